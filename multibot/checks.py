"""Slow work the master must not wait for (verify commands, merges): one background thread.

Jobs run one at a time, in the order given; the master's loop polls for their results each
tick, so it keeps reading messages and judging heartbeats while a test suite runs. A job
submitted during a turn starts only once the turn's task files are written (the master seals
the turn's jobs, then releases them): a check or merge never runs ahead of the task file that
says it is under way, so a crash in between finds the task where the file says it is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Done:
    """A finished job: its key, and its value or the exception it raised."""

    key: Hashable
    value: Any = None
    error: BaseException | None = None


class Checks:
    """A single worker thread for the master's slow jobs."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._wake = wake  # called after each job, so the owner's loop takes it in at once
        self._jobs: queue.Queue[tuple[Hashable, Callable[[], Any]] | None] = queue.Queue()
        self._done: queue.Queue[Done] = queue.Queue()
        self._pending: set[Hashable] = set()
        self._held: list[tuple[Hashable, Callable[[], Any]]] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, key: Hashable, job: Callable[[], Any]) -> bool:
        """Hold job under key until release; False if that key is held, waiting or running."""
        if key in self._pending:
            return False
        self._pending.add(key)
        self._held.append((key, job))
        return True

    def seal(self) -> list[tuple[Hashable, Callable[[], Any]]]:
        """Take the jobs held since the last seal, to start later with release(jobs)."""
        held, self._held = self._held, []
        return held

    def release(self, jobs: list[tuple[Hashable, Callable[[], Any]]]) -> None:
        """Start jobs taken by seal(), in order (none once closed)."""
        if not jobs or self._closed:
            return
        if self._thread is None:
            # A daemon: a master interrupted mid-check must not hang on exit; a cut merge is
            # recovered on restart and a cut check is run again.
            self._thread = threading.Thread(target=self._run, name="master-checks", daemon=True)
            self._thread.start()
        for item in jobs:
            self._jobs.put(item)

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
        """Stop taking jobs (held and sealed ones never start); give a running one a moment."""
        self._held, self._closed = [], True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(wait)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            key, job = item
            try:
                self._done.put(Done(key, value=job()))
            except BaseException as exc:  # reported to the master's loop, never lost here
                self._done.put(Done(key, error=exc))
            if self._wake is not None:
                self._wake()
