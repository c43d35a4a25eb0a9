"""What every part of the master shares: the run in memory, its durable turn, and its voice.

One ``RunContext`` per master process, made by ``Master``. The parts (intake, results,
dispatch, steering, restore) each hold it and read ``ctx.sys`` and ``ctx.book`` through it,
so that a start or a resume that replaces ``sys`` is seen by all of them. Everything here
runs on the loop's thread, except what ``chores`` and the journal's io threads are given.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from multibot import auth, mailbox, protocol
from multibot.atomic import open_log
from multibot.config import MasterConfig
from multibot.errors import LockTimeout, MultibotError, SendError, StateError, WriteFailed
from multibot.layout import MASTER_ID, Home
from multibot.limits import Throttle
from multibot.master.book import TaskBook
from multibot.master.discoveries import Discoveries
from multibot.master.jobs import Jobs
from multibot.master.journal import Hooks, TurnJournal
from multibot.master.pipeline import Pipeline
from multibot.master.view import SystemView
from multibot.state import BranchInfo, Plan, SharedContext, SystemState, TaskRecord, TaskStatus
from multibot.store import StateFile
from multibot.timeline import Timeline
from multibot.worktrees import GitRepo


class Listeners:
    """What the context passes on to parts made after it (set by Master at wiring)."""

    def __init__(self) -> None:
        self.edited: Callable[[str, TaskRecord], None] = lambda tid, written: None
        self.answer_sent: Callable[[protocol.Envelope], None] = lambda m: None
        self.answer_unsent: Callable[[protocol.Envelope], None] = lambda m: None
        self.problem: Callable[[StateError | LockTimeout | str, str | None], None] = (
            lambda problem, tid: None
        )


class RunContext:
    """The run's state in memory, the parts that make it durable, and how the master speaks."""

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        *,
        out: TextIO,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.home, self.config, self.out = home, config, out
        self.clock, self.mono = clock, monotonic
        self.sys = SystemState()
        self.plan = Plan()
        self.git: GitRepo | None = None  # once the repository is open
        self.inbox: mailbox.Receiver | None = None  # once the run starts or resumes
        self.keys = auth.Keys(b"")  # the run's, once it starts or resumes
        self.branches: dict[str, BranchInfo] = {}  # each task's entry in system-state.json
        self.write_failing: str | None = None  # why state files cannot be written, if so
        self.finished, self.exit_code = False, 0
        # The API's limits (see limits.py).
        self.throttle = Throttle(config.max_workers, adaptive=config.adaptive_concurrency)
        self.listen = Listeners()
        self.sys_file = StateFile(home.system_state, SystemState, default=SystemState)
        self.plan_file = StateFile(home.plan, Plan, default=Plan)
        self.discoveries = Discoveries(
            StateFile(home.context, SharedContext, default=SharedContext)
        )
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
        hooks = Hooks(
            edited=self._edited, refused=self.refused, sent=self._sent, unsent=self._unsent
        )
        self.journal = TurnJournal(home, self.jobs, self.book.tasks, hooks, monotonic)
        self.view = SystemView(
            self.sys_file, self.chores, lambda e: self.refused(None, e), monotonic
        )

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        return self.book.tasks

    # -- speaking ---------------------------------------------------------------------------
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

    def send(self, wid: str, payload: protocol.Payload, task_id: str | None = None) -> None:
        """Queue a message for a worker, sent by the journal after the turn's task files."""
        self.journal.send(self.message(wid, payload, task_id=task_id))

    def message(
        self,
        wid: str,
        payload: protocol.Payload,
        *,
        task_id: str | None = None,
        correlation_id: str | None = None,
    ) -> protocol.Envelope:
        """A message from the master to worker wid, signed for its current generation (a
        person's CLI, a stranger: generation 0, which no worker has)."""
        m = protocol.make(
            payload,
            sender=MASTER_ID,
            recipient=wid,
            generation=self.sys.master_generation,
            task_id=task_id,
            correlation_id=correlation_id,
        )
        info = self.sys.workers.get(wid)
        generation = info.generation if info is not None else 0
        return auth.sign(m, self.keys.worker(wid, generation), generation)

    def wake(self) -> None:
        """Make the loop tick now (called from the checks thread when a job is done)."""
        if self.inbox is not None:
            self.inbox.ring()

    # -- tasks ------------------------------------------------------------------------------
    def changed(self, rec: TaskRecord, lazy: bool) -> None:
        """(TaskBook) A task's status changed: its file is written at the end of the turn."""
        self.journal.changed(rec, lazy)
        self.view.dirty = True

    def add_task(self, rec: TaskRecord) -> None:
        """A new task: its file is made now, and it joins the book."""
        self.journal.create(rec)
        self.book.add(rec)

    def move(self, rec: TaskRecord, status: TaskStatus, *, lazy: bool = False) -> None:
        self.book.move(rec, status, lazy=lazy)

    def branch(self, rec: TaskRecord) -> str:
        """The task's branch (as recorded, else as the repository names it)."""
        assert self.git is not None
        return rec.branch or self.git.branch_for(rec.id)

    # -- writes that fail -------------------------------------------------------------------
    def refused(self, tid: str | None, problem: StateError | LockTimeout) -> None:
        """(journal, view) A state file could not be written: a broken hand edit, a lock, or
        a full disk. The state stays in memory and the write is tried again."""
        if not isinstance(problem, WriteFailed):
            self.listen.problem(problem, tid)
        elif self.write_failing is None:
            self.write_failing = str(problem)
            self.event("write-failed", f"{problem}: the run goes on in memory, writes retried")

    def wrote(self) -> None:
        """A state file was written: if writes were failing, they work again."""
        if self.write_failing is not None:
            self.event("write-recovered", f"writes work again (after: {self.write_failing})")
            self.write_failing = None

    def _edited(self, tid: str, written: TaskRecord) -> None:
        """(journal) A task's file was written, with the person's fields as they are."""
        self.wrote()
        self.listen.edited(tid, written)

    def _sent(self, message: protocol.Envelope) -> None:
        """(journal) A message reached its inbox."""
        self.wrote()
        if isinstance(message.payload, protocol.Answer):
            self.listen.answer_sent(message)

    def _unsent(self, message: protocol.Envelope, exc: MultibotError) -> None:
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
            self.listen.answer_unsent(message)

    def close(self) -> None:
        """Close what the context opened (the parts that use it are closed first)."""
        self.chores.shutdown()
        if self.inbox is not None:
            self.inbox.close()
        self.timeline.close()
        self._log.close()
