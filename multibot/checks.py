"""Slow work the master must not wait for (verify commands, merges): one background thread.

Jobs run one at a time, in the order given; the master's loop polls for their results each
tick, so it keeps reading messages and judging heartbeats while a test suite runs.
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
        self._thread: threading.Thread | None = None

    def submit(self, key: Hashable, job: Callable[[], Any]) -> bool:
        """Queue job under key; False if a job with that key is already waiting or running."""
        if key in self._pending:
            return False
        self._pending.add(key)
        if self._thread is None:
            # A daemon: a master interrupted mid-check must not hang on exit; a cut merge is
            # recovered on restart and a cut check is run again.
            self._thread = threading.Thread(target=self._run, name="master-checks", daemon=True)
            self._thread.start()
        self._jobs.put((key, job))
        return True

    def pending(self, key: Hashable) -> bool:
        """Return whether a job with key is waiting or running."""
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
        """Stop taking jobs; give a running one a moment to end."""
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
