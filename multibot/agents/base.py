"""The small interface every agent backend implements, and the child-process plumbing they share.

A backend runs one task at a time in a child process group. The worker's main loop drives it
without blocking: ``start``, then ``poll`` for events each tick, ``inject`` messages that arrive
mid-task, ``suspend``/``resume`` for pause, ``stop`` to end it, and ``outcome`` once it is done.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from multibot.limits import Trouble

EventKind = Literal["session", "text", "tool", "tool_result", "output", "cost", "file", "info"]

LINES_BUFFERED = 10_000  # a child's lines read but not yet taken (then the child waits)
LINES_PER_DRAIN = 1_000  # taken per drain: a loop turn's share of a fast printer


@dataclass(frozen=True)
class AgentSpec:
    """Everything a backend needs to run one task."""

    task_id: str
    prompt: str
    cwd: Path
    model: str = "sonnet"
    commands: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    resume_session: str | None = None
    timeout_s: float | None = None
    budget_usd: float | None = None
    permission_mode: str = "acceptEdits"
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()
    claude_bin: str = "claude"
    extra_args: tuple[str, ...] = ()
    mcp_sources: Mapping[str, str] = field(default_factory=dict)  # MCP server -> its file


@dataclass(frozen=True)
class AgentEvent:
    """Something the agent did, for the pane, the log and the memory file.

    kind: session (data: session_id), text (assistant text), tool (a tool call; data: name,
    input), tool_result (cut short), output (a line of a shell command), cost (data: cost_usd),
    file (a file touched; text: path), info (anything else worth a line).
    """

    kind: EventKind
    text: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentOutcome:
    """How a task ended. error_kind is None when ok."""

    ok: bool
    summary: str
    error_kind: str | None = None
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    turns: int = 0
    duration_s: float = 0.0
    session_id: str | None = None
    trouble: Trouble | None = None  # the API refused or failed the call (see limits.py)


class Agent(ABC):
    """One backend instance, running at most one task at a time."""

    name: str = "agent"

    @abstractmethod
    def start(self, spec: AgentSpec) -> None:
        """Start the task; raise AgentError at once if it cannot start (e.g. binary missing)."""

    @abstractmethod
    def inject(self, text: str) -> bool:
        """Deliver a message into the running task now; False if there is no running task."""

    @abstractmethod
    def poll(self) -> list[AgentEvent]:
        """Return the events since the last poll, without blocking."""

    @abstractmethod
    def outcome(self) -> AgentOutcome | None:
        """Return the outcome once the task has ended, else None."""

    @abstractmethod
    def process(self) -> ChildProcess | None:
        """The child process group running the task, if any."""

    def behind(self) -> bool:
        """Whether output is waiting that the last poll left for the next (a fast printer)."""
        child = self.process()
        return child is not None and not child.lines.empty()

    def suspend(self) -> None:
        """Stop the whole process group where it is (SIGSTOP)."""
        child = self.process()
        if child is not None:
            child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a suspended process group (SIGCONT)."""
        child = self.process()
        if child is not None:
            child.signal(signal.SIGCONT)

    def stop(self, grace: float = 5.0) -> None:
        """End the task: SIGTERM to the group, SIGKILL after grace seconds."""
        child = self.process()
        if child is not None:
            child.terminate(grace)


class ChildProcess:
    """A child in its own process group whose output lines are read by a thread into a queue.

    Signals go only to the group of a child we started and have not yet reaped, so a reused
    pid can never receive them.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdin_pipe: bool = False,
        merge_stderr: bool = True,
    ) -> None:
        self.started = time.monotonic()
        # Bounded: a child printing faster than the worker takes its lines waits on its pipe
        # (backpressure), instead of filling the worker's memory.
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=LINES_BUFFERED)
        self.stderr_tail: list[str] = []
        self.popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            start_new_session=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._readers = [self._spawn_reader(self.popen.stdout, self.lines)]
        if not merge_stderr:
            self._readers.append(self._spawn_reader(self.popen.stderr, None))
        self._lock = threading.Lock()

    def _spawn_reader(
        self, stream: IO[str] | None, into: queue.Queue[str | None] | None
    ) -> threading.Thread:
        def run() -> None:
            assert stream is not None
            for line in stream:
                if into is not None:
                    into.put(line.rstrip("\n"))
                else:
                    self.stderr_tail = [*self.stderr_tail[-19:], line.rstrip("\n")]
            if into is not None:
                into.put(None)

        t = threading.Thread(target=run, daemon=True, name=f"reader-{self.popen.pid}")
        t.start()
        return t

    @property
    def pid(self) -> int:
        return self.popen.pid

    def drain(self, max_lines: int = LINES_PER_DRAIN) -> tuple[list[str], bool]:
        """Return the lines read so far, at most max_lines of them, and whether the output
        has ended. Bounded, so that the loop calling it (and beating) comes back soon
        however fast the child prints."""
        out: list[str] = []
        ended = False
        while len(out) < max_lines:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            out.append(item)
        return out, ended

    def write_line(self, line: str) -> bool:
        """Write one line to the child's stdin; False if stdin is closed."""
        stdin = self.popen.stdin
        if stdin is None or stdin.closed:
            return False
        try:
            stdin.write(line + "\n")
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def close_stdin(self) -> None:
        stdin = self.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass

    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: signal.Signals) -> None:
        with self._lock:
            if self.popen.poll() is None:
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    pass

    def terminate(self, grace: float) -> int:
        """SIGCONT+SIGTERM the group, SIGKILL after grace; return the exit code."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Wait for the leader without reaping it: while it is a zombie its pid (and so the
        # group id) cannot be reused, so the final SIGKILL reaches only our own group.
        while not self._exited_unreaped() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            if self.popen.returncode is None:  # not reaped: the group id is still ours
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        code = self.popen.wait()
        self.close_stdin()
        return code

    def _exited_unreaped(self) -> bool:
        if self.popen.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None
