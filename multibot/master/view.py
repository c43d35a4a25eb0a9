"""system-state.json: the run as people and the status view see it.

``project`` derives its task lists, branches and merge queue from the tasks (pure);
``SystemView`` writes it in the chores thread, at most every FLUSH_EVERY_S, keeping the
person's pause.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from multibot.errors import LockTimeout, StateError
from multibot.master.edits import keep_persons_system
from multibot.scheduler import PlanOrder
from multibot.state import ACTIVE, OVER, BranchInfo, QueueView, SystemState, TaskRecord
from multibot.store import StateFile

# system-state.json is for people and the status view; every worker re-reads it when it changes.
FLUSH_EVERY_S = 0.5


def project(
    state: SystemState,
    tasks: Mapping[str, TaskRecord],
    order: PlanOrder,
    queue: tuple[str | None, QueueView],
    branches: dict[str, BranchInfo],
) -> None:
    """Derive state's task lists, branches and merge queue from the tasks and the pipeline's
    view (queue: the task being merged, the queue). branches keeps each task's entry from
    one projection to the next (most do not change)."""
    git = state.git
    git.merge_queue = sorted(
        (t for t, r in tasks.items() if r.status == "verified"), key=order.place
    )
    git.merging, git.queue = queue
    shown = []
    for t, r in tasks.items():
        if not r.branch:
            continue
        now = (r.branch, r.worker, r.commit, r.status == "merged")
        info = branches.get(t)
        if info is None or (info.name, info.worker, info.last_commit, info.merged) != now:
            info = branches[t] = BranchInfo.model_construct(  # from validated records
                name=r.branch, task_id=t, worker=r.worker, last_commit=r.commit, merged=now[3]
            )
        shown.append(info)
    git.branches = shown
    idx = state.tasks
    idx.active = [t for t, r in tasks.items() if r.status in ACTIVE]
    idx.pending = [t for t, r in tasks.items() if r.status == "pending"]
    idx.completed = [t for t, r in tasks.items() if r.status in OVER]
    idx.failed = [t for t, r in tasks.items() if r.status == "failed"]


class SystemView:
    """Writes system-state.json from the chores thread, one write at a time."""

    def __init__(
        self,
        file: StateFile[SystemState],
        chores: ThreadPoolExecutor,
        refused: Callable[[StateError], None],
        monotonic: Callable[[], float],
    ) -> None:
        self.file, self.chores, self.refused, self.mono = file, chores, refused, monotonic
        self.dirty = False  # something changed since the last write
        self.last_write = 0.0
        self.writing: Future[StateError | LockTimeout | None] | None = None

    def due(self, force: bool) -> bool:
        """Whether to write now: something changed (at most every FLUSH_EVERY_S), or forced;
        and the last write is done (the next takes the state as it is by then)."""
        now = self.mono()
        if not (force or (self.dirty and now - self.last_write > FLUSH_EVERY_S)):
            return False
        if self.writing is not None:
            if not (force or self.writing.done()):
                return False
            self.took(self.writing.result())
        return True

    def write(self, state: SystemState, force: bool) -> None:
        """Write state (as it is now: a copy is taken); wait for it if forced."""
        snapshot = state.model_dump_json()  # a copy the loop no longer touches
        self.writing = self.chores.submit(self._write, snapshot)
        self.dirty, self.last_write = False, self.mono()
        if force:
            self.took(self.writing.result())

    def _write(self, snapshot: str) -> StateError | LockTimeout | None:
        """(chores thread) Write system-state.json; return what stopped it, if anything."""
        state = SystemState.model_validate_json(snapshot)
        try:
            self.file.update(lambda disk: keep_persons_system(state, disk))
        except (StateError, LockTimeout) as exc:
            return exc
        return None

    def took(self, failed: StateError | LockTimeout | None) -> None:
        """Take in the outcome of the last write (in the loop's thread)."""
        self.writing = None
        if failed is not None:
            self.dirty = True  # written again at the next flush
            if isinstance(failed, StateError):
                self.refused(failed)
