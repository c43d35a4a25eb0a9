"""Heartbeat files written from a process's main loop, and pure judges of liveness.

The writer has no thread on purpose: a loop that is stuck stops beating and goes stale. Two ways
to judge a heartbeat: judge() compares wall-clock times (for a one-shot look such as ``status``),
HeartbeatTracker watches ``seq`` advance on the observer's own monotonic clock (for the master's
loop), which no wall-clock jump in either direction can fool.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from multibot.atomic import atomic_replace

_MAX_BYTES = 64 * 1024  # a heartbeat is a few hundred bytes; anything bigger is garbage
_RECORD = 512  # a beat is padded with spaces to a multiple of this: rewritten whole in place
_READS = 3  # a read that caught a rewrite half done is read again, this many times in all


class Heartbeat(BaseModel):
    """One beat: who, which generation, what it is doing, and when by both of its clocks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    process_id: str
    pid: int
    generation: int
    status: str
    time: float  # the writer's wall clock (time.time())
    monotonic: float  # the writer's time.monotonic(); only comparable with its own earlier beats
    interval: float  # how often the writer means to beat
    seq: int  # +1 per beat written: the observer's tracker watches this advance
    host: str
    # CRC-32 (hex) of this beat's JSON without this field: a read that caught a rewrite half
    # done does not match it. None in a beat written by something else: not checked.
    check: str | None = None

    def sealed(self) -> Heartbeat:
        """This beat with its check filled in."""
        return self.model_copy(update={"check": _crc(self)})

    def intact(self) -> bool:
        """False if the check does not match: the bytes read mix two beats."""
        return self.check is None or self.check == _crc(self)


def _crc(hb: Heartbeat) -> str:
    return f"{zlib.crc32(hb.model_dump_json(exclude={'check'}).encode()):08x}"


class HeartbeatWriter:
    """Write a process's heartbeat file; call beat() from its main loop every tick."""

    def __init__(
        self,
        path: Path,
        process_id: str,
        generation: int,
        interval: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path, self.process_id, self.generation = path, process_id, generation
        self.interval, self._clock, self._monotonic = interval, clock, monotonic
        self.seq = 0
        self.last_error: OSError | None = None
        self._last: tuple[str, float] | None = None  # status and monotonic time of the last write
        self._file: tuple[int, int, int, int] | None = None  # fd, device, inode, size written

    def beat(self, status: str) -> bool:
        """Write a beat if status changed or interval/3 has passed; say whether one was written.

        A failed write (disk full) does not stop the loop: it is kept in last_error and retried
        on the next call; if it keeps failing the heartbeat goes stale and observers act.
        """
        mono = self._monotonic()  # throttle on monotonic time: a wall-clock jump can't stall beats
        if self._last is not None:
            last_status, last_mono = self._last
            if status == last_status and mono - last_mono < self.interval / 3:
                return False
        hb = Heartbeat(
            process_id=self.process_id,
            pid=os.getpid(),
            generation=self.generation,
            status=status,
            time=self._clock(),
            monotonic=mono,
            interval=self.interval,
            seq=self.seq + 1,
            host=socket.gethostname(),
        )
        try:
            self._write(hb.sealed().model_dump_json().encode())
        except OSError as e:
            self.last_error = e
            return False
        self.seq, self._last, self.last_error = hb.seq, (status, mono), None
        return True

    def close(self) -> None:
        """Let go of the heartbeat file (it stays, with the last beat)."""
        if self._file is not None:
            fd, self._file = self._file[0], None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write(self, data: bytes) -> None:
        """Rewrite the heartbeat file in place, whole; make it anew the first time, or when it
        is gone or another process's file stands at its path.

        Not a new file per beat: many workers beating at once made the heartbeat folder's
        lock a queue, long enough on a busy machine for a loop to miss three beats. No fsync:
        a beat lost in a crash would be stale by the time anyone read it after a reboot. A
        beat is padded to a fixed size, so each write covers the last one whole, and its
        check lets readers tell a read that caught a write half done (read_heartbeat reads
        again).
        """
        size = -(-len(data) // _RECORD) * _RECORD
        if self._file is not None:
            fd, dev, ino, written = self._file
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (dev, ino):
                size = max(size, written)
                os.pwrite(fd, data.ljust(size), 0)
                self._file = (fd, dev, ino, size)
                return
            self.close()
        fd = atomic_replace(self.path, data.ljust(size), fsync=False)
        st = os.fstat(fd)
        self._file = (fd, st.st_dev, st.st_ino, size)


def read_heartbeat(path: Path) -> Heartbeat | None:
    """Return the heartbeat at path, or None if it is missing or not a valid heartbeat."""
    for _ in range(_READS):  # a beat is rewritten in place: a read may catch half of one
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_BYTES + 1)
            if len(raw) > _MAX_BYTES:
                return None
            hb = Heartbeat.model_validate_json(raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            continue
        if hb.intact():
            return hb
    return None


class State(StrEnum):
    """How an observer judges a process from its heartbeat."""

    ALIVE = "alive"
    STARTING = "starting"  # no beat from the current generation yet, but still within grace
    STALE = "stale"
    MISSING = "missing"


@dataclass(frozen=True)
class Liveness:
    """A judgement: state, seconds since the last sign of life (None if none), and why."""

    state: State
    age: float | None
    reason: str

    @property
    def dead(self) -> bool:
        return self.state in (State.STALE, State.MISSING)


def judge(
    hb: Heartbeat | None,
    now: float,
    interval: float,
    misses: int = 3,
    *,
    generation: int | None = None,
    started: float | None = None,
    tolerance: float = 1.0,
) -> Liveness:
    """Judge hb by wall clock: stale after misses beats plus tolerance; a future beat is fresh.

    now is the observer's time.time(). generation, if given, is the one expected: a beat from
    another generation does not count. started is when the current generation was started: until
    the limit has passed since then, no beat yet means STARTING rather than MISSING.
    """
    limit = misses * max(interval, hb.interval if hb else 0.0) + tolerance
    if hb is None or (generation is not None and hb.generation != generation):
        why = "no heartbeat" if hb is None else f"heartbeat is from generation {hb.generation}"
        if started is not None and now - started <= limit:  # also true if the clock went back
            return Liveness(State.STARTING, None, f"{why} yet")
        return Liveness(State.MISSING, None, why)
    age = now - hb.time
    if age < 0:  # our clock went back, or the writer's is ahead: not a death
        return Liveness(State.ALIVE, 0.0, f"heartbeat is {-age:.1f}s in the future (clock jump?)")
    if age > limit:
        return Liveness(State.STALE, age, f"last heartbeat {age:.1f}s ago (limit {limit:.1f}s)")
    return Liveness(State.ALIVE, age, hb.status)


class HeartbeatTracker:
    """Judge one process by whether its beats keep changing, timed on the observer's clock.

    Pure: feed it what read_heartbeat() returned and the observer's time.monotonic(). A beat
    counts as new when (pid, generation, seq) changes; stale when it has not changed for misses
    intervals. Call expect() when (re)starting the process: beats from any other generation
    (or pid, if given) are then ignored, so a frozen old worker or a reused pid cannot pass
    for the current one.
    """

    def __init__(
        self, interval: float, misses: int = 3, tolerance: float = 1.0, startup_grace: float = 0.0
    ) -> None:
        self.interval, self.misses, self.tolerance = interval, misses, tolerance
        # A process just started may take longer than a few intervals to beat the first time
        # (imports on a loaded machine): until its first beat, allow at least this long.
        self.startup_grace = startup_grace
        self.generation: int | None = None
        self.pid: int | None = None
        self._started: float | None = None
        self._key: tuple[int, int, int] | None = None
        self._since = 0.0  # observer's monotonic time when _key last changed

    def expect(self, generation: int, now: float, pid: int | None = None) -> None:
        """Start watching a new generation (and pid, once known), started at now."""
        self.generation, self.pid, self._started, self._key = generation, pid, now, None

    def observe(self, hb: Heartbeat | None, now: float) -> Liveness:
        """Take in the heartbeat as read at observer-monotonic now and judge the process."""
        if self._started is None:
            self._started = now
        limit = self.misses * max(self.interval, hb.interval if hb else 0.0) + self.tolerance
        if hb is not None and (
            (self.generation is not None and hb.generation != self.generation)
            or (self.pid is not None and hb.pid != self.pid)
        ):
            why = f"heartbeat is from pid {hb.pid} generation {hb.generation}"
            hb = None
        else:
            why = "no heartbeat"
        if hb is not None:
            key = (hb.pid, hb.generation, hb.seq)
            if key != self._key:
                self._key, self._since = key, now
        if self._key is None:
            waited = now - self._started
            if waited <= max(limit, self.startup_grace):
                return Liveness(State.STARTING, None, f"{why} yet")
            return Liveness(State.MISSING, None, f"{why} after {waited:.1f}s")
        quiet = now - self._since
        if hb is None:  # the file went away or went bad after beating: judge by the last beat
            return Liveness(State.STALE if quiet > limit else State.ALIVE, quiet, why)
        if quiet > limit:
            return Liveness(State.STALE, quiet, f"no new heartbeat for {quiet:.1f}s")
        return Liveness(State.ALIVE, quiet, hb.status)
