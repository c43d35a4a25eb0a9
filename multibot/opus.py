"""Opus, the master's brain: plans the goal, answers workers' questions, reviews diffs.

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
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from multibot.advisor import Advice, Advisor
from multibot.agents.claude import child_env, resolve_bin
from multibot.agents.stream import result_tokens
from multibot.atomic import open_log
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import AgentError, MultibotError, PlanError
from multibot.layout import Home
from multibot.plan import validate_plan
from multibot.state import Plan, PlanTask, SystemState
from multibot.store import StateFile

READ_ONLY_TOOLS = ("Read", "Glob", "Grep")
PERMISSION_MODE = "dontAsk"  # in -p nobody answers prompts: anything not allowed is denied
PLAN_TIMEOUT_S = 900.0  # planning may read much of the repository first
CALL_TIMEOUT_S = 300.0
MAX_DIFF_CHARS = 60_000  # a cut diff says so in the prompt (review_prompt)
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

# -- schemas --------------------------------------------------------------------------------

# The PlanTask fields Opus fills; the rest (commands, capabilities) belong to other backends.
PLAN_TASK_FIELDS = (
    "id",
    "title",
    "description",
    "dependencies",
    "priority",
    "owns",
    "model",
    "verify",
    "estimate_minutes",
)
_REQUIRED_TASK_FIELDS = ("id", "title", "description", "dependencies", "owns", "model")
_TASK_HINTS = {
    "id": "Unique id: lowercase letters, digits, '-' or '_', starting with a letter or digit.",
    "title": "A short title.",
    "description": "Everything the worker needs: what to do, where, and what done means.",
    "dependencies": "Ids of tasks of this plan that must be merged before this one starts.",
    "owns": "Files or globs, relative to the repository root, this task may create or change.",
    "verify": "Shell command run in the task's worktree when done (exit 0 = good), or null.",
    "estimate_minutes": "How long a capable engineer would take, in minutes.",
    "priority": "Among ready tasks, higher runs first.",
}
ID_PATTERN = "^[a-z0-9][a-z0-9_-]{0,62}$"

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "description": "The answer for the worker."}},
    "required": ["answer"],
    "additionalProperties": False,
}
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean", "description": "True when the change may be merged."},
        "feedback": {"type": "string", "description": "What is good, or what must change."},
    },
    "required": ["approved", "feedback"],
    "additionalProperties": False,
}


def _clean(prop: Mapping[str, Any]) -> dict[str, Any]:
    """Return a pydantic property schema without titles/defaults, `X | None` as a type list."""
    out = {k: v for k, v in prop.items() if k not in ("title", "default")}
    options = out.pop("anyOf", None)
    if options is not None:
        types = [o.get("type") for o in options]
        if len(options) != 2 or "null" not in types or not all(isinstance(t, str) for t in types):
            raise TypeError(f"cannot simplify schema {prop!r}")  # a model change to look at
        out["type"] = [t for t in types if t != "null"] + ["null"]
    return out


def plan_schema() -> dict[str, Any]:
    """Return the JSON Schema Opus fills with a plan: PlanTask's own fields, nothing internal."""
    props = PlanTask.model_json_schema()["properties"]
    task: dict[str, Any] = {}
    for name in PLAN_TASK_FIELDS:
        task[name] = _clean(props[name])
        if name in _TASK_HINTS:
            task[name]["description"] = _TASK_HINTS[name]
    task["id"]["pattern"] = ID_PATTERN
    task["dependencies"]["items"]["pattern"] = ID_PATTERN
    return {
        "type": "object",
        "properties": {
            "goal": {"type": "string", "description": "The goal, restated in one sentence."},
            "tasks": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": task,
                    "required": list(_REQUIRED_TASK_FIELDS),
                    "additionalProperties": False,
                },
            },
            "verify": {
                "type": ["string", "null"],
                "description": "Command that checks the whole project after every merge, or null.",
            },
        },
        "required": ["goal", "tasks"],
        "additionalProperties": False,
    }


# -- prompts --------------------------------------------------------------------------------

ROLE = (
    "You are the master of multibot: you run a team of Claude Code workers that work in "
    "parallel, each in its own git worktree of one repository, and you merge their branches. "
    "Your working directory is that repository: read it with Read, Glob and Grep when it "
    "helps; you cannot change anything."
)


def plan_prompt(goal: str, repo: Path) -> str:
    """Return the first planning prompt: the goal, the repository and the rules of a plan."""
    return f"""{ROLE}

Goal: {goal}
Repository: {repo}

Split the goal into tasks that workers can do independently and in parallel, and return the
plan by calling the StructuredOutput tool. Rules:
- id: unique, lowercase letters, digits, '-' and '_' (1-63 characters, starting with a letter
  or digit).
- dependencies: ids of tasks that must be finished and merged before this task starts. Every
  dependency must be a task of this plan, and there must be no cycle.
- owns: the files or globs (relative to the repository root, e.g. "src/parser.py",
  "tests/test_parser.py", "docs/*.md") the task may create or change. Tasks whose files overlap
  cannot run in parallel: tasks that touch the same files must depend on each other (better,
  give each file to one task).
- model: "haiku" for simple mechanical tasks, "sonnet" for normal work, "opus" for hard
  design or debugging.
- verify: a shell command run in the task's worktree when it is done, exit status 0 when the
  work is right (e.g. "python -m pytest -q tests/test_parser.py"). Give one wherever possible,
  else null.
- estimate_minutes: how long a capable engineer would take.
- priority: among ready tasks, higher runs first (default 0).
- description: everything the worker needs to know; it sees only its own task.
- verify at the top level: a command that checks the whole project after every merge, or null.
Prefer a few well-sized tasks (10 to 60 minutes each) over many tiny ones."""


def correction_prompt(problems: list[str]) -> str:
    """Return the follow-up that sends a rejected plan's problems back to Opus."""
    listed = "\n".join(f"- {p}" for p in problems)
    return (
        f"The plan you returned is invalid:\n{listed}\n\nFix these problems and return the "
        "complete corrected plan (every task, not only the changed ones) by calling the "
        "StructuredOutput tool again."
    )


def question_prompt(key: str, question: str, context: str) -> str:
    """Return the prompt asking Opus to answer a worker's question."""
    return f"""[multibot question {key}]
{ROLE}

A worker asks you a question. Answer so that it can go on: concretely and briefly, saying what
to do.

Question: {question}

Context:
{context or "(none)"}

Reply by calling the StructuredOutput tool with {{"answer": "..."}}."""


def review_prompt(key: str, task: str, diff: str) -> str:
    """Return the prompt asking Opus to review a task's diff before it is merged."""
    if len(diff) > MAX_DIFF_CHARS:
        cut = len(diff) - MAX_DIFF_CHARS
        diff = diff[:MAX_DIFF_CHARS] + f"\n[... {cut} more characters of diff not shown]"
    return f"""[multibot review {key}]
{ROLE}

Review the change a worker made for this task before it is merged. Approve it when it does
what the task asks, is correct and breaks nothing else; otherwise say exactly what must change.

Task:
{task}

Diff:
{diff or "(empty diff)"}

Reply by calling the StructuredOutput tool with {{"approved": true or false, "feedback": "..."}}."""


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


def _kill_group(proc: subprocess.Popen[str]) -> None:
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
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            return OpusReply(ok=False, text="stopped: the advisor is closing")
        try:
            out, err = proc.communicate(prompt, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            return OpusReply(ok=False, text=f"opus gave no answer within {timeout_s:g}s")
        if proc.returncode is not None and proc.returncode < 0:
            return OpusReply(ok=False, text=f"claude was stopped by signal {-proc.returncode}")
        return parse_reply(out, err, proc.returncode, before)
    finally:
        _kill_group(proc)
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


def _log(home: Home, line: str) -> None:
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
    prompt, cost = first, 0.0
    problems: list[str] = []
    say(f"asking opus ({config.planner_model}) for a plan…")
    for attempt in range(1, config.planner_attempts + 1):
        fresh = first if attempt == 1 else first + "\n\n" + correction_prompt(problems)
        reply = session.send(prompt, schema, timeout_s=timeout_s, fresh_prompt=fresh)
        cost += reply.cost_usd
        _log(
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


# -- the advisor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    kind: str  # "answer" | "review"
    key: str
    prompt: str


class OpusAdvisor(Advisor):
    """Answers questions and reviews diffs with Opus, one call at a time on one thread.

    ask/review only queue a job: the master never waits for Opus. Every job ends as exactly
    one Advice from poll(), failures included (ok=False, text says why). All calls continue
    one Opus session (``session_id``, the planner's unless given), so Opus keeps the run's
    history; when no session is known yet it is read from system-state.json (opus_session),
    and the working directory from there too (git.repo).
    """

    available = True

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        template: WorkerTemplate | None = None,
        *,
        session_id: str | None = None,
        repo: Path | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self.home, self.config, self.timeout_s = home, config, timeout_s
        # A claude_bin set only in the worker template is meant for Opus too.
        default_bin = MasterConfig.model_fields["claude_bin"].default
        self.claude_bin = config.claude_bin
        if template is not None and config.claude_bin == default_bin:
            self.claude_bin = template.claude_bin
        self.session_id = session_id
        self.repo = repo
        self._session: OpusSession | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._done: queue.Queue[Advice] = queue.Queue()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the master's side ------------------------------------------------------------------
    def ask(self, key: str, question: str, context: str) -> None:
        """Queue a question; its Advice (kind "answer") comes from poll()."""
        self._submit(_Job("answer", key, question_prompt(key, question, context)))

    def review(self, key: str, task: str, diff: str) -> None:
        """Queue a review of a task's diff; its Advice (kind "review") comes from poll()."""
        self._submit(_Job("review", key, review_prompt(key, task, diff)))

    def poll(self) -> list[Advice]:
        """Return the Advice finished since the last poll, without blocking."""
        out: list[Advice] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop: kill a running call, drop queued jobs, join the thread."""
        with self._lock:
            self._closing = True
            if self._proc is not None:
                _kill_group(self._proc)
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def pending(self) -> int:
        """Return how many jobs are queued (not counting one being run)."""
        return self._jobs.qsize()

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closing:
                self._done.put(
                    Advice(
                        job.kind, job.key, ok=False, text="the advisor is closed", approved=False
                    )
                )
                return
            if self._thread is None:
                # Not a daemon: close() joins it, so no claude call is cut off at exit unseen.
                self._thread = threading.Thread(target=self._loop, name="opus-advisor")
                self._thread.start()
        self._jobs.put(job)

    # -- the thread's side ------------------------------------------------------------------
    def _register(self, proc: subprocess.Popen[str] | None) -> bool:
        with self._lock:
            self._proc = proc
            return not self._closing

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closing:
                return
            try:
                advice = self._run(job)
            except Exception as exc:  # the master must get an Advice whatever happens here
                advice = Advice(
                    job.kind, job.key, ok=False, text=f"advisor failed: {exc!r}", approved=False
                )
            _log(
                self.home,
                f"{job.kind} {job.key}: ok={advice.ok} approved={advice.approved} "
                f"${advice.cost_usd:.4f}: {advice.text[:1000]}",
            )
            if not self._closing:
                self._done.put(advice)

    def _adopt(self) -> None:
        """Fill the session and repository from system-state.json when not known yet."""
        if self.session_id is not None and self.repo is not None:
            return
        try:
            state = StateFile(self.home.system_state, SystemState, default=SystemState).read()
        except MultibotError:
            return
        if self.session_id is None and state.opus_session:
            self.session_id = state.opus_session
        if self.repo is None and state.git.repo:
            self.repo = Path(state.git.repo)

    def _opus(self) -> OpusSession:
        if self._session is None:
            self._adopt()
            binary = find_claude(self.claude_bin)
            cwd = (self.repo or Path.cwd()).resolve()
            self._session = OpusSession(
                binary,
                self.config.planner_model,
                cwd,
                self.session_id,
                spent=None,  # a session from elsewhere: its spend so far is not known
                register=self._register,
            )
        return self._session

    def _run(self, job: _Job) -> Advice:
        try:
            opus = self._opus()
            reply = opus.send(job.prompt, self._schema(job.kind), timeout_s=self.timeout_s)
        except AgentError as exc:
            return Advice(job.kind, job.key, ok=False, text=str(exc), approved=False)
        self.session_id = opus.session_id
        fail = Advice(job.kind, job.key, False, reply.text, False, reply.cost_usd, reply.tokens)
        if not reply.ok:
            return fail
        data = reply.data or {}
        if job.kind == "answer":
            answer = data.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                fail.text = f"opus gave no answer: {reply.text[:500]}"
                return fail
            return Advice(
                "answer", job.key, True, answer.strip(), True, reply.cost_usd, reply.tokens
            )
        approved, feedback = data.get("approved"), data.get("feedback")
        if not isinstance(approved, bool) or not isinstance(feedback, str):
            fail.text = f"opus gave no review: {reply.text[:500]}"
            return fail
        return Advice(
            "review",
            job.key,
            ok=True,
            text=feedback.strip(),
            approved=approved,
            cost_usd=reply.cost_usd,
            tokens=reply.tokens,
        )

    @staticmethod
    def _schema(kind: str) -> dict[str, Any]:
        return ANSWER_SCHEMA if kind == "answer" else REVIEW_SCHEMA
