"""Slow work the master must not wait for (verify commands, merge candidates): background lanes.

Each lane has its own threads, started on first use: "verify" runs tasks' verify commands side
by side, "build" makes merge candidates one at a time (each is built on the one before), and
"check" runs the project check on candidates side by side. The master's loop polls for results
each tick, so it keeps reading messages and judging heartbeats while test suites run. A job
submitted during a turn starts only once the turn's task files are written (the master seals
the turn's jobs, then releases them): a check never runs ahead of the task file that says it
is under way, so a crash in between finds the task where the file says it is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

Job = Callable[[], Any]
Held = tuple[str, Hashable, Job]  # (lane, key, job)


@dataclass(frozen=True)
class Done:
    """A finished job: its key, and its value or the exception it raised."""

    key: Hashable
    value: Any = None
    error: BaseException | None = None


class Jobs:
    """Lanes of worker threads for the master's slow jobs; one result queue for all."""

    def __init__(
        self, wake: Callable[[], None] | None = None, lanes: Mapping[str, int] | None = None
    ) -> None:
        self._wake = wake  # called after each job, so the owner's loop takes it in at once
        self._sizes = dict(lanes or {"default": 1})
        self._lanes: dict[str, queue.Queue[tuple[Hashable, Job] | None]] = {}
        self._threads: list[threading.Thread] = []
        self._done: queue.Queue[Done] = queue.Queue()
        self._pending: set[Hashable] = set()
        self._held: list[Held] = []
        self._closed = False

    def submit(self, key: Hashable, job: Job, lane: str = "default") -> bool:
        """Hold job under key until release; False if that key is held, waiting or running."""
        if lane not in self._sizes:
            raise ValueError(f"no lane {lane!r} (lanes: {', '.join(self._sizes)})")
        if key in self._pending:
            return False
        self._pending.add(key)
        self._held.append((lane, key, job))
        return True

    def seal(self) -> list[Held]:
        """Take the jobs held since the last seal, to start later with release(jobs)."""
        held, self._held = self._held, []
        return held

    def release(self, jobs: list[Held]) -> None:
        """Start jobs taken by seal(), in order within each lane (none once closed)."""
        if self._closed:
            return
        for lane, key, job in jobs:
            self._lane(lane).put((key, job))

    def pending(self, key: Hashable) -> bool:
        """Return whether a job with key is held, waiting or running."""
        return key in self._pending

    def busy(self, kind: str) -> bool:
        """Return whether any job whose key is a tuple starting with kind is pending."""
        return any(isinstance(k, tuple) and k and k[0] == kind for k in self._pending)

    def poll(self) -> list[Done]:
        """Return the jobs finished since the last poll."""
        out: list[Done] = []
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return out
            self._pending.discard(done.key)
            out.append(done)

    def close(self, wait: float = 1.0) -> None:
        """Stop taking jobs (held and sealed ones never start); give running ones a moment."""
        self._held, self._closed = [], True
        for lane in self._lanes.values():
            for _ in range(self._sizes_of(lane)):
                lane.put(None)
        for thread in self._threads:
            thread.join(wait / max(1, len(self._threads)))

    def _sizes_of(self, lane: queue.Queue[tuple[Hashable, Job] | None]) -> int:
        return next(self._sizes[n] for n, q in self._lanes.items() if q is lane)

    def _lane(self, name: str) -> queue.Queue[tuple[Hashable, Job] | None]:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = queue.Queue()
            for n in range(self._sizes[name]):
                # Daemons: a master interrupted mid-check must not hang on exit; a cut merge
                # is recovered on restart and a cut check is run again.
                thread = threading.Thread(
                    target=self._run, args=(lane,), name=f"master-{name}-{n + 1}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return lane

    def _run(self, lane: queue.Queue[tuple[Hashable, Job] | None]) -> None:
        while True:
            item = lane.get()
            if item is None:
                return
            key, job = item
            try:
                self._done.put(Done(key, value=job()))
            except BaseException as exc:  # reported to the master's loop, never lost here
                self._done.put(Done(key, error=exc))
            if self._wake is not None:
                self._wake()
