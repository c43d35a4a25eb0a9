"""The master: plans, hands out ready tasks, supervises workers, answers, verifies and merges.

It is one loop (``tick``) over files: its inbox, the state files a person may edit, the
workers' heartbeats. Everything it knows is written to ``state/`` before it acts on it, so a
master killed at any point and started again rebuilds itself from those files and its inbox.

This module wires the parts and decides what the run's events mean for its tasks:
``book`` (the tasks), ``journal`` (what a turn makes durable and sends), ``pool`` (the
workers), ``pipeline`` (verify and merge), ``questions``, ``edits`` (the person's) and
``view`` (system-state.json).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from multibot import auth, mailbox, protocol
from multibot.advisor import Advice, Advisor
from multibot.atomic import open_log
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import (
    GitError,
    LockTimeout,
    MultibotError,
    PlanError,
    SendError,
    StateError,
    WriteFailed,
)
from multibot.launcher import Launcher
from multibot.layout import MASTER_ID, Home
from multibot.master import feedback, ledger
from multibot.master.book import TaskBook, drift
from multibot.master.discoveries import Discoveries, recipients
from multibot.master.edits import FORGED, Edits, Seen, task_edit
from multibot.master.jobs import Jobs
from multibot.master.journal import Hooks, TurnJournal
from multibot.master.pipeline import (
    BrokeCheck,
    Conflicted,
    Merged,
    Outcome,
    Pipeline,
    Verified,
)
from multibot.master.pool import WorkerPool
from multibot.master.questions import Questions, Voice, run_context
from multibot.master.view import SystemView, project
from multibot.plan import capability_problems, topological_order
from multibot.scheduler import WorkerSlot, schedule
from multibot.state import (
    LIVE_WORKER,
    ON_WORKER,
    BranchInfo,
    Plan,
    PlanTask,
    QuestionRecord,
    SharedContext,
    SystemState,
    TaskRecord,
    TaskStatus,
    WorkerState,
)
from multibot.store import StateFile
from multibot.timeline import Timeline
from multibot.worktrees import GitRepo

EXIT_DONE = 0
EXIT_FAILED = 1

PRUNE_EVERY_S = 300.0
AUDIT_MAX_AGE_S = 7 * 86400.0
AUDIT_MAX_COUNT = 20_000


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
        self.home, self.config, self.backend, self.repo = home, config, backend, repo
        self.advisor = advisor or Advisor()
        self.out = out or sys.stdout
        self.clock, self.mono = clock, monotonic
        self.open_git = git or self.git_of_repo
        self.sys_file = StateFile(home.system_state, SystemState, default=SystemState)
        self.plan_file = StateFile(home.plan, Plan, default=Plan)
        self.discoveries = Discoveries(
            StateFile(home.context, SharedContext, default=SharedContext)
        )
        self.sys = SystemState()
        self.plan = Plan()
        self.git: GitRepo | None = None
        self.inbox: mailbox.Receiver | None = None
        self.keys = auth.Keys(b"")  # the run's, once it starts or resumes (use_keys)
        self.unhandled: list[protocol.Envelope] = []  # fetched, to be handled again (disk full)
        self.finished, self.exit_code = False, EXIT_DONE
        self.budget_said = False  # the budget-reached event is said once
        self.last_prune = 0.0
        self.branches: dict[str, BranchInfo] = {}  # each task's entry in system-state.json
        self.timeline = Timeline(home.timeline, clock)
        home.logs_dir.mkdir(parents=True, exist_ok=True)
        self._log = open_log(home.log(MASTER_ID))
        # What the loop must not wait for, one at a time in order: tmux calls (pane titles,
        # the look for dead panes) and system-state.json (written, and looked at for the
        # person's pause, only from this thread). Each is tens of ms on a busy machine.
        self.chores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="master-chores")
        self.book = TaskBook(self.changed)
        self.jobs = Jobs(self.wake, Pipeline.lanes(config))
        self.pipeline = Pipeline(home, config, self.jobs, self.event, monotonic)
        self.journal = TurnJournal(
            home,
            self.jobs,
            self.book.tasks,
            Hooks(edited=self.took_write, refused=self.refused, sent=self.sent, unsent=self.unsent),
            monotonic,
        )
        self.edits = Edits(home, self.chores, Seen(self.take_edit, self.paused, self.event))
        self.write_failing: str | None = None  # why state files cannot be written, if so
        self.view = SystemView(
            self.sys_file, self.chores, lambda e: self.refused(None, e), monotonic
        )
        self.pool = WorkerPool(
            home,
            config,
            worker_template or WorkerTemplate(),
            launcher,
            backend,
            state=lambda: self.sys,
            chores=self.chores,
            send=self.send,
            event=self.event,
            monotonic=monotonic,
            agent_env=agent_env or {},
        )
        voice = Voice(self.journal.send, self.reply, self.event, self.show, self.opus_context)
        self.questions = Questions(home, config, self.advisor, voice)

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self.book.tasks

    # == start-up =============================================================================
    def git_of_repo(self) -> GitRepo:
        return GitRepo(
            self.repo,
            self.home.integration_worktree,
            integration_branch=self.config.integration_branch,
            setup_hook=self.config.worktree_setup,
        )

    def open_repo(self) -> None:
        """Open the target repository and its integration branch (and recover a cut merge)."""
        self.git = self.open_git()
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
        problems = capability_problems(plan.tasks, self.pool.template.capabilities)
        if problems:
            raise PlanError(problems)
        for path in (self.home.state_dir, self.home.tasks_dir, self.home.workers_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.use_keys(auth.create_keys(self.home))  # a new run: nothing old verifies
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
        ledger.charge(self.sys, opus_cost_usd)  # planning is part of the run's spend
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
        self.open_inbox()

    def resume(self) -> None:
        """Rebuild from the state files after a restart; nothing lost, nothing done twice."""
        note = self.sys_file.recover()
        self.sys = self.sys_file.read()
        if note:
            self.event("state-recovered", note)
        self.sys.master_generation += 1
        self.sys.master_pid = os.getpid()
        self.repo = Path(self.sys.git.repo or self.repo)
        self.use_keys(auth.keys_of(self.home, create=True))
        mailbox.create_inbox(self.home, MASTER_ID)
        self.open_repo()
        self.plan = self.plan_file.read()
        if self.plan.approved:
            self.load_tasks_from_files()
        self.questions.load()
        # A merge may have landed just before the crash: git says which verified tasks are in.
        for tid in self.book.ids("verified"):
            self.recover_merge(self.tasks[tid])
        self.pipeline.restore()
        self.pool.adopt()
        self.pool.forget_lost_panes()
        self.pool.watch_all()
        self.event(
            "master-restarted",
            f"generation {self.sys.master_generation}, "
            f"{len(self.tasks)} tasks, {len(self.sys.workers)} workers",
        )
        self.open_inbox()
        for tid in self.book.ids("verifying"):  # killed while checking it: nobody else will
            self.event("verify-resumed", f"{tid} is checked again", task=tid)
            self.verify(self.tasks[tid])
        # Then messages (a TASK_COMPLETE may be waiting), then re-send lost assignments.
        self.handle_inbox()
        self.reconcile_workers()
        self.resend_assignments()
        self.journal.commit()
        self.flush(force=True)

    def use_keys(self, keys: auth.Keys) -> None:
        self.keys = self.pool.keys = keys

    def open_inbox(self) -> None:
        self.inbox = mailbox.Receiver(
            self.home, MASTER_ID, rescan_s=self.config.rescan_interval, verify=self.verify_sender
        )
        self.journal.inbox = self.inbox

    def verify_sender(self, m: protocol.Envelope) -> auth.Refusal | None:
        """(inbox) A message counts only if its sender's key signed it (see auth.py)."""
        refusal = auth.check_from_worker(self.keys, m)
        if refusal is not None and refusal.forged:
            self.sys.metrics.messages_refused += 1
            self.view.dirty = True
            self.event("message-refused", refusal.reason, sender=m.sender, message=m.id)
        return refusal

    def signed(self, message: protocol.Envelope) -> protocol.Envelope:
        """message signed for its worker's current generation (a person's CLI, a stranger:
        generation 0, which no worker has)."""
        info = self.sys.workers.get(message.recipient)
        generation = info.generation if info is not None else 0
        return auth.sign(message, self.keys.worker(message.recipient, generation), generation)

    def reconcile_workers(self) -> None:
        """Free workers whose task ended after system-state.json was last written, and put
        back on their task those it did not name."""
        # Task files are written at every change, system-state.json a moment later: a worker
        # may still be recorded on a task that is verifying or merged, and would never be
        # given work again.
        for wid, info in self.sys.workers.items():
            rec = self.book.get(info.current_task)
            if info.current_task and (
                rec is None or rec.worker != wid or rec.status not in ON_WORKER
            ):
                info.current_task, info.idle_since = None, self.clock()
                self.view.dirty = True
        # And the other way: a worker adopted (or written down late) is on its task.
        for tid in self.book.ids(*ON_WORKER):
            rec = self.tasks[tid]
            on = self.sys.workers.get(rec.worker or "")
            if on and on.current_task is None and on.status in LIVE_WORKER:
                on.current_task, on.branch, on.model = rec.id, rec.branch, rec.task.model
                self.view.dirty = True

    def load_tasks_from_plan(self) -> None:
        """Create a task file for every planned task not already known."""
        self.book.ordered(topological_order(self.plan.tasks))
        now = self.clock()
        for t in self.plan.tasks:
            if t.id not in self.book:
                self.add_task(TaskRecord(task=t, ready_at=None if t.dependencies else now))
        self.sys.metrics.tasks_total = len(self.tasks)
        self.view.dirty = True

    def load_tasks_from_files(self) -> None:
        """Read the tasks back after a restart, by the rules the running master applies: a
        file a person broke, or whose fields only multibot writes were edited, is refused
        with the reason (the task goes on from its last good state, or from the plan); a
        file that is no task of the run (not in the plan, no follow-up) is refused."""
        self.book.ordered(topological_order(self.plan.tasks))
        self.home.tasks_dir.mkdir(parents=True, exist_ok=True)
        planned = {t.id: t for t in self.plan.tasks}
        for path in sorted(self.home.tasks_dir.glob("*.json")):
            rec = self.read_task_file(path, planned.get(path.stem))
            if rec is not None:
                self.book.add(rec)
        now = self.clock()
        for t in self.plan.tasks:  # a task file deleted by hand: the task starts anew
            if t.id not in self.book:
                self.event("task-file-missing", f"{self.home.task(t.id)} is missing: made anew")
                self.add_task(TaskRecord(task=t, ready_at=None if t.dependencies else now))

    def read_task_file(self, path: Path, planned: PlanTask | None) -> TaskRecord | None:
        """One task's record from its file, or None if the file is refused (see above)."""
        try:
            rec = self.journal.open(path)
        except StateError as exc:  # broken, with no good copy to fall back on
            if planned is None:
                self.event("task-file-refused", f"{exc}: not a task of this run")
                return None
            self.event("task-file-refused", f"{exc}: the task starts from the plan")
            rec = TaskRecord(task=planned, ready_at=self.clock())
            self.journal.adopt(path, rec)
            self.changed(rec, lazy=False)  # written once the file is fixed (or deleted)
            return rec
        why = None
        if rec.id != path.stem:
            why = f"it holds task {rec.id!r}, not {path.stem!r}"
        elif planned is None and not rec.origin.startswith("follow-up of "):
            why = "it is no task of the plan"
        if why is not None:
            self.event("task-file-refused", f"{path}: {why}; left alone, not run")
            self.journal.files.pop(path.stem, None)
            return None
        if rec.forged():
            good = self.journal.last_good(path)
            self.event("task-file-refused", f"{path}: {FORGED}")
            if good is not None and not good.forged():
                rec = good.model_copy(
                    update={"hold": rec.hold, "cancel": rec.cancel, "version": rec.version}
                )
            elif planned is not None:
                rec = TaskRecord(task=planned, ready_at=self.clock(), version=rec.version)
            else:
                self.journal.files.pop(path.stem, None)
                return None
            self.changed(rec, lazy=False)  # written back as the system has it
        return rec

    def add_task(self, rec: TaskRecord) -> None:
        self.journal.create(rec)
        self.book.add(rec)

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
                self.journal.commit()  # assignments out now: the rest of the turn can wait
            self.merge_next()
            self.stop_idle_workers()
            self.check_done()
        self.journal.commit()
        self.flush()

    def wake(self) -> None:
        """Make the loop tick now (called from the checks thread when a job is done)."""
        if self.inbox is not None:
            self.inbox.ring()

    def close(self) -> None:
        self.jobs.close()
        self.journal.close()
        self.flush(force=True)
        self.chores.shutdown()
        self.advisor.close()
        if self.inbox is not None:
            self.inbox.close()
        self.timeline.close()
        self._log.close()

    # == what the turn makes durable and sends ===============================================
    def changed(self, rec: TaskRecord, lazy: bool) -> None:
        """(TaskBook) A task's status changed: its file is written at the end of the turn."""
        self.journal.changed(rec, lazy)
        self.view.dirty = True

    def set_task(self, rec: TaskRecord, status: TaskStatus, *, lazy: bool = False) -> None:
        self.book.move(rec, status, lazy=lazy)

    def send(self, wid: str, payload: protocol.Payload, task_id: str | None = None) -> None:
        """Queue a message for a worker, sent by the journal after the turn's task files."""
        self.journal.send(
            self.signed(
                protocol.make(
                    payload,
                    sender=MASTER_ID,
                    recipient=wid,
                    generation=self.sys.master_generation,
                    task_id=task_id,
                )
            )
        )

    def sent(self, message: protocol.Envelope) -> None:
        """(journal) A message reached its inbox."""
        self.wrote()
        if isinstance(message.payload, protocol.Answer):
            self.questions.sent(message, self.clock())

    def unsent(self, message: protocol.Envelope, exc: MultibotError) -> None:
        """(journal) A message could not be sent: to an inbox that is gone it is dropped,
        else (a full disk) it goes again with the next turn."""
        if isinstance(exc, SendError):
            if self.write_failing is None:
                self.write_failing = str(exc)
                self.event("write-failed", f"{exc}: messages are sent again until it works")
            self.journal.send(message)
            return
        self.event("send-failed", f"{message.type} to {message.recipient}: {exc}")
        if isinstance(message.payload, protocol.Answer):
            self.questions.unsent(message)

    def refused(self, tid: str | None, problem: StateError | LockTimeout) -> None:
        """(journal, view) A state file could not be written: a broken hand edit, a lock, or
        a full disk. The state stays in memory and the write is tried again."""
        if not isinstance(problem, WriteFailed):
            self.edits.report(problem, task=tid)
        elif self.write_failing is None:
            self.write_failing = str(problem)
            self.event("write-failed", f"{problem}: the run goes on in memory, writes retried")

    def wrote(self) -> None:
        """A state file was written: if writes were failing, they work again."""
        if self.write_failing is not None:
            self.event("write-recovered", f"writes work again (after: {self.write_failing})")
            self.write_failing = None

    def flush(self, force: bool = False) -> None:
        """Write system-state.json if anything changed (at most every FLUSH_EVERY_S, or forced)."""
        if not self.view.due(force):
            return
        self.pool.refresh_titles()
        queue = (self.pipeline.merging(), self.pipeline.view())
        project(self.sys, self.tasks, self.book.order, queue, self.branches)
        self.view.write(self.sys, force)

    def event(self, kind: str, text: str, **fields: object) -> None:
        """Record an event in the timeline and show it in the master pane."""
        self.timeline.add(kind, text=text, **fields)
        self.sys.message = text[:200]
        self.view.dirty = True
        self.show(text)

    def show(self, line: str) -> None:
        """Print a line to the master pane and the master's log."""
        text = f"{time.strftime('%H:%M:%S')} {line}"
        print(text, file=self.out, flush=True)
        if not self._log.closed:
            with contextlib.suppress(OSError):  # a full disk: the pane still shows it
                self._log.write(text + "\n")

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
        waiting, self.unhandled = self.unhandled, []
        for m in [*waiting, *self.inbox.fetch()]:
            try:
                self.handle(m)
            except WriteFailed as exc:  # a full disk: handled again next turn
                self.refused(None, exc)
                self.unhandled.append(m)
                continue
            except (StateError, LockTimeout) as exc:
                self.event("state-write-refused", str(exc))
            except Exception:  # a poison message must not stop the master
                # Uncaught, it would stop the master again at every restart (it comes first).
                why = traceback.format_exc(limit=8)
                self.event("message-set-aside", f"{m.type} {m.id} from {m.sender}: {why}")
                self.inbox.set_aside(m, why)
                continue
            self.journal.took(m)  # marked handled once its effects are written

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
            if self.questions.asked(m, p, self.plan.faq, self.clock()):
                self.sys.metrics.questions += 1
        elif isinstance(p, protocol.TaskComplete):
            self.on_complete(m, p)
        elif isinstance(p, protocol.ErrorReport):
            self.on_error(m, p)
        else:
            self.event("message-ignored", f"{m.type} from {m.sender} is not for the master")

    def on_status(self, m: protocol.Envelope, p: protocol.StatusUpdate) -> None:
        wid, tid = m.sender, m.task_id
        info = self.sys.workers.get(wid)
        rec = self.book.get(tid)
        if p.kind == "started" and rec is not None:
            if rec.status == "assigned" and rec.worker == wid:
                rec.started_at = self.clock()
                # Lazy: a machine crash that loses it leaves the task assigned, and the
                # worker takes the assignment sent again at start for the one it runs.
                self.set_task(rec, "running", lazy=True)
        elif p.kind == "discovery":
            self.share_discovery(wid, tid, p.progress)
        elif p.kind == "follow_up" and rec is not None:
            self.add_follow_up(rec, p.progress)
        elif p.kind == "blocked":
            self.event("worker-blocked", f"{wid} is blocked: {p.progress}", worker=wid, task=tid)
            if info:
                info.status = "blocked"
        elif p.progress:
            self.show(f"{wid} · {tid or '-'}: {p.progress}")
        if info is not None and p.kind in ("progress", "started") and info.status == "blocked":
            info.status = "working"
        self.view.dirty = True

    def share_discovery(self, wid: str, tid: str | None, text: str) -> None:
        """Record a discovery once, and pass it to the other workers that have a task."""
        if not self.discoveries.record(wid, tid, text):
            return
        self.event("discovery", f"{wid}: {text}", worker=wid, task=tid)
        for other in recipients(wid, self.sys.workers):
            self.send(other, protocol.ContextUpdate(kind="discovery", text=text, source=wid))

    # -- questions ----------------------------------------------------------------------------
    def opus_context(self, asker: str, context: str) -> str:
        """(questions) What Opus is told of the run with a question."""
        return run_context(
            self.sys.goal,
            list(self.tasks.values()),
            self.discoveries.all(),
            list(self.sys.workers.values()),
            asker,
            context,
        )

    def reply(self, q: QuestionRecord, text: str, by: str) -> protocol.Envelope:
        """(questions) The message that answers q, to the worker that asked: it passes it
        on to its agent's `multibot ask` if that still waits, or into the agent's context."""
        return self.signed(
            protocol.make(
                protocol.Answer(answer=text, answered_by=by),
                sender=MASTER_ID,
                recipient=q.worker,
                generation=self.sys.master_generation,
                task_id=q.task_id,
                correlation_id=q.message_id,
            )
        )

    def handle_advice(self) -> None:
        self.questions.tick(self.clock())
        for advice in self.advisor.poll():
            session = self.advisor.session_id
            if session and session != self.sys.opus_session:
                self.sys.opus_session = session  # a lost session was replaced: keep the new one
            ledger.charge(self.sys, advice.cost_usd, advice.tokens)
            if advice.kind == "answer":
                self.questions.advised(advice)
            elif advice.kind == "review":
                self.on_review(advice)

    # -- task results -------------------------------------------------------------------------
    def on_complete(self, m: protocol.Envelope, p: protocol.TaskComplete) -> None:
        tid = m.task_id or ""
        rec = self.book.get(tid)
        if rec is None or rec.worker != m.sender or rec.status not in ON_WORKER:
            self.event(
                "duplicate-ignored",
                f"TASK_COMPLETE for {tid} from {m.sender} "
                f"(task is {rec.status if rec else 'unknown'})",
            )
            return
        if rec.branch and p.branch != rec.branch:  # the task's branch is the master's to name
            self.event(
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
        rec.finished_at = self.clock()
        tokens = (p.tokens.input, p.tokens.output)
        ledger.charge(self.sys, p.cost_usd, tokens, p.turns, worker=m.sender)
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
        made = self.book.follow_up(parent, text, self.clock())
        if isinstance(made, str):
            self.event("follow-up-refused", made)
        elif made is not None:
            self.add_task(made)
            self.sys.metrics.tasks_total = len(self.tasks)
            self.event("follow-up-added", f"{made.id} after {parent.id}: {text}")

    def verify(self, rec: TaskRecord) -> None:
        """Check a finished task: its claim, then its verify command (in the background)."""
        problem = drift(rec)
        if problem is not None:
            self.retry(rec, problem)
        elif rec.task.verify:
            self.pipeline.verify(rec.id, rec.commit or self.branch(rec), rec.task.verify)
        else:
            self.verified(rec)

    def verified(self, rec: TaskRecord) -> None:
        """A task passed its checks: review it if asked, else queue it for merging."""
        self.event("verified", f"{rec.id} verified", task=rec.id)
        if self.config.review and self.advisor.available and self.git is not None:
            try:
                diff = self.git.diff(self.branch(rec))
            except GitError as exc:  # uncaught, it would stop the master (and again on restart)
                self.retry(rec, f"the branch could not be read for review: {exc}")
                return
            self.advisor.review(rec.id, f"{rec.task.title}\n{rec.task.description}", diff)
            return
        self.set_task(rec, "verified")

    def on_review(self, advice: Advice) -> None:
        rec = self.book.get(advice.key)
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

    def handle_checks(self) -> None:
        """Take in the verify commands and merge queue jobs finished in the background."""
        for done in self.jobs.poll():
            for outcome in self.pipeline.take(done):
                self.take_outcome(outcome)

    def take_outcome(self, outcome: Outcome) -> None:
        """Act on what the pipeline found for one task."""
        tid = outcome.outcome.task_id if isinstance(outcome, Conflicted) else outcome.task_id
        rec = self.book.get(tid)
        if rec is None:
            return
        wanted = "verifying" if isinstance(outcome, Verified) else "verified"
        if isinstance(outcome, Merged) and rec.status == "cancelled":
            # Cancelled while its merge was landing: git is the truth, and its dependents go
            # on from it.
            self.event("cancel-too-late", f"{tid} was cancelled as it merged", task=tid)
            self.on_merged(rec, outcome.merge_commit)
        elif rec.status != wanted:  # cancelled (or sent back by hand) meanwhile
            self.event("merge-ignored", f"{tid} is {rec.status} now", task=tid)
        elif isinstance(outcome, Verified):
            if outcome.ok:
                self.verified(rec)
            else:
                self.retry(rec, feedback.verify_failed(rec, outcome.output))
        elif isinstance(outcome, Merged):
            self.on_merged(rec, outcome.merge_commit)
        elif isinstance(outcome, Conflicted):
            assert self.git is not None
            self.retry(rec, feedback.conflict(outcome.outcome, self.git.integration))
        elif isinstance(outcome, BrokeCheck):
            self.retry(rec, feedback.broke_check(rec, outcome.output))

    def retry(self, rec: TaskRecord, feedback: str) -> None:
        """Send a task back with feedback (a new attempt), or fail it when attempts run out."""
        if self.book.retry(rec, feedback, self.config.verify_attempts) == "failed":
            self.event(
                "task-failed",
                f"{rec.id} failed after {rec.attempts} attempts: {feedback[:300]}",
                task=rec.id,
            )
        else:
            self.event("task-retry", f"{rec.id} goes back: {feedback[:300]}", task=rec.id)

    def on_error(self, m: protocol.Envelope, p: protocol.ErrorReport) -> None:
        tid = m.task_id or ""
        rec = self.book.get(tid)
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
            self.pool.stop(m.sender)
        elif info is not None and info.current_task == tid:
            info.status, info.current_task, info.idle_since = "idle", None, self.clock()
        if rec is None or rec.worker != m.sender or rec.status not in ON_WORKER:
            return
        if p.kind == "busy":  # it runs another task: this one waits for a free worker
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
        """Take in what the person edited: pause, task hold/cancel/priority, answers."""
        mono = self.mono()
        files = self.journal.files
        self.edits.look_at_tasks(self.book.order.ids, files, self.tasks, self.journal.busy, mono)
        if self.edits.due(mono):
            self.edits.look_at_system(self.sys_file, self.sys.paused)
            self.questions.look()

    def took_write(self, tid: str, written: TaskRecord) -> None:
        """(journal) A task's file was written, with the person's fields as they are."""
        self.wrote()
        self.take_edit(self.tasks[tid], written)

    def take_edit(self, rec: TaskRecord, edited: TaskRecord) -> None:
        """Apply what the person changed in a task's file: hold, cancel, priority (a change
        of any other field is refused, and said once; the next write puts it back)."""
        if edited.forged():
            self.edits.report(f"{self.home.task(rec.id)}: {FORGED}")
        if not task_edit(rec, edited):
            return
        self.event(
            "task-edited",
            f"{rec.id}: hold={rec.hold} cancel={rec.cancel} priority={rec.task.priority}",
            task=rec.id,
        )
        if rec.cancel and rec.status not in ("merged", "cancelled"):
            self.cancel(rec)

    def paused(self, paused: bool) -> None:
        self.sys.paused = paused
        self.event("paused" if paused else "resumed", "by the person (system-state.json)")

    def cancel(self, rec: TaskRecord) -> None:
        """Cancel a task; its worker, if on it, stops (work committed) and is not restarted."""
        if rec.worker and rec.status in ON_WORKER:
            info = self.sys.workers.get(rec.worker)
            if info is not None and info.current_task == rec.id:
                info.current_task = None
                self.pool.stop(rec.worker, f"task {rec.id} cancelled")
        self.set_task(rec, "cancelled")

    def check_approval(self) -> None:
        plan = self.edits.approved_plan(self.plan_file)
        problems = capability_problems(plan.tasks if plan else [], self.pool.template.capabilities)
        if problems:
            self.event("plan-refused", "; ".join(problems))
        elif plan is not None:
            self.plan = plan
            self.sys.phase = "running"
            self.load_tasks_from_plan()
            self.event("plan-approved", f"{len(plan.tasks)} tasks")

    # == workers ==============================================================================
    def supervise(self) -> None:
        """Restart the workers whose restart is due, and take in those that died."""
        now = self.clock()
        checked = self.pool.check(now, self.mono())
        if checked is None:
            return
        self.view.dirty |= checked.changed or bool(checked.due or checked.dead)
        for wid in checked.due:
            self.pool.restart(wid)
            self.resend_assignments(only=wid)
        for wid, reason in checked.dead:
            info = self.sys.workers[wid]
            rec = self.book.get(info.current_task)
            on_it = rec is not None and rec.status in ON_WORKER and rec.worker == wid
            if not self.pool.died(wid, reason, now):
                if rec is not None and on_it:  # its next incarnation does it again
                    rec.runs += 1
                    self.changed(rec, lazy=True)
                continue
            info.current_task = None
            if rec is not None and rec.status in ON_WORKER:
                # Counted as an attempt: a task that kills every worker must not do so forever.
                # rec.worker stays: its worktree holds the branch, released on reassignment.
                self.retry(rec, feedback.worker_failed(wid, info.restarts - 1, reason))

    def resend_assignments(self, only: str | None = None) -> None:
        """Send again the assignments a worker may not have (after its or our restart)."""
        for tid in self.book.ids(*ON_WORKER):
            rec = self.tasks[tid]
            if rec.worker is None or (only is not None and rec.worker != only):
                continue
            if only is None:
                ws = StateFile(self.home.worker_state(rec.worker), WorkerState, default=None)
                try:
                    cur = ws.read().current_task
                except StateError:
                    cur = None
                if cur is not None and cur.task_id == rec.id:
                    continue
            self.send_assignment(rec, rec.worker)

    def stop_idle_workers(self) -> None:
        if self.book.needs_workers():
            return
        now = self.clock()
        for wid, info in self.pool.live().items():
            idle_for = now - (info.idle_since or now)
            if (
                info.status == "idle"
                and info.current_task is None
                and idle_for > self.config.idle_worker_timeout
            ):
                self.event("worker-stopped", f"{wid} idle for {idle_for:.0f}s", worker=wid)
                self.pool.stop(wid)

    # == assignments ==========================================================================
    def assign_ready(self) -> None:
        free = self.pool.free()
        last = self.book.last_tasks() if free else {}  # it looks at every ready task
        idle = [WorkerSlot(w, frozenset(i.capabilities), last.get(w)) for w, i in free.items()]
        plan = schedule(
            self.tasks,
            idle,
            len(self.pool.live()),
            self.config.max_workers,
            frozenset(self.pool.template.capabilities),
            self.book.order,
            self.book.index,
        )
        for a in plan:
            wid = a.worker_id or self.pool.spawn()
            try:
                self.send_assignment(self.tasks[a.task_id], wid, new=True)
            except GitError as exc:
                rec = self.tasks[a.task_id]
                rec.last_error = f"git: {exc}"
                self.event("assign-failed", f"{a.task_id}: {exc}", task=a.task_id)
                self.set_task(rec, "failed")

    def send_assignment(self, rec: TaskRecord, wid: str, new: bool = False) -> None:
        """Prepare the worktree and branch, record the assignment, then send it."""
        assert self.git is not None
        info = self.sys.workers[wid]
        prev = self.sys.workers.get(rec.worker or "")
        if new and prev is not None and prev.id != wid and prev.status in ("failed", "stopped"):
            self.pool.release_worktree(prev, self.git)
        worktree = self.home.worktree(wid)
        branch = self.git.branch_for(rec.id)  # the worker checks it out (see TaskAssignment.repo)
        if new:
            rec.attempts += 1
            rec.runs += 1
            rec.assigned_at = self.clock()
            rec.worker, rec.branch = wid, branch
            self.set_task(rec, "assigned")
        info.current_task, info.branch, info.model = rec.id, branch, rec.task.model
        info.working_directory = str(worktree)
        if info.status == "idle":
            info.status = "working"
        payload = feedback.assignment(
            rec,
            self.config,
            worktree=str(worktree),
            context=self.book.context_for(rec, self.discoveries.all()),
            base_branch=self.git.integration,
            repo=str(self.git.root),
        )
        self.send(wid, payload, task_id=rec.id)
        self.event(
            "assigned",
            f"{rec.id} → {wid} (attempt {rec.attempts}, {rec.task.model})",
            task=rec.id,
            worker=wid,
        )

    # == merging ==============================================================================
    def branch(self, rec: TaskRecord) -> str:
        """The task's branch (as recorded, else as the repository names it)."""
        assert self.git is not None
        return rec.branch or self.git.branch_for(rec.id)

    def merge_next(self) -> None:
        """Queue, in plan order, every verified task whose dependencies are merged."""
        if self.git is None or self.pipeline.idle():
            return  # it takes them in at its next step, whatever came meanwhile
        ready = [(r.id, r.task.title, self.branch(r)) for r in self.book.mergeable()]
        before = (self.pipeline.merging(), self.pipeline.blocked)
        self.pipeline.step(
            ready, self.plan.verify or self.config.verify, set(self.book.ids("verified"))
        )
        if (self.pipeline.merging(), self.pipeline.blocked) != before:
            self.view.dirty = True

    def on_merged(self, rec: TaskRecord, merge_commit: str | None) -> None:
        """A task is on the integration branch: its dependents may become ready."""
        assert self.git is not None
        self.book.merged(rec, merge_commit, self.clock())
        self.sys.git.last_merge_commit = merge_commit or self.sys.git.last_merge_commit
        self.sys.metrics.tasks_merged += 1
        self.event(
            "merged",
            f"{rec.id} merged into {self.git.integration} ({(merge_commit or '')[:10]})",
            task=rec.id,
        )

    def recover_merge(self, rec: TaskRecord) -> None:
        """A verified task whose branch git says is merged (just before a crash) is merged."""
        assert self.git is not None
        if self.git.is_merged(self.branch(rec)):
            self.book.merged(rec, None, self.clock())
            self.sys.metrics.tasks_merged += 1
            self.event("merge-recovered", f"{rec.id} was merged before the restart", task=rec.id)

    # == the end ==============================================================================
    def check_done(self) -> None:
        finished = self.book.finished()
        if finished is None:
            return
        failed, stuck = finished
        for tid, why in stuck.items():
            rec = self.tasks[tid]
            rec.last_error = f"blocked: {why}"
            self.changed(rec, lazy=False)
            self.event("task-blocked", f"{tid} can never start: {why}", task=tid)
        self.sys.phase = "failed" if failed or stuck else "done"
        self.sys.metrics.finished_at = self.clock()
        self.sys.metrics.tasks_failed = len(failed)
        for wid in self.pool.live():
            self.pool.stop(wid)
        tot = self.sys.metrics.totals
        took = self.sys.metrics.finished_at - self.sys.metrics.started_at
        self.event(
            "run-finished",
            f"{self.sys.phase}: {self.sys.metrics.tasks_merged} merged, "
            f"{len(failed)} failed, {len(stuck)} blocked in {took:.1f}s; "
            f"cost ${tot.cost_usd:.4f}, {tot.input_tokens} in / {tot.output_tokens} out tokens",
        )
        self.exit_code = EXIT_FAILED if failed or stuck else EXIT_DONE
        self.finished = True

    def over_budget(self) -> bool:
        why = ledger.over_budget(self.sys, self.config.budget_usd)
        if why is not None and not self.budget_said:
            self.budget_said = True
            self.event("budget-reached", why)
        return why is not None
