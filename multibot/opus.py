"""Opus, the master's brain: one call, a session, and planning (opus_advisor.py answers
workers' questions and reviews diffs; opus_prompts.py holds what Opus is asked).

Every call is the real ``claude`` binary in print mode with structured output::

    claude -p --model opus --output-format json --json-schema '<schema>'
           --tools Read,Glob,Grep --allowedTools Read,Glob,Grep --permission-mode dontAsk
           (--session-id <new uuid> | --resume <session>)      # prompt on stdin

run in the target repository, so Opus can read the code but not change it (``--tools`` hides
every other tool, ``dontAsk`` denies anything not allowed). How Claude Code 2.1.328 behaves
here, checked against the real binary and a fake API:

- The single JSON object on stdout has ``is_error`` (API errors come back with ``subtype``
  "success" and ``is_error`` true, ``result`` "API Error: 400 ..."), ``structured_output`` (the
  object the model gave the StructuredOutput tool), ``session_id`` and ``total_cost_usd``.
- The CLI checks the model's StructuredOutput against the schema and makes it try again within
  the turn; a model that answers with text only is told once to call the tool, then the result
  comes back with ``structured_output`` null.
- ``--resume`` keeps the session id. A session the config dir does not hold ends with exit 1,
  empty stdout and "No conversation found with session ID" on stderr: we then start a new
  session (and keep its id).
- ``total_cost_usd`` (and ``modelUsage``) are cumulative over the session, earlier processes
  included, while ``usage`` counts only this process: see ``call_cost``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from multibot.agents.claude import child_env, resolve_bin
from multibot.agents.stream import result_tokens
from multibot.atomic import open_log
from multibot.config import MasterConfig
from multibot.errors import AgentError, MultibotError, PlanError
from multibot.layout import Home
from multibot.limits import AUTH_FIX, Trouble, classify, wait_for
from multibot.opus_prompts import correction_prompt, plan_prompt, plan_schema
from multibot.plan import validate_plan
from multibot.state import Plan

READ_ONLY_TOOLS = ("Read", "Glob", "Grep")
PERMISSION_MODE = "dontAsk"  # in -p nobody answers prompts: anything not allowed is denied
PLAN_TIMEOUT_S = 900.0  # planning may read much of the repository first
CALL_TIMEOUT_S = 300.0
LOG_ID = "opus"  # state/logs/opus.log: every call and its outcome, for a person to read
# Input, output, cache-read and cache-write token prices relative to input: the same ratios
# for every current Claude model, so a session's cost can be shared out by weighted tokens.
TOKEN_WEIGHTS = {
    "input_tokens": 1.0,
    "output_tokens": 5.0,
    "cache_read_input_tokens": 0.1,
    "cache_creation_input_tokens": 1.25,
}
_MODEL_USAGE_KEYS = {
    "input_tokens": "inputTokens",
    "output_tokens": "outputTokens",
    "cache_read_input_tokens": "cacheReadInputTokens",
    "cache_creation_input_tokens": "cacheCreationInputTokens",
}
NOT_FOUND = "No conversation found"

# -- one call -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpusReply:
    """The outcome of one ``claude -p`` call. ok: the CLI ran and reported no error."""

    ok: bool
    data: dict[str, Any] | None = None
    text: str = ""  # the model's result text, or why the call failed
    session_id: str | None = None
    cost_usd: float = 0.0
    total_cost_usd: float | None = None  # the session's cumulative spend, if reported
    session_missing: bool = False
    tokens: tuple[int, int] = (0, 0)  # input (with cache), output: this call only
    trouble: Trouble | None = None  # the API refused or failed the call (see limits.py)


def opus_argv(
    binary: str,
    model: str,
    schema: Mapping[str, Any],
    *,
    resume: str | None = None,
    new_session: str | None = None,
) -> list[str]:
    """Return the command line of one structured-output call (the prompt goes on stdin)."""
    tools = ",".join(READ_ONLY_TOOLS)
    argv = [
        binary,
        "-p",
        "--model",
        model,
        "--output-format",
        "json",
        "--json-schema",
        json.dumps(schema, separators=(",", ":")),
        "--tools",
        tools,
        "--allowedTools",
        tools,
        "--permission-mode",
        PERMISSION_MODE,
    ]
    if resume is not None:
        argv += ["--resume", resume]
    elif new_session is not None:
        argv += ["--session-id", new_session]
    return argv


def _weighted(usage: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> float:
    total = 0.0
    for key, weight in TOKEN_WEIGHTS.items():
        value = usage.get(keys[key] if keys else key)
        if isinstance(value, int | float):
            total += weight * value
    return total


def call_cost(result: Mapping[str, Any], before: float | None) -> float:
    """Return what one call cost, from its result and the session's spend before it.

    ``total_cost_usd`` covers the whole session. When the spend before the call is known the
    difference is exact; otherwise (a session taken over from an earlier process) the total is
    shared out by this process's weighted tokens (``usage``) over the session's (``modelUsage``).
    """
    total = result.get("total_cost_usd")
    if not isinstance(total, int | float):
        return 0.0
    if before is not None:
        return max(0.0, float(total) - before)
    usage = result.get("usage")
    models = result.get("modelUsage")
    if not isinstance(usage, dict) or not isinstance(models, dict):
        return float(total)
    mine = _weighted(usage)
    session = sum(_weighted(m, _MODEL_USAGE_KEYS) for m in models.values() if isinstance(m, dict))
    if session <= 0:
        return float(total)
    return float(total) * min(1.0, mine / session)


def _result_object(stdout: str) -> dict[str, Any] | None:
    candidates = [stdout.strip(), *reversed(stdout.strip().splitlines())]
    for chunk in candidates:
        if not chunk:
            continue
        try:
            obj = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("type") == "result":
            return obj
    return None


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_reply(stdout: str, stderr: str, code: int | None, before: float | None) -> OpusReply:
    """Return the reply of a finished call from its output and exit status."""
    result = _result_object(stdout)
    if result is None:
        why = _tail(stderr) or _tail(stdout) or "no output"
        return OpusReply(
            ok=False,
            text=f"claude exited with code {code} without a result: {why}",
            session_missing=NOT_FOUND in stderr,
        )
    sid = result.get("session_id")
    total = result.get("total_cost_usd")
    common: dict[str, Any] = {
        "session_id": sid if isinstance(sid, str) else None,
        "cost_usd": call_cost(result, before),
        "total_cost_usd": float(total) if isinstance(total, int | float) else None,
        "tokens": result_tokens(result),
    }
    if result.get("is_error"):
        errors = result.get("errors")
        detail = "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""
        why = str(result.get("result") or detail or result.get("subtype") or "unknown error")
        return OpusReply(
            ok=False,
            text=f"claude reported an error ({result.get('subtype')}): {why}",
            session_missing=NOT_FOUND in detail,
            trouble=classify(result),
            **common,
        )
    data = result.get("structured_output")
    return OpusReply(
        ok=True,
        data=data if isinstance(data, dict) else None,
        text=str(result.get("result") or ""),
        **common,
    )


Register = Callable[["subprocess.Popen[str] | None"], bool]


def kill_group(proc: subprocess.Popen[str]) -> None:
    # Only while the child is unreaped: its pid, and so the group id, cannot be reused yet.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_call(
    argv: list[str],
    prompt: str,
    *,
    cwd: Path,
    timeout_s: float,
    before: float | None,
    register: Register | None = None,
) -> OpusReply:
    """Run one call to the end (or its timeout, which kills its process group)."""
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env({}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: a timeout kills its children too
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    except OSError as exc:
        raise AgentError(f"cannot start {argv[0]} in {cwd}: {exc}") from exc
    try:
        if register is not None and not register(proc):
            kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            return OpusReply(ok=False, text="stopped: the advisor is closing")
        try:
            out, err = proc.communicate(prompt, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            return OpusReply(ok=False, text=f"opus gave no answer within {timeout_s:g}s")
        if proc.returncode is not None and proc.returncode < 0:
            return OpusReply(ok=False, text=f"claude was stopped by signal {-proc.returncode}")
        return parse_reply(out, err, proc.returncode, before)
    finally:
        kill_group(proc)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if register is not None:
            register(None)


class OpusSession:
    """One Opus conversation across calls: resumed each time, restarted if it was lost."""

    def __init__(
        self,
        binary: str,
        model: str,
        cwd: Path,
        session_id: str | None = None,
        *,
        spent: float | None = None,
        register: Register | None = None,
    ) -> None:
        self.binary, self.model, self.cwd = binary, model, cwd
        self.session_id = session_id
        # The session's cumulative spend as last reported; None when not known.
        self.spent: float | None = spent if session_id else 0.0
        self.register = register

    def send(
        self,
        prompt: str,
        schema: Mapping[str, Any],
        *,
        timeout_s: float,
        fresh_prompt: str | None = None,
    ) -> OpusReply:
        """Send one prompt in the session; fresh_prompt replaces it if a new session starts."""
        if self.session_id is None:
            return self._call(fresh_prompt or prompt, schema, timeout_s, new=True)
        reply = self._call(prompt, schema, timeout_s, new=False)
        if reply.session_missing:
            return self._call(fresh_prompt or prompt, schema, timeout_s, new=True)
        return reply

    def _call(
        self, prompt: str, schema: Mapping[str, Any], timeout_s: float, new: bool
    ) -> OpusReply:
        minted = str(uuid.uuid4()) if new else None
        argv = opus_argv(
            self.binary,
            self.model,
            schema,
            resume=None if new else self.session_id,
            new_session=minted,
        )
        before = 0.0 if new else self.spent
        reply = run_call(
            argv, prompt, cwd=self.cwd, timeout_s=timeout_s, before=before, register=self.register
        )
        if reply.session_missing:
            return reply
        self.session_id = reply.session_id or minted or self.session_id
        self.spent = reply.total_cost_usd  # None after a timeout: the spend is unknown again
        return reply


def find_claude(name: str) -> str:
    """Return the claude executable for Opus, or raise AgentError saying what to do."""
    try:
        return resolve_bin(name, child_env({}))
    except AgentError as exc:
        raise AgentError(
            f"claude binary not found: {name} (install Claude Code with "
            "`npm i -g @anthropic-ai/claude-code`, set claude_bin in config/master-config.json, "
            "or use --plan FILE)"
        ) from exc


def log(home: Home, line: str) -> None:
    try:
        home.logs_dir.mkdir(parents=True, exist_ok=True)
        with open_log(home.log(LOG_ID)) as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        pass  # the log is for people; a full disk must not stop the run here


# -- planning -------------------------------------------------------------------------------


class Planned(NamedTuple):
    """A validated plan from Opus, the session it was made in, and what it cost."""

    plan: Plan
    session_id: str | None
    cost_usd: float


def plan_with_opus(
    home: Home,
    config: MasterConfig,
    repo: Path,
    goal: str,
    out: TextIO | None = None,
    *,
    timeout_s: float = PLAN_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Planned:
    """Ask Opus for a plan of goal in repo; send problems back (same session) until valid."""
    out = out or sys.stdout

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=out, flush=True)

    binary = find_claude(config.claude_bin)
    repo = repo.resolve()
    if not repo.is_dir():
        raise MultibotError(f"repository {repo} is not a directory")
    first = plan_prompt(goal, repo)
    session = OpusSession(binary, config.planner_model, repo)
    schema = plan_schema()
    prompt, cost, waited = first, 0.0, 0.0
    problems: list[str] = []
    say(f"asking opus ({config.planner_model}) for a plan…")
    for attempt in range(1, config.planner_attempts + 1):
        fresh = first if attempt == 1 else first + "\n\n" + correction_prompt(problems)
        reply = session.send(prompt, schema, timeout_s=timeout_s, fresh_prompt=fresh)
        cost += reply.cost_usd
        streak = 0
        while reply.trouble is not None and reply.trouble.waits and waited < config.limit_wait_max:
            streak += 1
            delay = wait_for(reply.trouble, streak, config, time.time())
            say(
                f"opus: API {reply.trouble.label()} ({reply.trouble.kind}); planning waits "
                f"{delay:.0f}s and asks again (no planning attempt spent)"
            )
            sleep(delay)
            waited += delay
            reply = session.send(prompt, schema, timeout_s=timeout_s, fresh_prompt=fresh)
            cost += reply.cost_usd
        if reply.trouble is not None and reply.trouble.kind == "auth":
            raise AgentError(
                f"opus could not plan: the API refused the credentials "
                f"({reply.trouble.status}): {reply.text}. {AUTH_FIX}"
            )
        log(
            home,
            f"plan attempt {attempt} (session {session.session_id}): "
            f"{'ok' if reply.ok else 'failed'}: {reply.text[:2000]}",
        )
        if not reply.ok:
            raise AgentError(f"opus could not plan: {reply.text}")
        if reply.data is None:
            problems = ["no plan came back: return it by calling the StructuredOutput tool"]
        else:
            try:
                plan = validate_plan(reply.data, "opus plan")
            except PlanError as exc:
                problems = exc.problems
            else:
                plan = plan.model_copy(update={"source": "opus", "goal": goal or plan.goal})
                say(
                    f"plan has {len(plan.tasks)} tasks (opus session {session.session_id}, "
                    f"${cost:.4f})"
                )
                return Planned(plan, session.session_id, cost)
        if attempt < config.planner_attempts:
            say(f"plan invalid: {'; '.join(problems)}, asking again")
            prompt = correction_prompt(problems)
    say(f"opus gave no valid plan in {config.planner_attempts} attempts")
    raise PlanError(problems)
