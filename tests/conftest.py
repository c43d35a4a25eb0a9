"""Shared pytest fixtures."""

from __future__ import annotations

# --- claude_bin / fake_api fixtures (real Claude Code against a fake Messages API) ---------
import os as _os
from collections.abc import Iterator as _Iterator
from pathlib import Path as _Path

import pytest as _pytest
from fakeapi import FakeAPI as _FakeAPI


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


# --- end claude_bin / fake_api fixtures ---------------------------------------------------
