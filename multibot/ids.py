"""Validation of identifiers before they touch a path, git or tmux."""

from __future__ import annotations

import re
from pathlib import Path

from multibot.errors import InvalidId

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_BRANCH_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_id(value: str, kind: str = "id") -> str:
    """Return value if it is a safe id: lowercase letters, digits, '-' and '_', 1-63 chars."""
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidId(
            kind, value, "use 1-63 lowercase letters, digits, '-' or '_', starting alphanumeric"
        )
    return value


def check_branch(value: str) -> str:
    """Return value if it is a safe git branch name (no '..', no option-like or odd chars)."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise InvalidId("branch", value, "must be 1-200 characters")
    parts = value.split("/")
    for part in parts:
        if not _BRANCH_PART.match(part) or part.endswith((".lock", ".")) or ".." in part:
            raise InvalidId(
                "branch", value, "each part must be letters, digits, '.', '_' or '-' (no '..')"
            )
    return value


def check_relpath(value: str, kind: str = "path") -> str:
    """Return value if it is a relative path (or glob) that stays inside its root."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidId(kind, value, "must be a non-empty path")
    p = Path(value)
    if p.is_absolute() or ".." in p.parts:
        raise InvalidId(kind, value, "must be relative and must not contain '..'")
    return value


def inside(root: Path, path: Path) -> Path:
    """Return path resolved, refusing anything that escapes root."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidId("path", str(path), f"escapes {root}")
    return resolved
