"""The scheduler: which ready task goes to which worker. Pure: no I/O, no clock.

A task is ready when every dependency is merged, it is not held or cancelled, and no active
task owns an overlapping file. Higher priority first, then plan order. A task needing
capabilities goes only to a worker that has them. Past the idle workers, new workers are asked
for up to the maximum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from multibot.state import TaskRecord

ACTIVE = ("assigned", "running", "verifying", "verified")


@dataclass(frozen=True)
class WorkerSlot:
    """An idle worker that can take a task."""

    id: str
    capabilities: frozenset[str] = frozenset()
    last_task: str | None = None


@dataclass(frozen=True)
class Assignment:
    """Give task_id to worker_id; worker_id None means: start a new worker for it."""

    task_id: str
    worker_id: str | None


def _norm(pattern: str) -> str:
    return pattern.strip().lstrip("./").rstrip("/")


def overlaps(a: Sequence[str], b: Sequence[str]) -> bool:
    """Return whether two ownership lists (files, folders or globs) may touch the same file."""
    for x in map(_norm, a):
        for y in map(_norm, b):
            if x == y or fnmatchcase(x, y) or fnmatchcase(y, x):
                return True
            if x.startswith(y + "/") or y.startswith(x + "/"):
                return True
            # Two globs: compare their literal prefixes (conservative).
            px, py = x.split("*")[0].split("?")[0], y.split("*")[0].split("?")[0]
            both_globs = ("*" in x or "?" in x) and ("*" in y or "?" in y)
            if both_globs and (px.startswith(py) or py.startswith(px)):
                return True
    return False


def ready_tasks(tasks: Mapping[str, TaskRecord], order: Sequence[str] = ()) -> list[TaskRecord]:
    """Return the tasks that could start now, best first."""
    rank = {tid: i for i, tid in enumerate(order)}
    active = [t for t in tasks.values() if t.status in ACTIVE]
    out: list[TaskRecord] = []
    for t in tasks.values():
        if t.status != "pending" or t.hold or t.cancel:
            continue
        if any(tasks.get(d) is None or tasks[d].status != "merged" for d in t.task.dependencies):
            continue
        out.append(t)
    out.sort(key=lambda t: (-t.task.priority, rank.get(t.id, len(rank)), t.id))
    chosen: list[TaskRecord] = []
    claims = [a.task.owns for a in active if a.task.owns]  # claiming nothing clashes with none
    for t in out:
        if t.task.owns:
            if any(overlaps(t.task.owns, other) for other in claims):
                continue
            claims.append(t.task.owns)
        chosen.append(t)
    return chosen


def schedule(
    tasks: Mapping[str, TaskRecord],
    idle: Sequence[WorkerSlot],
    running_workers: int,
    max_workers: int,
    new_worker_capabilities: frozenset[str] = frozenset(),
    order: Sequence[str] = (),
) -> list[Assignment]:
    """Return assignments for this moment: idle workers first, then new workers."""
    free = list(idle)
    can_start = max(0, max_workers - running_workers)
    plan: list[Assignment] = []
    for t in ready_tasks(tasks, order):
        if not free and can_start <= 0:
            break
        needs = frozenset(t.task.capabilities)
        fit = [w for w in free if needs <= w.capabilities]
        if fit:
            # Prefer the worker that last had this task: its worktree holds the branch.
            best = next((w for w in fit if w.last_task == t.id), fit[0])
            free.remove(best)
            plan.append(Assignment(t.id, best.id))
        elif can_start > 0 and needs <= new_worker_capabilities:
            can_start -= 1
            plan.append(Assignment(t.id, None))
    return plan
