"""Identifiers from messages and files are checked before they touch a path, git or tmux."""

from __future__ import annotations

from pathlib import Path

import pytest

from multibot.errors import InvalidId
from multibot.ids import check_branch, check_id, check_relpath, inside
from multibot.layout import Home

HOSTILE = [
    "../etc",
    "a/b",
    "",
    "W1",
    "-rf",
    "a b",
    "x;rm -rf /",
    "$(reboot)",
    "a" * 64,
    "\x00",
    "é",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidId):
        check_id(value)


@pytest.mark.parametrize("value", ["w1", "t-3", "fix_db", "0"])
def test_plain_ids_pass(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize(
    "branch", ["a..b", "-x", "a/.b", "x.lock", "a b", "a;b", "a/", "/a", "a~1", "a^", "a:b", ""]
)
def test_hostile_branches_are_refused(branch: str) -> None:
    with pytest.raises(InvalidId):
        check_branch(branch)


def test_paths_stay_inside(tmp_path: Path) -> None:
    for bad in ["/etc/passwd", "../x", "a/../../x", ""]:
        with pytest.raises(InvalidId):
            check_relpath(bad)
    assert check_relpath("src/*.py") == "src/*.py"
    with pytest.raises(InvalidId):
        inside(tmp_path, tmp_path / ".." / "x")


def test_the_layout_refuses_hostile_ids(tmp_path: Path) -> None:
    home = Home(tmp_path)
    for build in (home.worker_state, home.inbox, home.worktree, home.task, home.question, home.log):
        with pytest.raises(InvalidId):
            build("../../etc")  # type: ignore[operator]
