"""The master: plans, hands out ready tasks, supervises workers, answers, verifies and merges.

It is one loop (``tick``) over files: its inbox, the state files a person may edit, the
workers' heartbeats. Everything it knows is written to ``state/`` before it acts on it, so a
master killed at any point and started again rebuilds itself from those files and its inbox.

This module wires the parts and keeps the order of a turn, of a start and of a resume:
``context`` (what they all share: the run in memory, the durable turn, the voice),
``intake`` (the inbox), ``results`` (completions, checks, reviews, merges, the end),
``dispatch`` (assignments and supervision), ``steering`` (the person's edits),
``restore`` (tasks from the plan or the files), ``pool``, ``pipeline``, ``questions``,
``view`` (system-state.json).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from multibot import auth, mailbox, protocol
from multibot.advisor import Advisor
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import PlanError
from multibot.launcher import Launcher
from multibot.layout import MASTER_ID, Home
from multibot.master import ledger, restore
from multibot.master.context import RunContext
from multibot.master.dispatch import Dispatch
from multibot.master.edits import Edits, Seen
from multibot.master.intake import Intake
from multibot.master.limiting import Limits
from multibot.master.pool import WorkerPool
from multibot.master.questions import Questions, Voice, run_context
from multibot.master.results import EXIT_DONE, EXIT_FAILED, Results
from multibot.master.steering import Steering
from multibot.master.view import project
from multibot.plan import capability_problems
from multibot.state import Plan, QuestionRecord, SystemState, TaskRecord
from multibot.worktrees import GitRepo

__all__ = ["EXIT_DONE", "EXIT_FAILED", "Master"]


class Master:
    """The master process's parts, and the loop that drives them."""

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        *,
        repo: Path,
        backend: str,
        launcher: Launcher,
        worker_template: WorkerTemplate | None = None,
        advisor: Advisor | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        git: Callable[[], GitRepo] | None = None,
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        self.backend, self.repo = backend, repo
        self.advisor = advisor or Advisor()
        self.open_git = git or self.git_of_repo
        ctx = self.ctx = RunContext(
            home, config, out=out or sys.stdout, clock=clock, monotonic=monotonic
        )
        self.pool = WorkerPool(
            home,
            config,
            worker_template or WorkerTemplate(),
            launcher,
            backend,
            state=lambda: ctx.sys,
            chores=ctx.chores,
            send=ctx.send,
            event=ctx.event,
            monotonic=monotonic,
            agent_env=agent_env or {},
        )
        voice = Voice(ctx.journal.send, self.answer, ctx.event, ctx.show, self.opus_context)
        sandboxed = backend == "claude" and self.pool.template.sandbox
        self.questions = Questions(home, config, self.advisor, voice, sandboxed=sandboxed)
        self.limits = Limits(ctx, self.pool)
        self.results = Results(ctx, self.pool, self.advisor, self.questions, self.limits)
        self.intake = Intake(ctx, self.questions, self.results)
        self.dispatch = Dispatch(ctx, self.pool, self.results, self.limits)
        edits = Edits(home, ctx.chores, Seen(self.take_edit, self.paused, ctx.event))
        self.steering = Steering(ctx, self.pool, edits, self.questions)
        ctx.listen.edited = lambda tid, written: self.take_edit(ctx.tasks[tid], written)
        ctx.listen.problem = lambda problem, tid: edits.report(problem, task=tid)
        ctx.listen.answer_sent = lambda m: self.questions.sent(m, ctx.clock())
        ctx.listen.answer_unsent = self.questions.unsent

    # What tests and the runner look at.
    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self.ctx.tasks

    @property
    def sys(self) -> SystemState:
        return self.ctx.sys

    @property
    def finished(self) -> bool:
        return self.ctx.finished

    @property
    def exit_code(self) -> int:
        return self.ctx.exit_code

    def take_edit(self, rec: TaskRecord, edited: TaskRecord) -> None:
        self.steering.take_edit(rec, edited)

    def paused(self, paused: bool) -> None:
        self.steering.paused(paused)
        if not paused:
            self.limits.resumed()

    # == start-up =============================================================================
    def git_of_repo(self) -> GitRepo:
        return GitRepo(
            self.repo,
            self.ctx.home.integration_worktree,
            integration_branch=self.ctx.config.integration_branch,
            setup_hook=self.ctx.config.worktree_setup,
        )

    def open_repo(self) -> None:
        """Open the target repository and its integration branch (and recover a cut merge)."""
        git = self.ctx.git = self.open_git()
        git.ensure_integration(self.ctx.config.base_branch)
        self.ctx.pipeline.attach(git)
        note = git.recover()
        if note:
            self.ctx.event("merge-recovered", str(note))

    def use_keys(self, keys: auth.Keys) -> None:
        self.ctx.keys = self.pool.keys = keys

    def start_new(
        self,
        plan: Plan,
        goal: str,
        run_id: str,
        *,
        opus_session: str | None = None,
        opus_cost_usd: float = 0.0,
    ) -> None:
        """Begin a new run with a validated plan (and the Opus session that made it)."""
        ctx = self.ctx
        problems = capability_problems(plan.tasks, self.pool.template.capabilities)
        if problems:
            raise PlanError(problems)
        for path in (ctx.home.state_dir, ctx.home.tasks_dir, ctx.home.workers_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.use_keys(auth.create_keys(ctx.home))  # a new run: nothing old verifies
        mailbox.create_inbox(ctx.home, MASTER_ID)
        self.open_repo()
        assert ctx.git is not None
        ctx.sys = SystemState(
            run_id=run_id,
            goal=goal or plan.goal,
            backend=self.backend,
            master_pid=os.getpid(),
            phase="awaiting_approval" if ctx.config.approve_plan else "running",
            opus_session=opus_session,
        )
        ledger.charge(ctx.sys, opus_cost_usd)  # planning is part of the run's spend
        ctx.sys.git.repo, ctx.sys.git.integration_branch = str(self.repo), ctx.git.integration
        ctx.sys.git.base = ctx.config.base_branch or "HEAD"
        ctx.sys_file.update(lambda _: ctx.sys.model_copy(deep=True))
        ctx.plan = plan.model_copy(update={"approved": not ctx.config.approve_plan})
        ctx.plan_file.update(lambda _: ctx.plan)
        ctx.event("run-started", f"run {run_id}: {len(plan.tasks)} tasks", repo=str(self.repo))
        if ctx.config.approve_plan:
            ctx.show(
                f'plan written to {ctx.home.plan}: set "approved": true to start '
                "(or run `multibot approve`)"
            )
        else:
            restore.from_plan(ctx)
        self.intake.open()

    def resume(self) -> None:
        """Rebuild from the state files after a restart; nothing lost, nothing done twice."""
        ctx = self.ctx
        note = ctx.sys_file.recover()
        ctx.sys = ctx.sys_file.read()
        if note:
            ctx.event("state-recovered", note)
        ctx.sys.master_generation += 1
        ctx.sys.master_pid = os.getpid()
        self.repo = Path(ctx.sys.git.repo or self.repo)
        self.use_keys(auth.keys_of(ctx.home, create=True))
        mailbox.create_inbox(ctx.home, MASTER_ID)
        self.open_repo()
        ctx.plan = ctx.plan_file.read()
        if ctx.plan.approved:
            restore.from_files(ctx)
        self.questions.load()
        # A merge may have landed just before the crash: git says which verified tasks are in.
        for tid in ctx.book.ids("verified"):
            self.results.recover_merge(ctx.tasks[tid])
        ctx.pipeline.restore()
        self.pool.adopt()
        self.pool.forget_lost_panes()
        self.pool.watch_all()
        ctx.event(
            "master-restarted",
            f"generation {ctx.sys.master_generation}, "
            f"{len(ctx.tasks)} tasks, {len(ctx.sys.workers)} workers",
        )
        self.intake.open()
        for tid in ctx.book.ids("verifying"):  # killed while checking it: nobody else will
            ctx.event("verify-resumed", f"{tid} is checked again", task=tid)
            self.results.verify(ctx.tasks[tid])
        # Then messages (a TASK_COMPLETE may be waiting), then re-send lost assignments.
        self.intake.handle_inbox()
        self.dispatch.reconcile_workers()
        self.dispatch.resend_assignments()
        ctx.journal.commit()
        self.flush(force=True)

    # == the loop =============================================================================
    def run(self) -> int:
        """Tick until every task is merged, failed or cancelled; return the exit code."""
        try:
            while not self.ctx.finished:
                self.tick()
                assert self.ctx.inbox is not None
                self.ctx.inbox.wait(self.ctx.config.tick)
        except KeyboardInterrupt:
            self.ctx.show("interrupted: workers keep running; start the master again to resume")
            self.flush(force=True)
            return EXIT_FAILED
        finally:
            self.close()
        return self.ctx.exit_code

    def tick(self) -> None:
        """One turn: messages, edits, supervision, assignments, merges, completion."""
        ctx, results = self.ctx, self.results
        self.intake.handle_inbox()
        if ctx.finished:  # stopped by what came in (the API refused the credentials)
            ctx.journal.commit()
            self.flush(force=True)
            return
        self.intake.prune_inbox()
        self.steering.read_edits()
        if ctx.sys.phase == "awaiting_approval":
            self.steering.check_approval()
        self.dispatch.supervise()
        results.handle_advice()
        results.handle_checks()
        if ctx.sys.phase == "running":
            self.limits.check_wait()
            if not ctx.sys.paused and not results.over_budget():
                self.dispatch.assign_ready()
                ctx.journal.commit()  # assignments out now: the rest of the turn can wait
            results.merge_next()
            self.dispatch.stop_idle_workers()
            results.check_done()
        ctx.journal.commit()
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Write system-state.json if anything changed (at most every FLUSH_EVERY_S, or forced)."""
        ctx = self.ctx
        if not ctx.view.due(force):
            return
        self.pool.refresh_titles()
        queue = (ctx.pipeline.merging(), ctx.pipeline.view())
        project(ctx.sys, ctx.tasks, ctx.book.order, queue, ctx.branches)
        ctx.view.write(ctx.sys, force)

    def close(self) -> None:
        self.ctx.jobs.close()
        self.ctx.journal.close()
        self.flush(force=True)
        self.advisor.close()
        self.ctx.close()

    # == what the questions are told ==========================================================
    def opus_context(self, asker: str, context: str) -> str:
        """(questions) What Opus is told of the run with a question."""
        ctx = self.ctx
        tasks, workers = list(ctx.tasks.values()), list(ctx.sys.workers.values())
        return run_context(ctx.sys.goal, tasks, ctx.discoveries.all(), workers, asker, context)

    def answer(self, q: QuestionRecord, text: str, by: str) -> protocol.Envelope:
        """(questions) The message that answers q, to the worker that asked: it passes it
        on to its agent's `multibot ask` if that still waits, or into the agent's context."""
        answer = protocol.Answer(answer=text, answered_by=by)
        return self.ctx.message(q.worker, answer, task_id=q.task_id, correlation_id=q.message_id)
