"""Permission requests with the real claude binary everywhere, against the fake Messages API.

Workers may not use Bash (it is not in their allow-list, and the sandbox, which would allow it,
is off), so each agent's Bash call goes to the permission tool of its multibot MCP server, and
from there to the master. One is allowed by a rule of master-config.json, one is denied by a
rule, and one no rule names: it becomes a question for the person, answered by a hand edit of
its file in state/questions/. Each agent sees the decision; the run merges all three tasks.
Under permission_policy auto, Opus (scripted, in the planner's session) decides one no rule
names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import ApiRequest, FakeAPI, Reply, Rule, Script, structured, text, tool

from multibot.status import render, snapshot
from multibot.timeline import read_timeline
from tests.helpers import wait_until
from tests.test_run_claude import RUN_TIMEOUT, Run, end_run, make_run, master_env, workdir

pytestmark = pytest.mark.timeout(300)

COMMANDS = {
    # Not a bare `echo > file`: acceptEdits lets that write in the working directory.
    "t1": "sh -c 'echo PERM-T1 > t1.txt'",
    "t2": "sh -c 'echo PERM-T2 > t2.txt'",
    "t3": "sh -c 'echo PERM-T3 > t3.txt'",
}
VERIFY = {
    "t1": "grep -q PERM-T1 t1.txt",
    "t2": "grep -q 'said no' t2.txt",
    "t3": "grep -q PERM-T3 t3.txt",
}
PLAN = {
    "goal": "Write three files with shell commands.",
    "tasks": [
        {
            "id": tid,
            "title": f"Write {tid}",
            "description": f"Run `{COMMANDS[tid]}`.",
            "dependencies": [],
            "owns": [f"{tid}.txt"],
            "model": "haiku",
            "verify": VERIFY[tid],
            "estimate_minutes": 5,
            "priority": 0,
        }
        for tid in COMMANDS
    ],
    "verify": None,
}


def bash(tid: str) -> Reply:
    return tool("Bash", {"command": COMMANDS[tid], "description": "write the file"})


def keep_denial(r: ApiRequest) -> Reply:
    """Denied, the agent writes down what it was told instead."""
    path = workdir(r) / "t2.txt"
    return tool("Write", {"file_path": str(path), "content": r.last_tool_result() + "\n"})


WORKERS = Script(
    [
        Rule("# Task t1", [bash("t1"), lambda r: text(f"t1: {r.last_tool_result()}")]),
        Rule("# Task t2", [bash("t2"), keep_denial, text("t2: wrote down the denial")]),
        Rule("# Task t3", [bash("t3"), lambda r: text(f"t3: {r.last_tool_result()}")]),
    ]
)
OPUS = Script([Rule("GOAL-MARKER", [structured(PLAN)])])


# No Bash for the workers, and no sandbox, which would allow it: every Bash use is asked.
UNALLOWED_BASH = {"allowed_tools": ["Read", "Write"], "sandbox": False}


def model(opus: Script) -> Any:
    """Opus when the structured-output tool is offered (planning, answers), else a worker."""

    def respond(r: ApiRequest) -> Reply:
        if not r.is_side and r.has_tool("StructuredOutput"):
            return opus(r)
        return WORKERS(r)

    return respond


@pytest.fixture
def run(fake_api: FakeAPI, claude_bin: Path, tmp_path: Path) -> Iterator[Run]:
    fake_api.respond = model(OPUS)
    config = {
        "max_workers": 3,
        "permission_allow": ["Bash(sh -c 'echo PERM-T1*)"],
        "permission_deny": ["Bash(sh -c 'echo PERM-T2*)"],
        "permission_policy": "human",
    }
    r = make_run(fake_api, claude_bin, tmp_path, config, UNALLOWED_BASH)
    try:
        yield r
    finally:
        end_run(r)


def escalated(run: Run) -> tuple[Path, dict[str, Any]] | None:
    for path in run.home.questions_dir.glob("*.json"):
        q = json.loads(path.read_text())
        if q.get("permission") and q.get("escalated") and q.get("status") == "pending":
            return path, q
    return None


def test_permission_requests_are_decided_by_rule_and_by_the_person(run: Run) -> None:
    master = run.start(master_env(run))
    try:
        found = wait_until(lambda: escalated(run) or master.poll() is not None, RUN_TIMEOUT)
    except AssertionError:
        pytest.fail(f"no permission request reached the person\n{run.dump()}")
    if not isinstance(found, tuple):
        pytest.fail(f"the master ended first\n{run.dump()}")
    path, q = found
    shown = snapshot(run.home)
    assert [w["permission"] for w in shown["questions"] if w["id"] == q["id"]] == [True]
    assert f"{q['id']}  🔐 w" in render(shown)
    assert q["task_id"] == "t3" and q["permission"]["tool"] == "Bash"
    assert q["permission"]["input"]["command"] == COMMANDS["t3"]
    q["answer"] = "allow: fine by me"
    path.write_text(json.dumps(q, indent=2))  # the person's hand edit

    assert master.wait(timeout=RUN_TIMEOUT) == 0, run.dump()
    assert run.git("show", "multibot/integration:t1.txt") == "PERM-T1\n"
    denied = run.git("show", "multibot/integration:t2.txt")
    assert "the master said no: deny: denied by the rule Bash(sh -c 'echo PERM-T2*)" in denied
    assert run.git("show", "multibot/integration:t3.txt") == "PERM-T3\n"

    timeline = list(read_timeline(run.home.timeline))
    events = [e for e in timeline if str(e.get("event")).startswith("permission")]
    decided = {(e["event"], e.get("answered_by")) for e in events if e["event"] != "permission"}
    assert decided == {
        ("permission-allowed", "policy"),
        ("permission-denied", "policy"),
        ("permission-allowed", "human"),
    }, events
    assert sum(e["event"] == "permission" for e in events) == 3
    answered = json.loads(path.read_text())
    assert answered["status"] == "delivered" and answered["answered_by"] == "human"


def test_a_permission_request_no_rule_names_is_decided_by_opus(
    fake_api: FakeAPI, claude_bin: Path, tmp_path: Path
) -> None:
    plan = {**PLAN, "tasks": PLAN["tasks"][2:]}  # t3 alone: no rule names its command
    opus = Script(
        [
            Rule("[multibot question", [structured({"answer": "allow: it only writes t3.txt"})]),
            Rule("GOAL-MARKER", [structured(plan)]),
        ]
    )
    fake_api.respond = model(opus)
    r = make_run(fake_api, claude_bin, tmp_path, {"permission_policy": "auto"}, UNALLOWED_BASH)
    try:
        r.run_to_success(master_env(r))
        assert r.git("show", "multibot/integration:t3.txt") == "PERM-T3\n"
        timeline = list(read_timeline(r.home.timeline))
        (allowed,) = [e for e in timeline if e.get("event") == "permission-allowed"]
        assert allowed["answered_by"] == "opus" and "it only writes t3.txt" in allowed["text"]
        asked = [q for q in fake_api.requests if q.contains("[multibot question")]
        assert asked and asked[0].contains("sh -c 'echo PERM-T3 > t3.txt'")
    finally:
        end_run(r)
