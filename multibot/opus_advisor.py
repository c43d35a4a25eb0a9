"""The advisor Opus: answers workers' questions and reviews diffs, one call at a time, in a
thread of its own, in the master's Opus session (see opus.py)."""

from __future__ import annotations

import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibot.advisor import Advice, Advisor
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import AgentError, MultibotError
from multibot.layout import Home
from multibot.opus import CALL_TIMEOUT_S, OpusSession, find_claude, kill_group, log
from multibot.opus_prompts import ANSWER_SCHEMA, REVIEW_SCHEMA, question_prompt, review_prompt
from multibot.state import SystemState
from multibot.store import StateFile

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
                kill_group(self._proc)
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
            log(
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
