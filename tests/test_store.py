"""State files: broken, racing and stale hand edits, recovery, and locks, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
import store_child
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict
from store_child import Counter, inc

from multibot import store
from multibot.errors import LockTimeout, StateError, UnsafePath
from multibot.layout import backup_of, lock_of
from multibot.store import StateFile, dumps, validate_file

CHILD = Path(store_child.__file__)


class Worker(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["idle", "busy", "dead"] = "idle"
    task: str | None = None


class Team(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 0
    paused: bool = False
    workers: dict[str, Worker] = {}


def counter_file(path: Path) -> StateFile[Counter]:
    return StateFile(path, Counter, Counter, settle=())


def hand_save(path: Path, data: bytes | str, style: str = "rename") -> None:
    """Save as an editor would: a new file renamed over, or rewritten in place."""
    raw = data.encode() if isinstance(data, str) else data
    if style == "rename":
        tmp = path.with_name(path.name + ".swp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def set_notes(text: bytes, notes: list[str], **more: object) -> bytes:
    data = json.loads(text)
    data["notes"] = notes
    data.update(more)
    return dumps(data)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".prev", ".tmp")))


# -- basics -----------------------------------------------------------------------------------
def test_missing_file_gives_the_default_or_a_missing_error(tmp_path: Path) -> None:
    assert counter_file(tmp_path / "s.json").read() == Counter()
    with pytest.raises(StateError, match="missing"):
        StateFile(tmp_path / "s.json", Counter).read()
    with pytest.raises(TypeError, match="version"):
        StateFile(tmp_path / "t.json", Worker)


def test_update_writes_a_pretty_versioned_file_and_keeps_the_previous_as_backup(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "s.json"
    sf = counter_file(path)
    assert sf.update(inc) == Counter(version=1, count=1)
    assert sf.update(inc) == Counter(version=2, count=2)
    text = path.read_text()
    assert text == '{\n  "version": 2,\n  "count": 2,\n  "paused": false,\n  "notes": []\n}\n'
    assert Counter.model_validate_json(backup_of(path).read_bytes()).version == 1
    assert sf.update(lambda s: s).version == 2, "a no-op update writes nothing"
    assert leftovers(path.parent) == []
    assert counter_file(path).read() == Counter(version=2, count=2)


def test_shown_is_called_once_the_new_version_is_in_place_before_the_directory_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    seen: list[str] = []
    monkeypatch.setattr(store, "fsync_dir", lambda d: seen.append("dir synced"))

    def shown() -> None:
        seen.append(f"shown with count {Counter.model_validate_json(path.read_bytes()).count}")

    assert sf.update(inc, shown=shown).count == 2
    assert seen == ["shown with count 2", "dir synced"]
    # A refused update (a broken hand edit) shows nothing.
    hand_save(path, path.read_bytes()[:-5])
    with pytest.raises(StateError):
        sf.update(inc, shown=shown)
    assert seen == ["shown with count 2", "dir synced"]


def test_changed_sees_both_editor_styles_with_one_stat(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    for n, style in enumerate(["rename", "in-place", "rename", "in-place"], start=10):
        os.utime(path, ns=(1, 1))  # an old mtime: no racy same-tick rewrite to fear
        sf.read()
        assert not sf.changed()
        hand_save(path, set_notes(path.read_bytes(), [f"n{n}"], count=n), style)
        assert sf.changed()
        assert sf.read() == Counter(version=1, count=n, notes=[f"n{n}"])


# -- broken hand edits ------------------------------------------------------------------------
def test_invalid_json_keeps_the_last_good_state_and_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    good = sf.update(inc)
    broken = b'{\n  "version": 1,\n  "count": 5\n  "paused": true\n}\n'  # missing comma
    hand_save(path, broken)
    assert sf.read() == good
    problem = sf.problem()
    assert problem is not None and problem.path == path
    assert (problem.line, problem.column) == (4, 3)
    assert f"{path}:4:3" in str(problem)
    with pytest.raises(StateError):
        sf.update(inc)
    assert path.read_bytes() == broken, "a broken hand edit is never overwritten"
    assert sf.changed(), "a broken file is looked at again every tick"
    hand_save(path, broken.replace(b"5\n", b"5,\n"))
    assert sf.read() == Counter(version=1, count=5, paused=True)
    assert sf.problem() is None
    assert sf.update(inc) == Counter(version=2, count=6, paused=True), "fn applied on the fix"


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        ('{\n  "version": 1,\n  "coutn": 3\n}\n', "coutn", 3),
        ('{\n  "version": 1,\n  "paused": false,\n  "count": "many"\n}\n', "count", 4),
        ('{\n  "version": 1,\n  "notes": ["a", 7]\n}\n', "notes.1", 3),
    ],
)
def test_schema_errors_name_the_field_and_its_line(
    tmp_path: Path, text: str, field: str, line: int
) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    good = sf.update(inc)
    hand_save(path, text)
    assert sf.read() == good
    problem = sf.problem()
    assert problem is not None
    assert (problem.field, problem.line) == (field, line)
    assert str(validate_file(path, Counter)) == str(problem)


def test_nested_field_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / "team.json"
    sf = StateFile(path, Team, Team)
    sf.update(lambda t: t.model_copy(update={"workers": {"w1": Worker(), "w2": Worker()}}))
    text = path.read_text()
    at = text.rindex('"idle"')  # w2's status
    hand_save(path, text[:at] + '"bsy"' + text[at + len('"idle"') :])
    w2_status = text.count("\n", 0, at) + 1
    sf.read()
    problem = sf.problem()
    assert problem is not None
    assert problem.field == "workers.w2.status"
    assert problem.line == w2_status
    assert "workers.w2.status" in str(problem)


def test_a_half_written_file_is_never_acted_upon(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    good = sf.update(inc)
    new = set_notes(path.read_bytes(), ["typed"], paused=True)
    with open(path, "wb") as f:  # an in-place save caught half-way
        f.write(new[: len(new) // 2])
        f.flush()
        assert sf.read() == good and sf.problem() is not None
        with pytest.raises(StateError):
            sf.update(inc)
        assert path.read_bytes() == new[: len(new) // 2]
        f.write(new[len(new) // 2 :])
    assert sf.read() == Counter(version=1, count=1, paused=True, notes=["typed"])


def test_a_broken_file_with_no_memory_falls_back_to_the_backup(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    counter_file(path).update(inc)
    counter_file(path).update(inc)
    hand_save(path, b"{ nope")
    fresh = counter_file(path)
    assert fresh.read() == Counter(version=1, count=1)
    assert fresh.problem() is not None
    backup_of(path).unlink()
    with pytest.raises(StateError):
        counter_file(path).read()


# -- hand edits racing system writes --------------------------------------------------------------
def test_an_edit_of_an_older_copy_keeps_the_systems_later_changes(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    opened = path.read_bytes()  # the person opens the file in an editor at version 1
    sf.update(inc)
    sf.update(inc)
    hand_save(path, set_notes(opened, ["from the person"], paused=True))
    assert sf.read() == Counter(version=3, count=3, paused=True, notes=["from the person"])
    assert sf.update(inc) == Counter(version=4, count=4, paused=True, notes=["from the person"])
    # A field both changed: the person wins.
    opened = path.read_bytes()
    sf.update(inc)
    hand_save(path, set_notes(opened, [], count=100))
    assert sf.read() == Counter(version=5, count=100, paused=True, notes=[])


@pytest.mark.parametrize("style", ["rename", "in-place"])
def test_an_edit_between_read_and_write_is_taken_in_not_lost(tmp_path: Path, style: str) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    calls: list[Counter] = []

    def inc_while_person_saves(state: Counter) -> Counter:
        calls.append(state)
        if len(calls) == 1:  # the person saves after our read, before our write
            hand_save(path, set_notes(path.read_bytes(), ["mine"]), style)
        return inc(state)

    assert sf.update(inc_while_person_saves) == Counter(version=2, count=2, notes=["mine"])
    assert len(calls) == 2, "the update was redone on top of the edit"
    assert counter_file(path).read() == Counter(version=2, count=2, notes=["mine"])
    assert leftovers(tmp_path) == []


def test_a_broken_edit_between_read_and_write_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    broken = set_notes(path.read_bytes(), ["half"])[:-5]

    def inc_while_person_breaks_it(state: Counter) -> Counter:
        if path.read_bytes() != broken:
            hand_save(path, broken)
        return inc(state)

    with pytest.raises(StateError):
        sf.update(inc_while_person_breaks_it)
    assert path.read_bytes() == broken
    assert sf.read() == Counter(version=1, count=1)
    hand_save(path, broken + b"]\n}\n")
    assert sf.update(inc) == Counter(version=2, count=2, notes=["half"])


def test_an_editor_creating_the_file_while_it_is_away_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    edited = set_notes(path.read_bytes(), ["created"])
    real_link = os.link
    raced: list[bool] = []

    def link_after_an_editor(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.endswith(".tmp") and not raced:  # an editor saves between rename and link
            raced.append(True)
            hand_save(path, edited, "in-place")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_an_editor)
    assert sf.update(inc) == Counter(version=2, count=2, notes=["created"])
    assert raced


def test_a_late_save_into_the_old_inode_is_taken_in(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    fds: list[int] = []

    def inc_while_an_editor_opens(state: Counter) -> Counter:
        if not fds:  # opened before our rename, written after it: lands in what becomes .bak
            fds.append(os.open(path, os.O_WRONLY))
        return inc(state)

    sf.update(inc_while_an_editor_opens)
    late = set_notes(dumps(Counter(version=1, count=1).model_dump()), ["late"])
    os.ftruncate(fds[0], 0)
    os.pwrite(fds[0], late, 0)
    os.close(fds[0])
    assert sf.update(inc) == Counter(version=3, count=3, notes=["late"])


def test_changed_after_our_own_write_reads_nothing_until_a_late_save_arrives(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    fds: list[int] = []

    def inc_while_an_editor_opens(state: Counter) -> Counter:
        if not fds:
            fds.append(os.open(path, os.O_WRONLY))
        return inc(state)

    sf.update(inc_while_an_editor_opens)
    os.utime(path, ns=(1, 1))  # an old file time: not a racy stat
    assert sf.read() == Counter(version=2, count=2)
    # The previous version's inode is still watched for a late save, but none came.
    assert not sf.changed()
    late = set_notes(dumps(Counter(version=1, count=1).model_dump()), ["late"])
    os.ftruncate(fds[0], 0)
    os.pwrite(fds[0], late, 0)
    os.close(fds[0])
    assert sf.changed()
    assert sf.read().notes == ["late"]  # taken in, as a read does


def test_a_late_save_is_taken_in_by_the_next_read_or_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sf = counter_file(path)
    sf.update(inc)
    for n in (1, 2):
        fd = os.open(path, os.O_WRONLY)  # an editor opens the file...
        sf.update(inc)  # ...the system writes...
        late = set_notes(dumps(sf.read().model_dump()), [f"late{n}"], version=1 + n)
        os.pwrite(fd, late, 0)  # ...and the save lands in the inode that is now .bak
        os.close(fd)
        if n == 1:
            assert sf.changed()
            assert sf.read().notes == ["late1"], "read() takes it in (writing it)"
            assert Counter.model_validate_json(path.read_bytes()).notes == ["late1"]
    sf.close()  # stop watching: a late save not yet taken in is kept, and reported once
    problem = sf.problem()
    assert problem is not None and "too late" in str(problem)
    kept = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and b"late2" in kept[0].read_bytes() and str(kept[0]) in str(problem)
    assert sf.problem() is None


def test_a_reader_during_a_write_sees_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    counter_file(path).update(inc)
    os.rename(path, path.with_name("s.json.prev"))  # a writer between its rename and its link
    reader = counter_file(path)
    assert reader.read() == Counter(version=1, count=1)
    assert reader.problem() is None
    # ... and if that writer was killed there, the next update puts the file back first.
    assert counter_file(path).update(inc) == Counter(version=2, count=2)
    assert leftovers(tmp_path) == []


# -- recovery at start-up ---------------------------------------------------------------------
def test_recover_restores_a_truncated_file_from_its_backup_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "system-state.json"
    for _ in range(3):
        counter_file(path).update(inc)
    truncated = path.read_bytes()[:20]
    path.write_bytes(truncated)
    sf = counter_file(path)
    said = sf.recover()
    assert said is not None
    assert str(path) in said and "corrupt" in said and "line 3" in said
    assert "restored version 2 from system-state.json.bak" in said
    assert sf.read() == Counter(version=2, count=2) and sf.problem() is None
    kept = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert [p.read_bytes() for p in kept] == [truncated], "what was there is kept"
    assert kept[0].name in said
    assert counter_file(path).recover() is None
    assert sf.update(inc).count == 3


def test_recover_with_no_usable_backup_fails_and_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b'{"version": 1, "count": ')
    with pytest.raises(StateError, match="no backup"):
        counter_file(path).recover()
    backup_of(path).write_bytes(b"garbage")
    with pytest.raises(StateError, match="backup unusable"):
        counter_file(path).recover()
    assert path.read_bytes() == b'{"version": 1, "count": '


def test_recover_finishes_a_write_killed_between_rename_and_link(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    counter_file(path).update(inc)
    os.rename(path, path.with_name("s.json.prev"))
    said = counter_file(path).recover()
    assert said is not None and "interrupted" in said
    assert counter_file(path).read() == Counter(version=1, count=1)
    assert leftovers(tmp_path) == []


def test_validate_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    err = validate_file(path, Counter)
    assert err is not None and "missing" in str(err)
    path.write_bytes(dumps({"version": 3, "count": 1}))
    assert validate_file(path, Counter) is None
    path.write_bytes(b"\xff\xfe{}")
    err = validate_file(path, Counter)
    assert err is not None and err.line == 1


# -- property tests: arbitrary hand edits -----------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
NEAR = st.fixed_dictionaries(
    {},
    optional={
        "version": st.integers(-2, 3) | JSON,
        "count": st.integers() | JSON,
        "paused": st.booleans() | JSON,
        "notes": st.lists(st.text(max_size=5), max_size=3) | JSON,
        "cuont": JSON,
    },
)
GOOD = dumps({"version": 1, "count": 7, "paused": False, "notes": ["a", "b"]})


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid state with one typo: truncated, a byte dropped/inserted/changed, or a key bent."""
    raw = GOOD
    kind = draw(st.sampled_from(["truncate", "drop", "insert", "replace", "key"]))
    at = draw(st.integers(0, len(raw) - 1))
    if kind == "truncate":
        return raw[:at]
    if kind == "drop":
        return raw[:at] + raw[at + 1 :]
    byte = bytes([draw(st.integers(0, 255))])
    if kind == "insert":
        return raw[:at] + byte + raw[at:]
    if kind == "replace":
        return raw[:at] + byte + raw[at + 1 :]
    key = draw(st.sampled_from([b'"version"', b'"count"', b'"paused"', b'"notes"']))
    return raw.replace(key, key[:2] + key[3:] if len(key) > 3 else key, 1)


@pytest.fixture
def scratch() -> Iterator[Callable[[], Path]]:
    """A fresh folder per hypothesis example (tmp_path is shared between examples)."""
    folders: list[tempfile.TemporaryDirectory[str]] = []

    def make() -> Path:
        folders.append(tempfile.TemporaryDirectory())
        return Path(folders[-1].name)

    yield make
    for folder in folders:
        folder.cleanup()


def check_hand_edit(folder: Path, edit: bytes) -> None:
    path = folder / "s.json"
    path.write_bytes(GOOD)
    sf = counter_file(path)
    good = sf.read()
    for style in ("rename", "in-place"):
        hand_save(path, edit, style)
        try:
            expected: Counter | None = Counter.model_validate_json(edit.decode("utf-8-sig"))
        except ValueError:
            expected = None
        got = sf.read()
        problem = sf.problem()
        if expected is not None:
            assert got == expected and problem is None
            continue
        assert got == good, "the last good state stays in force"
        assert problem is not None and problem.path == path and str(path) in str(problem)
        try:
            json.loads(edit.decode("utf-8-sig"))
        except ValueError:
            assert problem.line is not None  # a syntax error is placed
        else:
            assert problem.field is not None or problem.line == 1  # a schema error is named
        with pytest.raises(StateError):
            sf.update(inc)
        assert path.read_bytes() == edit, "never overwritten"
    fixed = dumps({"version": 10, "count": 99})  # above any version the edit may have set
    hand_save(path, fixed)
    assert sf.read() == Counter(version=10, count=99) and sf.problem() is None


PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(edit=st.binary(max_size=120))
def test_random_bytes_never_crash_and_keep_the_last_good_state(
    scratch: Callable[[], Path], edit: bytes
) -> None:
    check_hand_edit(scratch(), edit)


@PROPERTY
@given(value=JSON | NEAR)
def test_random_json_never_crashes_and_keeps_the_last_good_state(
    scratch: Callable[[], Path], value: object
) -> None:
    check_hand_edit(scratch(), dumps(value))


@PROPERTY
@given(edit=mutations())
def test_typos_in_a_valid_state_never_crash_and_are_located(
    scratch: Callable[[], Path], edit: bytes
) -> None:
    check_hand_edit(scratch(), edit)


# -- real processes ---------------------------------------------------------------------------
def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes to kill at the end of the test, whatever happened."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_system_writes_and_hand_edits_at_the_same_time_lose_nothing(
    tmp_path: Path, reap: list[subprocess.Popen[str]]
) -> None:
    path, flag = tmp_path / "s.json", tmp_path / "editor-done"
    counter_file(path).update(lambda s: s)
    increments, edits = 300, 150
    system = child("count", str(path), str(increments), str(flag))
    editor = child("edit", str(path), str(edits), "hand")
    reap += [system, editor]
    _, err = editor.communicate(timeout=120)
    assert editor.returncode == 0, err
    flag.touch()
    _, err = system.communicate(timeout=120)
    assert system.returncode == 0, err
    final = counter_file(path).read()
    assert final.count == increments, "every system increment counted"
    assert sorted(final.notes) == sorted(f"hand-{i}" for i in range(edits)), "every edit kept"
    assert leftovers(tmp_path) == []


def test_two_system_writers_never_lose_an_update(
    tmp_path: Path, reap: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "s.json"
    writers = [child("count", str(path), "150") for _ in range(2)]
    reap += writers
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert counter_file(path).read().count == 300


def test_a_lock_holder_killed_with_sigkill_frees_the_lock_at_once(
    tmp_path: Path, reap: list[subprocess.Popen[str]]
) -> None:
    path, ready = tmp_path / "s.json", tmp_path / "ready"
    holder = child("hold", str(path), str(ready))
    reap.append(holder)
    wait_until(ready.exists, timeout=30)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    now = StateFile(path, Counter, Counter, lock_timeout=0)  # one try, no waiting
    assert now.update(inc) == Counter(version=1, count=1)


def test_a_hanging_lock_holder_times_out_others_naming_it(
    tmp_path: Path, reap: list[subprocess.Popen[str]]
) -> None:
    path, ready = tmp_path / "s.json", tmp_path / "ready"
    counter_file(path).update(inc)
    holder = child("hold", str(path), str(ready))
    reap.append(holder)
    wait_until(ready.exists, timeout=30)
    waiting = StateFile(path, Counter, Counter, lock_timeout=0.2)
    with pytest.raises(LockTimeout) as caught:
        waiting.update(inc)
    assert caught.value.holder is not None
    assert f"pid {holder.pid}" in caught.value.holder and "store_child.py hold" in str(caught.value)
    assert waiting.read() == Counter(version=1, count=1), "reading needs no lock"
    holder.kill()
    holder.wait(timeout=10)
    assert waiting.update(inc) == Counter(version=2, count=2)


def test_an_oversized_file_is_refused_unread_and_the_last_good_state_stays(
    tmp_path: Path,
) -> None:
    """Issue 20 item 4: a 50 MB hand edit of system-state.json was read and parsed by every
    worker in the loop that beats, and every one missed its heartbeat."""
    from multibot.state import SystemState

    path = tmp_path / "system-state.json"
    f = store.StateFile(path, SystemState, default=SystemState)
    f.update(lambda s: s.model_copy(update={"goal": "the real goal"}))
    huge = json.loads(path.read_text())
    huge["goal"] = "x" * (store.MAX_STATE_BYTES + 1)  # valid, only too big
    path.write_text(json.dumps(huge))
    assert f.changed()
    assert f.read().goal == "the real goal"
    problem = f.problem()
    assert problem is not None and "file too large" in str(problem)
    with pytest.raises(StateError, match="file too large"):
        f.update(lambda s: s)
    assert store.validate_file(path, SystemState) is not None


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    path, precious = tmp_path / "s.json", tmp_path / "precious.txt"
    precious.write_text("the user's file\n")
    lock_of(path).symlink_to(precious)
    with pytest.raises(UnsafePath, match=r"s\.json\.lock is a symbolic link"):
        counter_file(path).update(inc)
    assert precious.read_text() == "the user's file\n"
