"""How a state file reads: JSON as people edit it, validated against its model, with the line,
column and field of what is wrong; and the three-way merge of a person's edit (pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from multibot.errors import StateError

M = TypeVar("M", bound=BaseModel)

# A state file bigger than this is refused unread, as the bus refuses a big message: every
# worker reads system-state.json in the loop that beats (a 50 MB edit cost every worker its
# heartbeat). 10,000 tasks make a system-state.json of about 3 MB.
MAX_STATE_BYTES = 8_000_000
_GONE = object()  # a key absent from one side of a merge


def dumps(data: Any) -> bytes:
    """Render JSON data the way people edit it: field order kept, indent 2, trailing newline."""
    # pydantic's Rust encoder: with indent, json.dumps runs its pure-Python encoder, which was
    # most of the cost of writing a big state file. Same text, but for the spelling of some
    # floats (1e-07 there, 1e-7 here); non-finite floats stay Infinity and NaN, as there.
    try:
        return pydantic_core.to_json(data, indent=2, inf_nan_mode="constants") + b"\n"
    except pydantic_core.PydanticSerializationError:  # a lone surrogate cannot be UTF-8:
        return (json.dumps(data, indent=2) + "\n").encode()  # escape everything instead


def parse(path: Path, raw: bytes, model: type[M]) -> M:
    """Return raw validated as model, or raise StateError naming the line, column and field."""
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(path, too_large(len(raw)))
    try:
        text = raw.decode("utf-8-sig")  # some editors add a BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise StateError(path, f"not UTF-8 text ({e.reason})", line) from e
    try:
        json.loads(text)  # for the line and column of a syntax error, which pydantic lacks
    except json.JSONDecodeError as e:
        raise StateError(path, e.msg, e.lineno, e.colno) from e
    except (ValueError, RecursionError) as e:  # an absurdly long number or deep nesting
        raise StateError(path, f"unreadable JSON: {e}") from e
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        errors = e.errors()
        loc = errors[0]["loc"]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        field = ".".join(str(p) for p in loc) if loc else None
        at = _line_of(text, loc) if loc else 1  # no location: the document as a whole
        raise StateError(path, errors[0]["msg"] + more, at, None, field) from e


def validate_file(path: Path, model: type[BaseModel]) -> StateError | None:
    """Return what is wrong with the state file at path, or None if it is valid."""
    try:
        parse(path, path.read_bytes(), model)
    except FileNotFoundError:
        return StateError(path, "missing")
    except OSError as e:
        return StateError(path, f"unreadable: {e.strerror}")
    except StateError as e:
        return e
    return None


def too_large(size: int) -> str:
    return f"file too large: {size} bytes (max {MAX_STATE_BYTES})"


def validate_bytes(path: Path, raw: bytes, model: type[BaseModel]) -> StateError | None:
    """Return what is wrong with raw as the content of the state file at path, or None."""
    try:
        parse(path, raw, model)
    except StateError as e:
        return e
    return None


def merge3(base: Any, theirs: Any, ours: Any) -> Any:
    """Three-way merge of JSON values: the side that changed wins, theirs on a conflict."""
    if theirs == base:
        return ours
    if ours == base or not all(isinstance(v, dict) for v in (base, theirs, ours)):
        return theirs
    out: dict[str, Any] = {}
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        value = merge3(base.get(key, _GONE), theirs.get(key, _GONE), ours.get(key, _GONE))
        if value is not _GONE:
            out[key] = value
    return out


def _line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Return the line of the key at loc, found by searching for each key in turn."""
    pos, found = 0, False
    for part in loc:
        if isinstance(part, str):
            at = text.find(json.dumps(part, ensure_ascii=False), pos)
            if at < 0:
                break
            pos, found = at, True
    return text.count("\n", 0, pos) + 1 if found else None


def where(err: StateError) -> str:
    where = f"line {err.line}" if err.line else ""
    where += f" column {err.column}" if err.line and err.column else ""
    where += f"{', ' if where else ''}field {err.field}" if err.field else ""
    return f"{where}: " if where else ""
