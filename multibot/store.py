"""Atomic, locked, versioned JSON state files that a person may hand-edit while everything runs.

Beside a state file ``X.json`` live ``X.json.bak`` (the previous valid version, for recover()),
``X.json.lock`` (flock held only around a read-modify-write) and ``X.json.lock.holder`` (who
took it last, named on LockTimeout). ``X.json.prev`` exists only inside a write (or after a
writer died there), ``.X.json.<unique>.tmp`` is a version being written, and
``X.json.corrupt-<time>`` is bad content set aside so that nothing a person typed is lost.

The rules (RELIABILITY 10-14):
* read() never acts on a broken file: the last good state stays in force and problem() names
  the file, line, column and field. A half-written save is a broken file until it completes.
* update() never replaces bytes it has not read: a broken hand edit makes it refuse (the file
  stays exactly as the person left it); a valid one is taken in and fn applied on top.
* Models must have ``version: int``; every system write bumps it. People leave it alone, so a
  valid file whose version is OLDER than the newest this object has seen is an edit of an older
  copy. It is merged three-way (base = that copy, remembered here; theirs = the edit; ours =
  the newest version): what the person changed wins, the system's later changes to other fields
  stay. Without a remembered base (the versions in between came from another process, or this
  one started later) the edit wins whole.

A StateFile object belongs to one thread. Do not mutate what it returns in place and expect it
saved: pass a function to update().
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from multibot.atomic import (
    close_later,
    fsync_dir,
    unique_name,
    write_durable,
)
from multibot.errors import MultibotError, StateError, WriteFailed
from multibot.layout import backup_of
from multibot.stateformat import (
    MAX_STATE_BYTES,
    dumps,
    merge3,
    parse,
    too_large,
    validate_bytes,
    validate_file,
    where,
)
from multibot.statelock import StateLock

__all__ = [
    "MAX_STATE_BYTES",
    "StateFile",
    "dumps",
    "parse",
    "validate_bytes",
    "validate_file",
]

M = TypeVar("M", bound=BaseModel)

_HISTORY = 64  # versions remembered as merge bases for edits of older copies
_CYCLES = 20  # write attempts before giving up on a file that keeps changing under us
_SETTLE = (0.005, 0.01, 0.02, 0.05)  # waits for an in-place save to finish before refusing it
_RACY_NS = 50_000_000  # file clocks tick coarsely: a same-size rewrite this soon can hide
_WATCH_S, _WATCH_MAX = 5.0, 16  # how long, and how many, moved-away inodes stay watched


@dataclass
class _Moved:
    """An inode we renamed away from the path, kept open so a late save into it is seen."""

    fd: int
    seen: bytes
    until: float

    def absorb(self, data: bytes) -> None:
        self.seen = data

    def late(self) -> bytes | None:
        data = _read_fd(self.fd)
        return None if data == self.seen else data


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
        self._lock = StateLock(path, lock_timeout)
        self._good: str | bytes | None = None  # last good state as JSON, kept if the file breaks
        self._raw: bytes | None = None  # file content known to be valid and to give that state
        self._problem: StateError | None = None
        self._notices: list[StateError] = []  # saves we could not merge, reported once each
        self._stat: tuple[int, int, int] | None = None
        self._racy = True
        self._seen: dict[int, str | bytes] = {}  # version -> JSON, increasing: bases for merges
        self._moved: list[_Moved] = []

    def close(self) -> None:
        """Stop watching inodes moved away by our writes; the object stays usable."""
        while self._moved:
            self._drop(self._moved[0], at_once=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- reading -------------------------------------------------------------------------
    def read(self) -> M:
        """Return the state in force: the file if valid, else the last good state.

        A broken file never raises here: problem() says what is wrong. Raises StateError only
        when there is no state at all (missing with no default, or broken with neither a last
        good state nor a valid backup). A file gone missing while a last good state exists
        (deleted, or an editor between delete and create) keeps that state in force.
        """
        self.expire()
        if any(m.late() is not None for m in self._moved):  # a save raced our last write
            with contextlib.suppress(MultibotError):
                return self.update(_identity)
        try:
            loaded = self._load(with_prev=True)
        except StateError as err:
            return self._fallback(err)
        if loaded is None:
            self._stat, self._racy = None, False
            if self._good is not None:
                self._problem = StateError(self.path, "missing; keeping the last good state")
                return self.model.model_validate_json(self._good)
            self._problem = None
            return self._default()
        self._note_stat(loaded[1])
        if loaded[0] == self._raw:  # unchanged since we wrote or read it: nothing to merge
            self._problem = None
            return self._known(loaded[0])
        try:
            disk = parse(self.path, loaded[0], self.model)
            state = self._effective(disk)
        except StateError as err:
            return self._fallback(err)
        self._keep(state, loaded[0] if state is disk else None)
        self._problem = None
        return state

    def problem(self) -> StateError | None:
        """Return what is wrong with the file, else a save we had to set aside (each once)."""
        return self._problem or (self._notices.pop(0) if self._notices else None)

    def changed(self) -> bool:
        """Say cheaply (a stat, and a read of each inode our writes moved away in the last
        seconds) whether the file may differ from what was last read."""
        self.expire()
        if self._problem is not None or self._notices or self._racy:
            return True
        if any(m.late() is not None for m in self._moved):  # a save raced one of our writes
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._stat is not None
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self._stat

    # -- writing -------------------------------------------------------------------------
    def update(self, fn: Callable[[M], M], *, shown: Callable[[], None] | None = None) -> M:
        """Apply fn to the state under the lock and write the result as the next version.

        fn may run more than once (when the file changes under us) and should be pure. Raises
        StateError without writing if the file holds an invalid hand edit (left exactly as the
        person saved it), LockTimeout if another process holds the lock too long.

        shown, if given, is called once the new version is in place, its content synced but
        not yet the directory: the caller may act on it meanwhile (the master sends a task's
        assignment). A machine crash before the directory sync ends may undo the new name,
        but not before an action taken after it on a journaling file system, which commits
        metadata changes in the order they were made.
        """
        try:
            with self._lock.held():
                new = self._cycle(fn, shown)
                if any(m.late() is not None for m in self._moved):  # a save hit the old inode
                    with contextlib.suppress(StateError):  # fn is written; the next retries
                        new = self._cycle(_identity)
                return new
        except OSError as exc:  # a full disk: the caller keeps its state and tries again
            raise WriteFailed(self.path, f"cannot write: {exc.strerror or exc}") from exc

    def recover(self) -> str | None:
        """At start-up, restore a corrupt or truncated file from its backup; say what was done."""
        with self._lock.held():
            said = self._heal()
            for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)  # made only under the lock, which we hold
            loaded = self._load(with_prev=False)
            bad = None if loaded is None else validate_bytes(self.path, loaded[0], self.model)
            if loaded is None or bad is None:
                return said
            bak = backup_of(self.path)
            try:
                good_raw = bak.read_bytes()
                good = parse(bak, good_raw, self.model)
            except (OSError, StateError) as e:
                why = "no backup" if isinstance(e, FileNotFoundError) else f"backup unusable: {e}"
                problem = f"{bad.problem}; {why}"
                raise StateError(self.path, problem, bad.line, bad.column, bad.field) from e
            aside = self._aside()
            if not self._commit(loaded[0], good_raw, aside=aside):
                raise StateError(self.path, "changed while being recovered; try again")
            self._keep(good, None)  # (an older version than we saw: read() merges onto it)
            self._problem = None
            return (
                f"{self.path} was corrupt ({where(bad)}{bad.problem}); restored version "
                f"{_version(good)} from {bak.name}; the bad content is kept in {aside.name}"
            )

    # -- internals -----------------------------------------------------------------------
    def _cycle(self, fn: Callable[[M], M], shown: Callable[[], None] | None = None) -> M:
        """Read, merge, apply fn and commit; from the top again if someone saved meanwhile."""
        for _ in range(_CYCLES):
            self._heal()
            self.expire()
            late, late_problem = self._late_edits()
            raw, current = self._load_for_update()
            state = self._effective(current, [edit for _moved, _data, edit in late])
            result = fn(state)
            data = _dump(result)
            if raw is not None and dumps(data) == raw:
                new, written, text = result, raw, None  # nothing would change: no new version
            else:
                new, written = self._next_version(data, state)
                if not self._commit(raw, written, shown=shown):
                    continue
                text = written  # new's JSON, as parsed to make new: no need to render it again
            for moved, seen, _edit in late:
                moved.absorb(seen)
            self._keep(new, written, text)
            self._problem = late_problem
            with contextlib.suppress(FileNotFoundError):
                self._note_stat(os.stat(self.path))
            return new
        raise StateError(self.path, f"kept changing during update; gave up after {_CYCLES} tries")

    def _commit(
        self,
        base: bytes | None,
        data: bytes,
        *,
        aside: Path | None = None,
        shown: Callable[[], None] | None = None,
    ) -> bool:
        """Replace the file by data if it still holds base; False if someone saved meanwhile.

        (1) Rename the file to .prev: this captures whatever is there at this instant, so no
        save slips in unseen between our check and our replace. (2) Compare .prev with the
        bytes we based the update on; put a newer save back untouched. (3) Link the new file
        in: unlike rename, link refuses to replace a file an editor created meanwhile.
        What remains: an editor that opened the file before (1) without truncating and
        writes after it writes into the old inode (now .bak). We keep that inode open and
        compare it with what we saw, at every read and update, and merge such a late save; a
        save reaching it after _WATCH_S (or after _WATCH_MAX later writes) is set aside as
        .corrupt-<time> and reported by problem(): kept, but not applied.
        """
        path, prev = self.path, _prev_of(self.path)
        tmp = path.with_name(f".{path.name}.{unique_name()}.tmp")
        write_durable(tmp, data)
        fd, captured = -1, None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, prev)
                fd = os.open(prev, os.O_RDONLY)
                captured = _read_fd(fd)
            if captured != base:
                if captured is not None:
                    self._put_back(fd)
                return False
            try:
                os.link(tmp, path)
            except FileExistsError:  # an editor created the file while it was away: it wins
                linked = False
            else:
                linked = True
                if shown is not None:
                    shown()
                fsync_dir(path.parent)
            if captured is not None:
                target = aside or backup_of(path)
                try:  # held, so the version it replaces is freed by close_later, not here
                    held = os.open(target, os.O_RDONLY)
                except OSError:
                    held = -1
                os.replace(prev, target)
                if held >= 0:
                    close_later(held)
                if aside is None:
                    self._watch(fd, captured)
                    fd = -1
            return linked
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)

    def _put_back(self, fd: int) -> None:
        """Return a save captured in .prev to its place, unless an even newer one is there."""
        prev = _prev_of(self.path)
        try:
            os.link(prev, self.path)
        except FileExistsError:
            self._watch(os.dup(fd), b"")  # superseded at once: merge it as a late save
        prev.unlink()

    def _heal(self) -> str | None:
        """Finish what a writer killed inside _commit left: .prev goes back, or to the backup."""
        prev = _prev_of(self.path)
        try:
            os.link(prev, self.path)
        except FileNotFoundError:
            return None  # no .prev: nothing was interrupted
        except FileExistsError:
            if not os.path.samefile(prev, self.path):  # .prev is the version before the file
                ok = validate_bytes(self.path, prev.read_bytes(), self.model) is None
                os.replace(prev, backup_of(self.path) if ok else self._aside())
                return None
        else:
            prev.unlink()
            return f"{self.path} was missing after an interrupted write; put the previous back"
        prev.unlink()  # killed inside _put_back: both names are the same file
        return None

    def _watch(self, fd: int, seen: bytes) -> None:
        self._moved.append(_Moved(fd, seen, time.monotonic() + _WATCH_S))
        while len(self._moved) > _WATCH_MAX:
            self._drop(self._moved[0])

    def expire(self) -> None:
        """Stop watching the moved-away inodes whose time is up (read() and update() do too)."""
        if not self._moved:
            return
        now = time.monotonic()
        for moved in [m for m in self._moved if m.until < now]:
            self._drop(moved)

    def _drop(self, moved: _Moved, *, at_once: bool = False) -> None:
        """Stop watching an inode; a late save still in it is set aside and reported.

        Its handle is closed by close_later (it is often the last one of an old version) unless
        at_once: close() may run at interpreter exit, when no thread can start.
        """
        self._moved.remove(moved)
        try:
            data = moved.late()
            if data is not None:
                aside = self._aside()
                write_durable(aside, data)
                why = f"a save that raced a system write came too late to merge; kept in {aside}"
                self._notices.append(StateError(self.path, why))
        finally:
            if at_once:
                os.close(moved.fd)
            else:
                close_later(moved.fd)

    def _late_edits(self) -> tuple[list[tuple[_Moved, bytes, M]], StateError | None]:
        """Return valid saves that reached inodes we moved away, and what is wrong with others."""
        for wait in (*self.settle, None):
            found: list[tuple[_Moved, bytes, M]] = []
            broken: list[tuple[_Moved, bytes, StateError]] = []
            for moved in self._moved:
                if (data := moved.late()) is not None:
                    try:
                        found.append((moved, data, parse(self.path, data, self.model)))
                    except StateError as err:
                        broken.append((moved, data, err))
            if not broken or wait is None:
                break
            time.sleep(wait)  # perhaps caught half-way through its write
        problem = None
        for moved, data, bad in broken:
            aside = self._aside()
            write_durable(aside, data)
            moved.absorb(data)
            why = f"a save that raced a system write is invalid ({bad.problem}); kept in {aside}"
            problem = StateError(self.path, why, bad.line, bad.column, bad.field)
        return found, problem

    def _load(self, *, with_prev: bool) -> tuple[bytes, os.stat_result] | None:
        """Return the file's bytes and stat, or None if it is missing."""
        # Inside a write only .prev exists for an instant; the writer may finish between our
        # two opens (then the file is back), so go round a few times before calling it missing.
        names = (self.path, _prev_of(self.path)) if with_prev else (self.path,)
        for round_ in range(3 if with_prev else 1):
            if round_:
                # A rewrite that ran between our two opens has left a backup by now; without
                # one the file was never rewritten: missing, not caught mid-write.
                if not os.path.lexists(backup_of(self.path)):
                    return None
                time.sleep(0.001)
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY)
                    try:
                        st = os.fstat(fd)  # before reading: a later write then shows
                        if st.st_size > MAX_STATE_BYTES:
                            raise StateError(self.path, too_large(st.st_size))
                        return _read_fd(fd), st
                    finally:
                        os.close(fd)
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
                if self._good is not None:
                    return None, self.model.model_validate_json(self._good)
                return None, self._default()
            if loaded[0] == self._raw:
                return loaded[0], self._known(loaded[0])
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
            bak = backup_of(self.path)
            try:
                good = parse(bak, bak.read_bytes(), self.model)
            except (OSError, StateError):
                raise err from None
            self._keep(good, None)
            return good
        return self.model.model_validate_json(self._good)

    def _effective(self, disk: M, late: list[M] | None = None) -> M:
        """Return disk with the system's newer changes merged in if it edits an older copy.

        Late saves (into inodes we moved away) are merged first and lose conflicts to disk: a
        save there was computed from the file as it was before our write, disk's after it.
        """
        latest = next(reversed(self._seen), None)
        if not late and _version(disk) == latest:
            return disk  # the newest version or an edit of it: a merge onto it gives it back
        if latest is not None and _version(disk) <= latest and _version(disk) in self._seen:
            ours = json.loads(self._seen[latest])
            for edit in late or []:
                ours = _dump(self._merge_edit(edit, ours))
            return self._merge_edit(disk, ours)
        if latest is None or _version(disk) > latest:  # a write by another process
            self._record(disk)
        state = disk  # else an edit of a copy too old to remember: it wins whole
        for edit in late or []:
            state = self._merge_edit(edit, _dump(state))
        return state

    def _merge_edit(self, edit: M, ours: dict[str, Any]) -> M:
        """Merge a person's edit of a version we know onto ours; the person wins conflicts."""
        base = self._seen.get(_version(edit))
        if base is None:
            return edit
        merged = merge3(json.loads(base), _dump(edit), ours)
        try:
            return self.model.model_validate_json(json.dumps(merged))
        except ValidationError:
            return edit

    def _record(self, state: M, text: str | bytes | None = None) -> None:
        """Remember a new highest version (text: its JSON) as a base for merging later edits."""
        latest = next(reversed(self._seen), None)
        if latest is None or _version(state) > latest:
            self._seen[_version(state)] = state.model_dump_json() if text is None else text
            self._raw = None  # a newer version may make what it held an edit of an older copy
            while len(self._seen) > _HISTORY:
                del self._seen[next(iter(self._seen))]

    def _next_version(self, data: dict[str, Any], old: M) -> tuple[M, bytes]:
        """Return data with version one above anything seen, validated, and the bytes to write."""
        data["version"] = max(_version(old), next(reversed(self._seen), 0)) + 1
        raw = dumps(data)
        new = parse(self.path, raw, self.model)  # the check readers apply: never refused
        if (canonical := _dump(new)) != data:  # validation coerced a value: write the result
            raw = dumps(canonical)
            new = parse(self.path, raw, self.model)
        return new, raw

    def _keep(self, state: M, raw: bytes | None, text: bytes | None = None) -> None:
        """Make state the one in force (and a merge base, if newest).

        raw, if given, is valid file content that parses to state; text, if given, is state as
        JSON (what model_dump_json() gives, in another layout), so as not to render it again.
        """
        self._good = state.model_dump_json() if text is None else text
        self._record(state, self._good)
        self._raw = raw

    def _known(self, raw: bytes) -> M:
        """Return the state in raw, which parse() has accepted before: no errors to locate."""
        return self.model.model_validate_json(raw.removeprefix(codecs.BOM_UTF8))

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


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.pread(fd, 1 << 16, sum(map(len, chunks))):
        chunks.append(chunk)
    return b"".join(chunks)


def _version(state: BaseModel) -> int:
    return int(vars(state)["version"])


def _dump(state: BaseModel) -> dict[str, Any]:
    return state.model_dump(mode="json")


def _identity(state: M) -> M:
    return state


def _prev_of(path: Path) -> Path:
    return path.with_name(path.name + ".prev")
