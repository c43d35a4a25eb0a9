"""Task and worker lifecycles as explicit state machines: no I/O, just allowed transitions."""

from __future__ import annotations

from typing import get_args

from multibot.errors import MultibotError
from multibot.state import TaskStatus, WorkerStatusName

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"assigned", "cancelled", "failed"}),
    "assigned": frozenset({"running", "verifying", "pending", "failed", "cancelled"}),
    "running": frozenset({"verifying", "pending", "failed", "cancelled"}),
    "verifying": frozenset({"verified", "pending", "failed", "cancelled"}),
    "verified": frozenset({"merged", "pending", "failed", "cancelled"}),
    "merged": frozenset(),
    "failed": frozenset({"pending"}),  # the person may retry a failed task
    "cancelled": frozenset(),
}

WORKER_TRANSITIONS: dict[str, frozenset[str]] = {
    "starting": frozenset({"idle", "working", "paused", "error", "failed", "stopped"}),
    "idle": frozenset({"working", "paused", "error", "stopped", "blocked"}),
    "working": frozenset({"idle", "blocked", "paused", "error", "stopped"}),
    "blocked": frozenset({"working", "idle", "paused", "error", "stopped"}),
    "paused": frozenset({"idle", "working", "blocked", "error", "stopped"}),
    "error": frozenset({"starting", "failed", "stopped"}),
    "failed": frozenset({"starting"}),
    "stopped": frozenset({"starting"}),
}

assert set(TASK_TRANSITIONS) == set(get_args(TaskStatus))
assert set(WORKER_TRANSITIONS) == set(get_args(WorkerStatusName))


class BadTransition(MultibotError):
    """A state change that the lifecycle does not allow."""

    def __init__(self, what: str, old: str, new: str) -> None:
        self.what, self.old, self.new = what, old, new
        super().__init__(f"{what}: cannot go from {old} to {new}")


def can_move(table: dict[str, frozenset[str]], old: str, new: str) -> bool:
    """Return whether old -> new is allowed (staying put is always allowed)."""
    return old == new or new in table.get(old, frozenset())


def task_transition(old: TaskStatus, new: TaskStatus, what: str = "task") -> TaskStatus:
    """Return new if a task may move from old to new, else raise BadTransition."""
    if not can_move(TASK_TRANSITIONS, old, new):
        raise BadTransition(what, old, new)
    return new


def worker_transition(
    old: WorkerStatusName, new: WorkerStatusName, what: str = "worker"
) -> WorkerStatusName:
    """Return new if a worker may move from old to new, else raise BadTransition."""
    if not can_move(WORKER_TRANSITIONS, old, new):
        raise BadTransition(what, old, new)
    return new
