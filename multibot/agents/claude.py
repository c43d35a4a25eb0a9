"""The Claude Code backend: one headless ``claude -p`` process per task, fed through stdin.

How Claude Code 2.1.328 behaves here (checked against the real binary and a fake API):

- With ``--input-format stream-json`` every user line we write on stdin is a *command*. When
  the line carries a ``uuid``, the CLI reports its life on stdout: ``command_lifecycle`` lines
  with ``state`` queued, started, then completed (cancelled when the turn failed).
  ``--replay-user-messages`` also echoes the line back (``isReplay: true``) when the model
  takes it in, which the pane shows.
- A line written while a turn runs (e.g. during a tool call) is NOT a turn of its own: it is
  queued, then merged into the running turn and shown to the model with the next request
  (after the current tool result, as "The user sent a new message while you were working").
  That turn ends in one ``result`` only. So "one result per user line" is wrong, and
  ``queued_turn_count`` in the result is not reliable either (a line that arrived during the
  last request of a turn is reported 0 but then starts a new turn with its own result).
- A line written between turns starts a new turn (``init`` ... ``result``) in the same session.
- The prompt's own ``completed`` comes just after its turn's ``result``.

So the task is done when a result has arrived and every line we wrote has left the
queued/started states. Then stdin is closed and the process exits by itself. A message
injected after that is refused (inject returns False) and stays with the worker.

Cost: ``total_cost_usd`` is cumulative over the session, including earlier processes when
resumed, so this task's spend is the sum of each result's ``model_usage_since_last_result``.
``--max-budget-usd`` counts only this process's spend. A new session gets a known id with
``--session-id``; ``--resume <id>`` keeps that id, and needs the same CLAUDE_CONFIG_DIR (the
transcript lives under ``<config>/projects/``); elsewhere it fails with "No conversation found",
and then this backend starts a fresh session with the same prompt. The config dir may be empty
or missing: the CLI creates what it needs in ``-p`` mode.

stderr is read apart from stdout: merged, a stderr write could split a JSON line longer than
the pipe buffer. Its last lines only go into the summary of a process that ended without a
result. The timeout counts running time only (not time suspended); the budget is enforced by
the CLI (``--max-budget-usd``) and again here from the results' cost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from multibot import limits
from multibot.agents import stream
from multibot.agents.base import Agent, AgentEvent, AgentOutcome, AgentSpec, ChildProcess
from multibot.errors import AgentError

# Variables that make Claude Code believe it runs nested inside another Claude Code session.
NESTED_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT")
# How long the process may take to exit once stdin is closed, before it is stopped.
EXIT_GRACE_S = 10.0
# How long to wait for the end of output once the process has exited (a grandchild that
# kept stdout open must not hold the task forever).
EOF_GRACE_S = 2.0
STOP_GRACE_S = 3.0
INSTALL_HINT = (
    "install with `npm i -g @anthropic-ai/claude-code` or set claude_bin in "
    "config/worker-template.json"
)
_OPEN_STATES = ("", "queued", "started")


def user_line(text: str, line_id: str) -> str:
    """Return the stream-json stdin line that sends text as a user message."""
    message = {"role": "user", "content": text}
    return json.dumps(
        {"type": "user", "message": message, "uuid": line_id, "parent_tool_use_id": None}
    )


class Tally:
    """What one process's output adds up to: commands, results, cost, tokens. No I/O."""

    def __init__(self) -> None:
        self.commands: dict[str, str] = {}  # uuid of a line we wrote -> lifecycle state
        self.lifecycle_seen = False
        self.results: list[dict[str, Any]] = []
        self.cost_usd = 0.0
        self.session_cost_usd = 0.0
        self.input_tokens = 0
        self.output_tokens = 0
        self.turns = 0
        self.session_id: str | None = None
        self.last_text = ""
        self.reset_at: float | None = None  # when a usage limit met lifts (rate_limit_event)

    def wrote(self, line_id: str) -> None:
        """Record a user line written to stdin."""
        self.commands[line_id] = ""

    def feed(self, parsed: Mapping[str, Any]) -> None:
        """Account for one parsed output line."""
        kind = parsed.get("type")
        sid = parsed.get("session_id")
        if kind == "command_lifecycle":
            self.lifecycle_seen = True
            cid = parsed.get("command_uuid")
            if isinstance(cid, str) and cid in self.commands:
                self.commands[cid] = str(parsed.get("state") or "")
        elif kind == "system" and parsed.get("subtype") == "init" and isinstance(sid, str):
            self.session_id = sid
        elif kind == "assistant":
            for ev in stream.events_from(parsed):
                if ev.kind == "text":
                    self.last_text = ev.text
        elif kind == "result":
            self._result(parsed)
        elif kind == "rate_limit_event":
            self.reset_at = limits.reset_time(parsed) or self.reset_at

    def _result(self, r: Mapping[str, Any]) -> None:
        self.results.append(dict(r))
        if isinstance(r.get("session_id"), str):
            self.session_id = str(r["session_id"])
        total = r.get("total_cost_usd")
        total = float(total) if isinstance(total, int | float) else self.session_cost_usd
        turn = stream.turn_cost(r)
        # Without the per-turn figure, the growth of the session total is the next best.
        self.cost_usd += turn if turn is not None else max(0.0, total - self.session_cost_usd)
        self.session_cost_usd = total
        inp, out = stream.result_tokens(r)
        self.input_tokens += inp
        self.output_tokens += out
        turns = r.get("num_turns")
        self.turns += int(turns) if isinstance(turns, int) else 0

    @property
    def pending(self) -> list[str]:
        """Lines we wrote whose command is not over yet (not even seen, queued or running)."""
        return [u for u, state in self.commands.items() if state in _OPEN_STATES]

    @property
    def done(self) -> bool:
        """Whether the task is over: a result is in and no line we wrote is still open."""
        if not self.results:
            return False
        if not self.lifecycle_seen:
            return True  # this CLI reports no command lifecycle: one result is all we get
        return not self.pending

    @property
    def final(self) -> dict[str, Any] | None:
        return self.results[-1] if self.results else None


def session_not_found(result: Mapping[str, Any]) -> bool:
    """Whether a result says that --resume named a session this config dir does not hold."""
    errors = result.get("errors")
    text = " ".join(str(e) for e in errors) if isinstance(errors, list) else ""
    return bool(result.get("is_error")) and "No conversation found" in text


def exit_text(code: int | None) -> str:
    """Return an exit status as a person reads it: a number, or the signal that ended it."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def outcome_of(
    tally: Tally,
    *,
    duration_s: float,
    exit_code: int | None,
    tail: list[str],
    halted: tuple[str, str] | None = None,
) -> AgentOutcome:
    """Return how the task ended, from its results, or why it ended without one."""
    base = AgentOutcome(
        ok=False,
        summary="",
        cost_usd=tally.cost_usd,
        input_tokens=tally.input_tokens,
        output_tokens=tally.output_tokens,
        turns=tally.turns,
        duration_s=duration_s,
        session_id=tally.session_id,
    )
    if halted is not None:
        kind, why = halted
        last = f"\nlast output: {stream.cut(tally.last_text, 500)}" if tally.last_text else ""
        return replace(base, summary=why + last, error_kind=kind)
    final = tally.final
    if final is None:
        lines = "\n".join(tail[-10:])
        why = f"claude exited with {exit_text(exit_code)} before any result\n{lines}"
        return replace(base, summary=why.rstrip(), error_kind="exit")
    if final.get("is_error"):
        trouble = limits.classify(final, tally.reset_at)
        subtype = str(final.get("subtype") or "")
        kind = trouble.kind if trouble else subtype if subtype.startswith("error") else "is_error"
        return replace(base, summary=stream.result_error(final), error_kind=kind, trouble=trouble)
    texts = [str(r.get("result") or "").strip() for r in tally.results]
    summary = next((t for t in reversed(texts) if t), tally.last_text)
    return replace(base, ok=True, summary=summary)


def failed_servers(parsed: Mapping[str, Any], sources: Mapping[str, str]) -> str | None:
    """What the session's first line says of MCP servers that did not start, or None."""
    if parsed.get("type") != "system" or parsed.get("subtype") != "init":
        return None
    servers = parsed.get("mcp_servers")
    failed = [
        s.get("name")
        for s in (servers if isinstance(servers, list) else [])
        if isinstance(s, dict) and s.get("status") == "failed" and s.get("name") in sources
    ]
    if not failed:
        return None
    named = ", ".join(f"{n!r} ({sources[str(n)]})" for n in failed)
    return (
        f"MCP server {named} failed to start: run its command by hand to see why, or take it "
        "out of config/mcp-configs/"
    )


def resolve_bin(name: str, env: Mapping[str, str]) -> str:
    """Return the path of the claude executable, or raise AgentError saying how to get it."""
    if os.sep in name:
        path = Path(name).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise AgentError(
            f"claude binary not found: {name} is not an executable file; {INSTALL_HINT}"
        )
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise AgentError(f"claude binary not found: {name!r} is not on PATH; {INSTALL_HINT}")
    return found


def child_env(spec_env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the child's environment: ours minus the nested-session markers, plus spec.env."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in NESTED_ENV}
    env.update(spec_env)
    return env


def build_argv(binary: str, spec: AgentSpec, session_id: str | None) -> list[str]:
    """Return the command line; the prompt goes on stdin, so option lists cannot swallow it."""
    argv = [
        binary,
        "-p",
        "--output-format",
        "stream-json",
        "--input-format",
        "stream-json",
        "--verbose",
        "--replay-user-messages",
        "--model",
        spec.model,
        "--permission-mode",
        spec.permission_mode,
    ]
    if spec.resume_session and session_id is None:
        argv += ["--resume", spec.resume_session]
    else:
        argv += ["--session-id", session_id or str(uuid.uuid4())]
    if spec.budget_usd is not None:
        argv += ["--max-budget-usd", f"{spec.budget_usd:g}"]
    argv += list(spec.extra_args)
    # Variadic options last: each takes every following word up to the next option.
    if spec.allowed_tools:
        argv += ["--allowedTools", *spec.allowed_tools]
    if spec.disallowed_tools:
        argv += ["--disallowedTools", *spec.disallowed_tools]
    return argv


class ClaudeAgent(Agent):
    """Runs one task in a headless Claude Code process and tracks it to its end.

    Driven from one thread (the worker's loop): start, then poll, inject, outcome.
    """

    name = "claude"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._spec: AgentSpec | None = None
        self._child: ChildProcess | None = None
        self._tally = Tally()
        self._outcome: AgentOutcome | None = None
        self._events: list[AgentEvent] = []
        self._tail: deque[str] = deque(maxlen=20)
        self._said: list[str] = []  # every text written, to replay into a fresh session
        self._shown_session: str | None = None
        self._halted: tuple[str, str] | None = None
        self._started = 0.0
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._closed_at: float | None = None
        self._exited_at: float | None = None
        self._eof = False
        self._retried_fresh = False
        self._binary = ""
        self._env: dict[str, str] = {}

    # -- Agent interface ---------------------------------------------------------------
    def start(self, spec: AgentSpec) -> None:
        if self._child is not None and self._outcome is None:
            raise AgentError(
                f"claude agent is still running task {self._spec.task_id if self._spec else '?'}"
            )
        if not spec.cwd.is_dir():
            raise AgentError(f"working directory {spec.cwd} does not exist")
        env = child_env(spec.env)
        self._binary = resolve_bin(spec.claude_bin, env)
        config_dir = spec.env.get("CLAUDE_CONFIG_DIR")
        if config_dir:
            try:
                Path(config_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AgentError(f"cannot create CLAUDE_CONFIG_DIR {config_dir}: {exc}") from exc
        self._spec, self._env = spec, env
        self._outcome, self._halted = None, None
        self._events, self._said, self._shown_session = [], [], None
        self._paused_at, self._paused_total = None, 0.0
        self._retried_fresh = False
        self._tail.clear()
        self._started = self.clock()
        self._spawn(None if spec.resume_session else str(uuid.uuid4()), [spec.prompt])

    def _spawn(self, session_id: str | None, texts: list[str]) -> None:
        spec = self._spec
        assert spec is not None
        argv = build_argv(self._binary, spec, session_id)
        try:
            self._child = ChildProcess(
                argv, cwd=spec.cwd, env=self._env, stdin_pipe=True, merge_stderr=False
            )
        except OSError as exc:
            raise AgentError(f"cannot start {self._binary}: {exc}") from exc
        self._tally = Tally()
        self._closed_at = self._exited_at = None
        self._eof = False
        sid = session_id or spec.resume_session
        if sid:
            self._tally.session_id = sid
            self._note_session(sid)
        for text in texts:
            self._write(text)

    def _write(self, text: str) -> bool:
        child = self._child
        if child is None:
            return False
        line_id = str(uuid.uuid4())
        if not child.write_line(user_line(text, line_id)):
            return False
        self._tally.wrote(line_id)
        self._said.append(text)
        return True

    def inject(self, text: str) -> bool:
        if self._child is None or self._outcome is not None or self._closed_at is not None:
            return False
        if self._halted is not None or self._child.returncode() is not None:
            return False
        return self._write(text)

    def poll(self) -> list[AgentEvent]:
        events, self._events = self._events, []
        child, spec = self._child, self._spec
        if child is None or spec is None or self._outcome is not None:
            return events
        lines, ended = child.drain()
        self._eof = self._eof or ended
        for line in lines:
            events += self._take(line, spec.cwd)
        now = self.clock()
        if self._resume_failed(spec):
            events.append(
                AgentEvent("info", f"session {spec.resume_session} not found here; new one")
            )
            child.terminate(STOP_GRACE_S)
            texts, self._said = self._said, []
            self._retried_fresh = True
            self._spawn(str(uuid.uuid4()), texts)
            return events + self._flush()
        if self._halted is None and self._closed_at is None:
            self._check_limits(spec, now)
        if self._halted is None and self._tally.done and self._closed_at is None:
            child.close_stdin()
            self._closed_at = now
        if self._closed_at is not None and now - self._closed_at > EXIT_GRACE_S:
            child.terminate(STOP_GRACE_S)
        code = child.returncode()
        if code is not None:
            self._exited_at = now if self._exited_at is None else self._exited_at
            if self._eof or now - self._exited_at > EOF_GRACE_S:
                self._finish(code)
        return events + self._flush()

    def outcome(self) -> AgentOutcome | None:
        return self._outcome

    def process(self) -> ChildProcess | None:
        return self._child

    def suspend(self) -> None:
        if self._paused_at is None:
            self._paused_at = self.clock()
        super().suspend()

    def resume(self) -> None:
        super().resume()
        if self._paused_at is not None:
            self._paused_total += self.clock() - self._paused_at
            self._paused_at = None

    def stop(self, grace: float = 5.0) -> None:
        if self._child is not None and self._outcome is None and self._halted is None:
            self._halted = ("stopped", "stopped on request")
        super().stop(grace)

    # -- details -----------------------------------------------------------------------
    @property
    def final_result(self) -> dict[str, Any] | None:
        """The last result line of the task (e.g. its ``structured_output``), if any."""
        return self._tally.final

    def _take(self, line: str, cwd: Path) -> list[AgentEvent]:
        parsed = stream.parse_line(line)
        if parsed is None:
            if line.strip():
                self._tail.append(line)
            return stream.line_events(line)
        self._tally.feed(parsed)
        failed = failed_servers(parsed, self._spec.mcp_sources if self._spec else {})
        if failed and self._halted is None:
            self._halt("startup", failed)
        out: list[AgentEvent] = []
        for ev in stream.events_from(parsed, cwd):
            if ev.kind == "session":
                if ev.text == self._shown_session:
                    continue
                self._shown_session = ev.text
            elif ev.kind == "cost":
                data = {**ev.data, "cost_usd": self._tally.cost_usd}
                ev = AgentEvent("cost", f"${self._tally.cost_usd:.4f}", data)
            out.append(ev)
        return out

    def _resume_failed(self, spec: AgentSpec) -> bool:
        # A worker restarted on another config dir, or a lost transcript: the task must not
        # fail forever because its old session is gone, so it starts over in a fresh one.
        final = self._tally.final
        return (
            final is not None
            and bool(spec.resume_session)
            and not self._retried_fresh
            and len(self._tally.results) == 1
            and session_not_found(final)
        )

    def _note_session(self, sid: str) -> None:
        if sid != self._shown_session:
            self._shown_session = sid
            self._events.append(AgentEvent("session", sid, {"session_id": sid}))

    def _flush(self) -> list[AgentEvent]:
        events, self._events = self._events, []
        return events

    def _active_time(self, now: float) -> float:
        paused = self._paused_total + (
            now - self._paused_at if self._paused_at is not None else 0.0
        )
        return now - self._started - paused

    def _check_limits(self, spec: AgentSpec, now: float) -> None:
        if spec.timeout_s is not None and self._active_time(now) > spec.timeout_s:
            self._halt("timeout", f"timed out after {spec.timeout_s:g}s")
        elif spec.budget_usd is not None and self._tally.cost_usd > spec.budget_usd:
            final = self._tally.final or {}
            if final.get("subtype") != "error_max_budget_usd":  # the CLI's own verdict is better
                self._halt(
                    "budget", f"spent ${self._tally.cost_usd:.4f} of a ${spec.budget_usd:g} budget"
                )

    def _halt(self, kind: str, why: str) -> None:
        self._halted = (kind, why)
        self._events.append(AgentEvent("info", why))
        if self._child is not None:
            self._child.terminate(STOP_GRACE_S)

    def _finish(self, code: int) -> None:
        child = self._child
        assert child is not None
        child.close_stdin()
        # The stderr reader may still be behind the exit: let it catch up, briefly, so the
        # last error lines make it into the summary.
        for reader in getattr(child, "_readers", []):
            reader.join(timeout=1.0)
        tail = [*child.stderr_tail, *self._tail]
        self._outcome = outcome_of(
            self._tally,
            duration_s=self.clock() - self._started,
            exit_code=code,
            tail=tail,
            halted=self._halted,
        )
