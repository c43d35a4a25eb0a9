"""The Claude Code backend: bookkeeping in memory, then the real binary against a fake API."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import (
    ApiRequest,
    FakeAPI,
    Reply,
    Rule,
    Script,
    claude_env,
    error,
    structured,
    text,
    tool,
)
from helpers import wait_until

from multibot.agents import make_agent
from multibot.agents.base import AgentEvent, AgentOutcome, AgentSpec
from multibot.agents.claude import (
    ClaudeAgent,
    Tally,
    build_argv,
    child_env,
    outcome_of,
    resolve_bin,
    user_line,
)
from multibot.errors import AgentError

SID = "11111111-2222-3333-4444-555555555555"


# -- bookkeeping, in memory ----------------------------------------------------------------
def lifecycle(cid: str, state: str) -> dict[str, Any]:
    return {"type": "command_lifecycle", "command_uuid": cid, "state": state, "session_id": SID}


def result(
    text: str = "done", *, cost: float = 0.001, total: float = 0.001, **kw: Any
) -> dict[str, Any]:
    return {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "result": text,
        "session_id": SID,
        "total_cost_usd": total,
        "num_turns": 2,
        "usage": {"input_tokens": 100, "cache_read_input_tokens": 50, "output_tokens": 20},
        "model_usage_since_last_result": {"m": {"costUSD": cost}},
        **kw,
    }


def test_done_after_result_and_prompt_completed() -> None:
    t = Tally()
    t.wrote("p")
    t.feed(lifecycle("p", "queued"))
    t.feed(lifecycle("p", "started"))
    t.feed({"type": "system", "subtype": "init", "session_id": SID})
    assert not t.done
    t.feed(result())
    assert not t.done  # the prompt's "completed" comes just after its result
    t.feed(lifecycle("p", "completed"))
    assert t.done and t.session_id == SID


def test_message_merged_into_running_turn_needs_one_result() -> None:
    # What 2.1.328 does with a line written during a tool call: queued, started, completed
    # inside the running turn; that turn then ends with a single result.
    t = Tally()
    t.wrote("p")
    t.feed(lifecycle("p", "started"))
    t.wrote("i")
    t.feed(lifecycle("i", "queued"))
    t.feed(lifecycle("i", "started"))
    t.feed(lifecycle("i", "completed"))
    t.feed(result())
    t.feed(lifecycle("p", "completed"))
    assert t.done and len(t.results) == 1


def test_message_queued_at_end_of_turn_waits_for_its_own_turn() -> None:
    t = Tally()
    t.wrote("p")
    t.feed(lifecycle("p", "started"))
    t.wrote("i")
    t.feed(lifecycle("i", "queued"))
    t.feed(result(queued_turn_count=0))  # the CLI says 0 here, yet a turn follows
    t.feed(lifecycle("p", "completed"))
    assert not t.done
    t.feed(lifecycle("i", "started"))
    t.feed(result("second", total=0.002))
    assert not t.done
    t.feed(lifecycle("i", "completed"))
    assert t.done


def test_line_not_yet_read_keeps_the_task_open() -> None:
    t = Tally()
    t.wrote("p")
    t.feed(lifecycle("p", "started"))
    t.feed(result())
    t.feed(lifecycle("p", "completed"))
    t.wrote("late")
    assert not t.done and t.pending == ["late"]


def test_cancelled_is_terminal_and_no_lifecycle_means_first_result_ends() -> None:
    t = Tally()
    t.wrote("p")
    t.feed(lifecycle("p", "started"))
    t.feed(result(is_error=True))
    t.feed(lifecycle("p", "cancelled"))
    assert t.done
    quiet = Tally()
    quiet.wrote("p")
    quiet.feed(result())
    assert quiet.done


def test_costs_and_tokens_add_up_per_turn_not_per_session_total() -> None:
    t = Tally()
    t.feed(result(cost=0.0004, total=0.2006))  # a resumed session: total includes the past
    t.feed(result(cost=0.0004, total=0.2010))
    assert t.cost_usd == pytest.approx(0.0008)
    assert (t.input_tokens, t.output_tokens, t.turns) == (300, 40, 4)
    fallback = Tally()
    bare = {"type": "result", "is_error": False, "result": "x"}
    fallback.feed({**bare, "total_cost_usd": 0.5})
    fallback.feed({**bare, "total_cost_usd": 0.75})
    assert fallback.cost_usd == pytest.approx(0.75)


def test_outcome_of() -> None:
    t = Tally()
    t.feed(result("first"))
    t.feed(result(""))
    ok = outcome_of(t, duration_s=1.5, exit_code=0, tail=[])
    assert ok.ok and ok.summary == "first" and ok.session_id == SID and ok.error_kind is None
    t.feed(result("API Error: 400 bad", is_error=True))
    bad = outcome_of(t, duration_s=1, exit_code=1, tail=[])
    assert not bad.ok and bad.error_kind == "is_error" and "400" in bad.summary
    t.feed(result("", is_error=True, subtype="error_max_turns", errors=["too many"]))
    assert outcome_of(t, duration_s=1, exit_code=1, tail=[]).error_kind == "error_max_turns"
    none = outcome_of(Tally(), duration_s=1, exit_code=-9, tail=["boom"])
    assert none.error_kind == "exit" and "SIGKILL" in none.summary and "boom" in none.summary
    halted = outcome_of(t, duration_s=1, exit_code=-15, tail=[], halted=("timeout", "timed out"))
    assert halted.error_kind == "timeout" and not halted.ok


def test_a_refused_call_is_classified_and_a_usage_limit_keeps_its_reset_time() -> None:
    t = Tally()
    t.feed({"type": "rate_limit_event",
            "rate_limit_info": {"status": "rejected", "resetsAt": 1_800_000_000}})  # fmt: skip
    t.feed(result("API Error: Request rejected (429)", is_error=True, api_error_status=429,
                  api_error_type="rate_limit_error", terminal_reason="api_error"))  # fmt: skip
    out = outcome_of(t, duration_s=1, exit_code=1, tail=[])
    assert out.trouble is not None and out.trouble.kind == "usage_limit"
    assert out.trouble.reset_at == 1_800_000_000 and out.error_kind == "usage_limit"


def spec(prompt: str, cwd: Path, **kw: Any) -> AgentSpec:
    return AgentSpec(task_id="t1", prompt=prompt, cwd=cwd, **kw)


def test_argv_keeps_prompt_off_the_command_line(tmp_path: Path) -> None:
    s = spec(
        "PROMPT-TEXT",
        tmp_path,
        allowed_tools=("Bash(git *)", "Edit"),
        disallowed_tools=("WebFetch",),
        budget_usd=1.5,
        extra_args=("--max-turns", "7"),
    )
    argv = build_argv("/bin/claude", s, "sid-1")
    assert "PROMPT-TEXT" not in argv
    assert argv[argv.index("--session-id") + 1] == "sid-1" and "--resume" not in argv
    assert argv[argv.index("--max-budget-usd") + 1] == "1.5"
    assert argv[-5:] == ["--allowedTools", "Bash(git *)", "Edit", "--disallowedTools", "WebFetch"]
    resumed = build_argv("/bin/claude", spec("p", tmp_path, resume_session="old"), None)
    assert resumed[resumed.index("--resume") + 1] == "old" and "--session-id" not in resumed


def test_child_env_drops_nested_session_markers() -> None:
    base = {"CLAUDECODE": "1", "CLAUDE_CODE_ENTRYPOINT": "cli", "PATH": "/bin", "KEEP": "x"}
    env = child_env({"KEEP": "y", "CLAUDE_CONFIG_DIR": "/c"}, base)
    assert env == {"PATH": "/bin", "KEEP": "y", "CLAUDE_CONFIG_DIR": "/c"}


def test_user_line_is_one_json_line() -> None:
    line = user_line("two\nlines", "u1")
    assert "\n" not in line and '"uuid": "u1"' in line


def test_missing_binary_is_an_agent_error(tmp_path: Path) -> None:
    agent = make_agent("claude")
    assert isinstance(agent, ClaudeAgent)
    with pytest.raises(AgentError, match=r"claude binary not found.*npm i -g"):
        agent.start(spec("p", tmp_path, claude_bin="no-such-claude-binary-xyz"))
    with pytest.raises(AgentError, match="claude binary not found"):
        agent.start(spec("p", tmp_path, claude_bin=str(tmp_path / "missing" / "claude")))
    with pytest.raises(AgentError):
        resolve_bin("claude-nope", {"PATH": str(tmp_path)})
    assert agent.process() is None and agent.outcome() is None and not agent.inject("x")


def test_exit_without_result_reports_exit_and_stderr(tmp_path: Path) -> None:
    fake_bin = tmp_path / "claude"
    fake_bin.write_text("#!/bin/sh\necho 'Error: Session ID x is already in use.' >&2\nexit 3\n")
    fake_bin.chmod(0o755)
    agent = ClaudeAgent()
    agent.start(spec("p", tmp_path, claude_bin=str(fake_bin)))
    out = drive(agent, timeout=20)
    assert out.error_kind == "exit" and not out.ok
    assert "code 3" in out.summary and "already in use" in out.summary


# -- the real binary against the fake API --------------------------------------------------
def drive(
    agent: ClaudeAgent,
    timeout: float = 90.0,
    events: list[AgentEvent] | None = None,
    each: Callable[[list[AgentEvent]], None] | None = None,
) -> AgentOutcome:
    """Poll until the outcome is known, keeping events; fail after timeout."""
    seen = events if events is not None else []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += agent.poll()
        if each is not None:
            each(seen)
        out = agent.outcome()
        if out is not None:
            return out
        time.sleep(0.05)
    raise AssertionError(f"no outcome within {timeout}s; events: {seen[-20:]}")


def group_states(pgid: int) -> dict[int, str]:
    """The processes of a process group, and the state of each (Z: a zombie)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            found[int(entry)] = fields[0]
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    return [pid for pid, state in group_states(pgid).items() if state != "Z"]


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def suspended(pid: int) -> bool:
    """Whether the group led by pid cannot run: the leader stopped, or (seen under load) in
    uninterruptible sleep behind a member that is stopped: a child it forked with vfork,
    stopped by the same SIGSTOP before its exec, holds the leader in D until SIGCONT."""
    state = proc_state(pid)
    return state == "T" or (state == "D" and "T" in group_states(pid).values())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


@pytest.fixture
def agents() -> Iterator[list[ClaudeAgent]]:
    """Agents made by a test; all stopped at the end, with no process of theirs left."""
    made: list[ClaudeAgent] = []
    yield made
    for agent in made:
        agent.stop(2.0)
    for agent in made:
        assert_group_gone(agent)


def assert_group_gone(agent: ClaudeAgent) -> None:
    child = agent.process()
    if child is not None:
        wait_until(lambda: not group_members(child.pid), timeout=10)


@pytest.fixture
def run(
    agents: list[ClaudeAgent], fake_api: FakeAPI, claude_bin: Path, repo: Path, tmp_path: Path
) -> Callable[..., ClaudeAgent]:
    """Start a ClaudeAgent on a prompt in the test repo, pointed at the fake API."""

    def start(prompt: str, **kw: Any) -> ClaudeAgent:
        agent = ClaudeAgent()
        agents.append(agent)
        kw.setdefault("allowed_tools", ("Bash",))
        agent.start(
            AgentSpec(
                task_id="t1",
                prompt=prompt,
                cwd=repo,
                env=claude_env(fake_api, tmp_path),
                claude_bin=str(claude_bin),
                **kw,
            )
        )
        return agent

    return start


@pytest.mark.timeout(120)
def test_write_task_completes(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI, repo: Path
) -> None:
    target = repo / "hello.txt"
    fake_api.respond = Script(
        [
            Rule(
                "MARK-WRITE",
                [
                    tool("Write", {"file_path": str(target), "content": "hello world\n"}),
                    text("Wrote hello.txt."),
                ],
            )
        ]
    )
    agent = run("MARK-WRITE: create hello.txt")
    events: list[AgentEvent] = []
    out = drive(agent, events=events)
    assert out.ok, out
    assert target.read_text() == "hello world\n"
    assert out.summary == "Wrote hello.txt."
    tools = [e for e in events if e.kind == "tool"]
    assert [t.data["name"] for t in tools] == ["Write"] and tools[0].text == "Write hello.txt"
    assert any(e.kind == "file" and e.text == "hello.txt" for e in events)
    sessions = [e.data["session_id"] for e in events if e.kind == "session"]
    assert sessions and set(sessions) == {out.session_id}
    assert fake_api.messages_requests()[0].session_id == out.session_id
    assert out.cost_usd > 0 and out.input_tokens >= 200 and out.output_tokens > 0
    assert out.turns == 2 and out.duration_s > 0
    costs = [e for e in events if e.kind == "cost"]
    assert costs and costs[-1].data["cost_usd"] == pytest.approx(out.cost_usd)
    assert agent.process() is not None and agent.process().returncode() == 0  # type: ignore[union-attr]
    assert not agent.inject("too late")


@pytest.mark.timeout(120)
def test_inject_reaches_the_model_mid_task(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI
) -> None:
    fake_api.respond = Script(
        [
            Rule(
                "MARK-INJECT",
                [
                    tool("Bash", {"command": "sleep 2; echo slept", "description": "wait"}),
                    lambda r: text(
                        "ANSWER-SEEN" if r.contains("the answer is 42") else "NO-ANSWER"
                    ),
                ],
            ),
            # If the message landed between turns it is a turn of its own: same answer.
            Rule("the answer is 42", [text("ANSWER-SEEN")]),
        ]
    )
    agent = run("MARK-INJECT: run the long command")
    wait_for_tool(agent, "Bash")
    assert agent.inject("CONTEXT: the answer is 42")
    seen_before_final = False

    def check(_: list[AgentEvent]) -> None:
        nonlocal seen_before_final
        if agent.outcome() is None and fake_api.saw("the answer is 42"):
            seen_before_final = True

    out = drive(agent, each=check)
    assert seen_before_final
    assert out.ok and out.summary == "ANSWER-SEEN", out
    informed = [r for r in fake_api.messages_requests() if r.contains("the answer is 42")]
    assert informed and all(r.session_id == out.session_id for r in informed)
    first = fake_api.messages_requests()[0]
    assert first.session_id == out.session_id and not first.contains("the answer is 42")


def wait_for_tool(agent: ClaudeAgent, name: str, timeout: float = 60.0) -> list[AgentEvent]:
    events: list[AgentEvent] = []

    def called() -> bool:
        events.extend(agent.poll())
        assert agent.outcome() is None, agent.outcome()
        return any(e.kind == "tool" and e.data.get("name") == name for e in events)

    wait_until(called, timeout=timeout, interval=0.05)
    return events


@pytest.mark.timeout(120)
def test_resume_continues_the_session(run: Callable[..., ClaudeAgent], fake_api: FakeAPI) -> None:
    fake_api.respond = Script(
        [
            Rule("MARK-FIRST", [text("first run done")]),
            Rule(
                "MARK-SECOND",
                [lambda r: text("remembers" if r.contains("MARK-FIRST") else "forgot")],
            ),
        ]
    )
    first = drive(run("MARK-FIRST: remember this"))
    assert first.ok and first.session_id
    n = len(fake_api.messages_requests())
    second = drive(run("MARK-SECOND: what came before?", resume_session=first.session_id))
    assert second.ok and second.summary == "remembers", second
    assert second.session_id == first.session_id
    later = fake_api.messages_requests()[n:]
    assert later and all(r.contains("MARK-FIRST") and r.contains("first run done") for r in later)
    # The resumed process's cost is its own, not the session's running total.
    assert second.cost_usd == pytest.approx(first.cost_usd)


@pytest.mark.timeout(120)
def test_resume_of_unknown_session_starts_fresh(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI
) -> None:
    fake_api.respond = Script([Rule("MARK-LOST", [text("fresh start")])])
    gone = str(uuid.uuid4())
    events: list[AgentEvent] = []
    out = drive(run("MARK-LOST: go on", resume_session=gone), events=events)
    assert out.ok and out.summary == "fresh start", out
    assert out.session_id and out.session_id != gone
    assert any(e.kind == "info" and "not found" in e.text for e in events)


@pytest.mark.timeout(120)
def test_api_error_gives_is_error_outcome(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI
) -> None:
    fake_api.respond = Script(
        [Rule("MARK-FAIL", [error(400, "invalid_request_error", "scripted")])]
    )
    out = drive(run("MARK-FAIL: this breaks"))
    assert not out.ok and out.error_kind == "is_error", out
    assert "400" in out.summary and out.session_id


@pytest.mark.parametrize(
    ("status", "etype", "kind"),
    [(429, "rate_limit_error", "rate_limit"), (401, "authentication_error", "auth")],
)
def test_a_refused_call_ends_with_the_kind_of_refusal(
    run: Callable[..., ClaudeAgent],
    fake_api: FakeAPI,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    etype: str,
    kind: str,
) -> None:
    """Issue 16: a 429 was taken as any failed attempt; the binary's result says which it is
    in api_error_status and api_error_type, and its retries show as api_retry lines."""
    monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "1")  # gives up after 2 requests, not 11
    fake_api.respond = Script([Rule("MARK-LIMIT", [error(status, etype, "scripted refusal")])])
    events: list[AgentEvent] = []
    out = drive(run("MARK-LIMIT: the API refuses this"), events=events)
    assert not out.ok and out.trouble is not None, out
    assert out.trouble.kind == kind and out.trouble.status == status
    assert out.session_id  # the session to resume once the limit lifts
    if kind == "rate_limit":
        assert any(e.kind == "info" and f"API {status}" in e.text for e in events), events


@pytest.mark.timeout(120)
def test_budget_exceeded(run: Callable[..., ClaudeAgent], fake_api: FakeAPI) -> None:
    fake_api.respond = Script([Rule("MARK-DEAR", [text("pricey", input_tokens=2_000_000)])])
    out = drive(run("MARK-DEAR: spend", budget_usd=0.5))
    assert not out.ok and out.error_kind == "error_max_budget_usd", out
    assert out.cost_usd > 0.5


@pytest.mark.timeout(120)
def test_timeout_stops_the_process_group(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI
) -> None:
    fake_api.respond = Script(
        [
            Rule(
                "MARK-SLOW",
                [
                    tool(
                        "Bash",
                        {
                            "command": "python3 -c 'import time; time.sleep(60)'",
                            "description": "slow",
                        },
                    ),
                    text("x"),
                ],
            )
        ]
    )
    agent = run("MARK-SLOW: take forever", timeout_s=4)
    out = drive(agent)
    assert out.error_kind == "timeout" and not out.ok, out
    assert_group_gone(agent)


@pytest.mark.timeout(120)
def test_suspend_and_resume(
    run: Callable[..., ClaudeAgent], fake_api: FakeAPI, tmp_path: Path
) -> None:
    # The tool waits for the test, so the task cannot end before the suspension is seen.
    go = tmp_path / "go"
    nap = f"until [ -f {go} ]; do sleep 0.05; done; echo slept"
    fake_api.respond = Script(
        [
            Rule(
                "MARK-PAUSE",
                [
                    tool("Bash", {"command": nap, "description": "nap"}),
                    text("woke up"),
                ],
            )
        ]
    )
    agent = run("MARK-PAUSE: nap")
    wait_for_tool(agent, "Bash")
    child = agent.process()
    assert child is not None
    # Suspended again while waiting, as the paused worker does each second: a single SIGSTOP
    # was undone now and then (1 run in ~10 under load), most likely by the SIGCONT the kernel
    # sends an orphaned process group with a stopped member when one of its processes exits.
    wait_until(lambda: (agent.suspend(), suspended(child.pid))[1], timeout=10)
    # While stopped, nothing moves: keep polling for a while, the task must not end.
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        agent.suspend()
        agent.poll()
        assert agent.outcome() is None
        time.sleep(0.05)
    assert suspended(child.pid)
    agent.resume()
    wait_until(lambda: not suspended(child.pid), timeout=10)
    go.touch()
    out = drive(agent)
    assert out.ok and out.summary == "woke up", out


@pytest.mark.timeout(120)
def test_structured_output(run: Callable[..., ClaudeAgent], fake_api: FakeAPI) -> None:
    schema = {"type": "object", "properties": {"steps": {"type": "array"}}, "required": ["steps"]}

    def respond(req: ApiRequest) -> Reply:
        if req.has_tool("StructuredOutput"):
            return structured({"steps": ["a", "b"]})
        return text("no schema offered")

    fake_api.respond = respond
    agent = run("MARK-PLAN: plan", extra_args=("--json-schema", json.dumps(schema)))
    out = drive(agent)
    assert out.ok, out
    assert agent.final_result is not None
    assert agent.final_result["structured_output"] == {"steps": ["a", "b"]}


def test_fake_api_answers_plain_json_count_tokens_and_404(fake_api: FakeAPI) -> None:
    fake_api.respond = Script([Rule("MARK", [tool("Write", {"file_path": "x"}, say="hi")])])

    def post(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        req = urllib.request.Request(
            fake_api.url + path, data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    tools = [{"name": "Write"}]
    msg = {"role": "user", "content": [{"type": "text", "text": "MARK go"}]}
    status, raw = post("/v1/messages", {"model": "m", "messages": [msg], "tools": tools})
    reply = json.loads(raw)
    assert status == 200 and reply["stop_reason"] == "tool_use"
    assert [b["type"] for b in reply["content"]] == ["text", "tool_use"]
    status, raw = post(
        "/v1/messages?beta=true", {"model": "m", "messages": [msg], "tools": tools, "stream": True}
    )
    events = [ln[7:] for ln in raw.decode().splitlines() if ln.startswith("event: ")]
    assert status == 200 and events[0] == "message_start" and events[-1] == "message_stop"
    assert "input_json_delta" in raw.decode() and '"stop_reason": "tool_use"' in raw.decode()
    status, raw = post("/v1/messages/count_tokens?beta=true", {"messages": [msg]})
    assert status == 200 and json.loads(raw)["input_tokens"] > 0
    status, _ = post("/v1/other", {})
    assert status == 404 and fake_api.unknown == ["POST /v1/other"]
    side = post("/v1/messages", {"model": "haiku", "messages": [msg], "max_tokens": 50})
    assert json.loads(side[1])["content"] == [{"type": "text", "text": "Side reply"}]
    assert len(fake_api.messages_requests()) == 2 and fake_api.saw("MARK go")
