"""Whether a worker is to be paused: by its own state file (the person's ``paused``), or by
the run's, in system-state.json, which is read in a thread off the loop that beats."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from multibot.errors import StateError
from multibot.layout import Home
from multibot.state import PauseView, WorkerState
from multibot.store import StateFile


class PauseWatch:
    """Looks at both files for a pause; says a bad edit in either once."""

    def __init__(
        self, home: Home, state: StateFile[WorkerState], show: Callable[[str], None]
    ) -> None:
        self.state, self.show = state, show
        self.system = StateFile(home.system_state, PauseView, default=PauseView)
        self.run_paused = self.system.read().paused  # then read in the look thread only
        self.looks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pause-look")
        self.system_look: Future[tuple[bool, StateError | None] | None] | None = None
        self.last_problem = ""

    def wanted(self) -> bool:
        return self.state.read().paused or self.run_paused

    def changed(self) -> bool:
        """Whether either file changed since the last look (the run's: as last looked at)."""
        if not (self._system_changed() | self.state.changed()):
            return False
        self._report(self.state.problem())
        return True

    def close(self) -> None:
        self.looks.shutdown(cancel_futures=True)

    def _look_at_system(self) -> tuple[bool, StateError | None] | None:
        """(look thread) The run's pause and the file's problem, if it changed.
        system-state.json is the master's, rewritten twice a second and as big as the run:
        read here, off the loop that beats."""
        if not self.system.changed():
            return None
        return self.system.read().paused, self.system.problem()

    def _system_changed(self) -> bool:
        """Take in the last look at system-state.json and start the next; True if the
        run's pause (or the file's problem) changed."""
        changed = False
        if self.system_look is not None and self.system_look.done():
            seen, self.system_look = self.system_look.result(), None
            if seen is not None:
                changed = seen[0] != self.run_paused or seen[1] is not None
                self.run_paused, problem = seen
                self._report(problem)
        if self.system_look is None:
            self.system_look = self.looks.submit(self._look_at_system)
        return changed

    def _report(self, problem: StateError | None) -> None:
        if problem and str(problem) != self.last_problem:
            self.last_problem = str(problem)
            self.show(f"! ignoring a bad edit, last good state stays in force: {problem}")
