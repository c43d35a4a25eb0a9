"""The API's limits with the real claude binary everywhere, against the fake Messages API.

`multibot master --goal ... --backend claude --no-tmux` runs as a child process, as in
test_run_claude.py, with CLAUDE_CODE_MAX_RETRIES=1 so that the binary gives up on a refused
call after two requests instead of about ten over three minutes.

- A temporary limit: the planning call is answered 429 first, and then every worker call is
  for a window of seconds. The plan is delayed, not failed; every task is merged with its
  one attempt; the limited sessions are resumed; concurrency drops and grows back.
- A permanent 401: the run stops after the first refused call, with the fix in its message,
  and nothing failed; started again with a good key, it continues to its end.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import ApiRequest, FakeAPI, Reply, Rule, Script, structured, text, tool

from multibot.timeline import read_timeline
from tests.helpers import wait_until
from tests.test_run_claude import (
    RUN_TIMEOUT,
    Run,
    end_run,
    make_run,
    master_env,
    processes_in,
    workdir,
)

pytestmark = pytest.mark.timeout(300)

TASKS = ("t1", "t2", "t3")
PLAN = {
    "goal": "Write three files.",
    "tasks": [
        {
            "id": tid,
            "title": f"Write {tid}",
            "description": f"Create {tid}.txt holding {tid.upper()}-CONTENT.",
            "dependencies": [],
            "owns": [f"{tid}.txt"],
            "model": "haiku",
            "verify": f"test -f {tid}.txt",
            "estimate_minutes": 5,
            "priority": 0,
        }
        for tid in TASKS
    ],
    "verify": None,
}


def write(tid: str) -> Any:
    def reply(r: ApiRequest) -> Reply:
        path = workdir(r) / f"{tid}.txt"
        return tool("Write", {"file_path": str(path), "content": f"{tid.upper()}-CONTENT\n"})

    return reply


WORKERS = Script([Rule(f"# Task {t}", [write(t), text(f"Wrote {t}.txt.")]) for t in TASKS])
OPUS = Script([Rule("GOAL-MARKER", [structured(PLAN)])])
RATE_LIMITED = Reply(
    text="Rate limited", status=429, error_type="rate_limit_error", headers={"retry-after": "1"}
)
BAD_KEY = Reply(text="invalid x-api-key", status=401, error_type="authentication_error")


class Weather:
    """What the fake API does: refuses planning calls, worker calls for a window, or all."""

    def __init__(self, plan_refusals: int = 0, window_s: float = 0.0, bad_key: bool = False):
        self.plan_refusals, self.window_s, self.bad_key = plan_refusals, window_s, bad_key
        self.window_start: float | None = None
        self.refused = {"plan": 0, "worker": 0}
        self.lock = threading.Lock()

    def __call__(self, r: ApiRequest) -> Reply:
        if r.is_side:
            return text("Side reply")
        with self.lock:
            if r.has_tool("StructuredOutput"):
                if self.refused["plan"] < self.plan_refusals:
                    self.refused["plan"] += 1
                    return RATE_LIMITED
                return OPUS(r)
            if self.bad_key:
                self.refused["worker"] += 1
                return BAD_KEY
            now = time.monotonic()
            if self.window_start is None:
                self.window_start = now
            if now - self.window_start < self.window_s:
                self.refused["worker"] += 1
                return RATE_LIMITED
            return WORKERS(r)


@pytest.fixture
def run(fake_api: FakeAPI, claude_bin: Path, tmp_path: Path) -> Iterator[Run]:
    config = {
        "max_workers": 3,
        "idle_worker_timeout": 30,
        "limit_backoff": 1.0,
        "limit_backoff_max": 2.0,
        "max_attempts": 1,  # a limit that spent an attempt would fail its task
    }
    r = make_run(fake_api, claude_bin, tmp_path, config)
    try:
        yield r
    finally:
        end_run(r)


def env_of(run: Run) -> dict[str, str]:
    return {**master_env(run), "CLAUDE_CODE_MAX_RETRIES": "1"}


def events(run: Run, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_timeline(run.home.timeline) if e.get("event") == kind]


def test_a_temporary_limit_delays_the_plan_and_costs_no_task_an_attempt(run: Run) -> None:
    weather = Weather(plan_refusals=2, window_s=6.0)
    run.fake.respond = weather
    run.run_to_success(env_of(run))  # exit 0: every task merged, with max_attempts 1

    out = (run.tmp / "master.out").read_text()
    assert "opus: API 429 (rate_limit); planning waits" in out  # delayed, not failed
    assert weather.refused["plan"] == 2 and weather.refused["worker"] >= 2
    for tid in TASKS:
        rec = run.task(tid)
        assert rec["status"] == "merged" and rec["attempts"] == 1, (tid, rec)
    limited = [tid for tid in TASKS if run.task(tid)["limits"] > 0]
    assert limited, "the window limited no task"
    assert run.git("show", f"multibot/integration:{limited[0]}.txt").startswith("T")

    # The limited task's own session was resumed once the throttle let it start again.
    workers = [r for r in run.fake.messages_requests() if not r.has_tool("StructuredOutput")]
    for tid in limited:
        sessions = [r.session_id for r in workers if r.contains(f"# Task {tid}")]
        assert len(set(sessions)) == 1, (tid, sessions)

    # Throttled and shown so: concurrency dropped, and grew back with the successes.
    throttled = events(run, "throttled")
    assert throttled and all("attempt" in e["text"] and "kept" in e["text"] for e in throttled)
    allowed = [int(e["text"].split(" of 3 workers allowed")[0].rsplit(" ", 1)[1])
               for e in throttled]  # fmt: skip
    assert min(allowed) < 3
    assert events(run, "throttle-ended")
    final = run.state()["limits"]
    assert final["hits"] == len(throttled) and final["allowed"] == 3 and not final["throttled"]
    assert not events(run, "task-failed")


def test_a_refused_key_stops_the_run_at_once_and_a_restart_after_the_fix_continues(
    run: Run,
) -> None:
    weather = Weather(bad_key=True)
    run.fake.respond = weather
    master = run.start(env_of(run))
    try:
        code = master.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not stop\n{run.dump()}")
    assert code == 3, run.dump()
    out = (run.tmp / "master.out").read_text()
    assert "run stopped: the API refused the credentials (401 from w" in out, out
    assert "ANTHROPIC_API_KEY" in out
    state = run.state()
    assert state["phase"] == "running"  # unfinished: started again, it resumes
    for tid in TASKS:  # nothing failed, no attempt spent
        rec = run.task(tid)
        assert rec["status"] == "pending" and rec["attempts"] == 0, (tid, rec)
        assert rec["runs"] <= 1, "a task ran again after the refusal"
    # One call per worker at most: the ones that started before the first refusal arrived.
    assert weather.refused["worker"] <= 2 * 3

    weather.bad_key = False  # the key fixed
    wait_until(lambda: not processes_in(run.tmp / "home" / "worktrees"), timeout=20)
    run.run_to_success(env_of(run))
    for tid in TASKS:
        rec = run.task(tid)
        assert rec["status"] == "merged" and rec["attempts"] == 1, (tid, rec)
