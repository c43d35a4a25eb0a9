"""Task and worker lifecycles: the allowed task transitions, and the one rule for what a
worker is doing. Pure: no I/O."""

from __future__ import annotations

from typing import get_args

from multibot.errors import MultibotError
from multibot.state import GONE_WORKER, LIVE_WORKER, TaskStatus, WorkerStatusName

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"assigned", "cancelled", "failed"}),
    "assigned": frozenset({"running", "verifying", "pending", "failed", "cancelled"}),
    "running": frozenset({"verifying", "pending", "failed", "cancelled"}),
    "verifying": frozenset({"verified", "pending", "failed", "cancelled"}),
    "verified": frozenset({"merged", "pending", "failed", "cancelled"}),
    "merged": frozenset(),
    "failed": frozenset({"pending", "cancelled"}),  # the person may retry or cancel it
    # A cancel that came while the task's merge was landing: git has it, so it is merged.
    "cancelled": frozenset({"merged"}),
}

assert set(TASK_TRANSITIONS) == set(get_args(TaskStatus))


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


def worker_status(
    recorded: WorkerStatusName, beat: str | None = None, paused: bool = False
) -> WorkerStatusName:
    """Return what a worker is doing, from what the master recorded, the status in the
    heartbeat of its current incarnation (None without one), and whether it is paused.

    The master and the status view both judge by this rule. Failed, stopped and error are
    the master's word (the process is gone, or about to be started again). A pause shows over
    the rest. Blocked is what the worker reported, and stays until it reports progress. Else
    the heartbeat, which is newer than anything the master wrote down, says.
    """
    if recorded in GONE_WORKER or recorded == "error":
        return recorded
    if paused:
        return "paused"
    if recorded == "blocked" or beat not in LIVE_WORKER:
        return recorded
    return beat  # type: ignore[return-value]
