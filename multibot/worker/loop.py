"""The worker process: one per tmux pane, running one agent on one task at a time.

Its main loop beats its heartbeat, handles its inbox, watches its state file for a pause,
drives the agent and shows what happens. It never decides what to work on: the master does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from multibot import auth, mailbox, protocol, sandbox
from multibot.agents import Agent, AgentEvent, AgentOutcome, make_agent
from multibot.atomic import open_log
from multibot.auth import WorkerKey
from multibot.config import WorkerTemplate, load_worker
from multibot.errors import (
    AgentError,
    MultibotError,
)
from multibot.heartbeat import HeartbeatWriter
from multibot.ids import check_id
from multibot.layout import MASTER_ID, Home
from multibot.state import ContextMemory, CurrentTask, WorkerState
from multibot.store import StateFile
from multibot.worker.branches import Branches, Tidy
from multibot.worker.ending import changed_files, clear_lock, commit_left, settle
from multibot.worker.launch import reset_file, task_spec, worker_key
from multibot.worker.orders import judge_assignment
from multibot.worker.outbox import Outbox
from multibot.worker.pause import PauseWatch
from multibot.worker.progress import Progress
from multibot.worker.relay import Relay
from multibot.worker.report import end_report, remember_file, remember_note
from multibot.worker.typed import PaneInput, for_agent, kept_section
from multibot.worker.writes import Replaced, StateWrites

if TYPE_CHECKING:  # imported when used: GitPython is slow to import, and workers start often
    from multibot.worktrees import TaskStart

EXIT_OK = 0
EXIT_STARTUP = 2
EXIT_REPLACED = 3


ORDERS = (protocol.TaskAssignment, protocol.Terminate)  # taken from the master alone


class Stopped(MultibotError):
    """The process was told to stop by a signal (its pane closed, or kill)."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


class Worker:
    """One worker: its files, its inbox, its agent."""

    def __init__(
        self,
        home: Home,
        worker_id: str,
        *,
        backend: str = "shell",
        generation: int = 0,
        config: WorkerTemplate | None = None,
        heartbeat_interval: float = 1.0,
        setup_hook: str | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        key: WorkerKey | None = None,
    ) -> None:
        self.home, self.id = home, check_id(worker_id, "worker id")
        self.generation, self.backend = generation, backend
        self.key = key or worker_key(home, self.id, generation)
        self.config = config or load_worker(home)
        self.clock = clock
        self.out = out or sys.stdout
        self.agent: Agent = make_agent(backend)
        self.state = StateFile(home.worker_state(self.id), WorkerState, default=self._fresh_state)
        self.memory = StateFile(home.worker_memory(self.id), ContextMemory, default=ContextMemory)
        self.pause = PauseWatch(home, self.state, self.show)
        self.paused_at = 0.0  # when the agent was last stopped (see _hold_paused)
        self.heartbeat_interval = heartbeat_interval
        self.writes = StateWrites(self.state, generation, self.show)
        self.start_commit: str | None = None  # where the current task's new branch began
        self.identities: dict[str, dict[str, str]] = {}  # identity_env per worktree
        self.heartbeat = HeartbeatWriter(
            home.heartbeat(self.id), self.id, generation, heartbeat_interval
        )
        home.logs_dir.mkdir(parents=True, exist_ok=True)
        self._log = open_log(home.log(self.id))
        mailbox.create_inbox(home, self.id)
        mailbox.create_inbox(home, sandbox.reply_inbox(self.id))  # its agent's `multibot ask`
        self.inbox = mailbox.Receiver(home, self.id, verify=self._verify)
        self.branches = Branches(home, self.id, generation, setup_hook, self.inbox.ring)
        self.outbox = Outbox(home, self.show)
        self.relay = Relay(home, self.key, self.memory, self.writes, self.outbox, self.show)
        self.typed = PaneInput(self.inbox.ring)
        self.task: protocol.Envelope | None = None
        self.task_started = 0.0
        self.deferred: list[protocol.Envelope] = []
        self.finished: set[tuple[str, int]] = set()  # (task id, attempt) reported to the master
        self.paused = False
        self.stopping = False
        self.status = "idle"
        self.progress = Progress(self.show)
        self.discoveries_at_start = 0

    # -- lifecycle --------------------------------------------------------------------------
    def _fresh_state(self) -> WorkerState:
        return WorkerState(id=self.id, generation=self.generation, backend=self.backend)

    def register(self) -> None:
        """Claim the worker's state file for this generation, or refuse if a newer one exists."""

        def claim(s: WorkerState) -> WorkerState:
            if s.generation > self.generation:
                raise Replaced(f"generation {s.generation} is newer than mine ({self.generation})")
            s.generation, s.pid, s.backend = self.generation, os.getpid(), self.backend
            s.status, s.current_task, s.current_tool = "idle", None, None
            return s

        self.state.update(claim)
        self.paused = self.pause.wanted()
        self.status = "paused" if self.paused else "idle"
        self.heartbeat.beat(self.status)
        self.show(f"worker {self.id} ready (generation {self.generation}, {self.backend} backend)")
        if self.typed.start():
            self.show("   type a line and Enter here to tell the agent something")

    def run(self) -> int:
        """Run the main loop until terminated; return the exit code."""
        try:
            self.register()
        except Replaced as exc:
            self.show(f"not starting: {exc}")
            return EXIT_REPLACED
        # A closed pane sends SIGHUP, `kill` SIGTERM: stop the agent's whole process group too,
        # so nothing outlives the worker, and keep the work done so far.
        signal.signal(signal.SIGTERM, _raise_stopped)
        signal.signal(signal.SIGHUP, _raise_stopped)
        try:
            idle_wait = max(self.config.tick, self.heartbeat_interval / 3)
            while not self.stopping:
                self.step()
                # Idle, nothing to poll but the inbox, whose doorbell wakes us at once: sleep
                # longer (a third of a heartbeat) and spare the CPU of many idle workers.
                # Output left by a bounded poll is taken at once (after a beat).
                if not (self.task and not self.paused and self.agent.behind()):
                    self.inbox.wait(self.config.tick if self.task else idle_wait)
        except Stopped as exc:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self.show(f"stopping on {exc}")
            with contextlib.suppress(Exception):  # best effort on the way out
                self._on_terminate(protocol.Terminate(reason=f"worker got {exc}"))
        except Replaced as exc:
            self.show(f"stopping: replaced by a newer incarnation ({exc})")
            if self.agent.process() is not None:
                self.agent.stop(2.0)
            return EXIT_REPLACED
        except KeyboardInterrupt:
            self.show("interrupted")
            self.agent.stop(2.0)
        finally:
            self.inbox.close()
            self.heartbeat.close()
            self._log.close()
            self.pause.close()
        return EXIT_OK

    def step(self) -> None:
        """One turn of the main loop: heartbeat, pause, inbox, agent."""
        self.heartbeat.beat(self.status)
        self.outbox.flush()
        self._check_pause()
        if self.writes.due():
            self.writes.update()  # the lazy changes, on their own
        for message in self.inbox.fetch():
            try:
                self.handle(message)
            except Exception:  # a poison message must not stop the worker
                self.inbox.set_aside(message, traceback.format_exc(limit=8))
                self.show(f"message {message.id} ({message.type}) set aside: see rejected/")
                continue
            self.inbox.done(message)
        for line in self.typed.take():
            self.on_typed(line)
        self.take_branch()
        if self.paused and self.task is not None:
            self._hold_paused()
        if self.paused or self.task is None:
            return
        for event in self.agent.poll():
            self.on_event(event)
        outcome = self.agent.outcome()
        if outcome is not None:
            self.finish(outcome)

    # -- pause ------------------------------------------------------------------------------
    def _hold_paused(self) -> None:
        """Stop the agent's group again each second while paused: a single SIGSTOP was seen
        undone now and then, most likely by the SIGCONT the kernel sends an orphaned process
        group (the agent's is one: a session of its own) when one of its processes exits."""
        now = time.monotonic()
        if now - self.paused_at >= 1.0:
            self.paused_at = now
            self.agent.suspend()

    def _check_pause(self) -> None:
        if not self.pause.changed():
            return
        if self.state.read().generation > self.generation:
            raise Replaced(f"state file names generation {self.state.read().generation}")
        want = self.pause.wanted()
        if want and not self.paused:
            self.paused = True
            self.agent.suspend()
            self._set_status("paused")
            self.show("⏸  paused")
        elif not want and self.paused:
            self.paused = False
            self.agent.resume()
            self._set_status("working" if self.task or self.branches.preparing else "idle")
            self.show("▶  resumed")
            deferred, self.deferred = self.deferred, []
            for message in deferred:
                self.handle(message)

    # -- messages ---------------------------------------------------------------------------
    def current_task_id(self) -> str | None:
        current = self.task or (self.branches.preparing[0] if self.branches.preparing else None)
        return current.task_id if current is not None else None

    def _verify(self, m: protocol.Envelope) -> auth.Refusal | None:
        """(inbox) Take only what the master (or a person) signed for this incarnation, and
        what our own agent signed about its task; and orders only from the master."""
        refusal = self.key.check(m, self.current_task_id())
        if refusal is None and isinstance(m.payload, ORDERS) and m.sender != MASTER_ID:
            refusal = auth.Refusal(f"{m.type} from {m.sender!r}: only the master gives orders")
        if refusal is not None:
            self.show(f"! refused message {m.id}: {refusal.reason}")
        return refusal

    def handle(self, m: protocol.Envelope) -> None:
        """Act on one message from the master, or from our agent's commands."""
        if m.sender == self.id:
            self.relay.from_agent(m)
            return
        if m.sender == MASTER_ID:
            self.writes.master_contact = self.clock()  # written with the next state change
        p = m.payload
        if isinstance(p, protocol.Answer) and self.relay.answers(m):
            if not self.relay.answer(m, p, self.current_task_id()):
                self._on_context("answer", p.answer, p.answered_by)
        elif isinstance(p, protocol.TaskAssignment):
            self._on_assignment(m, p)
        elif isinstance(p, protocol.StatusRequest):
            self.send(
                self._status_update("status"), correlation_id=m.id, to=m.reply_to, durable=False
            )
        elif isinstance(p, protocol.Terminate):
            self._on_terminate(p)
        elif isinstance(p, protocol.ContextUpdate | protocol.Broadcast):
            self._on_context(p.kind, p.text, p.source or m.sender)
        elif isinstance(p, protocol.Answer):
            self._on_context("answer", p.answer, p.answered_by)
        else:
            self.show(f"! ignoring {m.type} (not for workers)")

    def _on_assignment(self, m: protocol.Envelope, a: protocol.TaskAssignment) -> None:
        task_id = m.task_id or ""
        verdict = judge_assignment(
            self.id,
            self.home.worktree(self.id),
            task_id,
            a,
            current=self.current_task_id(),
            finished=self.finished,
            paused=self.paused,
        )
        if verdict.note:
            self.show(verdict.note)
        if verdict.error is not None:
            self.send(verdict.error, task_id=task_id)
        elif verdict.action == "defer":
            self.deferred.append(m)
        elif verdict.action == "start":
            self.start_task(m, a)

    def start_task(self, m: protocol.Envelope, a: protocol.TaskAssignment) -> None:
        """Check out the task's branch (see branches.py), then start the agent on it."""
        task_id = m.task_id or "task"
        tidy, self.branches.tidy = self.branches.tidy, None  # tidy again once it ends well
        self.start_commit = None
        if not a.repo:
            self.run_agent(m, a)
            return
        clear_lock(Path(a.working_directory), self.show)
        started = self.branches.quick(task_id, a, tidy)
        if started is not None:
            self.branch_ready(m, a, started)
            return
        self.branches.begin(m, a, task_id)
        self.status = "working"
        self.show(f"… {task_id}: preparing branch {a.branch}")

    def take_branch(self) -> None:
        """Start the agent once the branch being prepared is ready (not while paused)."""
        done = None if self.paused else self.branches.take()
        if done is None:
            return
        m, a, job = done
        try:
            started = job.result()
        except MultibotError as exc:
            self.show(f"✗ cannot prepare {a.branch}: {exc}")
            self.send(
                protocol.ErrorReport(kind="git", message=str(exc), recoverable=True),
                task_id=m.task_id,
            )
            self._set_status("idle")
            return
        self.branch_ready(m, a, started)

    def branch_ready(
        self, m: protocol.Envelope, a: protocol.TaskAssignment, started: TaskStart
    ) -> None:
        self.start_commit = started.start
        if started.branch != a.branch:
            self.show(f"! the master named branch {a.branch}, git gave {started.branch}")
        self.run_agent(m, a)

    def run_agent(self, m: protocol.Envelope, a: protocol.TaskAssignment) -> None:
        """Start the agent on an assignment whose branch is checked out."""
        task_id = m.task_id or "task"
        memory = self.memory.read()
        self.discoveries_at_start = len(memory.discoveries)
        try:
            spec = task_spec(
                self.home,
                self.key,
                self.config,
                self.backend,
                m,
                a,
                memory=memory,
                resume=self.state.read().sessions.get(task_id),
                identities=self.identities,
            )
        except AgentError as exc:
            self._cannot_start(exc, task_id)
            return
        kept = self.typed.take_kept()
        if kept:
            spec = replace(spec, prompt=spec.prompt + "\n" + kept_section(kept))
            self.show(f"✉  {len(kept)} typed line(s) go to the agent with the task")
        reset_file(self.home.worker_context(self.id), "".join(f"{line}\n" for line in a.context))
        self.task, self.task_started = m, self.clock()
        self.progress.reset()
        title = f"{task_id}: {a.title}" if a.title else task_id
        resumed = " (resuming session)" if spec.resume_session else ""
        self.show(f"▶  {title} [{a.model}] attempt {a.attempt}{resumed}")
        try:
            self.agent.start(spec)
        except AgentError as exc:
            self._cannot_start(exc, task_id)
            return

        def started(s: WorkerState) -> WorkerState:
            s.current_task = CurrentTask(
                task_id=task_id, title=a.title, model=a.model, attempt=a.attempt
            )
            s.git.branch = a.branch
            s.status = "working"
            return s

        self.status = "working"
        # The master hears first (the task's start is what it waits on); the file follows.
        # Not synced to disk, like a heartbeat: it tells of this process, which a machine
        # crash would kill too, and the master learns the rest from the task's outcome.
        update = self._status_update("started", f"started {title}")
        self.send(update, task_id=task_id, durable=False)
        self.writes.update(started, lazy=True)

    def on_typed(self, text: str) -> None:
        """A line the person typed into the pane: to the running agent, or kept for the next
        task (the shell backend cannot be steered: recorded only); the master records it."""
        task_id = self.current_task_id()
        running = self.task is not None
        if self.backend == "shell":
            self.show("✎  noted: the shell backend runs fixed commands, typing cannot steer them")
        elif running and self.agent.inject(for_agent(text)):
            self.show(f"✉  to the agent: {text}")
        else:
            self.typed.keep(text)
            self.show(f"✎  kept for the next task (no task is running now): {text}")
        self.send(self._status_update("person", text), task_id=task_id)

    def _cannot_start(self, exc: AgentError, task_id: str) -> None:
        self.show(f"✗ cannot start: {exc}")
        self.send(
            protocol.ErrorReport(kind="startup", message=str(exc), recoverable=False),
            task_id=task_id,
        )
        self.task = None
        self._set_status("error")

    def _on_terminate(self, t: protocol.Terminate) -> None:
        self.show(f"■ terminate: {t.reason or 'asked by master'}")
        self.stopping = True
        m = self.branches.stop()
        if m is not None:  # its branch is still being made: it never started
            self.send(
                protocol.ErrorReport(
                    kind="terminated", message="terminated before it started", recoverable=True
                ),
                task_id=m.task_id,
            )
        if self.task is None:
            self._set_status("stopped")
            return
        self.agent.stop(5.0 if t.graceful else 0.5)
        task_id = self.task.task_id or ""
        assignment = self.task.payload
        assert isinstance(assignment, protocol.TaskAssignment)
        commit = commit_left(assignment, f"multibot: work in progress on {task_id} (terminated)")
        note = f"terminated; work in progress committed as {commit}" if commit else "terminated"
        self.send(
            protocol.ErrorReport(kind="terminated", message=note, recoverable=True),
            task_id=task_id,
        )
        self.task = None
        self._set_status("stopped")

    def _on_context(self, kind: str, text: str, source: str) -> None:
        line = f"[{kind} from {source}] {text}"
        self.show(f"✉  {line}")

        self.writes.other(self.memory, remember_note(line))
        if self.task is not None and not self.agent.inject(line):
            self.show("   (kept for the next task)")

    # -- the agent --------------------------------------------------------------------------
    def on_event(self, event: AgentEvent) -> None:
        """Show an agent event and remember what matters."""
        if event.kind == "session":
            sid = str(event.data.get("session_id") or event.text)
            task_id = self.task.task_id if self.task else None

            def keep(s: WorkerState) -> WorkerState:
                s.session_id = sid
                if task_id:
                    s.sessions = {**s.sessions, task_id: sid}
                return s

            if sid and self.state.read().session_id != sid:
                self.writes.update(keep)
            return
        if event.kind == "file":
            self.writes.other(self.memory, remember_file(event.text))
        self.progress.take(event)

    def finish(self, outcome: AgentOutcome) -> None:
        """Commit what is left and report the task's end to the master."""
        assert self.task is not None
        m, self.task = self.task, None
        self.progress.ended()
        task_id = m.task_id or ""
        a = m.payload
        assert isinstance(a, protocol.TaskAssignment)
        settled = settle(task_id, a, outcome, self.show)
        commit, head, outcome = settled.commit, settled.head, settled.outcome
        if a.repo and (commit or head):  # prepared by this process (start_task), committed
            self.branches.tidy = Tidy(a.working_directory, commit or head, time.monotonic())
        elapsed = self.clock() - self.task_started
        if outcome.session_id:
            self.on_event(AgentEvent("session", outcome.session_id))
        files: list[str] = []
        discoveries: list[str] = []
        if outcome.ok:
            discoveries = self.memory.read().discoveries[self.discoveries_at_start :]
            files = changed_files(a, settled, self.start_commit)
        report, line = end_report(
            task_id,
            a,
            outcome,
            commit=commit or head or "",
            files=files,
            discoveries=discoveries,
            elapsed=elapsed,
        )

        trouble = outcome.trouble
        fresh = trouble is not None and trouble.kind == "too_long"

        def idle(s: WorkerState) -> WorkerState:
            if fresh:  # its context is full: the next try starts a new session
                s.sessions = {k: v for k, v in s.sessions.items() if k != task_id}
            s.current_task, s.current_tool, s.status = None, None, "idle"
            s.turns += outcome.turns
            s.cost_usd += outcome.cost_usd
            s.git.last_commit = commit or s.git.last_commit
            s.git.uncommitted_changes = False
            return s

        # The state says idle before the master hears of the end, so it never sees it busy.
        self.writes.update(idle)
        self.status = "paused" if self.paused else "idle"
        if trouble is None or trouble.kind == "too_long":
            self.finished.add((task_id, a.attempt))  # a limit's is sent again, attempt and all
        self.send(report, task_id=task_id)
        self.show(line)

    # -- output -----------------------------------------------------------------------------
    def _status_update(self, kind: str, progress: str = "") -> protocol.StatusUpdate:
        elapsed = self.clock() - self.task_started if self.task else 0.0
        return self.progress.update(self.status, kind, progress, elapsed)

    def send(
        self,
        payload: protocol.Payload,
        *,
        task_id: str | None = None,
        correlation_id: str | None = None,
        to: str | None = None,
        durable: bool = True,
    ) -> None:
        """Send a message to the master (or to a reply inbox); flushed to disk if durable."""
        message = protocol.make(
            payload,
            sender=self.id,
            recipient=to or MASTER_ID,
            generation=self.generation,
            task_id=task_id,
            correlation_id=correlation_id,
        )
        self.outbox.put(self.key.sign(message), durable)

    def _set_status(self, status: str) -> None:
        self.status = status

        def put(s: WorkerState) -> WorkerState:
            s.status = status  # type: ignore[assignment]
            return s

        self.writes.update(put)
        self.heartbeat.beat(status)

    def show(self, line: str) -> None:
        """Print a line to the pane and the worker's log."""
        stamp = time.strftime("%H:%M:%S")
        text = f"{stamp} {line}"
        with contextlib.suppress(OSError):  # the pane may be gone (SIGHUP): the log still has it
            print(text, file=self.out, flush=True)
        if not self._log.closed:
            with contextlib.suppress(OSError):  # a full disk: the pane still shows it
                self._log.write(text + "\n")
