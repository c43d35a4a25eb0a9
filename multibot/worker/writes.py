"""A worker's writes of its own files: its state file (with lazy changes) and its memory.

A change made lazy is written with the next write, or LAZY_STATE_S after it, whichever
comes first: a short task's start and end cost one write, not two. A write refused by a
full disk keeps its changes for the next; a broken hand edit is the person's to fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from multibot.errors import LockTimeout, MultibotError, StateError, WriteFailed
from multibot.state import WorkerState
from multibot.store import StateFile

# A task's start is written to the worker's state file this long after it, if the task has not
# ended by then (the end's write then says it all): a short task costs one write, not two.
LAZY_STATE_S = 0.5

Change = Callable[[WorkerState], WorkerState]


class Replaced(MultibotError):
    """A newer incarnation of this worker exists: this one must stop without writing."""


class StateWrites:
    """The state file of one worker incarnation, and the changes not written yet."""

    def __init__(
        self, state: StateFile[WorkerState], generation: int, show: Callable[[str], None]
    ) -> None:
        self.state, self.generation, self.show = state, generation, show
        self.master_contact: float | None = None  # written with the next change
        self.lazy: list[Change] = []
        self.lazy_due: float | None = None

    def due(self) -> bool:
        return self.lazy_due is not None and time.monotonic() >= self.lazy_due

    def update(self, fn: Change | None = None, lazy: bool = False) -> None:
        """Apply fn to the state file, with the lazy changes before it; if lazy, only note it,
        for the next write or LAZY_STATE_S from now, whichever comes first."""
        if fn is not None:
            self.lazy.append(fn)
        if lazy:
            if self.lazy_due is None:
                self.lazy_due = time.monotonic() + LAZY_STATE_S
            return
        fns, self.lazy, self.lazy_due = self.lazy, [], None

        def guarded(s: WorkerState) -> WorkerState:
            if s.generation > self.generation:
                raise Replaced(f"generation {s.generation} is newer than mine")
            s.communication.last_master_contact = self.master_contact
            for each in fns:
                s = each(s)
            return s

        try:
            self.state.update(guarded)
        except WriteFailed as exc:  # a full disk: the changes wait for the next write
            self.lazy, self.lazy_due = [*fns, *self.lazy], time.monotonic() + LAZY_STATE_S
            self.show(f"! could not write {self.state.path.name}, tried again: {exc}")
        except (StateError, LockTimeout) as exc:
            self.show(f"! could not write {self.state.path.name}: {exc}")

    def other(self, f: StateFile[Any], fn: Callable[[Any], Any]) -> None:
        """Update another of the worker's files (its memory); a broken hand edit is said."""
        try:
            f.update(fn)
        except (StateError, LockTimeout) as exc:
            self.show(f"! could not write {f.path.name}: {exc}")
