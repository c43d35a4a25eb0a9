"""Opus planning and advice: pure parts in memory, then the real claude binary on a fake API."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeAPI, Reply, Rule, Script, claude_env, error, structured, text, tool
from helpers import wait_until

from multibot.advisor import Advice
from multibot.config import MasterConfig
from multibot.errors import AgentError, PlanError
from multibot.layout import Home
from multibot.opus import call_cost, opus_argv, parse_reply, plan_with_opus
from multibot.opus_advisor import OpusAdvisor
from multibot.opus_prompts import PLAN_TASK_FIELDS, plan_schema
from multibot.plan import validate_plan
from multibot.state import GitState, PlanTask, SystemState
from multibot.store import StateFile

GOAL = "add a greeting module PLANMARK-7f3"
WAIT_S = 90.0  # one claude call takes 1-2 s here; generous for a loaded 2-core machine


def task(tid: str, deps: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "id": tid,
        "title": f"do {tid}",
        "description": f"Write {tid}.",
        "dependencies": deps or [],
        "owns": [f"{tid}.py"],
        "model": "sonnet",
        **kw,
    }


GOOD = {"goal": "greet", "tasks": [task("hello"), task("tests", ["hello"], model="haiku")]}
CYCLE = {"goal": "greet", "tasks": [task("a", ["b"]), task("b", ["a"])]}
UNKNOWN = {"goal": "greet", "tasks": [task("a", ["nope"])]}


def walk(obj: object) -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


# -- in memory --------------------------------------------------------------------------------
def test_plan_schema_is_plain_and_matches_plantask() -> None:
    schema = plan_schema()
    keys = {k for k, _ in walk(schema)}
    assert "$ref" not in keys and "$defs" not in keys and "anyOf" not in keys
    props = schema["properties"]["tasks"]["items"]["properties"]
    assert set(props) == set(PLAN_TASK_FIELDS) <= set(PlanTask.model_fields)
    assert not {"commands", "capabilities"} & set(props)
    assert set(schema["properties"]) == {"goal", "tasks", "verify"}  # no version/approved/faq
    assert props["model"]["enum"] == ["haiku", "sonnet", "opus"]
    assert validate_plan(GOOD).tasks[1].dependencies == ["hello"]


def test_argv_keeps_prompt_off_the_command_line() -> None:
    argv = opus_argv("/bin/claude", "opus", {"type": "object"}, resume="s1")
    assert argv[:3] == ["/bin/claude", "-p", "--model"]
    assert argv[argv.index("--json-schema") + 1] == '{"type":"object"}'
    assert argv[argv.index("--resume") + 1] == "s1" and "--session-id" not in argv
    assert argv[argv.index("--tools") + 1] == "Read,Glob,Grep"
    assert argv[argv.index("--permission-mode") + 1] == "dontAsk"
    fresh = opus_argv("/bin/claude", "opus", {}, new_session="u1")
    assert fresh[fresh.index("--session-id") + 1] == "u1" and "--resume" not in fresh


def result(**kw: Any) -> str:
    base = {"type": "result", "subtype": "success", "is_error": False, "session_id": "s1"}
    return json.dumps({**base, **kw})


def test_parse_reply_checks_is_error_not_only_subtype() -> None:
    r = parse_reply(result(is_error=True, result="API Error: 400 boom", total_cost_usd=0), "", 1, 0)
    assert not r.ok and "boom" in r.text and r.session_id == "s1"
    ok = parse_reply(result(structured_output={"answer": "x"}, total_cost_usd=0.5), "", 0, 0.25)
    assert ok.ok and ok.data == {"answer": "x"} and ok.cost_usd == pytest.approx(0.25)
    lost = parse_reply("", "No conversation found with session ID: abc\n", 1, None)
    assert not lost.ok and lost.session_missing
    dead = parse_reply("", "segfault\n", 139, None)
    assert not dead.ok and not dead.session_missing and "segfault" in dead.text


def test_call_cost_shares_an_unknown_session_by_tokens() -> None:
    res = {
        "total_cost_usd": 0.3,
        "usage": {"input_tokens": 100, "output_tokens": 20},
        "modelUsage": {"m": {"inputTokens": 300, "outputTokens": 60}},
    }
    assert call_cost(res, 0.2) == pytest.approx(0.1)  # known spend before: exact difference
    assert call_cost(res, None) == pytest.approx(0.1)  # unknown: this process's share


def test_missing_binary_is_a_clear_error_at_plan_time(tmp_path: Path) -> None:
    config = MasterConfig(claude_bin=str(tmp_path / "no" / "claude"))
    with pytest.raises(AgentError, match=r"claude binary not found.*--plan FILE"):
        plan_with_opus(Home.at(tmp_path / "home"), config, tmp_path, "goal", io.StringIO())


def test_missing_binary_is_an_advice_not_an_exception(tmp_path: Path) -> None:
    config = MasterConfig(claude_bin="no-such-claude-xyz")
    advisor = OpusAdvisor(Home.at(tmp_path / "home"), config, repo=tmp_path)
    try:
        advisor.ask("q-1", "why?", "")
        advisor.review("t1", "task", "diff")
        got: list[Advice] = []
        wait_until(lambda: got.extend(advisor.poll()) or len(got) == 2, timeout=10)
    finally:
        advisor.close()
    assert [(a.kind, a.ok, a.approved) for a in got] == [
        ("answer", False, False),
        ("review", False, False),
    ]
    assert all("claude binary not found" in a.text for a in got)


# -- the real binary against the fake API -----------------------------------------------------
@dataclass
class Env:
    fake: FakeAPI
    home: Home
    repo: Path
    config: MasterConfig
    advisors: list[OpusAdvisor]

    def advisor(self, **kw: Any) -> OpusAdvisor:
        a = OpusAdvisor(self.home, self.config, **{"repo": self.repo, **kw})
        self.advisors.append(a)
        return a

    def script(self, *rules: Rule) -> None:
        self.fake.respond = Script(list(rules))

    def main(self) -> list[Any]:
        return self.fake.messages_requests()


@pytest.fixture
def env(
    fake_api: FakeAPI, claude_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    # The code under test passes os.environ through to claude: point it at the fake, offline.
    for key, value in claude_env(fake_api, tmp_path / "claude").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CLAUDECODE", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("The greeting port is README-SECRET-4242.\n")
    config = MasterConfig(claude_bin=str(claude_bin), planner_attempts=3)
    e = Env(fake_api, Home.at(tmp_path / "home"), repo, config, [])
    try:
        yield e
    finally:
        for a in e.advisors:
            a.close()
        assert not claude_processes_in(repo), "a claude process outlived the test"


def claude_processes_in(cwd: Path) -> list[int]:
    """Pids of live processes working in cwd (ours are the only ones there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == cwd.resolve():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def collect(advisor: OpusAdvisor, n: int, timeout: float = WAIT_S) -> list[Advice]:
    got: list[Advice] = []
    wait_until(lambda: got.extend(advisor.poll()) or len(got) >= n, timeout=timeout, interval=0.05)
    return got


def test_valid_plan_then_advisor_continues_its_session(env: Env) -> None:
    env.script(
        Rule("PLANMARK-7f3", [structured(GOOD)]),
        Rule("QMARK-1", [structured({"answer": "Use port 8080."})]),
    )
    out = io.StringIO()
    planned = plan_with_opus(env.home, env.config, env.repo, GOAL, out)
    plan, session, cost = planned
    assert [t.id for t in plan.tasks] == ["hello", "tests"]
    assert plan.source == "opus" and plan.goal == GOAL and plan.tasks[1].model == "haiku"
    assert session and cost > 0
    first = env.main()
    assert len(first) == 1 and first[0].session_id == session
    assert first[0].model.startswith("claude-opus")
    assert set(first[0].tool_names()) >= {"Read", "Glob", "Grep", "StructuredOutput"}
    assert not {"Write", "Edit", "Bash"} & set(first[0].tool_names())  # read-only Opus
    assert "asking opus" in out.getvalue() and "plan has 2 tasks" in out.getvalue()

    # The master records the session; the advisor finds it (and the repo) there and resumes it.
    StateFile(env.home.system_state, SystemState, default=SystemState).update(
        lambda s: s.model_copy(
            update={"opus_session": session, "git": GitState(repo=str(env.repo))}
        )
    )
    advisor = env.advisor(repo=None)
    advisor.ask("q-1", "QMARK-1 which port?", "CTXMARK-1 worker w1 on hello")
    [advice] = collect(advisor, 1)
    assert advice == Advice(
        "answer",
        "q-1",
        ok=True,
        text="Use port 8080.",
        cost_usd=advice.cost_usd,
        tokens=advice.tokens,
    )
    assert advice.tokens[0] > 0 and advice.tokens[1] > 0  # this call's usage, from the API
    assert advice.cost_usd == pytest.approx(cost)  # this call's share, not the session's total
    asked = env.main()[-1]
    assert asked.contains("QMARK-1 which port?") and asked.contains("CTXMARK-1")
    assert asked.contains("PLANMARK-7f3")  # same conversation as the plan
    assert asked.session_id == session == advisor.session_id


def test_invalid_plan_is_corrected_in_the_same_session(env: Env) -> None:
    env.script(Rule("PLANMARK-7f3", [structured(CYCLE), structured(GOOD)]))
    out = io.StringIO()
    plan, session, _ = plan_with_opus(env.home, env.config, env.repo, GOAL, out)
    assert [t.id for t in plan.tasks] == ["hello", "tests"]
    reqs = env.main()
    assert len(reqs) == 2
    assert reqs[1].contains("dependency cycle") and reqs[1].contains("PLANMARK-7f3")
    assert reqs[0].session_id == reqs[1].session_id == session
    assert "plan invalid: dependency cycle" in out.getvalue()
    assert "asking again" in out.getvalue()


def test_always_invalid_plan_raises_after_the_attempts(env: Env) -> None:
    env.config = env.config.model_copy(update={"planner_attempts": 2})
    env.script(Rule("PLANMARK-7f3", [structured(UNKNOWN)]))
    with pytest.raises(PlanError) as info:
        plan_with_opus(env.home, env.config, env.repo, GOAL, io.StringIO())
    assert any("unknown task 'nope'" in p for p in info.value.problems)
    assert len(env.main()) == 2


def test_text_instead_of_a_plan_counts_as_a_bad_attempt(env: Env) -> None:
    env.config = env.config.model_copy(update={"planner_attempts": 2})
    env.script(Rule("PLANMARK-7f3", [text("Here is my plan: ...")]))
    with pytest.raises(PlanError, match="StructuredOutput"):
        plan_with_opus(env.home, env.config, env.repo, GOAL, io.StringIO())


def test_api_error_while_planning_is_an_agent_error(env: Env) -> None:
    env.script(Rule("PLANMARK-7f3", [error(400, message="planning boom")]))
    with pytest.raises(AgentError, match="planning boom"):
        plan_with_opus(env.home, env.config, env.repo, GOAL, io.StringIO())


def test_answer_may_read_the_repo_and_reviews_share_one_session(env: Env) -> None:
    readme = str(env.repo / "README.md")
    env.script(
        Rule("QMARK-2", [tool("Read", {"file_path": readme}), structured({"answer": "4242"})]),
        Rule("REVIEW-A", [structured({"approved": True, "feedback": "Looks right."})]),
        Rule("REVIEW-B", [structured({"approved": False, "feedback": "Add a test."})]),
    )
    advisor = env.advisor()
    advisor.ask("q-2", "QMARK-2 which port does the README give?", "")
    advisor.review("hello", "REVIEW-A write hello.py", "+def hello(): ...")
    advisor.review("tests", "REVIEW-B write tests", "+# nothing")
    got = collect(advisor, 3)
    assert [(a.kind, a.key, a.ok, a.approved, a.text) for a in got] == [
        ("answer", "q-2", True, True, "4242"),
        ("review", "hello", True, True, "Looks right."),
        ("review", "tests", True, False, "Add a test."),
    ]
    reqs = env.main()
    assert any("README-SECRET-4242" in r for req in reqs for r in req.tool_results())
    assert len({r.session_id for r in reqs}) == 1 == len({advisor.session_id})
    assert reqs[-1].contains("+def hello(): ...") and reqs[-1].contains("QMARK-2")


def test_api_error_is_advice_not_ok(env: Env) -> None:
    env.script(Rule("QMARK-3", [error(400, message="answer boom")]))
    advisor = env.advisor()
    advisor.ask("q-3", "QMARK-3 why?", "")
    [advice] = collect(advisor, 1)
    assert advice.kind == "answer" and not advice.ok and "answer boom" in advice.text


def test_lost_session_starts_a_new_one(env: Env) -> None:
    env.script(Rule("QMARK-4", [structured({"answer": "fresh"})]))
    gone = str(uuid.uuid4())
    advisor = env.advisor(session_id=gone)
    advisor.ask("q-4", "QMARK-4 still there?", "")
    [advice] = collect(advisor, 1)
    assert advice.ok and advice.text == "fresh"
    assert advisor.session_id not in (None, gone)
    assert env.main()[-1].session_id == advisor.session_id


def test_timeout_kills_the_call(env: Env) -> None:
    env.script(Rule("QMARK-5", [_delay(30)]))
    advisor = env.advisor(timeout_s=3)
    advisor.ask("q-5", "QMARK-5 slow?", "")
    [advice] = collect(advisor, 1)
    assert not advice.ok and "no answer within 3s" in advice.text
    wait_until(lambda: not claude_processes_in(env.repo), timeout=10)


def test_close_stops_a_running_call_at_once(env: Env) -> None:
    env.script(Rule("QMARK-6", [_delay(60)]))
    advisor = env.advisor()
    advisor.ask("q-6", "QMARK-6 slow?", "")
    advisor.ask("q-7", "never asked", "")
    wait_until(lambda: env.fake.saw("QMARK-6"), timeout=WAIT_S)
    advisor.close()
    assert advisor._thread is not None and not advisor._thread.is_alive()
    assert not claude_processes_in(env.repo)
    assert not env.fake.saw("never asked")
    advisor.ask("q-8", "after close", "")
    [late] = advisor.poll()
    assert not late.ok and "closed" in late.text


def _delay(seconds: float) -> Reply:
    """A structured answer that comes only after seconds (longer than the caller waits)."""
    return Reply(tools=structured({"answer": "late"}).tools, delay_s=seconds)
