"""Who works on what: ready tasks to free workers, a dead worker's task back, idle ones stopped.

The schedule itself is pure (``scheduler.py``) and the restart policy is the pool's; here
they meet the repository: a worktree and branch are prepared, the assignment recorded, then
sent (the journal sends it only once the task file says so).
"""

from __future__ import annotations

from multibot.errors import GitError, StateError
from multibot.master import feedback
from multibot.master.context import RunContext
from multibot.master.limiting import Limits
from multibot.master.pool import WorkerPool
from multibot.master.results import Results
from multibot.scheduler import WorkerSlot, schedule
from multibot.state import LIVE_WORKER, ON_WORKER, TaskRecord, WorkerState
from multibot.store import StateFile


class Dispatch:
    """Assigns ready tasks, supervises the workers, and sends again what may be lost."""

    def __init__(self, ctx: RunContext, pool: WorkerPool, results: Results, limits: Limits) -> None:
        self.ctx, self.pool, self.results, self.limits = ctx, pool, results, limits

    def supervise(self) -> None:
        """Restart the workers whose restart is due, and take in those that died."""
        ctx = self.ctx
        now = ctx.clock()
        checked = self.pool.check(now, ctx.mono())
        if checked is None:
            return
        ctx.view.dirty |= checked.changed or bool(checked.due or checked.dead)
        for wid in checked.due:
            self.pool.restart(wid)
            self.resend_assignments(only=wid)
        for wid, reason in checked.dead:
            info = ctx.sys.workers[wid]
            rec = ctx.book.get(info.current_task)
            on_it = rec is not None and rec.status in ON_WORKER and rec.worker == wid
            if not self.pool.died(wid, reason, now):
                if rec is not None and on_it:  # its next incarnation does it again
                    rec.runs += 1
                    ctx.changed(rec, lazy=True)
                continue
            info.current_task = None
            if rec is not None and rec.status in ON_WORKER:
                # Counted as an attempt: a task that kills every worker must not do so forever.
                # rec.worker stays: its worktree holds the branch, released on reassignment.
                self.results.retry(rec, feedback.worker_failed(wid, info.restarts - 1, reason))

    def resend_assignments(self, only: str | None = None) -> None:
        """Send again the assignments a worker may not have (after its or our restart)."""
        ctx = self.ctx
        for tid in ctx.book.ids(*ON_WORKER):
            rec = ctx.tasks[tid]
            if rec.worker is None or (only is not None and rec.worker != only):
                continue
            if only is None:
                ws = StateFile(ctx.home.worker_state(rec.worker), WorkerState, default=None)
                try:
                    cur = ws.read().current_task
                except StateError:
                    cur = None
                if cur is not None and cur.task_id == rec.id:
                    continue
            self.send_assignment(rec, rec.worker)

    def reconcile_workers(self) -> None:
        """Free workers whose task ended after system-state.json was last written, and put
        back on their task those it did not name."""
        ctx = self.ctx
        # Task files are written at every change, system-state.json a moment later: a worker
        # may still be recorded on a task that is verifying or merged, and would never be
        # given work again.
        for wid, info in ctx.sys.workers.items():
            rec = ctx.book.get(info.current_task)
            if info.current_task and (
                rec is None or rec.worker != wid or rec.status not in ON_WORKER
            ):
                info.current_task, info.idle_since = None, ctx.clock()
                ctx.view.dirty = True
        # And the other way: a worker adopted (or written down late) is on its task.
        for tid in ctx.book.ids(*ON_WORKER):
            rec = ctx.tasks[tid]
            on = ctx.sys.workers.get(rec.worker or "")
            if on and on.current_task is None and on.status in LIVE_WORKER:
                on.current_task, on.branch, on.model = rec.id, rec.branch, rec.task.model
                ctx.view.dirty = True

    def stop_idle_workers(self) -> None:
        ctx = self.ctx
        if ctx.book.needs_workers():
            return
        now = ctx.clock()
        for wid, info in self.pool.live().items():
            idle_for = now - (info.idle_since or now)
            if (
                info.status == "idle"
                and info.current_task is None
                and idle_for > ctx.config.idle_worker_timeout
            ):
                ctx.event("worker-stopped", f"{wid} idle for {idle_for:.0f}s", worker=wid)
                self.pool.stop(wid)

    def assign_ready(self) -> None:
        ctx = self.ctx
        room = self.limits.room()  # none while throttled, fewer after a limit (AIMD)
        if room <= 0:
            return
        free = self.pool.free()
        last = ctx.book.last_tasks() if free else {}  # it looks at every ready task
        idle = [WorkerSlot(w, frozenset(i.capabilities), last.get(w)) for w, i in free.items()]
        plan = schedule(
            ctx.tasks,
            idle,
            len(self.pool.live()),
            ctx.config.max_workers,
            frozenset(self.pool.template.capabilities),
            ctx.book.order,
            ctx.book.index,
        )
        for a in plan[:room]:
            wid = a.worker_id or self.pool.spawn()
            try:
                self.send_assignment(ctx.tasks[a.task_id], wid, new=True)
            except GitError as exc:
                rec = ctx.tasks[a.task_id]
                rec.last_error = f"git: {exc}"
                ctx.event("assign-failed", f"{a.task_id}: {exc}", task=a.task_id)
                ctx.move(rec, "failed")

    def send_assignment(self, rec: TaskRecord, wid: str, new: bool = False) -> None:
        """Prepare the worktree and branch, record the assignment, then send it."""
        ctx = self.ctx
        assert ctx.git is not None
        info = ctx.sys.workers[wid]
        prev = ctx.sys.workers.get(rec.worker or "")
        if new and prev is not None and prev.id != wid and prev.status in ("failed", "stopped"):
            self.pool.release_worktree(prev, ctx.git)
        worktree = ctx.home.worktree(wid)
        branch = ctx.git.branch_for(rec.id)  # the worker checks it out (see TaskAssignment.repo)
        if new:
            rec.attempts += 1
            rec.runs += 1
            rec.assigned_at = ctx.clock()
            rec.worker, rec.branch = wid, branch
            ctx.move(rec, "assigned")
        info.current_task, info.branch, info.model = rec.id, branch, rec.task.model
        info.working_directory = str(worktree)
        if info.status == "idle":
            info.status = "working"
        payload = feedback.assignment(
            rec,
            ctx.config,
            worktree=str(worktree),
            context=ctx.book.context_for(rec, ctx.discoveries.all()),
            base_branch=ctx.git.integration,
            repo=str(ctx.git.root),
        )
        ctx.send(wid, payload, task_id=rec.id)
        ctx.event(
            "assigned",
            f"{rec.id} → {wid} (attempt {rec.attempts}, {rec.task.model})",
            task=rec.id,
            worker=wid,
        )
