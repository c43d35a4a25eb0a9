"""The tasks of a run, from its plan (a new or approved run) or its files (after a restart).

A file a person broke, or whose fields only multibot writes were edited, is refused with the
reason, and the task goes on from its last good state or from the plan; a file that is no
task of the run is left alone.
"""

from __future__ import annotations

from pathlib import Path

from multibot.errors import StateError
from multibot.master.context import RunContext
from multibot.master.edits import FORGED
from multibot.plan import topological_order
from multibot.state import PlanTask, TaskRecord


def from_plan(ctx: RunContext) -> None:
    """Create a task file for every planned task not already known."""
    ctx.book.ordered(topological_order(ctx.plan.tasks))
    now = ctx.clock()
    for t in ctx.plan.tasks:
        if t.id not in ctx.book:
            ctx.add_task(TaskRecord(task=t, ready_at=None if t.dependencies else now))
    ctx.sys.metrics.tasks_total = len(ctx.tasks)
    ctx.view.dirty = True


def from_files(ctx: RunContext) -> None:
    """Read the tasks back after a restart, by the rules the running master applies: a
    file a person broke, or whose fields only multibot writes were edited, is refused
    with the reason (the task goes on from its last good state, or from the plan); a
    file that is no task of the run (not in the plan, no follow-up) is refused."""
    ctx.book.ordered(topological_order(ctx.plan.tasks))
    ctx.home.tasks_dir.mkdir(parents=True, exist_ok=True)
    planned = {t.id: t for t in ctx.plan.tasks}
    for path in sorted(ctx.home.tasks_dir.glob("*.json")):
        rec = read_task_file(ctx, path, planned.get(path.stem))
        if rec is not None:
            ctx.book.add(rec)
    now = ctx.clock()
    for t in ctx.plan.tasks:  # a task file deleted by hand: the task starts anew
        if t.id not in ctx.book:
            ctx.event("task-file-missing", f"{ctx.home.task(t.id)} is missing: made anew")
            ctx.add_task(TaskRecord(task=t, ready_at=None if t.dependencies else now))


def read_task_file(ctx: RunContext, path: Path, planned: PlanTask | None) -> TaskRecord | None:
    """One task's record from its file, or None if the file is refused (see above)."""
    try:
        rec = ctx.journal.open(path)
    except StateError as exc:  # broken, with no good copy to fall back on
        if planned is None:
            ctx.event("task-file-refused", f"{exc}: not a task of this run")
            return None
        ctx.event("task-file-refused", f"{exc}: the task starts from the plan")
        rec = TaskRecord(task=planned, ready_at=ctx.clock())
        ctx.journal.adopt(path, rec)
        ctx.changed(rec, lazy=False)  # written once the file is fixed (or deleted)
        return rec
    why = None
    if rec.id != path.stem:
        why = f"it holds task {rec.id!r}, not {path.stem!r}"
    elif planned is None and not rec.origin.startswith("follow-up of "):
        why = "it is no task of the plan"
    if why is not None:
        ctx.event("task-file-refused", f"{path}: {why}; left alone, not run")
        ctx.journal.files.pop(path.stem, None)
        return None
    if rec.forged():
        good = ctx.journal.last_good(path)
        ctx.event("task-file-refused", f"{path}: {FORGED}")
        if good is not None and not good.forged():
            rec = good.model_copy(
                update={"hold": rec.hold, "cancel": rec.cancel, "version": rec.version}
            )
        elif planned is not None:
            rec = TaskRecord(task=planned, ready_at=ctx.clock(), version=rec.version)
        else:
            ctx.journal.files.pop(path.stem, None)
            return None
        ctx.changed(rec, lazy=False)  # written back as the system has it
    return rec
