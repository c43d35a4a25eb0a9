"""The scheduler: which ready task goes to which worker. Pure: no I/O, no clock.

A task is ready when every dependency is merged, it is not held or cancelled, and no active
task owns an overlapping file. Higher priority first, then plan order. A task needing
capabilities goes only to a worker that has them. Past the idle workers, new workers are asked
for up to the maximum.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from multibot.state import ACTIVE, TaskRecord


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


class PlanOrder:
    """The tasks in plan order (follow-ups at the end), and each one's place in it: looked up
    on every turn, so not worked out again from the list each time (milliseconds with a
    thousand tasks)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []
        self.rank: dict[str, int] = {}
        for tid in ids:
            self.add(tid)

    def add(self, tid: str) -> None:
        """Put tid last, unless it has a place already."""
        if tid not in self.rank:
            self.rank[tid] = len(self.ids)
            self.ids.append(tid)

    def place(self, tid: str) -> int:
        """Return tid's place; after every task if it has none."""
        return self.rank.get(tid, len(self.ids))

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)


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


class TaskIndex:
    """Which tasks are in each status, and which pending ones have every dependency merged.

    Kept up to date by note() at each change, so a turn looks only at the few tasks that
    matter: looking at every task each turn cost milliseconds with hundreds of tasks waiting,
    on the path of every assignment. A task's dependencies not known yet count as not merged.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, tuple[str, ...]]] = {}  # status and dependencies
        self._in: dict[str, dict[str, None]] = {}  # status -> task ids (in the order noted)
        self._missing: dict[str, set[str]] = {}  # pending task -> its dependencies not merged
        self._waiting: dict[str, set[str]] = {}  # dependency -> pending tasks missing it
        self._ready: dict[str, None] = {}  # pending, nothing missing

    def note(self, t: TaskRecord) -> None:
        """Take in a task just added, or whose status (or dependency list) may have changed."""
        seen = (t.status, tuple(t.task.dependencies))
        if self._seen.get(t.id) == seen:
            return
        self._forget(t.id)
        self._seen[t.id] = seen
        self._in.setdefault(t.status, {})[t.id] = None
        if t.status == "pending":
            missing = {d for d in seen[1] if d not in self._seen or self._seen[d][0] != "merged"}
            for d in missing:
                self._waiting.setdefault(d, set()).add(t.id)
            if missing:
                self._missing[t.id] = missing
            else:
                self._ready[t.id] = None
        elif t.status == "merged":  # for good (see lifecycle): its dependents may be ready
            for waiter in self._waiting.pop(t.id, set()):
                missing = self._missing[waiter]
                missing.discard(t.id)
                if not missing:
                    del self._missing[waiter]
                    self._ready[waiter] = None

    def _forget(self, tid: str) -> None:
        if tid not in self._seen:
            return
        del self._in[self._seen.pop(tid)[0]][tid]
        self._ready.pop(tid, None)
        for d in self._missing.pop(tid, set()):
            self._waiting[d].discard(tid)

    def ids(self, *statuses: str) -> list[str]:
        """Return the ids of the tasks in any of these statuses."""
        return [tid for status in statuses for tid in self._in.get(status, {})]

    def ready(self) -> list[str]:
        """Return the pending tasks whose dependencies are all merged (held ones too)."""
        return list(self._ready)


def blocked(tasks: Mapping[str, TaskRecord], pending: Iterable[str]) -> dict[str, str]:
    """Return, of the pending tasks given, those that can never start, with why: a dependency
    failed or was cancelled, or is itself blocked."""
    why: dict[str, str | None] = {}

    def reason(tid: str) -> str | None:
        if tid in why:
            return why[tid]
        why[tid] = None  # a cycle (refused by the plan) blocks nothing
        for d in tasks[tid].task.dependencies:
            dep = tasks.get(d)
            if dep is None:
                continue
            if dep.status in ("failed", "cancelled"):
                why[tid] = f"its dependency {d} {dep.status}"
                break
            if dep.status == "pending" and reason(d) is not None:
                why[tid] = f"its dependency {d} is blocked ({why[d]})"
                break
        return why[tid]

    return {tid: r for tid in pending if tasks[tid].status == "pending" and (r := reason(tid))}


def ready_tasks(
    tasks: Mapping[str, TaskRecord], order: PlanOrder | None = None, index: TaskIndex | None = None
) -> Iterator[TaskRecord]:
    """Yield the tasks that could start now, best first (looking only at those the index
    names, when given one that has noted every task).

    Lazily: a heap, not a sort, so a turn that takes the best few of thousands of ready tasks
    pays little for the rest (sorting 3,000 on every turn cost the master milliseconds).
    """
    order = order or PlanOrder()
    if index is None:
        active = [t for t in tasks.values() if t.status in ACTIVE]
        candidates: Iterable[TaskRecord] = tasks.values()
    else:
        active = [tasks[tid] for tid in index.ids(*ACTIVE)]
        candidates = [tasks[tid] for tid in index.ready()]
    heap = [
        ((-t.task.priority, order.place(t.id), t.id), t)  # ids are unique: t is never compared
        for t in candidates
        if t.status == "pending" and not t.hold and not t.cancel
    ]
    heapq.heapify(heap)
    claims = [a.task.owns for a in active if a.task.owns]  # claiming nothing clashes with none
    while heap:
        _, t = heapq.heappop(heap)
        if any(tasks.get(d) is None or tasks[d].status != "merged" for d in t.task.dependencies):
            continue
        if t.task.owns:
            if any(overlaps(t.task.owns, other) for other in claims):
                continue
            claims.append(t.task.owns)
        yield t


def schedule(
    tasks: Mapping[str, TaskRecord],
    idle: Sequence[WorkerSlot],
    running_workers: int,
    max_workers: int,
    new_worker_capabilities: frozenset[str] = frozenset(),
    order: PlanOrder | None = None,
    index: TaskIndex | None = None,
) -> list[Assignment]:
    """Return assignments for this moment: idle workers first, then new workers."""
    free = list(idle)
    can_start = max(0, max_workers - running_workers)
    plan: list[Assignment] = []
    ready = ready_tasks(tasks, order, index)  # lazy: nothing is looked at while no one is free
    while free or can_start > 0:
        t = next(ready, None)
        if t is None:
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
