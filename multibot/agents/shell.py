"""The shell backend: a task's commands run in order in the worktree, no LLM needed.

It takes the same paths as Claude: the commands may call ``multibot report`` and
``multibot ask``; messages injected mid-task are appended to the file named by
``MULTIBOT_CONTEXT_FILE`` so a running command can read them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

from multibot.agents.base import Agent, AgentEvent, AgentOutcome, AgentSpec, ChildProcess
from multibot.atomic import open_log
from multibot.errors import AgentError, UnsafePath


class ShellAgent(Agent):
    """Runs ``spec.commands`` one after another with bash; the first failure ends the task."""

    name = "shell"

    def __init__(self) -> None:
        self._spec: AgentSpec | None = None
        self._queue: deque[str] = deque()
        self._child: ChildProcess | None = None
        self._current = ""
        self._outcome: AgentOutcome | None = None
        self._started = 0.0
        self._tail: deque[str] = deque(maxlen=20)
        self._ran = 0
        self._pending: list[AgentEvent] = []

    def start(self, spec: AgentSpec) -> None:
        if not spec.cwd.is_dir():
            raise AgentError(f"working directory {spec.cwd} does not exist")
        self._spec = spec
        self._queue = deque(spec.commands)
        self._outcome = None
        self._started = time.monotonic()
        self._ran = 0
        self._tail.clear()
        self._next()

    def _next(self) -> None:
        assert self._spec is not None
        if not self._queue:
            self._child = None
            n = self._ran
            self._finish(True, f"ran {n} command{'s' * (n != 1)}" if n else "nothing to run")
            return
        self._current = self._queue.popleft()
        env = {**os.environ, **self._spec.env}
        self._child = ChildProcess(["bash", "-c", self._current], cwd=self._spec.cwd, env=env)
        self._ran += 1
        shown = " ".join(self._current.split())
        shown = shown if len(shown) <= 160 else shown[:157] + "..."
        self._pending.append(AgentEvent("tool", f"$ {shown}", {"name": "Bash"}))

    def _finish(self, ok: bool, summary: str, error_kind: str | None = None) -> None:
        self._outcome = AgentOutcome(
            ok=ok,
            summary=summary,
            error_kind=error_kind,
            turns=self._ran,
            duration_s=time.monotonic() - self._started,
        )

    def inject(self, text: str) -> bool:
        if self._spec is None or self._outcome is not None:
            return False
        path = self._spec.env.get("MULTIBOT_CONTEXT_FILE")
        if not path:
            return False
        try:
            with open_log(Path(path)) as f:
                f.write(text.rstrip("\n") + "\n")
        except UnsafePath:  # the task's commands made it a link: not written through
            return False
        return True

    def poll(self) -> list[AgentEvent]:
        events, self._pending = self._pending, []
        child = self._child
        if child is None or self._spec is None:
            return events
        lines, ended = child.drain()
        for line in lines:
            self._tail.append(line)
            events.append(AgentEvent("output", line))
        if ended:
            code = child.popen.wait()
            if code != 0:
                self._child = None
                tail = "\n".join(self._tail)
                self._finish(
                    False, f"command failed (exit {code}): {self._current}\n{tail}", "exit"
                )
            else:
                self._next()
        else:
            self._check_timeout(child)
        return events

    def _check_timeout(self, child: ChildProcess) -> None:
        spec = self._spec
        if spec and spec.timeout_s and time.monotonic() - self._started > spec.timeout_s:
            child.terminate(1.0)
            self._child = None
            self._finish(False, f"timed out after {spec.timeout_s:g}s: {self._current}", "timeout")

    def outcome(self) -> AgentOutcome | None:
        return self._outcome

    def process(self) -> ChildProcess | None:
        return self._child
