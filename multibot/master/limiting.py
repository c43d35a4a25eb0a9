"""The API's limits as the run meets them: throttling, adaptive concurrency, the stop on a
bad credential, and the pause once the run has waited too long in all (see limits.py).

A worker whose agent's call was limited reports ERROR kind "limit": its task goes back with
its attempt given back, and keeps its worker (whose session for it is resumed). Kind "auth"
stops the run at once, every task kept for the restart that follows the fix.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from multibot import protocol
from multibot.limits import AUTH_FIX, Kind, Trouble, wait_for
from multibot.master.context import RunContext
from multibot.master.pool import WorkerPool
from multibot.state import ON_WORKER, LimitsView, TaskRecord

EXIT_STOPPED = 3  # the run stopped, to be continued: start the master again after the fix


class Limits:
    """Decides what a limit, an overload or a refused credential does to the run."""

    def __init__(
        self, ctx: RunContext, pool: WorkerPool, draw: Callable[[], float] = random.random
    ) -> None:
        self.ctx, self.pool, self.draw = ctx, pool, draw
        self.was_throttled = False

    def on_limit(self, rec: TaskRecord, sender: str, p: protocol.ErrorReport) -> None:
        """A worker's agent was limited on rec: back it goes, attempt kept, run throttled."""
        ctx, cfg = self.ctx, self.ctx.config
        now = ctx.clock()
        trouble = Trouble(_kind(p.detail), p.api_status, p.reset_at, p.message)
        running = len(ctx.book.ids(*ON_WORKER))
        wait = wait_for(trouble, ctx.throttle.streak + 1, cfg, now, self.draw())
        ctx.throttle.limited(now, sender, trouble, running, wait)
        ctx.book.limited(rec)
        self.was_throttled = True
        ctx.event(
            "throttled",
            f"{rec.id}: {trouble.kind.replace('_', ' ')} ({trouble.label()}) from {sender}, "
            f"attempt {rec.attempts} kept; {ctx.throttle.line(now)}",
            task=rec.id,
            worker=sender,
            status=p.api_status,
        )
        self.show()

    def on_auth(self, sender: str, p: protocol.ErrorReport) -> None:
        """The API refused the credentials: stop the run now, keeping every task for later."""
        ctx = self.ctx
        for tid in ctx.book.ids(*ON_WORKER):  # their agents would be refused all the same
            ctx.book.limited(ctx.tasks[tid])
        for wid in list(self.pool.live()):
            self.pool.stop(wid, "the API refused the credentials")
        ctx.event(
            "run-stopped",
            f"run stopped: the API refused the credentials ({p.api_status} from {sender}: "
            f"{p.message[:200]}). {AUTH_FIX}",
            worker=sender,
            status=p.api_status,
        )
        ctx.exit_code, ctx.finished = EXIT_STOPPED, True

    def succeeded(self) -> None:
        """A task's agent finished without a limit: one more agent may run at once."""
        before = self.ctx.throttle.allowed
        self.ctx.throttle.succeeded()
        if self.ctx.throttle.allowed != before:
            self.show()

    def room(self) -> int:
        """How many agents may start now (none while throttled)."""
        ctx = self.ctx
        now = ctx.clock()
        if ctx.throttle.throttled(now):
            return 0
        if self.was_throttled:
            self.was_throttled = False
            ctx.event("throttle-ended", f"agents may start again: {ctx.throttle.line(now)}")
            self.show()
        return ctx.throttle.room(len(ctx.book.ids(*ON_WORKER)))

    def check_wait(self) -> None:
        """Past limit_wait_max of waiting in all, the run pauses itself (not fails)."""
        ctx = self.ctx
        waited = ctx.throttle.total_wait(ctx.clock())
        if ctx.sys.paused or waited <= ctx.config.limit_wait_max:
            return
        ctx.sys.paused = True
        ctx.sys_file.update(lambda s: s.model_copy(update={"paused": True}))
        ctx.event(
            "paused",
            f"paused itself: {waited:.0f}s of API limits in all (limit_wait_max "
            f"{ctx.config.limit_wait_max:.0f}s), the last {ctx.throttle.last}. Running agents "
            "are paused too; `multibot resume all` goes on when the API allows again.",
        )
        self.show()

    def resumed(self) -> None:
        """The person resumed the run: the wait is counted afresh."""
        self.ctx.throttle.reset_wait()
        self.show()

    def show(self) -> None:
        """Put the throttle in system-state.json (and so in `multibot status`)."""
        ctx = self.ctx
        t, now = ctx.throttle, ctx.clock()
        ctx.sys.limits = LimitsView(
            throttled=t.since is not None and now < t.until,
            next_try=t.until if t.since is not None else None,
            allowed=t.allowed,
            ceiling=t.ceiling,
            hits=t.hits,
            waited_s=round(t.total_wait(now), 1),
            last=t.last,
            line=t.line(now),
        )
        ctx.view.dirty = True


def _kind(detail: str) -> Kind:
    kinds: tuple[Kind, ...] = ("rate_limit", "overloaded", "usage_limit", "server")
    return next((k for k in kinds if k == detail), "rate_limit")
