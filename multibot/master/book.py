"""The task book: the run's tasks, their order and dependents, and every change of status.

Pure: no I/O and no clock (the caller passes the time). A change of status goes through the
lifecycle and is told to the ``changed`` callback, which makes it durable (see journal.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from multibot.lifecycle import task_transition
from multibot.plan import graph_problems
from multibot.scheduler import PlanOrder, TaskIndex, blocked, overlaps
from multibot.state import ACTIVE, Discovery, PlanTask, TaskRecord, TaskStatus

FEEDBACK_KEPT = 10  # the latest feedback a task keeps
FEEDBACK_SHOWN = 3  # of which an assignment shows
DISCOVERIES_SHOWN = 20  # the latest discoveries of the run an assignment shows


class TaskBook:
    """The tasks of a run, indexed by status, in plan order (follow-ups at the end)."""

    def __init__(self, changed: Callable[[TaskRecord, bool], None]) -> None:
        self.tasks: dict[str, TaskRecord] = {}
        self.index = TaskIndex()  # the tasks by status, noted at each change (see move)
        self.order = PlanOrder()
        self._changed = changed  # (task, lazy): called after every change of status
        self._dependents: tuple[int, dict[str, list[str]]] = (0, {})  # see dependents()

    def __contains__(self, tid: object) -> bool:
        return tid in self.tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def get(self, tid: str | None) -> TaskRecord | None:
        return self.tasks.get(tid or "")

    def ordered(self, plan_order: Sequence[str]) -> None:
        """Take the plan's order (a topological one); tasks already known keep their place."""
        self.order = PlanOrder([*plan_order, *self.order.ids])

    def add(self, rec: TaskRecord) -> None:
        """Take in a task (a new one, or one read back from its file)."""
        self.tasks[rec.id] = rec
        self.index.note(rec)
        self.order.add(rec.id)

    def move(self, rec: TaskRecord, status: TaskStatus, *, lazy: bool = False) -> None:
        """Move a task along its lifecycle (BadTransition if it may not go there)."""
        rec.status = task_transition(rec.status, status, f"task {rec.id}")
        self.tasks[rec.id] = rec
        self.index.note(rec)
        self._changed(rec, lazy)

    def ids(self, *statuses: str) -> list[str]:
        return self.index.ids(*statuses)

    def dependents(self) -> dict[str, list[str]]:
        """Return, per task, the tasks that depend on it (kept until a task is added)."""
        if self._dependents[0] != len(self.tasks):  # tasks are only ever added
            index: dict[str, list[str]] = {}
            for rec in self.tasks.values():
                for dep in rec.task.dependencies:
                    index.setdefault(dep, []).append(rec.id)
            self._dependents = (len(self.tasks), index)
        return self._dependents[1]

    def dependencies_merged(self, rec: TaskRecord) -> bool:
        """Return whether every known dependency of rec is merged."""
        return all(
            self.tasks[d].status == "merged" for d in rec.task.dependencies if d in self.tasks
        )

    def merged(self, rec: TaskRecord, merge_commit: str | None, now: float) -> None:
        """Mark rec merged; its dependents with every dependency merged are ready from now."""
        rec.merge_commit = merge_commit or rec.merge_commit
        self.move(rec, "merged")
        for tid in self.dependents().get(rec.id, []):
            other = self.tasks[tid]
            if self.dependencies_merged(other):
                other.ready_at = now

    def mergeable(self) -> list[TaskRecord]:
        """Return the verified tasks whose dependencies are merged, in plan order."""
        verified = sorted(self.index.ids("verified"), key=self.order.place)
        return [r for tid in verified if self.dependencies_merged(r := self.tasks[tid])]

    def last_tasks(self) -> dict[str, str]:
        """Return, per worker, a task that can start and went back to pending from it (for
        affinity: its worktree holds the branch)."""
        last: dict[str, str] = {}
        for tid in self.index.ready():
            if worker := self.tasks[tid].worker:
                last.setdefault(worker, tid)
        return last

    def retry(self, rec: TaskRecord, feedback: str, max_attempts: int) -> TaskStatus:
        """Send a task back with feedback for a new attempt, or fail it when its attempts
        are spent; return the status it went to."""
        rec.feedback = [*rec.feedback, feedback][-FEEDBACK_KEPT:]
        rec.last_error = feedback
        self.move(rec, "failed" if rec.attempts >= max_attempts else "pending")
        return rec.status

    def limited(self, rec: TaskRecord) -> None:
        """Send a task back after the API limited its agent: no fault of the task, so the
        attempt is given back, and it keeps its worker (whose session for it is resumed)."""
        rec.attempts = max(0, rec.attempts - 1)
        rec.limits += 1
        self.move(rec, "pending")

    def follow_up(self, parent: TaskRecord, text: str, now: float) -> TaskRecord | str | None:
        """Return a new task after parent doing text, or why it cannot be one, or None if
        parent asked for it already (a request may come twice)."""
        origin = f"follow-up of {parent.id}"
        siblings = [t for t in self.tasks.values() if t.origin == origin]
        if any(t.task.description == text for t in siblings):
            return None
        task = PlanTask(
            id=f"{parent.id}-f{len(siblings) + 1}"[:63],
            title=text[:80],
            description=text,
            dependencies=[parent.id],
            model=parent.task.model,
        )
        problems = graph_problems([*(t.task for t in self.tasks.values()), task])
        if problems:
            return "; ".join(problems)
        return TaskRecord(task=task, origin=origin, ready_at=now)

    def context_for(self, rec: TaskRecord, discoveries: Iterable[Discovery]) -> list[str]:
        """The finished dependencies' summaries and discoveries, the run's latest other
        discoveries, and the feedback on earlier tries."""
        lines: list[str] = []
        for d in rec.task.dependencies:
            dep = self.tasks.get(d)
            if dep is not None:
                lines.append(f"{d} ({dep.task.title}) is merged: {dep.summary}")
                lines += [f"{d} discovered: {x}" for x in dep.discoveries]
        seen = set(lines)
        for disc in list(discoveries)[-DISCOVERIES_SHOWN:]:
            line = f"{disc.worker} discovered: {disc.text}"
            if line not in seen and not any(disc.text in s for s in seen):
                lines.append(line)
        lines += [f"Feedback on your last attempt: {f}" for f in rec.feedback[-FEEDBACK_SHOWN:]]
        return lines

    def finished(self) -> tuple[list[str], dict[str, str]] | None:
        """Return None while any task may still be worked on, else the failed tasks and the
        pending ones that can never start (a dependency failed or was cancelled), with why."""
        if not self.tasks or self.index.ids(*ACTIVE) or self.index.ready():
            return None
        pending = self.index.ids("pending")
        stuck = blocked(self.tasks, pending) if pending else {}
        if len(stuck) < len(pending):
            return None
        return self.index.ids("failed"), stuck

    def needs_workers(self) -> bool:
        """Whether a worker may still be needed: a task can be sent back while it is checked
        (to its worker, whose session knows it), and pending tasks not held wait for one."""
        return bool(self.index.ids("verifying")) or any(
            not self.tasks[t].hold for t in self.index.ids("pending")
        )


def drift(rec: TaskRecord) -> str | None:
    """Return a complaint if the task changed files outside the ones it owns."""
    if not rec.task.owns:
        return None
    outside = [f for f in rec.files_changed if not overlaps([f], rec.task.owns)]
    if outside:
        return (
            f"you changed files outside your claim ({', '.join(rec.task.owns)}): "
            f"{', '.join(outside)}. Revert those changes."
        )
    return None
