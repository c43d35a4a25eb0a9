"""The master: plans, hands out ready tasks, supervises workers, answers, verifies and merges.

It is one loop (``tick``) over files: its inbox, the state files a person may edit, the
workers' heartbeats. Everything it knows is written to ``state/`` before it acts on it, so a
master killed at any point and started again rebuilds itself from those files and its inbox.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from multibot import mailbox, procs, protocol, worktrees
from multibot.advisor import Advice, Advisor
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import (
    GitError,
    LockTimeout,
    MultibotError,
    PlanError,
    StateError,
    TmuxError,
)
from multibot.heartbeat import HeartbeatTracker, read_heartbeat
from multibot.launcher import Launcher, worker_argv
from multibot.layout import MASTER_ID, Home
from multibot.lifecycle import task_transition
from multibot.master.jobs import Held, Jobs
from multibot.master.pipeline import (
    BrokeCheck,
    Conflicted,
    Merged,
    Outcome,
    Pipeline,
    Verified,
)
from multibot.plan import graph_problems, topological_order, validate_plan
from multibot.scheduler import ACTIVE, PlanOrder, TaskIndex, WorkerSlot, overlaps, schedule
from multibot.state import (
    BranchInfo,
    Discovery,
    Plan,
    PlanTask,
    QuestionRecord,
    SharedContext,
    SystemState,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    WorkerState,
)
from multibot.store import StateFile
from multibot.supervisor import backoff
from multibot.timeline import Timeline
from multibot.worktrees import GitRepo, MergeOutcome

EXIT_DONE = 0
EXIT_FAILED = 1

PRUNE_EVERY_S = 300.0
SUPERVISE_EVERY_S = 0.25
EDITS_EVERY_S = 0.5
# system-state.json is for people and the status view; every worker re-reads it when it changes.
FLUSH_EVERY_S = 0.5
TURN_WAIT_S = 0.5  # how long the loop waits for a turn's writes and messages (see commit)
LAZY_WRITE_S = 0.5  # how long a lazy task change waits for company (see set_task)
AUDIT_MAX_AGE_S = 7 * 86400.0
AUDIT_MAX_COUNT = 20_000

LIVE_WORKER = ("starting", "idle", "working", "blocked", "paused", "error")

Written = TaskRecord | StateError | LockTimeout  # what writing a task's file came to


@dataclass
class Turn:
    """A committed turn whose task files are not all written yet (see Master.commit)."""

    needs: dict[str, int]  # task id -> the change count its written file must reach
    taken: list[protocol.Envelope]  # messages handled in the turn, marked so once it is written
    jobs: list[Held]  # verify commands and the merge queue's jobs, started then

    def written(self, done: dict[str, int]) -> bool:
        return all(done.get(tid, -1) >= n for tid, n in self.needs.items())


class Master:
    """The master process's state and loop."""

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
    ) -> None:
        self.home, self.config, self.backend = home, config, backend
        self.repo = repo
        self.launcher = launcher
        self.template = worker_template or WorkerTemplate()
        self.advisor = advisor or Advisor()
        self.out = out or sys.stdout
        self.clock, self.mono = clock, monotonic
        self.sys_file = StateFile(home.system_state, SystemState, default=SystemState)
        self.plan_file = StateFile(home.plan, Plan, default=Plan)
        self.context_file = StateFile(home.context, SharedContext, default=SharedContext)
        self._shared: SharedContext | None = None
        self.sys = SystemState()
        self.plan = Plan()
        self.order = PlanOrder()
        self._dependents: tuple[int, dict[str, list[str]]] = (0, {})  # see dependents()
        self.tasks: dict[str, TaskRecord] = {}
        self.index = TaskIndex()  # the tasks by status, noted at each change (see set_task)
        self.task_files: dict[str, StateFile[TaskRecord]] = {}
        self.questions: dict[str, StateFile[QuestionRecord]] = {}
        self.watches: dict[str, HeartbeatTracker] = {}
        self.titles: dict[str, str] = {}
        self.jobs = Jobs(self.wake, Pipeline.lanes(config))
        self.pipeline = Pipeline(home, config, self.jobs, self.event, monotonic)
        self.last_prune = 0.0
        self.last_supervise = 0.0
        self.last_edits = 0.0
        self.last_task_look, self.task_look_at = 0.0, 0  # see read_edits
        self.git: GitRepo | None = None
        self.timeline = Timeline(home.timeline, clock)
        home.logs_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(home.log(MASTER_ID), "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.inbox: mailbox.Receiver | None = None
        self.dirty = False
        self.last_flush = 0.0
        self.finished = False
        self.exit_code = EXIT_DONE
        self.reported: set[str] = set()
        self.pending_window: dict[str, float] = {}
        # What a turn did, made durable and let out together by commit() (see there).
        self.unwritten: dict[str, float] = {}  # task id -> earliest retry (mono) of its file
        self.changes: dict[str, int] = {}  # task id -> changes made to it (set_task)
        self.touched: set[str] = set()  # tasks changed in this turn
        # task id -> (the changes it holds, the write, resolved once the file is in place)
        self.writing: dict[str, tuple[int, Future[Written], Future[None]]] = {}
        self.written: dict[str, int] = {}  # task id -> changes its last finished write held
        self.turns: list[Turn] = []  # committed, their files still being written
        self.outbox: list[protocol.Envelope] = []
        self.taken: list[protocol.Envelope] = []  # messages handled, not yet marked so
        self.undelivered: list[tuple[protocol.Envelope, MultibotError]] = []  # (io threads)
        # commit() writes files and sends in parallel: each waits on its disk sync, and the
        # file system commits many syncs together, so a turn's writes take about as long as one.
        self.io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="master-io")
        # What the loop must not wait for, one at a time in order: tmux calls (pane titles,
        # the look for dead panes) and system-state.json (written, and looked at for the
        # person's pause, only from this thread). Each is tens of ms on a busy machine.
        self.chores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="master-chores")
        self.sys_write: Future[StateError | LockTimeout | None] | None = None
        self.sys_look: Future[tuple[SystemState, StateError | None] | None] | None = None
        self.pane_look: tuple[float, Future[set[str]]] | None = None  # (started, look)
        self.title_job: Future[None] | None = None
        self.launched: dict[str, float] = {}  # worker id -> when (mono) its process was started
        self.sought: set[int] = set()  # pids of adopted workers whose pane was looked for
        self.branches: dict[str, BranchInfo] = {}  # each task's entry in system-state.json

    # == start-up =============================================================================
    def open_repo(self) -> None:
        """Open the target repository and its integration branch (and recover a cut merge)."""
        self.git = GitRepo(
            self.repo,
            self.home.integration_worktree,
            integration_branch=self.config.integration_branch,
            setup_hook=self.config.worktree_setup,
        )
        self.git.ensure_integration(self.config.base_branch)
        self.pipeline.attach(self.git)
        note = self.git.recover()
        if note:
            self.event("merge-recovered", str(note))

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
        for path in (self.home.state_dir, self.home.tasks_dir, self.home.workers_dir):
            path.mkdir(parents=True, exist_ok=True)
        mailbox.create_inbox(self.home, MASTER_ID)
        self.open_repo()
        assert self.git is not None
        self.sys = SystemState(
            run_id=run_id,
            goal=goal or plan.goal,
            backend=self.backend,
            master_pid=os.getpid(),
            phase="awaiting_approval" if self.config.approve_plan else "running",
            opus_session=opus_session,
        )
        self.sys.metrics.totals.cost_usd = opus_cost_usd  # planning is part of the run's spend
        self.sys.git.repo, self.sys.git.integration_branch = str(self.repo), self.git.integration
        self.sys.git.base = self.config.base_branch or "HEAD"
        self.sys_file.update(lambda _: self.sys.model_copy(deep=True))
        self.plan = plan.model_copy(update={"approved": not self.config.approve_plan})
        self.plan_file.update(lambda _: self.plan)
        self.event("run-started", f"run {run_id}: {len(plan.tasks)} tasks", repo=str(self.repo))
        if self.config.approve_plan:
            self.show(
                f'plan written to {self.home.plan}: set "approved": true to start '
                "(or run `multibot approve`)"
            )
        else:
            self.load_tasks_from_plan()
        self.inbox = mailbox.Receiver(self.home, MASTER_ID, rescan_s=self.config.rescan_interval)

    def resume(self) -> None:
        """Rebuild from the state files after a restart; nothing lost, nothing done twice."""
        note = self.sys_file.recover()
        self.sys = self.sys_file.read()
        if note:
            self.event("state-recovered", note)
        self.sys.master_generation += 1
        self.sys.master_pid = os.getpid()
        self.repo = Path(self.sys.git.repo or self.repo)
        mailbox.create_inbox(self.home, MASTER_ID)
        self.open_repo()
        self.plan = self.plan_file.read()
        if self.plan.approved:
            self.load_tasks_from_files()
        # A merge may have landed just before the crash: git says which verified tasks are in.
        for rec in list(self.tasks.values()):
            if rec.status == "verified":
                self.recover_merge(rec.id)
        self.pipeline.restore()
        self.adopt_workers()
        self.forget_lost_panes()
        now = self.mono()
        for wid, info in self.sys.workers.items():
            if info.status in LIVE_WORKER:
                self.watch(wid, info.generation, now)
        self.event(
            "master-restarted",
            f"generation {self.sys.master_generation}, "
            f"{len(self.tasks)} tasks, {len(self.sys.workers)} workers",
        )
        self.inbox = mailbox.Receiver(self.home, MASTER_ID, rescan_s=self.config.rescan_interval)
        for rec in list(self.tasks.values()):
            if rec.status == "verifying":  # killed while checking it: nobody else will
                self.event("verify-resumed", f"{rec.id} is checked again", task=rec.id)
                self.verify(rec)
        # Then messages (a TASK_COMPLETE may be waiting), then re-send lost assignments.
        self.handle_inbox()
        self.reconcile_workers()
        self.resend_assignments()
        self.commit()
        self.flush(force=True)

    def adopt_workers(self) -> None:
        """Catch up with workers started or restarted just before the crash, from their files."""
        # A launch writes the worker's state file first and system-state.json a moment later:
        # a worker missing here would be started a second time under the same id.
        suffix = "-state.json"
        for path in sorted(self.home.workers_dir.glob(f"*{suffix}")):
            wid = path.name[: -len(suffix)]
            try:
                ws = StateFile(path, WorkerState, default=None).read()
                known = self.sys.workers.get(wid)
                info = known or WorkerInfo(
                    id=wid, generation=ws.generation, capabilities=list(self.template.capabilities)
                )
            except (StateError, ValueError):
                continue
            if known is None:
                self.sys.workers[wid] = info
                self.event(
                    "worker-adopted",
                    f"{wid} (generation {ws.generation}) was started just before the restart",
                    worker=wid,
                )
            elif info.status in LIVE_WORKER and ws.generation > info.generation:
                info.generation = ws.generation  # restarted just before: watch the new one

    def forget_lost_panes(self) -> None:
        """Drop the pane ids recorded under another tmux server (the old one died): they
        would name nothing, or another pane of the new one."""
        try:
            here = self.launcher.where()
        except TmuxError as exc:
            self.event("pane-look-failed", f"cannot tell which tmux server runs: {exc}")
            return
        for wid, info in self.sys.workers.items():
            if info.pane_id and info.pane_server != here:
                self.event(
                    "pane-forgotten",
                    f"{wid}'s pane {info.pane_id} was in {info.pane_server or 'an unknown server'}"
                    f", not {here}: it gets a new pane",
                    worker=wid,
                )
                info.pane_id, info.pane_server = None, None

    def reconcile_workers(self) -> None:
        """Free workers whose task ended after system-state.json was last written, and put
        back on their task those it did not name."""
        # Task files are written at every change, system-state.json a moment later: a worker
        # may still be recorded on a task that is verifying or merged, and would never be
        # given work again.
        for wid, info in self.sys.workers.items():
            rec = self.tasks.get(info.current_task or "")
            if info.current_task and (
                rec is None or rec.worker != wid or rec.status not in ("assigned", "running")
            ):
                info.current_task, info.idle_since = None, self.clock()
                self.dirty = True
        # And the other way: a worker adopted (or written down late) is on its task.
        for rec in self.tasks.values():
            on = self.sys.workers.get(rec.worker or "")
            if (
                rec.status in ("assigned", "running")
                and on
                and on.current_task is None
                and on.status in LIVE_WORKER
            ):
                on.current_task, on.branch, on.model = rec.id, rec.branch, rec.task.model
                self.dirty = True

    def load_tasks_from_plan(self) -> None:
        """Create a task file for every planned task not already known."""
        self.order = PlanOrder(topological_order(self.plan.tasks))
        now = self.clock()
        for t in self.plan.tasks:
            if t.id not in self.tasks:
                self.add_task(TaskRecord(task=t, ready_at=None if t.dependencies else now))
        self.sys.metrics.tasks_total = len(self.tasks)
        self.dirty = True

    def load_tasks_from_files(self) -> None:
        self.order = PlanOrder(topological_order(self.plan.tasks))
        self.home.tasks_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.home.tasks_dir.glob("*.json")):
            tid = path.stem
            f = StateFile(path, TaskRecord, default=None)
            f.recover()
            rec = f.read()
            self.tasks[tid], self.task_files[tid] = rec, f
            self.index.note(rec)
            self.order.add(tid)
        for path in sorted(self.home.questions_dir.glob("*.json")):
            q = StateFile(path, QuestionRecord, default=None)
            if q.read().status != "delivered":
                self.questions[path.stem] = q

    def add_task(self, rec: TaskRecord) -> None:
        f = StateFile(self.home.task(rec.id), TaskRecord, default=lambda: rec)
        self.tasks[rec.id], self.task_files[rec.id] = rec, f
        self.index.note(rec)
        f.update(lambda _: rec)
        self.order.add(rec.id)

    # == the loop =============================================================================
    def run(self) -> int:
        """Tick until every task is merged, failed or cancelled; return the exit code."""
        try:
            while not self.finished:
                self.tick()
                assert self.inbox is not None
                self.inbox.wait(self.config.tick)
        except KeyboardInterrupt:
            self.show("interrupted: workers keep running; start the master again to resume")
            self.flush(force=True)
            return EXIT_FAILED
        finally:
            self.close()
        return self.exit_code

    def tick(self) -> None:
        """One turn: messages, edits, supervision, assignments, merges, completion."""
        self.handle_inbox()
        self.prune_inbox()
        self.read_edits()
        if self.sys.phase == "awaiting_approval":
            self.check_approval()
        self.supervise()
        self.handle_advice()
        self.handle_checks()
        if self.sys.phase == "running":
            if not self.sys.paused and not self.over_budget():
                self.assign_ready()
                self.commit()  # assignments out now: the rest of the turn can wait for them
            self.merge_next()
            self.stop_idle_workers()
            self.check_done()
        self.commit()
        self.flush()

    def wake(self) -> None:
        """Make the loop tick now (called from the checks thread when a job is done)."""
        if self.inbox is not None:
            self.inbox.ring()

    def close(self) -> None:
        self.jobs.close()
        self.settle()
        self.io.shutdown()
        self.flush(force=True)
        self.chores.shutdown()
        self.advisor.close()
        if self.inbox is not None:
            self.inbox.close()
        self.timeline.close()
        self._log.close()

    # == messages =============================================================================
    def prune_inbox(self) -> None:
        """Now and then, drop handled messages kept for audit past their age or number."""
        now = self.mono()
        if now - self.last_prune < PRUNE_EVERY_S or self.inbox is None:
            return
        self.last_prune = now
        removed = self.inbox.prune(max_age_s=AUDIT_MAX_AGE_S, max_count=AUDIT_MAX_COUNT)
        if removed:
            self.timeline.add("inbox-pruned", removed=removed)

    def handle_inbox(self) -> None:
        assert self.inbox is not None
        for m in self.inbox.fetch():
            try:
                self.handle(m)
            except (StateError, LockTimeout) as exc:
                self.event("state-write-refused", str(exc))
            self.taken.append(m)  # marked handled by commit(), once its effects are written

    def handle(self, m: protocol.Envelope) -> None:
        """Act on one message from a worker (or from the CLI speaking for one)."""
        info = self.sys.workers.get(m.sender)
        if info is not None and m.generation < info.generation:
            self.event(
                "stale-message-ignored",
                f"{m.type} from {m.sender} generation {m.generation} < {info.generation}",
                message=m.id,
            )
            return
        self.timeline.add("message", type=m.type, sender=m.sender, task=m.task_id, id=m.id)
        p = m.payload
        if info is not None:
            info.last_heartbeat = self.clock()
        if isinstance(p, protocol.StatusUpdate):
            self.on_status(m, p)
        elif isinstance(p, protocol.Question):
            self.on_question(m, p)
        elif isinstance(p, protocol.TaskComplete):
            self.on_complete(m, p)
        elif isinstance(p, protocol.ErrorReport):
            self.on_error(m, p)
        else:
            self.event("message-ignored", f"{m.type} from {m.sender} is not for the master")

    def on_status(self, m: protocol.Envelope, p: protocol.StatusUpdate) -> None:
        wid, tid = m.sender, m.task_id
        info = self.sys.workers.get(wid)
        if p.kind == "started" and tid in self.tasks:
            rec = self.tasks[tid]
            if rec.status == "assigned" and rec.worker == wid:
                rec.started_at = self.clock()
                # Lazy: a machine crash that loses it leaves the task assigned, and the
                # worker takes the assignment sent again at start for the one it runs.
                self.set_task(rec, "running", lazy=True)
        elif p.kind == "discovery":
            self.share_discovery(wid, tid, p.progress)
        elif p.kind == "follow_up" and tid in self.tasks:
            self.add_follow_up(self.tasks[tid], p.progress)
        elif p.kind == "blocked":
            self.event("worker-blocked", f"{wid} is blocked: {p.progress}", worker=wid, task=tid)
            if info:
                info.status = "blocked"
        elif p.progress:
            self.show(f"{wid} · {tid or '-'}: {p.progress}")
        if info is not None and p.kind in ("progress", "started") and info.status == "blocked":
            info.status = "working"
        self.dirty = True

    def share_discovery(self, wid: str, tid: str | None, text: str) -> None:
        """Record a discovery in the shared context and pass it to the other running workers."""
        self.context_file.update(
            lambda c: c.model_copy(
                update={
                    "discoveries": [*c.discoveries, Discovery(worker=wid, task_id=tid, text=text)]
                }
            )
        )
        self.event("discovery", f"{wid}: {text}", worker=wid, task=tid)
        for other, info in self.sys.workers.items():
            if other != wid and info.current_task and info.status in ("working", "blocked"):
                self.send(other, protocol.ContextUpdate(kind="discovery", text=text, source=wid))

    # -- questions ----------------------------------------------------------------------------
    def on_question(self, m: protocol.Envelope, p: protocol.Question) -> None:
        qid = "q-" + m.id
        if qid in self.questions or self.home.question(qid).exists():
            return  # redelivered after a restart: already recorded
        q = QuestionRecord(
            id=qid,
            message_id=m.id,
            worker=m.sender,
            task_id=m.task_id,
            question=p.question,
            context=p.context,
            reply_to=m.reply_to,
        )
        f = StateFile(self.home.question(qid), QuestionRecord, default=lambda: q)
        self.home.questions_dir.mkdir(parents=True, exist_ok=True)
        f.update(lambda _: q)
        self.questions[qid] = f
        self.sys.metrics.questions += 1
        self.event("question", f"{m.sender} asks: {p.question}", question=qid, worker=m.sender)
        known = self.faq_answer(p.question)
        if known is not None:
            self.answer(qid, known, "plan faq")
        elif self.config.question_policy == "auto" and self.advisor.available:
            self.advisor.ask(qid, p.question, self.question_context(m.sender, p))
        else:
            f.update(lambda r: r.model_copy(update={"escalated": True}))
            self.show(
                f"❓ question for you ({qid}) from {m.sender}: {p.question}\n"
                f'   answer with: multibot answer {qid} "..."  (or edit {f.path})'
            )
            if self.config.question_policy == "auto_with_window" and self.advisor.available:
                q_deadline = self.clock() + self.config.override_window
                self.pending_window[qid] = q_deadline

    def faq_answer(self, question: str) -> str | None:
        words = question.lower()
        for entry in self.plan.faq:
            if all(w in words for w in entry.match.lower().split()):
                return entry.answer
        return None

    def question_context(self, wid: str, p: protocol.Question) -> str:
        lines = [f"Goal: {self.sys.goal}", "Tasks:"]
        lines += [f"- {t.id} [{t.status}] {t.task.title}" for t in self.tasks.values()]
        disc = self.shared_context().discoveries
        if disc:
            lines += ["Discoveries:", *[f"- {d.worker}: {d.text}" for d in disc[-20:]]]
        lines += [
            "Workers:",
            *[f"- {w}: {i.status} on {i.current_task or '-'}" for w, i in self.sys.workers.items()],
        ]
        lines += [f"Asked by {wid}. {p.context}"]
        return "\n".join(lines)

    def answer(self, qid: str, text: str, by: str) -> None:
        """Record an answer and send it to the asking worker (exactly once)."""
        f = self.questions.get(qid)
        if f is None:
            return
        q = f.read()
        if q.status == "delivered":
            return
        now = self.clock()
        reply = protocol.make(
            protocol.Answer(answer=text, answered_by=by),
            sender=MASTER_ID,
            recipient=q.reply_to or q.worker,
            generation=self.sys.master_generation,
            task_id=q.task_id,
            correlation_id=q.message_id,
        )
        with contextlib.suppress(MultibotError):
            mailbox.send(self.home, reply)
        f.update(
            lambda r: r.model_copy(
                update={
                    "status": "delivered",
                    "answer": text,
                    "answered_by": by,
                    "answered_at": now,
                }
            )
        )
        self.questions.pop(qid, None)
        self.pending_window.pop(qid, None)
        self.event("answer", f"{qid} answered by {by}: {text}", question=qid, answered_by=by)

    def handle_advice(self) -> None:
        now = self.clock()
        for qid, deadline in list(self.pending_window.items()):
            if now >= deadline and qid in self.questions:
                q = self.questions[qid].read()
                self.advisor.ask(qid, q.question, q.context)
                del self.pending_window[qid]
        for advice in self.advisor.poll():
            session = getattr(self.advisor, "session_id", None)
            if session and session != self.sys.opus_session:
                self.sys.opus_session = session  # a lost session was replaced: keep the new one
            totals = self.sys.metrics.totals
            totals.cost_usd += advice.cost_usd
            totals.input_tokens += advice.tokens[0]
            totals.output_tokens += advice.tokens[1]
            if advice.kind == "answer":
                if advice.ok:
                    self.answer(advice.key, advice.text, "opus")
                else:
                    self.event("advisor-failed", f"could not answer {advice.key}: {advice.text}")
                    self.show(
                        f"❓ {advice.key} needs your answer: multibot answer {advice.key} ..."
                    )
            elif advice.kind == "review":
                self.on_review(advice)

    # -- task results -------------------------------------------------------------------------
    def on_complete(self, m: protocol.Envelope, p: protocol.TaskComplete) -> None:
        tid = m.task_id or ""
        rec = self.tasks.get(tid)
        if rec is None or rec.worker != m.sender or rec.status not in ("assigned", "running"):
            self.event(
                "duplicate-ignored",
                f"TASK_COMPLETE for {tid} from {m.sender} "
                f"(task is {rec.status if rec else 'unknown'})",
            )
            return
        rec.summary, rec.commit, rec.branch = p.summary, p.commit, p.branch
        rec.files_changed = p.files_changed
        rec.discoveries = [*rec.discoveries, *p.discoveries]
        rec.cost_usd += p.cost_usd
        rec.tokens = protocol.Tokens(
            input=rec.tokens.input + p.tokens.input, output=rec.tokens.output + p.tokens.output
        )
        rec.turns += p.turns
        rec.finished_at = self.clock()
        self.add_cost(m.sender, p.cost_usd, p.tokens.input, p.tokens.output, p.turns)
        info = self.sys.workers.get(m.sender)
        if info is not None:
            info.status, info.current_task, info.idle_since = "idle", None, self.clock()
            info.tasks_done += 1
        self.set_task(rec, "verifying")
        self.show(f"✓ {tid} finished by {m.sender}: {p.summary[:160]}")
        for text in p.follow_ups:
            self.add_follow_up(rec, text)
        self.verify(rec)

    def add_follow_up(self, parent: TaskRecord, text: str) -> None:
        """Add a task after parent, as its worker asked (once, even if the request comes twice)."""
        siblings = [t for t in self.tasks.values() if t.origin == f"follow-up of {parent.id}"]
        if any(t.task.description == text for t in siblings):
            return
        n = len(siblings) + 1
        tid = f"{parent.id}-f{n}"[:63]
        task = PlanTask(
            id=tid,
            title=text[:80],
            description=text,
            dependencies=[parent.id],
            model=parent.task.model,
        )
        problems = graph_problems([*(t.task for t in self.tasks.values()), task])
        if problems:
            self.event("follow-up-refused", "; ".join(problems))
            return
        self.add_task(
            TaskRecord(task=task, origin=f"follow-up of {parent.id}", ready_at=self.clock())
        )
        self.sys.metrics.tasks_total = len(self.tasks)
        self.event("follow-up-added", f"{tid} after {parent.id}: {text}")

    def verify(self, rec: TaskRecord) -> None:
        """Check a finished task: its claim, then its verify command (in the background)."""
        problem = self.drift(rec)
        if problem is not None:
            self.retry(rec, problem)
            return
        if rec.task.verify:
            self.pipeline.verify(
                rec.id, rec.commit or rec.branch or f"multibot/{rec.id}", rec.task.verify
            )
            return
        self.verified(rec)

    def on_verify(self, rec: TaskRecord, ok: bool, output: str) -> None:
        """Take in a verify command's result."""
        if not ok:
            self.retry(rec, f"verify `{rec.task.verify}` failed:\n{output[-3000:]}")
            return
        self.verified(rec)

    def verified(self, rec: TaskRecord) -> None:
        """A task passed its checks: review it if asked, else queue it for merging."""
        self.event("verified", f"{rec.id} verified", task=rec.id)
        if self.config.review and self.advisor.available and self.git is not None:
            try:
                diff = self.git.diff(rec.branch or f"multibot/{rec.id}")
            except GitError as exc:  # uncaught, it would stop the master (and again on restart)
                self.retry(rec, f"the branch could not be read for review: {exc}")
                return
            self.advisor.review(rec.id, f"{rec.task.title}\n{rec.task.description}", diff)
            return
        self.set_task(rec, "verified")

    def handle_checks(self) -> None:
        """Take in the verify commands and merge queue jobs finished in the background."""
        for done in self.jobs.poll():
            for outcome in self.pipeline.take(done):
                self.take_outcome(outcome)

    def take_outcome(self, outcome: Outcome) -> None:
        """Act on what the pipeline found for one task."""
        tid = outcome.outcome.task_id if isinstance(outcome, Conflicted) else outcome.task_id
        rec = self.tasks.get(tid)
        if rec is None:
            return
        wanted = "verifying" if isinstance(outcome, Verified) else "verified"
        if rec.status != wanted:  # cancelled (or sent back by hand) meanwhile
            self.event("merge-ignored", f"{tid} is {rec.status} now", task=tid)
        elif isinstance(outcome, Verified):
            self.on_verify(rec, outcome.ok, outcome.output)
        elif isinstance(outcome, Merged):
            self.on_merged(rec, outcome.merge_commit)
        elif isinstance(outcome, Conflicted):
            self.retry(rec, self.conflict_feedback(outcome.outcome))
        elif isinstance(outcome, BrokeCheck):
            self.retry(
                rec,
                f"the project check failed with {rec.id} merged, so it was not merged:\n"
                f"{outcome.output[-3000:]}",
            )

    def on_review(self, advice: Advice) -> None:
        rec = self.tasks.get(advice.key)
        if rec is None or rec.status != "verifying":
            return
        if not advice.ok:
            # Opus could not review (timeout, API error): not the worker's fault, so no attempt
            # is spent on it. The checks passed: merge, as when no advisor is available at all.
            self.event("review-failed", f"{rec.id} merged unreviewed: {advice.text}", task=rec.id)
            self.set_task(rec, "verified")
        elif advice.approved:
            self.event("review-approved", f"{rec.id}: {advice.text[:200]}", task=rec.id)
            self.set_task(rec, "verified")
        else:
            self.retry(rec, f"review asked for changes: {advice.text}")

    def drift(self, rec: TaskRecord) -> str | None:
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

    def retry(self, rec: TaskRecord, feedback: str) -> None:
        """Send a task back with feedback (a new attempt), or fail it when attempts run out."""
        rec.feedback = [*rec.feedback, feedback][-10:]
        rec.last_error = feedback
        if rec.attempts >= self.config.verify_attempts:
            self.set_task(rec, "failed")
            self.event(
                "task-failed",
                f"{rec.id} failed after {rec.attempts} attempts: {feedback[:300]}",
                task=rec.id,
            )
            return
        self.event("task-retry", f"{rec.id} goes back: {feedback[:300]}", task=rec.id)
        self.set_task(rec, "pending")

    def on_error(self, m: protocol.Envelope, p: protocol.ErrorReport) -> None:
        tid = m.task_id or ""
        rec = self.tasks.get(tid)
        info = self.sys.workers.get(m.sender)
        self.event(
            "worker-error",
            f"{m.sender} on {tid or '-'}: {p.kind}: {p.message[:300]}",
            worker=m.sender,
            task=tid,
        )
        if p.kind == "startup" and info is not None:
            info.status, info.failure_reason = "failed", p.message
            info.current_task = None
            self.stop_worker(m.sender, info)
        elif info is not None and info.current_task == tid:
            info.status, info.current_task, info.idle_since = "idle", None, self.clock()
        if rec is None or rec.worker != m.sender or rec.status not in ("assigned", "running"):
            return
        if p.kind == "protocol" and "busy" in p.message:
            rec.worker = None
            self.set_task(rec, "pending")
            return
        if p.recoverable and rec.attempts < self.config.verify_attempts:
            self.retry(rec, f"{p.kind}: {p.message}")
        else:
            rec.last_error = f"{p.kind}: {p.message}"
            self.set_task(rec, "failed")

    # == the person's edits ===================================================================
    def read_edits(self) -> None:
        """Take in what the person edited: pause, task hold/cancel/priority, answers.

        Each file is looked at every EDITS_EVERY_S; the task files a share each turn, in
        turn, as time passes (a look at a thousand at once held the turn up 20-30 ms).
        """
        mono = self.mono()
        share = min(1.0, (mono - self.last_task_look) / EDITS_EVERY_S)
        self.last_task_look = mono
        ids = self.order.ids
        count = min(len(ids), math.ceil(len(ids) * share))
        for k in range(count):
            self.look_at_task_file(ids[(self.task_look_at + k) % len(ids)])
        self.task_look_at = (self.task_look_at + count) % max(1, len(ids))
        if mono - self.last_edits < EDITS_EVERY_S:
            return
        self.last_edits = mono
        self.take_system_edits()
        for qid, qf in list(self.questions.items()):
            if qf.changed():
                q = qf.read()
                if q.answer and q.status != "delivered":
                    self.answer(qid, q.answer, "human")

    def look_at_task_file(self, tid: str) -> None:
        """Take in a person's edit of a task's file, if it changed."""
        f = self.task_files.get(tid)
        if f is None or tid in self.writing:  # the io thread has the file: look next time
            return
        if self.tasks[tid].status in ("merged", "cancelled"):
            f.expire()  # over: hold, cancel and priority mean nothing now
            return
        if not f.changed():
            return
        edited = f.read()
        problem = f.problem()
        if problem:
            self.report_problem(problem)
            return
        self.take_edit(self.tasks[tid], edited)

    def take_edit(self, rec: TaskRecord, edited: TaskRecord) -> None:
        """Apply what the person changed in a task file: hold, cancel, priority."""
        if (edited.hold, edited.cancel, edited.task.priority) == (
            rec.hold,
            rec.cancel,
            rec.task.priority,
        ):
            return
        rec.hold, rec.cancel = edited.hold, edited.cancel
        rec.task = rec.task.model_copy(update={"priority": edited.task.priority})
        self.event(
            "task-edited",
            f"{rec.id}: hold={rec.hold} cancel={rec.cancel} priority={rec.task.priority}",
            task=rec.id,
        )
        if rec.cancel and rec.status not in ("merged", "cancelled"):
            self.cancel(rec)

    def report_problem(self, problem: StateError) -> None:
        key = str(problem)
        if key not in self.reported:
            self.reported.add(key)
            self.event("bad-edit", f"{key} (last good state stays in force)")

    def cancel(self, rec: TaskRecord) -> None:
        """Cancel a task; its worker, if on it, stops (work committed) and is not restarted."""
        if rec.worker and rec.status in ("assigned", "running"):
            info = self.sys.workers.get(rec.worker)
            if info is not None and info.current_task == rec.id:
                info.current_task = None
                self.send(rec.worker, protocol.Terminate(reason=f"task {rec.id} cancelled"))
                info.status = "stopped"  # it exits: a new worker starts if work needs one
        self.set_task(rec, "cancelled")

    def check_approval(self) -> None:
        if not self.plan_file.changed():
            return
        plan = self.plan_file.read()
        problem = self.plan_file.problem()
        if problem:
            self.report_problem(problem)
            return
        if not plan.approved:
            return
        try:
            plan = validate_plan(plan.model_dump(), str(self.home.plan))
        except PlanError as exc:
            self.event("plan-refused", str(exc))
            return
        self.plan = plan
        self.sys.phase = "running"
        self.load_tasks_from_plan()
        self.event("plan-approved", f"{len(plan.tasks)} tasks")

    # == workers ==============================================================================
    def live_workers(self) -> dict[str, WorkerInfo]:
        return {w: i for w, i in self.sys.workers.items() if i.status in LIVE_WORKER}

    def new_worker_id(self) -> str:
        n = 1
        while f"w{n}" in self.sys.workers:
            n += 1
        return f"w{n}"

    def spawn_worker(self) -> str:
        wid = self.new_worker_id()
        info = WorkerInfo(id=wid, generation=1, capabilities=list(self.template.capabilities))
        self.sys.workers[wid] = info
        mailbox.create_inbox(self.home, wid)
        self.launch(wid, info, restart=False)
        self.event("worker-started", f"{wid} started", worker=wid)
        return wid

    def launch(self, wid: str, info: WorkerInfo, *, restart: bool) -> None:
        argv = worker_argv(self.home, wid, self.backend, info.generation)
        env = {"MULTIBOT_HOME": str(self.home.root)}
        if restart:
            # First: a frozen incarnation may hold the lock of its state file.
            self.kill_old_incarnation(wid, info.generation)
        # The worker's state file must not let an older incarnation claim it back.
        sf = StateFile(
            self.home.worker_state(wid), WorkerState, default=lambda: WorkerState(id=wid)
        )
        with contextlib.suppress(StateError, LockTimeout):
            sf.update(
                lambda s: s.model_copy(update={"generation": max(s.generation, info.generation)})
            )
        if restart and info.pane_id:
            info.pane_id = self.launcher.restart(info.pane_id, argv, env)
        else:
            info.pane_id = self.launcher.start(wid, argv, env, self.title(info))
        self.titles.pop(wid, None)  # a new pane needs its title
        with contextlib.suppress(TmuxError):
            info.pane_server = self.launcher.where()
        info.status, info.pid = "starting", self.launcher.pid(info.pane_id)
        info.next_restart_at = None
        self.launched[wid] = self.mono()
        self.watch(wid, info.generation, self.launched[wid])
        self.dirty = True  # the title follows with the next flush

    def kill_old_incarnation(self, wid: str, generation: int) -> None:
        """SIGKILL a frozen or stuck worker process, and the agents its earlier lives left."""
        hb = read_heartbeat(self.home.heartbeat(wid))
        if hb is not None and procs.runs(hb.pid, "worker", wid):  # checked: pids get reused
            procs.kill(hb.pid)
        # An agent runs in a session of its own, so it outlives a killed worker and would go on
        # changing the worktree beside the new incarnation's agent.
        for pid in procs.stray_agents(self.home, wid, generation):
            procs.kill(pid)

    def refresh_titles(self) -> None:
        """Show each worker's task, model and status in its pane title (one call for all)."""
        changed: dict[str, str] = {}
        for wid, info in self.sys.workers.items():
            title = self.title(info)
            if info.pane_id and self.titles.get(wid) != title:
                self.titles[wid] = changed[info.pane_id] = title
        if self.title_job is not None and self.title_job.done():
            if self.title_job.exception() is not None:
                self.event("titles-failed", str(self.title_job.exception()))
            self.title_job = None
        if changed:
            self.title_job = self.chores.submit(self.launcher.set_titles, changed)

    def title(self, info: WorkerInfo) -> str:
        return f"{info.id} · {info.current_task or '-'} · {info.model or '-'} · {info.status}"

    def watch(self, wid: str, generation: int, now: float) -> HeartbeatTracker:
        """Start judging a worker incarnation by its heartbeats, from now."""
        c = self.config
        tracker = HeartbeatTracker(
            c.heartbeat_interval,
            c.heartbeat_misses,
            # Workers beat every third of an interval, so the last beat before a freeze is up
            # to a third old already: judging at (misses - 1/3) intervals of silence, checked
            # every SUPERVISE_EVERY_S, keeps detection within `misses` intervals.
            tolerance=-c.heartbeat_interval / 3,
            startup_grace=max(c.heartbeat_interval * c.heartbeat_misses, 20.0),
        )
        tracker.expect(generation, now)
        self.watches[wid] = tracker
        return tracker

    def supervise(self) -> None:
        """Find dead workers, restart them with backoff, fail them after too many restarts."""
        now, mono = self.clock(), self.mono()
        # A few looks a second are plenty against an interval of seconds, and tmux calls cost.
        if mono - self.last_supervise < min(SUPERVISE_EVERY_S, self.config.heartbeat_interval / 4):
            return
        self.last_supervise = mono
        handles = [
            i.pane_id
            for i in self.sys.workers.values()
            if i.pane_id and i.status not in ("failed", "stopped", "error")
        ]
        gone = self.look_at_panes(handles, mono)
        for wid, info in list(self.sys.workers.items()):
            if info.status in ("failed", "stopped"):
                continue
            if info.status == "error":
                if info.next_restart_at is not None and now >= info.next_restart_at:
                    info.generation += 1
                    self.event(
                        "worker-restart",
                        f"{wid} restarting as generation "
                        f"{info.generation} (restart {info.restarts})",
                        worker=wid,
                    )
                    self.launch(wid, info, restart=True)
                    self.resend_assignments(only=wid)
                continue
            tracker = self.watches.get(wid) or self.watch(wid, info.generation, mono)
            hb = read_heartbeat(self.home.heartbeat(wid))
            liveness = tracker.observe(hb, mono)
            if hb is not None and hb.generation == info.generation:
                info.last_heartbeat = hb.time
                if info.pane_id is None and hb.pid not in self.sought:
                    self.find_worker(wid, info, hb.pid)
                status = hb.status if hb.status in LIVE_WORKER else info.status
                if status != info.status and info.status != "blocked":
                    info.status = status  # type: ignore[assignment]
                    self.dirty = True
            reason = liveness.reason if liveness.dead else None
            if reason is None and wid in gone:
                reason = "process exited"
            if reason is not None:
                self.worker_died(wid, info, reason, now)

    def look_at_panes(self, handles: list[str], mono: float) -> set[str]:
        """Return the workers whose pane (or process) the last finished look found dead.

        The look runs in the chores thread and its answer is taken on a later tick; a worker
        started again since the look began is not judged by it.
        """
        gone: set[str] = set()
        if self.pane_look is not None and self.pane_look[1].done():
            started, look = self.pane_look
            self.pane_look = None
            try:
                dead = look.result()
            except Exception as exc:  # tmux gone mad: judge by heartbeats alone this time
                self.event("pane-look-failed", str(exc))
                dead = set()
            for wid, info in self.sys.workers.items():
                if info.pane_id in dead and self.launched.get(wid, 0.0) < started:
                    gone.add(wid)
        if self.pane_look is None and handles:
            self.pane_look = (mono, self.chores.submit(self.launcher.dead, handles))
        return gone

    def find_worker(self, wid: str, info: WorkerInfo, pid: int) -> None:
        """Find the pane of a worker adopted after a restart (started by the master that
        crashed before it wrote down where), so it is titled, watched and restarted in place."""
        try:
            handle = self.launcher.find(pid)
        except TmuxError:
            return  # tmux did not answer: look again next time
        self.sought.add(pid)
        if handle is not None:
            info.pane_id, info.pid = handle, pid
            with contextlib.suppress(TmuxError):
                info.pane_server = self.launcher.where()
            self.event("worker-found", f"{wid} runs in {handle} (pid {pid})", worker=wid)

    def worker_died(self, wid: str, info: WorkerInfo, reason: str, now: float) -> None:
        info.restarts += 1
        self.sys.metrics.restarts += 1
        info.failure_reason = reason
        if info.restarts > self.config.max_restarts:
            info.status = "failed"
            self.event(
                "worker-failed",
                f"{wid} failed after {info.restarts - 1} restarts: {reason}",
                worker=wid,
            )
            tid = info.current_task
            info.current_task = None
            rec = self.tasks.get(tid or "")
            if rec is not None and rec.status in ("assigned", "running"):
                # Counted as an attempt: a task that kills every worker must not do so forever.
                # rec.worker stays: its worktree holds the branch, released on reassignment.
                self.retry(
                    rec,
                    f"worker {wid} failed after {info.restarts - 1} restarts "
                    f"({reason}) while on this task",
                )
            return
        delay = backoff(info.restarts, self.config.restart_backoff, self.config.restart_backoff_max)
        info.status, info.next_restart_at = "error", now + delay
        self.event("worker-dead", f"{wid} is dead ({reason}); restart in {delay:.1f}s", worker=wid)
        self.dirty = True

    def resend_assignments(self, only: str | None = None) -> None:
        """Send again the assignments a worker may not have (after its or our restart)."""
        for rec in self.tasks.values():
            if rec.status not in ("assigned", "running") or rec.worker is None:
                continue
            if only is not None and rec.worker != only:
                continue
            if only is None:
                ws = StateFile(self.home.worker_state(rec.worker), WorkerState, default=None)
                with contextlib.suppress(StateError):
                    cur = ws.read().current_task
                    if cur is not None and cur.task_id == rec.id:
                        continue
            self.send_assignment(rec, rec.worker)

    def stop_idle_workers(self) -> None:
        now = self.clock()
        # A task being checked may come back to its worker (whose session knows it): keep them.
        pending = self.index.ids("verifying") or any(
            not self.tasks[t].hold for t in self.index.ids("pending")
        )
        if pending:
            return
        for wid, info in self.live_workers().items():
            if (
                info.status == "idle"
                and info.current_task is None
                and info.idle_since
                and now - info.idle_since > self.config.idle_worker_timeout
            ):
                self.event(
                    "worker-stopped", f"{wid} idle for {now - info.idle_since:.0f}s", worker=wid
                )
                self.stop_worker(wid, info)

    def stop_worker(self, wid: str, info: WorkerInfo) -> None:
        self.send(wid, protocol.Terminate(reason="no more work"))
        if info.status != "failed":
            info.status = "stopped"
        self.dirty = True

    # == assignments ==========================================================================
    def assign_ready(self) -> None:
        live = self.live_workers()
        free = [
            (w, i)
            for w, i in live.items()
            if i.status in ("idle", "starting") and i.current_task is None
        ]
        last = self.last_tasks() if free else {}  # it looks at every ready task
        idle = [WorkerSlot(w, frozenset(i.capabilities), last.get(w)) for w, i in free]
        plan = schedule(
            self.tasks,
            idle,
            len(live),
            self.config.max_workers,
            frozenset(self.template.capabilities),
            self.order,
            self.index,
        )
        for a in plan:
            wid = a.worker_id or self.spawn_worker()
            try:
                self.send_assignment(self.tasks[a.task_id], wid, new=True)
            except GitError as exc:
                rec = self.tasks[a.task_id]
                rec.last_error = f"git: {exc}"
                self.event("assign-failed", f"{a.task_id}: {exc}", task=a.task_id)
                self.set_task(rec, "failed")

    def dependents(self) -> dict[str, list[str]]:
        """Return, per task, the tasks that depend on it (kept until a task is added)."""
        if self._dependents[0] != len(self.tasks):  # tasks are only ever added
            index: dict[str, list[str]] = {}
            for rec in self.tasks.values():
                for dep in rec.task.dependencies:
                    index.setdefault(dep, []).append(rec.id)
            self._dependents = (len(self.tasks), index)
        return self._dependents[1]

    def last_tasks(self) -> dict[str, str]:
        """Return, per worker, a task that can start and went back to pending from it (for
        affinity: its worktree holds the branch)."""
        last: dict[str, str] = {}
        for tid in self.index.ready():
            if worker := self.tasks[tid].worker:
                last.setdefault(worker, tid)
        return last

    def send_assignment(self, rec: TaskRecord, wid: str, new: bool = False) -> None:
        """Prepare the worktree and branch, record the assignment, then send it."""
        assert self.git is not None
        info = self.sys.workers[wid]
        prev = self.sys.workers.get(rec.worker or "")
        if new and prev is not None and prev.id != wid and prev.status in ("failed", "stopped"):
            self.release_worktree(prev)
        worktree = self.home.worktree(wid)
        branch = self.git.branch_for(rec.id)  # the worker checks it out (see TaskAssignment.repo)
        if new:
            rec.attempts += 1
            rec.assigned_at = self.clock()
            rec.worker, rec.branch = wid, branch
            self.set_task(rec, "assigned")
        info.current_task, info.branch, info.model = rec.id, branch, rec.task.model
        info.working_directory = str(worktree)
        if info.status == "idle":
            info.status = "working"
        t = rec.task
        budget = protocol.Budget(
            max_usd=self.config.task_budget_usd, max_minutes=self.config.task_timeout_minutes
        )
        payload = protocol.TaskAssignment(
            title=t.title,
            description=t.description,
            branch=branch,
            working_directory=str(worktree),
            context=self.context_for(rec),
            dependencies=t.dependencies,
            priority=t.priority,
            estimated_duration=t.estimate_minutes * 60,
            model=t.model,
            owns=t.owns,
            verify=t.verify,
            budget=budget,
            commands=t.commands,
            attempt=rec.attempts,
            base_branch=self.git.integration,
            repo=str(self.git.root),
        )
        self.send(wid, payload, task_id=rec.id)
        self.event(
            "assigned",
            f"{rec.id} → {wid} (attempt {rec.attempts}, {t.model})",
            task=rec.id,
            worker=wid,
        )

    def release_worktree(self, info: WorkerInfo) -> None:
        """Free the task branch a failed or stopped worker's worktree holds, keeping its work."""
        # git lets a branch be checked out in one worktree only: without this, a task whose
        # worker failed, or that went back after its worker stopped, could never start again.
        assert self.git is not None
        path = self.home.worktree(info.id)
        if not path.exists():
            return
        self.kill_old_incarnation(info.id, info.generation + 1)  # a frozen one may linger
        try:
            commit = worktrees.commit_all(path, f"multibot: work left by {info.id}")
            self.git.cleanup([path], force=True)  # everything is on the branch now
        except GitError as exc:  # a detached HEAD holds no branch; else the assignment says why
            self.event("worktree-kept", f"{path}: {exc}", worker=info.id)
            return
        self.event(
            "worktree-released",
            f"{info.id}'s worktree removed; its work is on its "
            f"branch{' as ' + commit[:10] if commit else ''}",
            worker=info.id,
        )

    def context_for(self, rec: TaskRecord) -> list[str]:
        """The finished dependencies' summaries and discoveries, and feedback on earlier tries."""
        lines: list[str] = []
        for d in rec.task.dependencies:
            dep = self.tasks.get(d)
            if dep is not None:
                lines.append(f"{d} ({dep.task.title}) is merged: {dep.summary}")
                lines += [f"{d} discovered: {x}" for x in dep.discoveries]
        shared = self.shared_context().discoveries
        seen = set(lines)
        for disc in shared[-20:]:
            line = f"{disc.worker} discovered: {disc.text}"
            if line not in seen and not any(disc.text in s for s in seen):
                lines.append(line)
        lines += [f"Feedback on your last attempt: {f}" for f in rec.feedback[-3:]]
        return lines

    def shared_context(self) -> SharedContext:
        """Return state/context.json, read again only when the file changed."""
        if self._shared is None or self.context_file.changed():
            self._shared = self.context_file.read()
        return self._shared

    # == merging ==============================================================================
    def merge_next(self) -> None:
        """Queue, in plan order, every verified task whose dependencies are merged."""
        if self.git is None or self.pipeline.idle():
            return  # it takes them in at its next step, whatever came meanwhile
        verified = self.index.ids("verified")
        ready = [
            (rec.id, rec.task.title, rec.branch or f"multibot/{rec.id}")
            for tid in sorted(verified, key=self.order.place)
            if (rec := self.tasks[tid]) is not None
            and all(
                self.tasks[d].status == "merged" for d in rec.task.dependencies if d in self.tasks
            )
        ]
        before = (self.pipeline.merging(), self.pipeline.blocked)
        self.pipeline.step(ready, self.plan.verify or self.config.verify, set(verified))
        if (self.pipeline.merging(), self.pipeline.blocked) != before:
            self.dirty = True

    def on_merged(self, rec: TaskRecord, merge_commit: str | None) -> None:
        """A task is on the integration branch: its dependents may become ready."""
        assert self.git is not None
        rec.merge_commit = merge_commit
        self.set_task(rec, "merged")
        self.sys.git.last_merge_commit = merge_commit or self.sys.git.last_merge_commit
        self.sys.metrics.tasks_merged += 1
        now = self.clock()
        for tid in self.dependents().get(rec.id, []):  # dependents become ready now
            other = self.tasks[tid]
            if all(
                self.tasks[d].status == "merged" for d in other.task.dependencies if d in self.tasks
            ):
                other.ready_at = now
        self.event(
            "merged",
            f"{rec.id} merged into {self.git.integration} ({(merge_commit or '')[:10]})",
            task=rec.id,
        )

    def conflict_feedback(self, outcome: MergeOutcome) -> str:
        """What a task whose branch could not join a candidate is told."""
        assert self.git is not None
        branch, into = outcome.branch, self.git.integration
        if outcome.status == "missing":
            return f"{outcome.output}; the task is done again"
        files = ", ".join(c.path for c in outcome.conflicts)
        sides = "\n".join(
            f"--- {c.path} on {into}:\n{(c.ours or '(deleted)')[:1500]}\n"
            f"--- {c.path} on {branch}:\n{(c.theirs or '(deleted)')[:1500]}"
            for c in outcome.conflicts[:10]
        )
        return (
            f"merging {branch} into {into} conflicts in {files}. Merge {into} into your "
            f"branch, resolve the conflicts and commit.\n{sides}"
        )

    def recover_merge(self, tid: str) -> None:
        assert self.git is not None
        rec = self.tasks.get(tid)
        if rec is None:
            return
        if rec.status == "verified" and self.git.is_merged(rec.branch or f"multibot/{tid}"):
            self.set_task(rec, "merged")
            self.sys.metrics.tasks_merged += 1
            self.event("merge-recovered", f"{tid} was merged before the restart", task=tid)

    # == bookkeeping ==========================================================================
    def check_done(self) -> None:
        if not self.tasks or self.index.ids("pending", *ACTIVE):
            return
        failed = [t.id for t in self.tasks.values() if t.status == "failed"]
        self.sys.phase = "failed" if failed else "done"
        self.sys.metrics.finished_at = self.clock()
        self.sys.metrics.tasks_failed = len(failed)
        for wid, info in self.live_workers().items():
            self.stop_worker(wid, info)
        tot = self.sys.metrics.totals
        took = self.sys.metrics.finished_at - self.sys.metrics.started_at
        self.event(
            "run-finished",
            f"{self.sys.phase}: {self.sys.metrics.tasks_merged} merged, "
            f"{len(failed)} failed in {took:.1f}s; cost ${tot.cost_usd:.4f}, "
            f"{tot.input_tokens} in / {tot.output_tokens} out tokens",
        )
        self.exit_code = EXIT_FAILED if failed else EXIT_DONE
        self.finished = True

    def over_budget(self) -> bool:
        b = self.config.budget_usd
        if b is not None and self.sys.metrics.totals.cost_usd >= b:
            if "budget" not in self.reported:
                self.reported.add("budget")
                self.event(
                    "budget-reached",
                    f"spent ${self.sys.metrics.totals.cost_usd:.4f} of ${b:.2f}: no new tasks",
                )
            return True
        return False

    def add_cost(self, wid: str, usd: float, tin: int, tout: int, turns: int) -> None:
        t = self.sys.metrics.totals
        t.cost_usd += usd
        t.input_tokens += tin
        t.output_tokens += tout
        t.turns += turns
        if wid in self.sys.workers:
            self.sys.workers[wid].cost_usd += usd

    def set_task(self, rec: TaskRecord, status: TaskStatus, *, lazy: bool = False) -> None:
        """Move a task along its lifecycle; its file is written at the end of the turn.

        A lazy change is one nothing waits on (a task's start): it is written with the task's
        next change if that comes within LAZY_WRITE_S (a short task's end), else on its own
        then, and the turn that made it does not wait for it.
        """
        rec.status = task_transition(rec.status, status, f"task {rec.id}")
        self.tasks[rec.id] = rec
        self.index.note(rec)
        self.changes[rec.id] = self.changes.get(rec.id, 0) + 1
        self.dirty = True
        if lazy:
            self.unwritten.setdefault(rec.id, self.mono() + LAZY_WRITE_S)
            return
        self.unwritten[rec.id] = 0.0
        self.touched.add(rec.id)

    def commit(self) -> None:
        """End a turn: write the changed task files, send the messages, and once the files are
        written, mark the messages taken in and start the checks and merges.

        In this order a crash loses nothing: a message is marked handled only once what it
        changed is on disk (else it is handled again after a restart, which is harmless), no
        worker hears of a task before that task's file says so, and no check or merge starts
        before the task file says it is verifying or verified. Batching the turn's writes and
        marks also spares a file write per transition and a sync per message.

        The loop waits for that a moment (TURN_WAIT_S) and goes on if a write takes longer (a
        file locked by another process holds its write for seconds). A turn is finished once
        the files of the tasks it changed are written, whatever became of earlier turns; each
        recipient's messages go (in order) as soon as the files of the tasks they name are in
        place. One write at a time per task file: a change made while its file is being
        written is written next, and the messages naming it wait for that.
        """
        self.take_writes()
        mono = self.mono()
        outbox, self.outbox = self.outbox, []
        held: set[str] = set()  # recipients whose messages wait for a later turn
        sending: list[protocol.Envelope] = []
        for message in outbox:
            tid = message.task_id or ""
            behind = tid in self.writing and self.writing[tid][0] != self.changes.get(tid, 0)
            if behind or message.recipient in held:
                held.add(message.recipient)
                self.outbox.append(message)
            else:
                sending.append(message)
        due = [t for t, at in self.unwritten.items() if at <= mono and t not in self.writing]
        named = {m.task_id for m in sending if m.task_id is not None}
        # The files messages wait for first in the queue; the rest right behind, not after:
        # a second round of disk syncs would slow every turn.
        waits: list[Future[Any]] = []
        for tid in sorted(due, key=lambda tid: tid not in named):
            # A copy: the loop changes the record while the io thread writes it. Shallow is
            # enough, as the loop replaces the record's lists and models, never edits them.
            shown: Future[None] = Future()
            write = self.io.submit(self.write_task, tid, self.tasks[tid].model_copy(), shown)
            self.writing[tid] = (self.changes.get(tid, 0), write, shown)
            waits.append(write)
        by_recipient: dict[str, list[protocol.Envelope]] = {}
        for message in sending:
            by_recipient.setdefault(message.recipient, []).append(message)
        # Queued behind every write, so a delivery never holds a thread a write waits for.
        for messages in by_recipient.values():
            after = [self.writing[t][2] for m in messages if (t := m.task_id or "") in self.writing]
            waits.append(self.io.submit(self.deliver, messages, after))
            waits[-1].add_done_callback(self.took_delivery)
        needs = {tid: self.changes[tid] for tid in self.touched}
        taken, self.taken, self.touched = self.taken, [], set()
        turn = Turn(needs, taken, self.jobs.seal())
        if needs or turn.taken or turn.jobs:
            self.turns.append(turn)
        # The loop waits for the turn's writes and messages as long as they take a moment:
        # its own work would slow the io threads (they share one GIL), and an assignment is on
        # the way of a worker's start. What takes longer (a locked file) goes on without the
        # loop, whose next turns (every tick at least) take it in.
        wait(waits, TURN_WAIT_S)
        self.take_writes()

    def take_writes(self) -> None:
        """Take in the task files written since the last look; finish the turns now written."""
        for tid, (count, write, _shown) in list(self.writing.items()):
            if write.done():
                del self.writing[tid]
                self.took_write(tid, count, write.result())
        while self.undelivered:
            message, exc = self.undelivered.pop(0)
            self.event("send-failed", f"{message.type} to {message.recipient}: {exc}")
        for turn in [turn for turn in self.turns if turn.written(self.written)]:
            self.turns.remove(turn)
            self.jobs.release(turn.jobs)
            if turn.taken and self.inbox is not None:
                self.inbox.done(*turn.taken)

    def settle(self) -> None:
        """Commit, and wait until every task file due is written and every turn finished.

        The lazy changes are due now."""
        self.unwritten = {tid: min(at, 0.0) for tid, at in self.unwritten.items()}
        self.commit()
        while self.writing:
            wait([write for _count, write, _shown in self.writing.values()])
            self.commit()

    def took_delivery(self, sent: Future[list[tuple[protocol.Envelope, MultibotError]]]) -> None:
        """(io thread) Note the messages that could not be sent; their events are the loop's."""
        self.undelivered.extend(sent.result())

    def deliver(
        self, messages: list[protocol.Envelope], after: Sequence[Future[Any]]
    ) -> list[tuple[protocol.Envelope, MultibotError]]:
        """Send messages in order once the task files in after are in place (an io thread);
        return those that failed, and why. Each is written meanwhile: only its link into the
        inbox waits, and not for the sync of the task files' directory.

        An assignment is not synced to disk at all (two disk syncs on the way of every task's
        start): its task file, synced, is the record. A machine crash may lose the file's new
        name and the assignment (the task is assigned again), or the assignment only, or leave
        it empty (the worker sets it aside as malformed): then the task file says it was
        assigned, and the assignment is sent again at start (resend_assignments).
        """
        failed, staged = [], []
        for message in messages:
            sync = not isinstance(message.payload, protocol.TaskAssignment)
            try:
                staged.append((message, mailbox.stage(self.home, message, fsync=sync)))
            except MultibotError as exc:
                failed.append((message, exc))
        wait(after)
        for message, ready in staged:
            try:
                ready.publish()
            except MultibotError as exc:
                failed.append((message, exc))
        return failed

    def took_write(self, tid: str, count: int, written: Written) -> None:
        """Take in the outcome of writing a task's file, which held count changes (loop)."""
        self.written[tid] = count  # a refused write too: the turns waiting on it go on
        if isinstance(written, TaskRecord):
            if self.changes.get(tid, 0) == count:
                del self.unwritten[tid]
            self.tasks[tid].version = written.version
            self.take_edit(self.tasks[tid], written)
            return
        # A broken hand edit of the file: kept as the person left it; the system's change
        # stays in memory and is written once the file is valid again (its messages still go:
        # the worker's work must not wait on a person's typo).
        self.unwritten[tid] = self.mono() + EDITS_EVERY_S
        if isinstance(written, StateError):
            self.report_problem(written)
        else:
            self.event("state-write-refused", str(written), task=tid)

    def write_task(self, tid: str, mine: TaskRecord, shown: Future[None]) -> Written:
        """Write one task's file as mine (an io thread); return what was written or the error.

        shown is resolved once the new file is in place, before its directory is synced (see
        StateFile.update), or once the write failed: the messages naming the task wait for it.
        """

        def merge(disk: TaskRecord) -> TaskRecord:
            return mine.model_copy(
                update={
                    "version": disk.version,
                    "hold": disk.hold,
                    "cancel": disk.cancel or mine.cancel,
                    "task": mine.task.model_copy(update={"priority": disk.task.priority}),
                }
            )

        try:
            return self.task_files[tid].update(merge, shown=lambda: shown.set_result(None))
        except (StateError, LockTimeout) as exc:
            return exc
        finally:
            if not shown.done():
                shown.set_result(None)

    def refresh_index(self) -> None:
        """Derive the task lists, branches and merge queue of system-state.json from the tasks."""
        git = self.sys.git
        git.merge_queue = sorted(self.index.ids("verified"), key=self.order.place)
        git.merging = self.pipeline.merging()
        git.queue = self.pipeline.view()
        branches = []
        for t, r in self.tasks.items():
            if not r.branch:
                continue
            now = (r.branch, r.worker, r.commit, r.status == "merged")
            info = self.branches.get(t)
            if info is None or (info.name, info.worker, info.last_commit, info.merged) != now:
                info = self.branches[t] = BranchInfo.model_construct(  # from validated records
                    name=r.branch, task_id=t, worker=r.worker, last_commit=r.commit, merged=now[3]
                )
            branches.append(info)
        git.branches = branches
        idx = self.sys.tasks
        idx.active = [
            t
            for t, r in self.tasks.items()
            if r.status in ("assigned", "running", "verifying", "verified")
        ]
        idx.pending = [t for t, r in self.tasks.items() if r.status == "pending"]
        idx.completed = [t for t, r in self.tasks.items() if r.status in ("merged", "cancelled")]
        idx.failed = [t for t, r in self.tasks.items() if r.status == "failed"]

    def take_system_edits(self) -> None:
        """Take in the person's pause from the last look at system-state.json; look again."""
        if self.sys_look is not None and self.sys_look.done():
            seen = self.sys_look.result()
            self.sys_look = None
            if seen is not None:
                disk, problem = seen
                if problem:
                    self.report_problem(problem)
                if disk.paused != self.sys.paused:
                    self.sys.paused = disk.paused
                    self.event(
                        "paused" if disk.paused else "resumed", "by the person (system-state.json)"
                    )
        if self.sys_look is None:
            self.sys_look = self.chores.submit(self.look_at_system_state)

    def look_at_system_state(self) -> tuple[SystemState, StateError | None] | None:
        """(chores thread) Return system-state.json and its problem if it changed, else None."""
        if not self.sys_file.changed():
            return None
        return self.sys_file.read(), self.sys_file.problem()

    def flush(self, force: bool = False) -> None:
        """Write system-state.json if anything changed (at most every FLUSH_EVERY_S, or forced)."""
        now = self.mono()
        if not (force or (self.dirty and now - self.last_flush > FLUSH_EVERY_S)):
            return
        if self.sys_write is not None:
            if not (force or self.sys_write.done()):
                return  # one write at a time: the next takes the state as it is by then
            self.took_system_write(self.sys_write.result())
        self.refresh_titles()
        self.refresh_index()
        # A copy the loop no longer touches, for the chores thread to write.
        snapshot = self.sys.model_dump_json()
        self.sys_write = self.chores.submit(self.write_system_state, snapshot)
        self.dirty, self.last_flush = False, now
        if force:
            self.took_system_write(self.sys_write.result())

    def write_system_state(self, snapshot: str) -> StateError | LockTimeout | None:
        """(chores thread) Write system-state.json; return what stopped it, if anything."""
        state = SystemState.model_validate_json(snapshot)

        def merge(disk: SystemState) -> SystemState:
            # The person's field wins: a pause written by hand is never overwritten.
            return state.model_copy(update={"version": disk.version, "paused": disk.paused})

        try:
            self.sys_file.update(merge)
        except (StateError, LockTimeout) as exc:
            return exc
        return None

    def took_system_write(self, failed: StateError | LockTimeout | None) -> None:
        """Take in the outcome of the last write of system-state.json (in the loop's thread)."""
        self.sys_write = None
        if failed is not None:
            self.dirty = True  # written again at the next flush
            if isinstance(failed, StateError):
                self.report_problem(failed)

    def send(self, wid: str, payload: protocol.Payload, task_id: str | None = None) -> None:
        message = protocol.make(
            payload,
            sender=MASTER_ID,
            recipient=wid,
            generation=self.sys.master_generation,
            task_id=task_id,
        )
        self.outbox.append(message)  # sent by commit(), after the turn's task files

    def event(self, kind: str, text: str, **fields: object) -> None:
        """Record an event in the timeline and show it in the master pane."""
        self.timeline.add(kind, text=text, **fields)
        self.sys.message = text[:200]
        self.dirty = True
        self.show(text)

    def show(self, line: str) -> None:
        """Print a line to the master pane and the master's log."""
        text = f"{time.strftime('%H:%M:%S')} {line}"
        print(text, file=self.out, flush=True)
        if not self._log.closed:
            self._log.write(text + "\n")
