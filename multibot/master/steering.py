"""The person's hand on the run: task edits (hold, cancel, priority), the pause, approval.

``edits.py`` looks at the files in rotation and works out what changed; here a change is
applied to the run: a cancelled task's worker is stopped, an approved plan becomes tasks.
"""

from __future__ import annotations

from multibot.master import restore
from multibot.master.context import RunContext
from multibot.master.edits import FORGED, Edits, task_edit
from multibot.master.pool import WorkerPool
from multibot.master.questions import Questions
from multibot.plan import capability_problems
from multibot.state import ON_WORKER, TaskRecord


class Steering:
    """Applies what the person changed in the state files."""

    def __init__(
        self, ctx: RunContext, pool: WorkerPool, edits: Edits, questions: Questions
    ) -> None:
        self.ctx, self.pool, self.edits, self.questions = ctx, pool, edits, questions

    def read_edits(self) -> None:
        """Take in what the person edited: pause, task hold/cancel/priority, answers."""
        ctx = self.ctx
        mono = ctx.mono()
        files = ctx.journal.files
        self.edits.look_at_tasks(ctx.book.order.ids, files, ctx.tasks, ctx.journal.busy, mono)
        if self.edits.due(mono):
            self.edits.look_at_system(ctx.sys_file, ctx.sys.paused)
            self.questions.look()

    def took_write(self, tid: str, written: TaskRecord) -> None:
        """(journal) A task's file was written, with the person's fields as they are."""
        self.ctx.wrote()
        self.take_edit(self.ctx.tasks[tid], written)

    def take_edit(self, rec: TaskRecord, edited: TaskRecord) -> None:
        """Apply what the person changed in a task's file: hold, cancel, priority (a change
        of any other field is refused, and said once; the next write puts it back)."""
        if edited.forged():
            self.edits.report(f"{self.ctx.home.task(rec.id)}: {FORGED}")
        if not task_edit(rec, edited):
            return
        self.ctx.event(
            "task-edited",
            f"{rec.id}: hold={rec.hold} cancel={rec.cancel} priority={rec.task.priority}",
            task=rec.id,
        )
        if rec.cancel and rec.status not in ("merged", "cancelled"):
            self.cancel(rec)

    def paused(self, paused: bool) -> None:
        self.ctx.sys.paused = paused
        self.ctx.event("paused" if paused else "resumed", "by the person (system-state.json)")

    def cancel(self, rec: TaskRecord) -> None:
        """Cancel a task; its worker, if on it, stops (work committed) and is not restarted."""
        if rec.worker and rec.status in ON_WORKER:
            info = self.ctx.sys.workers.get(rec.worker)
            if info is not None and info.current_task == rec.id:
                info.current_task = None
                self.pool.stop(rec.worker, f"task {rec.id} cancelled")
        self.ctx.move(rec, "cancelled")

    def check_approval(self) -> None:
        ctx = self.ctx
        plan = self.edits.approved_plan(ctx.plan_file)
        problems = capability_problems(plan.tasks if plan else [], self.pool.template.capabilities)
        if problems:
            ctx.event("plan-refused", "; ".join(problems))
        elif plan is not None:
            ctx.plan = plan
            ctx.sys.phase = "running"
            restore.from_plan(self.ctx)
            ctx.event("plan-approved", f"{len(plan.tasks)} tasks")
