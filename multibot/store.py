"""Atomic, locked, versioned JSON state files that a person may hand-edit while everything runs.

Files kept beside a state file ``X.json``:
  X.json               the state: the model's field order, indent 2, trailing newline
  X.json.bak           the previous valid version (layout.backup_of), for recover()
  X.json.lock          flock held only around a read-modify-write (layout.lock_of)
  X.json.lock.holder   "pid .. on host: command" of the last process to take the lock
  X.json.prev          exists only inside a write, or after a writer died inside one
  X.json.corrupt-<t>   bad content set aside, so nothing a person typed is lost
  .X.json.<unique>.tmp a new version being written

Models used here must have ``version: int``; every system write bumps it. A person editing the
file leaves it alone, so a valid file whose version is OLDER than the newest this object has
seen is an edit of an older copy: it is merged three-way (base = the copy the person started
from, kept in memory; theirs = the edit; ours = the newest system version). What the person
changed wins; the system's later changes to other fields are kept. With no known base the edit
simply wins. read() and update() both see the merged state; update() then writes it.

A StateFile object belongs to one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import filelock
from pydantic import BaseModel, ValidationError

from multibot.atomic import atomic_write, fsync_dir, unique_name, write_durable
from multibot.errors import LockTimeout, StateError
from multibot.layout import backup_of, lock_of

M = TypeVar("M", bound=BaseModel)

_HISTORY = 64  # versions remembered as merge bases for edits of older copies
_CYCLES = 20  # write attempts before giving up on a file that keeps changing under us
_SETTLE = (0.005, 0.01, 0.02, 0.05)  # waits for an in-place save to finish before refusing it
_RACY_NS = (
    50_000_000  # file clocks tick coarsely: a same-size rewrite this soon is invisible to stat
)
_GONE = object()  # a key absent from one side of a merge


def dumps(data: Any) -> bytes:
    """Render JSON data the way people edit it: field order kept, indent 2, trailing newline."""
    try:
        return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate cannot be UTF-8: escape everything instead
        return (json.dumps(data, indent=2) + "\n").encode()


def parse(path: Path, raw: bytes, model: type[M]) -> M:
    """Return raw validated as model, or raise StateError naming the line, column and field."""
    try:
        text = raw.decode("utf-8-sig")  # some editors add a BOM
    except UnicodeDecodeError as e:
        raise StateError(
            path, f"not UTF-8 text ({e.reason})", raw[: e.start].count(b"\n") + 1
        ) from e
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
        field = ".".join(str(p) for p in loc) or None
        raise StateError(path, errors[0]["msg"] + more, _line_of(text, loc), None, field) from e


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


class StateFile(Generic[M]):
    """One JSON state file bound to its model; see the module docstring for the rules."""

    def __init__(
        self,
        path: Path,
        model: type[M],
        default: Callable[[], M] | None = None,
        *,
        lock_timeout: float = 10.0,
        settle: tuple[float, ...] = _SETTLE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if "version" not in model.model_fields:
            raise TypeError(f"{model.__name__} needs a 'version: int' field to be a state file")
        self.path, self.model, self.default = path, model, default
        self.lock_timeout, self.settle, self._clock = lock_timeout, settle, clock
        self._lock = filelock.FileLock(str(lock_of(path)))
        self._good: M | None = None  # the last good state, in force while the file is broken
        self._problem: StateError | None = None
        self._stat: tuple[int, int, int] | None = None
        self._racy = True
        self._seen: dict[int, str] = {}  # version -> compact JSON, in increasing versions
        self._bak_expect: tuple[int, bytes] | None = None  # inode and bytes we left in .bak

    # -- reading -------------------------------------------------------------------------
    def read(self) -> M:
        """Return the state in force: the file if valid, else the last good state.

        A broken file never raises here: problem() then says what is wrong. Raises StateError
        only when there is no state at all (missing with no default, or broken with neither a
        last good state nor a valid backup). A missing file while a last good state exists (a
        person deleted it, or an editor is between delete and create) keeps that state.
        """
        try:
            loaded = self._load(with_prev=True)
        except StateError as err:
            return self._fallback(err)
        if loaded is None:
            self._stat, self._racy = None, False
            if self._good is not None:
                self._problem = StateError(self.path, "missing; keeping the last good state")
                return self._good
            self._problem = None
            return self._default()
        raw, st = loaded
        self._note_stat(st)
        try:
            state = self._effective(parse(self.path, raw, self.model))
        except StateError as err:
            return self._fallback(err)
        self._good, self._problem = state, None
        return state

    def problem(self) -> StateError | None:
        """Return what was wrong with the file at the last read or update, or None."""
        return self._problem

    def changed(self) -> bool:
        """Say with one stat whether the file may differ from what was last read or written."""
        if self._problem is not None or self._racy:
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._stat is not None
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self._stat

    # -- writing -------------------------------------------------------------------------
    def update(self, fn: Callable[[M], M]) -> M:
        """Apply fn to the state under the lock and write the result as the next version.

        fn may run more than once (when the file changes under us) and should be pure. Raises
        StateError without writing if the file holds an invalid hand edit (it stays exactly as
        the person left it), LockTimeout if another process holds the lock too long.
        """
        with self._locked():
            new = self._cycle(fn)
            if self._bak_changed() is not None:  # a late in-place save hit the old inode
                with contextlib.suppress(StateError):  # fn is written; the next update retries
                    new = self._cycle(_identity)
            return new

    def recover(self) -> str | None:
        """At start-up, restore a corrupt or truncated file from its backup; say what was done."""
        with self._locked():
            said = self._heal()
            tmp_prefix = f".{self.path.name}."
            for leftover in self.path.parent.glob(f"{tmp_prefix}*.tmp"):
                leftover.unlink(missing_ok=True)  # writers only make these under the lock we hold
            loaded = self._load(with_prev=False)
            if loaded is None:
                return said
            try:
                parse(self.path, loaded[0], self.model)
                return said
            except StateError as err:
                bad = err
            bak = backup_of(self.path)
            try:
                good_raw = bak.read_bytes()
                good = parse(bak, good_raw, self.model)
            except (OSError, StateError) as e:
                why = "no backup" if isinstance(e, FileNotFoundError) else f"backup unusable: {e}"
                problem = f"{bad.problem}; {why}"
                raise StateError(self.path, problem, bad.line, bad.column, bad.field) from e
            aside = self._aside()
            if not self._commit(loaded[0], good_raw, to_backup=False, aside=aside):
                raise StateError(self.path, "changed while being recovered; try again")
            self._record(good)
            self._good, self._problem = good, None
            return (
                f"{self.path} was corrupt ({_where(bad)}{bad.problem}); restored version "
                f"{_version(good)} from {bak.name}; the bad content is kept in {aside.name}"
            )

    # -- internals -----------------------------------------------------------------------
    def _cycle(self, fn: Callable[[M], M]) -> M:
        """Read, merge, apply fn and commit, again from the top if someone saved meanwhile."""
        for _ in range(_CYCLES):
            self._heal()
            late, late_problem = self._late_edit()
            raw, current = self._load_for_update()
            state = self._effective(current)
            if late is not None:
                state = self._merge_edit(late, _dump(state))
            result = fn(state)
            if raw is not None and result == state and raw == _render(state):
                new = state  # nothing to change: don't churn versions
                if late is not None:
                    self._bak_expect = None  # its content is what the file holds already
            else:
                new = self._next_version(result, state)
                if not self._commit(raw, _render(new), to_backup=True):
                    continue
            self._record(new)
            self._good, self._problem = new, late_problem
            with contextlib.suppress(FileNotFoundError):
                self._note_stat(os.stat(self.path))
            return new
        raise StateError(self.path, f"kept changing during update; gave up after {_CYCLES} tries")

    def _commit(
        self, base: bytes | None, data: bytes, *, to_backup: bool, aside: Path | None = None
    ) -> bool:
        """Replace the file by data if it still holds base; False if someone saved meanwhile.

        (1) rename the file to .prev: this captures whatever is there at this instant, and no
        save can slip in unseen between our check and our replace; (2) compare .prev with the
        bytes we based the update on, and put a newer save back untouched; (3) link the new
        file in: unlike rename, link refuses to replace a file an editor created meanwhile.
        Remaining window: an in-place editor that opened the file before (1) and writes after
        it writes into the old inode, which becomes .bak; update() compares .bak with what we
        put there, before and after each write, and merges such a late save. Only a save that
        reaches the old inode after the NEXT write replaced .bak would be lost.
        """
        path, prev = self.path, _prev_of(self.path)
        tmp = path.with_name(f".{path.name}.{unique_name()}.tmp")
        write_durable(tmp, data)
        try:
            try:
                os.rename(path, prev)
                captured: bytes | None = prev.read_bytes()
            except FileNotFoundError:
                captured = None
            if captured != base:
                if captured is not None:
                    self._put_back()
                return False
            try:
                os.link(tmp, path)
            except FileExistsError:  # an editor created the file while it was away: it wins
                linked = False
            else:
                linked = True
                fsync_dir(path.parent)
            if captured is not None:
                keep = backup_of(path) if to_backup else (aside or self._aside())
                ino = os.stat(prev).st_ino
                os.replace(prev, keep)
                if to_backup:
                    self._bak_expect = (ino, captured)
            return linked
        finally:
            tmp.unlink(missing_ok=True)

    def _put_back(self) -> None:
        """Return a save captured in .prev to its place (unless an even newer one is there)."""
        prev = _prev_of(self.path)
        with contextlib.suppress(FileExistsError):
            os.link(prev, self.path)
        prev.unlink()

    def _heal(self) -> str | None:
        """Finish what a writer killed inside _commit left: .prev goes back, or to the backup."""
        prev = _prev_of(self.path)
        try:
            os.link(prev, self.path)
        except FileNotFoundError:
            return None  # no .prev: nothing was interrupted
        except FileExistsError:
            if os.path.samefile(prev, self.path):  # killed inside _put_back
                prev.unlink()
                return None
            raw = prev.read_bytes()  # killed after the new version was in: .prev is the old one
            valid = validate_bytes(self.path, raw, self.model) is None
            os.replace(prev, backup_of(self.path) if valid else self._aside())
            return None
        prev.unlink()
        return f"{self.path} was missing after an interrupted write; put the previous file back"

    def _late_edit(self) -> tuple[M | None, StateError | None]:
        """Return a save that landed in .bak's inode after we moved it there, or its problem."""
        for wait in (*self.settle, None):
            raw = self._bak_changed()
            if raw is None:
                return None, None
            try:
                return parse(backup_of(self.path), raw, self.model), None
            except StateError as err:
                if wait is None:  # keep it where the person can find it, and say so
                    aside = self._aside()
                    os.replace(backup_of(self.path), aside)
                    self._bak_expect = None
                    why = f"a save that raced a system write is invalid ({err.problem}); "
                    why += f"kept in {aside.name}, not applied"
                    return None, StateError(self.path, why, err.line, err.column, err.field)
                time.sleep(wait)
        return None, None

    def _bak_changed(self) -> bytes | None:
        """Return .bak's bytes if its inode is the one we left there but its content changed."""
        if self._bak_expect is None:
            return None
        ino, expected = self._bak_expect
        try:
            with open(backup_of(self.path), "rb") as f:
                if os.fstat(f.fileno()).st_ino != ino:
                    return None
                raw = f.read()
        except FileNotFoundError:
            return None
        return None if raw == expected else raw

    def _load(self, *, with_prev: bool) -> tuple[bytes, os.stat_result] | None:
        """Return the file's bytes and stat, or None if it is missing."""
        # Inside a write only .prev exists for an instant; the writer may finish between our two
        # opens (then the file is back), so go round a few times before calling it missing.
        names = (self.path, _prev_of(self.path)) if with_prev else (self.path,)
        for _ in range(3 if with_prev else 1):
            for name in names:
                try:
                    with open(name, "rb") as f:
                        st = os.fstat(f.fileno())  # before reading: a later write then shows
                        return f.read(), st
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise StateError(self.path, f"unreadable: {e.strerror}") from e
        return None

    def _load_for_update(self) -> tuple[bytes | None, M]:
        """Return the bytes and state an update starts from; refuse a broken hand edit."""
        for wait in (*self.settle, None):
            loaded = self._load(with_prev=False)
            if loaded is None:
                return None, self._good if self._good is not None else self._default()
            try:
                return loaded[0], parse(self.path, loaded[0], self.model)
            except StateError as err:
                if wait is None:
                    self._problem = err
                    raise
                time.sleep(wait)  # perhaps an editor caught between truncate and write
        raise AssertionError("unreachable")

    def _fallback(self, err: StateError) -> M:
        """Record err and return the last good state: from memory, else from the backup."""
        self._problem = err
        if self._good is None:
            try:
                good = parse(backup_of(self.path), backup_of(self.path).read_bytes(), self.model)
            except (OSError, StateError):
                raise err from None
            self._record(good)
            self._good = good
        return self._good

    def _effective(self, disk: M) -> M:
        """Return disk, with the system's newer changes merged in if it edits an older copy."""
        latest = next(reversed(self._seen), None)
        if latest is None or _version(disk) > latest:
            self._record(disk)
            return disk
        return self._merge_edit(disk, json.loads(self._seen[latest]))

    def _merge_edit(self, edit: M, ours: dict[str, Any]) -> M:
        """Merge a person's edit of an older version onto ours; the person wins conflicts."""
        base = self._seen.get(_version(edit))
        if base is None or ours["version"] <= _version(edit):
            return edit
        merged = _merge3(json.loads(base), _dump(edit), ours)
        try:
            return self.model.model_validate_json(json.dumps(merged))
        except ValidationError:
            return edit

    def _record(self, state: M) -> None:
        """Remember a new highest version as a base for merging later edits of it."""
        latest = next(reversed(self._seen), None)
        if latest is None or _version(state) > latest:
            self._seen[_version(state)] = state.model_dump_json()
            while len(self._seen) > _HISTORY:
                del self._seen[next(iter(self._seen))]

    def _next_version(self, new: M, old: M) -> M:
        """Return new, validated, with version one above anything seen."""
        data = new.model_dump(mode="json")
        data["version"] = max(_version(old), next(reversed(self._seen), 0)) + 1
        return parse(self.path, dumps(data), self.model)

    def _note_stat(self, st: os.stat_result) -> None:
        self._stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._racy = st.st_mtime_ns >= time.time_ns() - _RACY_NS

    def _default(self) -> M:
        if self.default is None:
            raise StateError(self.path, "missing")
        return self.default()

    def _aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}"), 1
        while aside.exists():
            aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}"), n + 1
        return aside

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock around one read-modify-write; name the holder if it takes too long."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = _holder_of(self.path)
        try:
            self._lock.acquire(timeout=self.lock_timeout)
        except filelock.Timeout as e:
            try:
                who: str | None = holder.read_text(errors="replace").strip() or None
            except OSError:
                who = None
            raise LockTimeout(lock_of(self.path), who, self.lock_timeout) from e
        try:
            # The flock dies with its holder (the kernel drops it), so this note can only name
            # a live holder or, for an instant after a release, the previous one.
            line = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}"
            atomic_write(holder, line.encode(errors="replace") + b"\n", fsync=False)
            yield
        finally:
            self._lock.release()


def validate_bytes(path: Path, raw: bytes, model: type[BaseModel]) -> StateError | None:
    """Return what is wrong with raw as the content of the state file at path, or None."""
    try:
        parse(path, raw, model)
    except StateError as e:
        return e
    return None


def _merge3(base: Any, theirs: Any, ours: Any) -> Any:
    """Three-way merge of JSON values: the side that changed wins, theirs on a conflict."""
    if theirs == base:
        return ours
    if ours == base or not all(isinstance(v, dict) for v in (base, theirs, ours)):
        return theirs
    out: dict[str, Any] = {}
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        value = _merge3(base.get(key, _GONE), theirs.get(key, _GONE), ours.get(key, _GONE))
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


def _version(state: BaseModel) -> int:
    return int(vars(state)["version"])


def _dump(state: BaseModel) -> dict[str, Any]:
    return state.model_dump(mode="json")


def _render(state: BaseModel) -> bytes:
    return dumps(_dump(state))


def _where(err: StateError) -> str:
    where = f"line {err.line}" if err.line else ""
    where += f" column {err.column}" if err.line and err.column else ""
    where += f"{', ' if where else ''}field {err.field}" if err.field else ""
    return f"{where}: " if where else ""


def _identity(state: M) -> M:
    return state


def _prev_of(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _holder_of(path: Path) -> Path:
    lock = lock_of(path)
    return lock.with_name(lock.name + ".holder")
