"""Shared pytest fixtures."""

from __future__ import annotations

# --- claude_bin / fake_api fixtures (real Claude Code against a fake Messages API) ---------
import os as _os
from collections.abc import Callable as _Callable
from collections.abc import Iterator as _Iterator
from pathlib import Path as _Path

import pytest as _pytest
from fakeapi import FakeAPI as _FakeAPI
from fakeapi import claude_env as _claude_env

from tests.helpers import wait_until as _wait_until
from tests.rig import Rig as _Rig
from tests.rig import kill_under as _kill_under
from tests.rig import processes_under as _processes_under
from tests.rig import write_template as _write_template


@_pytest.fixture
def claude_bin() -> _Path:
    """The pinned Claude Code binary; skipped when absent, but a failure when CI is set."""
    env = _os.environ.get("MULTIBOT_CLAUDE_BIN")
    root = _Path(__file__).resolve().parent.parent
    path = _Path(env) if env else root / ".cache/claude-code/node_modules/.bin/claude"
    if not (path.is_file() and _os.access(path, _os.X_OK)):
        why = f"claude binary not found at {path} (npm install --prefix .cache/claude-code ...)"
        if _os.environ.get("CI"):
            _pytest.fail(why)
        _pytest.skip(why)
    return path


@_pytest.fixture
def fake_api() -> _Iterator[_FakeAPI]:
    """A started fake Messages API; set ``fake_api.respond`` to script the model."""
    fake = _FakeAPI().start()
    try:
        yield fake
    finally:
        fake.stop()


@_pytest.fixture
def make_rig(tmp_path: _Path) -> _Iterator[_Callable[..., _Rig]]:
    """Build a Rig for the claude backend; at the end no process of the test is left."""
    made: list[_Rig] = []

    def build(claude_bin: str, env: dict[str, str] | None = None) -> _Rig:
        rig = _Rig(tmp_path, backend="claude", env=env)
        _write_template(rig, claude_bin)
        made.append(rig)
        return rig

    yield build
    for rig in made:
        rig.close()
    _kill_under(tmp_path)  # the agents of killed workers, and their tools
    _wait_until(lambda: not _processes_under(tmp_path), timeout=10)


@_pytest.fixture
def rig(
    fake_api: _FakeAPI, make_rig: _Callable[..., _Rig], claude_bin: _Path, tmp_path: _Path
) -> _Rig:
    """A rig whose worker runs the real claude against the fake API, offline."""
    # fake_api comes first so that it is stopped last, after the workers.
    # Claude Code keeps per-project scratch files under $CLAUDE_CODE_TMPDIR (else /tmp): here.
    scratch = tmp_path / "claude" / "tmp"
    scratch.mkdir(parents=True, mode=0o700)
    env = {**_claude_env(fake_api, tmp_path / "claude"), "CLAUDE_CODE_TMPDIR": str(scratch)}
    return make_rig(str(claude_bin), env)


# --- end claude_bin / fake_api fixtures ---------------------------------------------------
