"""What the workers' results, the checks and Opus's reviews mean for the tasks.

A TASK_COMPLETE moves a task to verifying; its claim and verify command decide verified or a
retry; a review may send it back; the merge queue lands it. Attempts run out into failed.
Here too: the run's end (every task merged, failed or cancelled) and its budget.
"""

from __future__ import annotations

from multibot import protocol
from multibot.advisor import Advice, Advisor
from multibot.errors import GitError
from multibot.master import feedback, ledger
from multibot.master.book import drift
from multibot.master.context import RunContext
from multibot.master.limiting import Limits
from multibot.master.pipeline import BrokeCheck, Conflicted, Merged, Outcome, Verified
from multibot.master.pool import WorkerPool
from multibot.master.questions import Questions
from multibot.state import ON_WORKER, TaskRecord

EXIT_DONE = 0
EXIT_FAILED = 1


class Results:
    """Takes in completions, errors, check outcomes and reviews; decides retry, merge, end."""

    def __init__(
        self,
        ctx: RunContext,
        pool: WorkerPool,
        advisor: Advisor,
        questions: Questions,
        limits: Limits,
    ) -> None:
        self.ctx, self.pool, self.advisor, self.questions = ctx, pool, advisor, questions
        self.limits = limits
        self.budget_said = False  # the budget-reached event is said once

    def on_complete(self, m: protocol.Envelope, p: protocol.TaskComplete) -> None:
        ctx = self.ctx
        tid = m.task_id or ""
        rec = ctx.book.get(tid)
        if rec is None or rec.worker != m.sender or rec.status not in ON_WORKER:
            ctx.event(
                "duplicate-ignored",
                f"TASK_COMPLETE for {tid} from {m.sender} "
                f"(task is {rec.status if rec else 'unknown'})",
            )
            return
        if rec.branch and p.branch != rec.branch:  # the task's branch is the master's to name
            ctx.event(
                "branch-ignored",
                f"{m.sender} reported {tid} done on {p.branch}; its branch is {rec.branch}",
                task=tid,
            )
        rec.summary, rec.commit, rec.branch = p.summary, p.commit, rec.branch or p.branch
        rec.files_changed = p.files_changed
        rec.discoveries = [*rec.discoveries, *p.discoveries]
        rec.cost_usd += p.cost_usd
        rec.tokens = protocol.Tokens(
            input=rec.tokens.input + p.tokens.input, output=rec.tokens.output + p.tokens.output
        )
        rec.turns += p.turns
        rec.finished_at = ctx.clock()
        tokens = (p.tokens.input, p.tokens.output)
        ledger.charge(ctx.sys, p.cost_usd, tokens, p.turns, worker=m.sender)
        info = ctx.sys.workers.get(m.sender)
        if info is not None:
            info.status, info.current_task, info.idle_since = "idle", None, ctx.clock()
            info.tasks_done += 1
        ctx.move(rec, "verifying")
        self.limits.succeeded()
        ctx.show(f"✓ {tid} finished by {m.sender}: {p.summary[:160]}")
        for text in p.follow_ups:
            self.add_follow_up(rec, text)
        self.verify(rec)

    def add_follow_up(self, parent: TaskRecord, text: str) -> None:
        """Add a task after parent, as its worker asked (once, even if the request comes twice)."""
        ctx = self.ctx
        made = ctx.book.follow_up(parent, text, ctx.clock())
        if isinstance(made, str):
            ctx.event("follow-up-refused", made)
        elif made is not None:
            ctx.add_task(made)
            ctx.sys.metrics.tasks_total = len(ctx.tasks)
            ctx.event("follow-up-added", f"{made.id} after {parent.id}: {text}")

    def verify(self, rec: TaskRecord) -> None:
        """Check a finished task: its claim, then its verify command (in the background)."""
        problem = drift(rec)
        if problem is not None:
            self.retry(rec, problem)
        elif rec.task.verify:
            self.ctx.pipeline.verify(rec.id, rec.commit or self.ctx.branch(rec), rec.task.verify)
        else:
            self.verified(rec)

    def verified(self, rec: TaskRecord) -> None:
        """A task passed its checks: review it if asked, else queue it for merging."""
        ctx = self.ctx
        ctx.event("verified", f"{rec.id} verified", task=rec.id)
        if ctx.config.review and self.advisor.available and ctx.git is not None:
            try:
                diff = ctx.git.diff(ctx.branch(rec))
            except GitError as exc:  # uncaught, it would stop the master (and again on restart)
                self.retry(rec, f"the branch could not be read for review: {exc}")
                return
            self.advisor.review(rec.id, f"{rec.task.title}\n{rec.task.description}", diff)
            return
        ctx.move(rec, "verified")

    def handle_advice(self) -> None:
        ctx = self.ctx
        self.questions.tick(ctx.clock())
        for advice in self.advisor.poll():
            session = self.advisor.session_id
            if session and session != ctx.sys.opus_session:
                ctx.sys.opus_session = session  # a lost session was replaced: keep the new one
            ledger.charge(ctx.sys, advice.cost_usd, advice.tokens)
            if advice.kind == "answer":
                self.questions.advised(advice)
            elif advice.kind == "review":
                self.on_review(advice)

    def on_review(self, advice: Advice) -> None:
        ctx = self.ctx
        rec = ctx.book.get(advice.key)
        if rec is None or rec.status != "verifying":
            return
        if not advice.ok:
            # Opus could not review (timeout, API error): not the worker's fault, so no attempt
            # is spent on it. The checks passed: merge, as when no advisor is available at all.
            ctx.event("review-failed", f"{rec.id} merged unreviewed: {advice.text}", task=rec.id)
            ctx.move(rec, "verified")
        elif advice.approved:
            ctx.event("review-approved", f"{rec.id}: {advice.text[:200]}", task=rec.id)
            ctx.move(rec, "verified")
        else:
            self.retry(rec, f"review asked for changes: {advice.text}")

    def handle_checks(self) -> None:
        """Take in the verify commands and merge queue jobs finished in the background."""
        for done in self.ctx.jobs.poll():
            for outcome in self.ctx.pipeline.take(done):
                self.take_outcome(outcome)

    def take_outcome(self, outcome: Outcome) -> None:
        """Act on what the pipeline found for one task."""
        ctx = self.ctx
        tid = outcome.outcome.task_id if isinstance(outcome, Conflicted) else outcome.task_id
        rec = ctx.book.get(tid)
        if rec is None:
            return
        wanted = "verifying" if isinstance(outcome, Verified) else "verified"
        if isinstance(outcome, Merged) and rec.status == "cancelled":
            # Cancelled while its merge was landing: git is the truth, and its dependents go
            # on from it.
            ctx.event("cancel-too-late", f"{tid} was cancelled as it merged", task=tid)
            self.on_merged(rec, outcome.merge_commit)
        elif rec.status != wanted:  # cancelled (or sent back by hand) meanwhile
            ctx.event("merge-ignored", f"{tid} is {rec.status} now", task=tid)
        elif isinstance(outcome, Verified):
            if outcome.ok:
                self.verified(rec)
            else:
                self.retry(rec, feedback.verify_failed(rec, outcome.output))
        elif isinstance(outcome, Merged):
            self.on_merged(rec, outcome.merge_commit)
        elif isinstance(outcome, Conflicted):
            assert ctx.git is not None
            self.retry(rec, feedback.conflict(outcome.outcome, ctx.git.integration))
        elif isinstance(outcome, BrokeCheck):
            self.retry(rec, feedback.broke_check(rec, outcome.output))

    def retry(self, rec: TaskRecord, feedback: str) -> None:
        """Send a task back with feedback (a new attempt), or fail it when attempts run out."""
        ctx = self.ctx
        if ctx.book.retry(rec, feedback, ctx.config.max_attempts) == "failed":
            ctx.event(
                "task-failed",
                f"{rec.id} failed after {rec.attempts} attempts: {feedback[:300]}",
                task=rec.id,
            )
        else:
            ctx.event("task-retry", f"{rec.id} goes back: {feedback[:300]}", task=rec.id)

    def on_error(self, m: protocol.Envelope, p: protocol.ErrorReport) -> None:
        ctx = self.ctx
        tid = m.task_id or ""
        rec = ctx.book.get(tid)
        info = ctx.sys.workers.get(m.sender)
        ctx.event(
            "worker-error",
            f"{m.sender} on {tid or '-'}: {p.kind}: {p.message[:300]}",
            worker=m.sender,
            task=tid,
        )
        if p.kind == "startup" and info is not None:
            info.status, info.failure_reason = "failed", p.message
            info.current_task = None
            self.pool.stop(m.sender)
        elif info is not None and info.current_task == tid:
            info.status, info.current_task, info.idle_since = "idle", None, ctx.clock()
        if rec is None or rec.worker != m.sender or rec.status not in ON_WORKER:
            return
        if p.kind == "busy":  # it runs another task: this one waits for a free worker
            rec.worker = None
            ctx.move(rec, "pending")
            return
        if p.kind == "limit":
            self.limits.on_limit(rec, m.sender, p)
            return
        if p.kind == "auth":
            self.limits.on_auth(m.sender, p)
            return
        if p.kind == "context":
            self.retry(rec, feedback.context_full(rec, p.message))
            return
        if p.recoverable and rec.attempts < ctx.config.max_attempts:
            self.retry(rec, f"{p.kind}: {p.message}")
        else:
            rec.last_error = f"{p.kind}: {p.message}"
            ctx.move(rec, "failed")

    def merge_next(self) -> None:
        """Queue, in plan order, every verified task whose dependencies are merged."""
        ctx = self.ctx
        if ctx.git is None or ctx.pipeline.idle():
            return  # it takes them in at its next step, whatever came meanwhile
        ready = [(r.id, r.task.title, ctx.branch(r)) for r in ctx.book.mergeable()]
        before = (ctx.pipeline.merging(), ctx.pipeline.blocked)
        ctx.pipeline.step(
            ready,
            ctx.plan.verify or ctx.config.verify,
            set(ctx.book.ids("verified")),
        )
        if (ctx.pipeline.merging(), ctx.pipeline.blocked) != before:
            ctx.view.dirty = True

    def on_merged(self, rec: TaskRecord, merge_commit: str | None) -> None:
        """A task is on the integration branch: its dependents may become ready."""
        ctx = self.ctx
        assert ctx.git is not None
        ctx.book.merged(rec, merge_commit, ctx.clock())
        ctx.sys.git.last_merge_commit = merge_commit or ctx.sys.git.last_merge_commit
        ctx.sys.metrics.tasks_merged += 1
        ctx.event(
            "merged",
            f"{rec.id} merged into {ctx.git.integration} ({(merge_commit or '')[:10]})",
            task=rec.id,
        )

    def recover_merge(self, rec: TaskRecord) -> None:
        """A verified task whose branch git says is merged (just before a crash) is merged."""
        ctx = self.ctx
        assert ctx.git is not None
        if ctx.git.is_merged(ctx.branch(rec)):
            ctx.book.merged(rec, None, ctx.clock())
            ctx.sys.metrics.tasks_merged += 1
            ctx.event("merge-recovered", f"{rec.id} was merged before the restart", task=rec.id)

    def check_done(self) -> None:
        ctx = self.ctx
        finished = ctx.book.finished()
        if finished is None:
            return
        failed, stuck = finished
        for tid, why in stuck.items():
            rec = ctx.tasks[tid]
            rec.last_error = f"blocked: {why}"
            ctx.changed(rec, lazy=False)
            ctx.event("task-blocked", f"{tid} can never start: {why}", task=tid)
        ctx.sys.phase = "failed" if failed or stuck else "done"
        ctx.sys.metrics.finished_at = ctx.clock()
        ctx.sys.metrics.tasks_failed = len(failed)
        for wid in self.pool.live():
            self.pool.stop(wid)
        tot = ctx.sys.metrics.totals
        took = ctx.sys.metrics.finished_at - ctx.sys.metrics.started_at
        ctx.event(
            "run-finished",
            f"{ctx.sys.phase}: {ctx.sys.metrics.tasks_merged} merged, "
            f"{len(failed)} failed, {len(stuck)} blocked in {took:.1f}s; "
            f"cost ${tot.cost_usd:.4f}, {tot.input_tokens} in / {tot.output_tokens} out tokens",
        )
        ctx.exit_code = EXIT_FAILED if failed or stuck else EXIT_DONE
        ctx.finished = True

    def over_budget(self) -> bool:
        ctx = self.ctx
        why = ledger.over_budget(ctx.sys, ctx.config.budget_usd)
        if why is not None and not self.budget_said:
            self.budget_said = True
            ctx.event("budget-reached", why)
        return why is not None
