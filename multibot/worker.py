"""The worker process: one per tmux pane, running one agent on one task at a time.

Its main loop beats its heartbeat, handles its inbox, watches its state file for a pause,
drives the agent and shows what happens. It never decides what to work on: the master does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TextIO

from multibot import auth, mailbox, privacy, protocol, sandbox
from multibot.agents import Agent, AgentEvent, AgentOutcome, AgentSpec, make_agent
from multibot.agents.stream import render
from multibot.atomic import open_file, open_log
from multibot.auth import WorkerKey
from multibot.config import WorkerTemplate, load_worker
from multibot.errors import (
    AgentError,
    LockTimeout,
    MultibotError,
    SendError,
    StateError,
    UnsafePath,
    WriteFailed,
)
from multibot.heartbeat import HeartbeatWriter
from multibot.ids import check_id
from multibot.layout import MASTER_ID, Home
from multibot.prompts import task_prompt
from multibot.state import ContextMemory, CurrentTask, Decision, PauseView, WorkerState
from multibot.store import StateFile

if TYPE_CHECKING:  # imported when used: GitPython is slow to import, and workers start often
    from multibot.worktrees import GitRepo, TaskStart

EXIT_OK = 0
EXIT_STARTUP = 2
EXIT_REPLACED = 3

MAX_NOTES = 200
TASK_OUTPUT_SHOWN = 5_000_000  # bytes of a task's output shown in the pane and log

# How long the worker's own check that a worktree has everything committed stands in for a
# new one when its next task starts there (GitRepo.quick_start's clean_at). Between one task's
# end and the next assignment no one is meant to touch a worker's worktree: its agent is gone
# and the master verifies and merges in worktrees of its own. A start this soon after the
# check skips a `git status`; later (a person may have looked in and edited), git looks again.
CLEAN_TRUST_S = 1.0
# A task's start is written to the worker's state file this long after it, if the task has not
# ended by then (the end's write then says it all): a short task costs one write, not two.
LAZY_STATE_S = 0.5
ORDERS = (protocol.TaskAssignment, protocol.Terminate)  # taken from the master alone


class Tidy(NamedTuple):
    """A worktree this process saw with everything committed, at commit `head`."""

    path: str
    head: str | None  # None: not known (the next start checks with git)
    at: float  # time.monotonic() of the check


class Stopped(MultibotError):
    """The process was told to stop by a signal (its pane closed, or kill)."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


class Replaced(MultibotError):
    """A newer incarnation of this worker exists: this one must stop without writing."""


def _reset_file(path: Path, text: str) -> None:
    """Make the file at path hold text, rewritten in place (no reader is looking yet).

    Not truncated first: emptying a file frees its block, which costs a millisecond or more
    on a disk mounted with discard, on the way of every task's start.
    """
    data = text.encode("utf-8")
    try:
        fd = open_file(path, os.O_WRONLY | os.O_CREAT)
    except UnsafePath:  # a link planted in its place: drop the link, never write through it
        os.unlink(path)
        fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def agent_env(home: Home, key: WorkerKey, task_id: str) -> dict[str, str]:
    """Return the environment that lets the agent's `multibot` commands speak for this worker,
    about this task, and no more: they sign with a key for the task (see auth.py)."""
    bindir = str(Path(sys.executable).parent)
    return {
        "MULTIBOT_HOME": str(home.root),
        "MULTIBOT_WORKER_ID": key.worker_id,
        "MULTIBOT_TASK_ID": task_id,
        "MULTIBOT_GENERATION": str(key.generation),
        "MULTIBOT_AGENT_KEY": auth.agent_key(key.key, task_id).hex(),
        "MULTIBOT_CONTEXT_FILE": str(home.worker_context(key.worker_id)),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }


def worker_key(home: Home, worker_id: str, generation: int) -> WorkerKey:
    """This incarnation's key: from the launch file the master left (its secrets go into our
    environment, for the agent), or, for a worker started by hand, from the run key."""
    launch = privacy.take_launch(home, worker_id, generation)
    if launch is not None:
        key, env = launch
        os.environ.update(env)
        return WorkerKey(worker_id, generation, key)
    return WorkerKey(worker_id, generation, auth.load_keys(home).worker(worker_id, generation))


Preparing = tuple[protocol.Envelope, protocol.TaskAssignment, "Future[TaskStart]"]


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
        # our agent's questions: id -> (the inbox its `multibot ask` waits in, the question)
        self.asked: dict[str, tuple[str | None, str]] = {}
        self.config = config or load_worker(home)
        self.clock = clock
        self.out = out or sys.stdout
        self.agent: Agent = make_agent(backend)
        self.state = StateFile(home.worker_state(self.id), WorkerState, default=self._fresh_state)
        self.memory = StateFile(home.worker_memory(self.id), ContextMemory, default=ContextMemory)
        self.system = StateFile(home.system_state, PauseView, default=PauseView)
        self.run_paused = self.system.read().paused  # then read in the pause-look thread only
        self.paused_at = 0.0  # when the agent was last stopped (see _hold_paused)
        self.looks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pause-look")
        self.system_look: Future[tuple[bool, StateError | None] | None] | None = None
        self.heartbeat_interval = heartbeat_interval
        self.setup_hook = setup_hook
        self.master_contact: float | None = None
        self.repos: dict[tuple[str, str], GitRepo] = {}
        # The worktree this process prepared for its last task, which ended with everything
        # committed: its next branch may start the quick way (see GitRepo.quick_start).
        self.tidy: Tidy | None = None
        # State changes not written yet (see _update_state), and when they are due.
        self.lazy: list[Callable[[WorkerState], WorkerState]] = []
        self.lazy_due: float | None = None
        self.start_commit: str | None = None  # where the current task's new branch began
        self.identities: dict[str, dict[str, str]] = {}  # identity_env per worktree
        # A branch being made the careful way, in a thread (see start_task).
        self.preparing: Preparing | None = None
        self.heartbeat = HeartbeatWriter(
            home.heartbeat(self.id), self.id, generation, heartbeat_interval
        )
        home.logs_dir.mkdir(parents=True, exist_ok=True)
        self._log = open_log(home.log(self.id))
        mailbox.create_inbox(home, self.id)
        mailbox.create_inbox(home, sandbox.reply_inbox(self.id))  # its agent's `multibot ask`
        self.inbox = mailbox.Receiver(home, self.id, verify=self._verify)
        self.task: protocol.Envelope | None = None
        self.task_started = 0.0
        self.deferred: list[protocol.Envelope] = []
        self.finished: set[tuple[str, int]] = set()  # (task id, attempt) reported to the master
        self.paused = False
        self.stopping = False
        self.status = "idle"
        self.turns = 0
        self.cost = 0.0
        self.current_tool: str | None = None
        self.output_bytes, self.output_hidden = 0, 0  # a task's output shown, lines not
        self.unsent: list[tuple[protocol.Envelope, bool]] = []  # (message, durable), in order
        self.send_failing = False
        self.discoveries_at_start = 0
        self.last_problem = ""

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
        self.paused = self._want_pause()
        self.status = "paused" if self.paused else "idle"
        self.heartbeat.beat(self.status)
        self.show(f"worker {self.id} ready (generation {self.generation}, {self.backend} backend)")

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
            self.looks.shutdown(cancel_futures=True)
        return EXIT_OK

    def step(self) -> None:
        """One turn of the main loop: heartbeat, pause, inbox, agent."""
        self.heartbeat.beat(self.status)
        self.send_unsent()
        self._check_pause()
        if self.lazy_due is not None and time.monotonic() >= self.lazy_due:
            self._update_state()  # the lazy changes, on their own
        for message in self.inbox.fetch():
            try:
                self.handle(message)
            except Exception:  # a poison message must not stop the worker
                self.inbox.set_aside(message, traceback.format_exc(limit=8))
                self.show(f"message {message.id} ({message.type}) set aside: see rejected/")
                continue
            self.inbox.done(message)
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
    def _want_pause(self) -> bool:
        return self.state.read().paused or self.run_paused

    def _hold_paused(self) -> None:
        """Stop the agent's group again each second while paused: a single SIGSTOP was seen
        undone now and then, most likely by the SIGCONT the kernel sends an orphaned process
        group (the agent's is one: a session of its own) when one of its processes exits."""
        now = time.monotonic()
        if now - self.paused_at >= 1.0:
            self.paused_at = now
            self.agent.suspend()

    def _look_at_system(self) -> tuple[bool, StateError | None] | None:
        """(pause-look thread) The run's pause and the file's problem, if it changed.
        system-state.json is the master's, rewritten twice a second and as big as the run:
        read here, off the loop that beats."""
        if not self.system.changed():
            return None
        return self.system.read().paused, self.system.problem()

    def _system_changed(self) -> bool:
        """Take in the last look at system-state.json and start the next; True if the
        run's pause (or the file's problem) changed."""
        changed = False
        if self.system_look is not None and self.system_look.done():
            seen, self.system_look = self.system_look.result(), None
            if seen is not None:
                changed = seen[0] != self.run_paused or seen[1] is not None
                self.run_paused, problem = seen
                self._report_problem(problem)
        if self.system_look is None:
            self.system_look = self.looks.submit(self._look_at_system)
        return changed

    def _report_problem(self, problem: StateError | None) -> None:
        if problem and str(problem) != self.last_problem:
            self.last_problem = str(problem)
            self.show(f"! ignoring a bad edit, last good state stays in force: {problem}")

    def _check_pause(self) -> None:
        if not (self._system_changed() | self.state.changed()):
            return
        self._report_problem(self.state.problem())
        if self.state.read().generation > self.generation:
            raise Replaced(f"state file names generation {self.state.read().generation}")
        want = self._want_pause()
        if want and not self.paused:
            self.paused = True
            self.agent.suspend()
            self._set_status("paused")
            self.show("⏸  paused")
        elif not want and self.paused:
            self.paused = False
            self.agent.resume()
            self._set_status("working" if self.task or self.preparing else "idle")
            self.show("▶  resumed")
            deferred, self.deferred = self.deferred, []
            for message in deferred:
                self.handle(message)

    # -- messages ---------------------------------------------------------------------------
    def current_task_id(self) -> str | None:
        current = self.task or (self.preparing[0] if self.preparing else None)
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
            self._from_agent(m)
            return
        if m.sender == MASTER_ID:
            self.master_contact = self.clock()  # written with the next state change
        p = m.payload
        if isinstance(p, protocol.Answer) and m.correlation_id in self.asked:
            self._answer_agent(m, p)
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

    def _from_agent(self, m: protocol.Envelope) -> None:
        """Our agent's `multibot report` or `ask` (checked by _verify): remember what it says
        and pass it on to the master, signed as ours."""
        p, task = m.payload, m.task_id
        if isinstance(p, protocol.Question):
            self.asked[m.id] = (m.reply_to, p.question)
            self.show(f"?  {p.question}")
        elif isinstance(p, protocol.StatusUpdate):
            self.show(f"✎  {p.kind}: {p.progress}")
            text = p.progress

            def remember(mem: ContextMemory) -> ContextMemory:
                if p.kind == "discovery":
                    return mem.model_copy(update={"discoveries": [*mem.discoveries, text]})
                if p.kind == "blocked":
                    return mem.model_copy(update={"blockers": [*mem.blockers, text]})
                if p.kind == "decision":
                    return mem.model_copy(
                        update={"decisions": [*mem.decisions, Decision(text=text, task_id=task)]}
                    )
                return mem

            if p.kind in ("discovery", "blocked", "decision"):
                self._update(self.memory, remember)
        onward = m.model_copy(update={"recipient": MASTER_ID, "mac": None})
        self.unsent.append((self.key.sign(onward), True))
        self.send_unsent()

    def _answer_agent(self, m: protocol.Envelope, p: protocol.Answer) -> None:
        """The master's answer to our agent's question: to the `multibot ask` waiting for it,
        or, when that gave up, into the agent's context like any message."""
        waiting_in, question = self.asked.pop(m.correlation_id or "")
        note = f"Q: {question} A: {p.answer}"
        self._update(self.memory, lambda mem: mem.model_copy(update={"notes": [*mem.notes, note]}))
        task = m.task_id or self.current_task_id()
        if task is not None and waiting_in and self.home.inbox(waiting_in).root.is_dir():
            onward = m.model_copy(update={"recipient": waiting_in, "mac": None})
            with contextlib.suppress(MultibotError):
                mailbox.send(self.home, self.key.sign_for_agent(onward, task))
                return
        self._on_context("answer", p.answer, p.answered_by)

    def _on_assignment(self, m: protocol.Envelope, a: protocol.TaskAssignment) -> None:
        task_id = m.task_id or ""
        mine = self.home.worktree(self.id)
        if a.working_directory and Path(a.working_directory).resolve() != mine.resolve():
            self.show(f"! refused {task_id}: {a.working_directory} is not my worktree ({mine})")
            self.send(
                protocol.ErrorReport(
                    kind="protocol",
                    message=f"{a.working_directory} is not {self.id}'s worktree ({mine})",
                    recoverable=False,
                ),
                task_id=task_id,
            )
            return
        current = self.task or (self.preparing[0] if self.preparing else None)
        if current is not None:
            if current.task_id == task_id:
                return  # the same assignment again (master restarted): already on it
            self.send(
                protocol.ErrorReport(
                    kind="busy", message=f"busy with {current.task_id}", recoverable=True
                ),
                task_id=task_id,
            )
            return
        if (task_id, a.attempt) in self.finished:
            # Re-sent by a master that restarted before it read our report: that is on its way.
            self.show(f"… {task_id} attempt {a.attempt} is done already; not running it again")
            return
        if self.paused:
            self.deferred.append(m)
            self.show(f"… {task_id} waits until resumed")
            return
        self.start_task(m, a)

    def start_task(self, m: protocol.Envelope, a: protocol.TaskAssignment) -> None:
        """Check out the task's branch, then start the agent on it."""
        task_id = m.task_id or "task"
        tidy, self.tidy = self.tidy, None  # tidy again once it ends well
        self.start_commit = None
        if not a.repo:
            self.run_agent(m, a)
            return
        repo = self.repos.get((a.repo, a.base_branch))
        self._clear_lock(Path(a.working_directory))
        if tidy and tidy.path == a.working_directory and repo is not None:
            # This process left the worktree with everything committed: the branch is made
            # here in the loop (the usual case, and the latency that counts): no `git status`
            # if the check that found it clean was moments ago, no git at all at the tip.
            recent = time.monotonic() - tidy.at <= CLEAN_TRUST_S
            with contextlib.suppress(MultibotError):
                started = repo.quick_start(
                    Path(a.working_directory), task_id, clean_at=tidy.head if recent else None
                )
                if started is not None:
                    self.branch_ready(m, a, started)
                    return
        # The careful way may wait for the repository's lock, add the worktree and run the
        # setup hook: seconds, minutes for a hook that installs packages. A loop that waited
        # would stop beating and be judged dead.
        job: Future[TaskStart] = Future()

        def prepare() -> None:
            try:
                job.set_result(self.prepare_branch(task_id, a))
            except BaseException as exc:  # taken by take_branch in the loop
                job.set_exception(exc)
            self.inbox.ring()

        # A daemon: a worker told to stop does not wait for a hook still running.
        threading.Thread(target=prepare, name="worker-prep", daemon=True).start()
        self.preparing = (m, a, job)
        self.status = "working"
        self.show(f"… {task_id}: preparing branch {a.branch}")

    def prepare_branch(self, task_id: str, a: protocol.TaskAssignment) -> TaskStart:
        """(prep thread) Check out the task's branch in the worktree (made on first use)."""
        from multibot import worktrees

        key = (a.repo, a.base_branch)
        repo = self.repos.get(key)
        if repo is None:  # opening checks the repository: once per worker, not per task
            repo = self.repos[key] = worktrees.GitRepo(
                Path(a.repo),
                self.home.integration_worktree,
                integration_branch=a.base_branch,
                setup_hook=self.setup_hook,
                # A hook this incarnation leaves behind when killed is found by the next
                # one's master like a stray agent (procs.stray_agents), and killed.
                hook_env={
                    "MULTIBOT_HOME": str(self.home.root),
                    "MULTIBOT_WORKER_ID": self.id,
                    "MULTIBOT_GENERATION": str(self.generation),
                },
            )
        return repo.begin_task(Path(a.working_directory), task_id)

    def take_branch(self) -> None:
        """Start the agent once the branch being prepared is ready (not while paused)."""
        if self.preparing is None or self.paused or not self.preparing[2].done():
            return
        m, a, job = self.preparing
        self.preparing = None
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
        state = self.state.read()
        memory = self.memory.read()
        self.discoveries_at_start = len(memory.discoveries)
        from multibot import checkout

        identity = self.identities.get(a.working_directory)
        if identity is None:  # two git calls: once per worktree for this process's life
            identity = checkout.identity_env(Path(a.working_directory))
            self.identities[a.working_directory] = identity
        env = {**identity, **agent_env(self.home, self.key, task_id)}
        try:
            allowed_tools, extra_args = self.confinement(a)
        except AgentError as exc:
            self._cannot_start(exc, task_id)
            return
        prompt = (
            a.description if self.backend == "shell" else task_prompt(self.id, task_id, a, memory)
        )
        spec = AgentSpec(
            task_id=task_id,
            prompt=prompt,
            cwd=Path(a.working_directory),
            model=a.model,
            commands=tuple(a.commands),
            env=env,
            resume_session=state.sessions.get(task_id),
            timeout_s=a.budget.max_minutes * 60 if a.budget.max_minutes else None,
            budget_usd=a.budget.max_usd,
            permission_mode=self.config.permission_mode,
            allowed_tools=allowed_tools,
            disallowed_tools=self.config.disallowed_tools,
            claude_bin=self.config.claude_bin,
            extra_args=extra_args,
        )
        _reset_file(self.home.worker_context(self.id), "".join(f"{line}\n" for line in a.context))
        self.task, self.task_started = m, self.clock()
        self.turns, self.cost, self.current_tool = 0, 0.0, None
        self.output_bytes, self.output_hidden = 0, 0
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
        self._update_state(started, lazy=True)

    def confinement(self, a: protocol.TaskAssignment) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The allowed tools and extra arguments that put a claude agent in its sandbox (see
        sandbox.py), or the template's own when it is off or the backend is not claude."""
        cfg = self.config
        if self.backend != "claude" or not cfg.sandbox:
            return cfg.allowed_tools, cfg.extra_args
        sandbox.require(cfg.permission_mode, os.environ.get("PATH"))
        deny: list[Path] = []
        dirs = sandbox.git_dirs(Path(a.working_directory))
        if dirs is not None:
            try:
                deny = sandbox.guard(dirs, a.branch, a.base_branch)
            except OSError as exc:
                raise sandbox.SandboxError(f"cannot guard {dirs.common}: {exc}") from exc
        rules = sandbox.settings(
            self.home,
            self.id,
            deny_write=deny,
            allow_write=cfg.sandbox_write,
            network=cfg.sandbox_network,
        )
        return sandbox.tools_for(cfg.allowed_tools), (
            *cfg.extra_args,
            *sandbox.settings_arg(rules),
        )

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
        self.tidy = None
        if self.preparing is not None:  # its branch is still being made: it never started
            m, self.preparing = self.preparing[0], None
            for repo in list(self.repos.values()):
                repo.stop_hooks()
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
        commit = self._commit(assignment, f"multibot: work in progress on {task_id} (terminated)")
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

        def remember(mem: ContextMemory) -> ContextMemory:
            # Other workers' discoveries are notes here: `discoveries` holds this worker's own,
            # which its TASK_COMPLETE reports.
            mem.notes = [*mem.notes, line][-MAX_NOTES:]
            return mem

        self._update(self.memory, remember)
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
                self._update_state(keep)
            return
        if event.kind == "tool":
            self.current_tool = str(event.data.get("name") or event.text)
            self.turns += 1
        elif event.kind == "cost":
            self.cost = float(event.data.get("cost_usd", self.cost))
        elif event.kind == "file":
            path = event.text

            def touched(mem: ContextMemory) -> ContextMemory:
                if path not in mem.files:
                    mem.files = [*mem.files, path][-MAX_NOTES:]
                return mem

            self._update(self.memory, touched)
        line = render(event)
        if line:
            self.show_output(line)

    def show_output(self, line: str) -> None:
        """Show an agent's line, up to TASK_OUTPUT_SHOWN bytes a task; past that the lines
        are counted, not logged (a task printing 100 MB made two logs of 211 MB each)."""
        self.output_bytes += len(line) + 10  # as logged: "HH:MM:SS " before, "\n" after
        if self.output_bytes <= TASK_OUTPUT_SHOWN:
            self.show(line)
            return
        if not self.output_hidden:
            self.show(f"[output past {TASK_OUTPUT_SHOWN // 1_000_000} MB is not logged]")
        self.output_hidden += 1

    def finish(self, outcome: AgentOutcome) -> None:
        """Commit what is left and report the task's end to the master."""
        assert self.task is not None
        m, self.task = self.task, None
        if self.output_hidden:
            self.show(f"[{self.output_hidden} lines of output were not logged]")
        task_id = m.task_id or ""
        a = m.payload
        assert isinstance(a, protocol.TaskAssignment)
        from multibot import checkout

        cwd = Path(a.working_directory)
        commit: str | None = None
        head: str | None = None  # HEAD, when the agent left nothing to commit
        self._clear_lock(cwd)  # the agent's git may have been killed mid-command
        try:
            head = checkout.settled(cwd)  # one git call tells that, the usual case
            if head is None:
                commit = self._commit(a, f"multibot: {task_id} {a.title}".rstrip())
            if a.repo:  # prepared by this process (start_task), and now all committed
                self.tidy = Tidy(a.working_directory, commit or head, time.monotonic())
        except MultibotError as exc:
            self.show(f"✗ commit failed: {exc}")
            outcome = AgentOutcome(False, f"commit failed: {exc}", "git")
        elapsed = self.clock() - self.task_started
        if outcome.session_id:
            self.on_event(AgentEvent("session", outcome.session_id))
        report: protocol.Payload
        if outcome.ok:
            memory = self.memory.read()
            if head is not None and head == self.start_commit:
                files: list[str] = []  # still where its new branch began: nothing changed
            else:
                files = checkout.changed_files(cwd, a.base_branch)
            report = protocol.TaskComplete(
                summary=outcome.summary,
                branch=a.branch,
                commit=commit or head or checkout.head_commit(cwd),
                files_changed=files,
                cost_usd=outcome.cost_usd,
                tokens=protocol.Tokens(input=outcome.input_tokens, output=outcome.output_tokens),
                turns=outcome.turns,
                duration_s=elapsed,
                discoveries=memory.discoveries[self.discoveries_at_start :],
                session_id=outcome.session_id,
            )
            line = f"✓ {task_id} done in {elapsed:.1f}s: {outcome.summary[:200]}"
        else:
            kind = {"timeout": "timeout", "budget": "budget", "git": "git"}.get(
                outcome.error_kind or "", "agent"
            )
            report = protocol.ErrorReport(
                kind=kind,
                message=outcome.summary[-2000:],
                recoverable=kind != "budget",
                detail=outcome.error_kind or "",
            )
            line = f"✗ {task_id} failed ({outcome.error_kind}): {outcome.summary[-300:]}"

        def idle(s: WorkerState) -> WorkerState:
            s.current_task, s.current_tool, s.status = None, None, "idle"
            s.turns += outcome.turns
            s.cost_usd += outcome.cost_usd
            s.git.last_commit = commit or s.git.last_commit
            s.git.uncommitted_changes = False
            return s

        # The state says idle before the master hears of the end, so it never sees it busy.
        self._update_state(idle)
        self.status = "paused" if self.paused else "idle"
        self.finished.add((task_id, a.attempt))
        self.send(report, task_id=task_id)
        self.show(line)

    def _clear_lock(self, worktree: Path) -> None:
        """Remove a stale index.lock from this worker's worktree (only it works there)."""
        from multibot import checkout

        note = checkout.clear_stale_lock(worktree)
        if note is not None:
            self.show(f"! {note}")

    def _commit(self, a: protocol.TaskAssignment, message: str) -> str | None:
        from multibot import checkout

        return checkout.commit_all(Path(a.working_directory), message)

    # -- output -----------------------------------------------------------------------------
    def _status_update(self, kind: str, progress: str = "") -> protocol.StatusUpdate:
        return protocol.StatusUpdate(
            status=self.status,
            kind=kind,
            progress=progress,
            current_tool=self.current_tool,
            turns=self.turns,
            cost_usd=self.cost,
            elapsed_s=self.clock() - self.task_started if self.task else 0.0,
        )

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
        self.unsent.append((self.key.sign(message), durable))
        self.send_unsent()

    def send_unsent(self) -> None:
        """Send the messages not sent yet, in order. One that could not be made durable (a
        full disk) waits, with those after it, for the next step; one to an inbox that is
        gone is dropped."""
        while self.unsent:
            message, durable = self.unsent[0]
            try:
                mailbox.send(self.home, message, fsync=durable)
            except SendError as exc:
                if not self.send_failing:
                    self.show(f"! could not send {message.type}, sent again until it works: {exc}")
                self.send_failing = True
                return
            except MultibotError as exc:
                self.show(f"! could not send {message.type}: {exc}")
            self.unsent.pop(0)
            self.send_failing = False

    def _set_status(self, status: str) -> None:
        self.status = status

        def put(s: WorkerState) -> WorkerState:
            s.status = status  # type: ignore[assignment]
            return s

        self._update_state(put)
        self.heartbeat.beat(status)

    def _update_state(
        self, fn: Callable[[WorkerState], WorkerState] | None = None, lazy: bool = False
    ) -> None:
        """Apply fn to the state file, with the lazy changes before it; if lazy, only note it,
        for the next write or LAZY_STATE_S from now, whichever comes first."""
        if fn is not None:
            self.lazy.append(fn)
        if lazy:
            if self.lazy_due is None:
                self.lazy_due = time.monotonic() + LAZY_STATE_S
            return
        fns, self.lazy, self.lazy_due = self.lazy, [], None

        def guarded(s: WorkerState) -> WorkerState:
            if s.generation > self.generation:
                raise Replaced(f"generation {s.generation} is newer than mine")
            s.communication.last_master_contact = self.master_contact
            for each in fns:
                s = each(s)
            return s

        try:
            self.state.update(guarded)
        except WriteFailed as exc:  # a full disk: the changes wait for the next write
            self.lazy, self.lazy_due = [*fns, *self.lazy], time.monotonic() + LAZY_STATE_S
            self.show(f"! could not write {self.state.path.name}, tried again: {exc}")
        except (StateError, LockTimeout) as exc:
            self.show(f"! could not write {self.state.path.name}: {exc}")

    def _update(self, f: StateFile, fn: Callable) -> None:  # type: ignore[type-arg]
        try:
            f.update(fn)
        except (StateError, LockTimeout) as exc:
            # A broken hand edit is the person's to fix; the loop goes on.
            self.show(f"! could not write {f.path.name}: {exc}")

    def show(self, line: str) -> None:
        """Print a line to the pane and the worker's log."""
        stamp = time.strftime("%H:%M:%S")
        text = f"{stamp} {line}"
        with contextlib.suppress(OSError):  # the pane may be gone (SIGHUP): the log still has it
            print(text, file=self.out, flush=True)
        if not self._log.closed:
            with contextlib.suppress(OSError):  # a full disk: the pane still shows it
                self._log.write(text + "\n")
