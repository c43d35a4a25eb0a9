"""multibot's MCP tools with the real claude binary and the fake API: the worker process
(as tests/test_worker_claude.py, the test playing the master), its agent's MCP servers, and
what a person types into its tmux pane."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeapi import ApiRequest, FakeAPI, Reply, Rule, Script, text, tool

from multibot import protocol
from tests.helpers import kill_tmux_server, new_socket, wait_until
from tests.rig import Rig, expect, write_template

pytestmark = pytest.mark.timeout(150)

PROBE = Path(__file__).with_name("mcp_probe.py")
ROOT = Path(__file__).resolve().parent.parent


def main_requests(fake: FakeAPI) -> list[ApiRequest]:
    return fake.messages_requests()


def test_the_agent_reports_and_asks_with_mcp_tools_without_bash(
    rig: Rig, fake_api: FakeAPI, claude_bin: Path
) -> None:
    write_template(rig, str(claude_bin), allowed_tools=["Read"])  # no Bash: not mute
    fake_api.respond = Script(
        [
            Rule(
                "MARK-MCP",
                [
                    tool("mcp__multibot__report_discovery", {"text": "MCP-DISCOVERY"}),
                    tool("mcp__multibot__ask", {"question": "which port?", "timeout_s": 60}),
                    lambda r: text(f"port is {r.last_tool_result()}"),
                ],
            )
        ]
    )
    rig.start_worker()
    rig.assign("t1", description="MARK-MCP: find out the port")
    news = expect(rig, protocol.StatusUpdate, kind="discovery")
    assert isinstance(news.payload, protocol.StatusUpdate)
    assert news.payload.progress == "MCP-DISCOVERY"
    assert news.sender == "w1" and news.task_id == "t1"
    q = expect(rig, protocol.Question)
    assert isinstance(q.payload, protocol.Question) and q.payload.question == "which port?"
    assert q.task_id == "t1" and q.payload.permission is None
    rig.send(protocol.Answer(answer="PORT-4242"), "t1", correlation_id=q.id)
    done = expect(rig, protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    assert done.payload.summary == "port is PORT-4242", rig.output()
    prompt = main_requests(fake_api)[0].conversation_text()
    assert "mcp__multibot__ask" in prompt and "multibot ask" not in prompt
    memory = json.loads(rig.home.worker_memory("w1").read_text())
    assert memory["discoveries"] == ["MCP-DISCOVERY"]


def test_a_configured_server_starts_with_the_workers_values(
    rig: Rig, fake_api: FakeAPI, claude_bin: Path
) -> None:
    rig.env["PROBE_SECRET"] = "SECRET-7781"
    rig.home.mcp_configs_dir.mkdir(parents=True)
    server = {
        "command": sys.executable,
        "args": [str(PROBE), "--branch", "{branch}"],
        "env": {
            "PROBE_WORKTREE": "{worktree}",
            "PROBE_TASK": "{task_id}",
            "PROBE_SECRET": "${PROBE_SECRET}",
            "PYTHONPATH": str(ROOT),
        },
    }
    (rig.home.mcp_configs_dir / "probe.json").write_text(
        json.dumps({"mcpServers": {"probe": server}})
    )
    fake_api.respond = Script(
        [Rule("MARK-PROBE", [tool("mcp__probe__whoami", {}), lambda r: text(r.last_tool_result())])]
    )
    rig.start_worker()
    rig.assign("t1", description="MARK-PROBE: who is there")
    done = expect(rig, protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    seen = json.loads(done.payload.summary)
    assert seen["argv"] == ["--branch", done.payload.branch]
    assert seen["worktree"] == str(rig.home.worktree("w1")) and seen["task"] == "t1"
    assert seen["secret_sha"] == hashlib.sha256(b"SECRET-7781").hexdigest()[:16]
    written = [p for p in rig.home.root.rglob("*") if p.is_file()]
    assert not [p for p in written if b"SECRET-7781" in p.read_bytes()]


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("no-such-mcp-server", "command 'no-such-mcp-server' not found"),
        ("false", "failed to start"),
    ],
)
def test_a_broken_server_is_a_startup_error_naming_it(
    rig: Rig, fake_api: FakeAPI, command: str, says: str
) -> None:
    rig.home.mcp_configs_dir.mkdir(parents=True)
    config = rig.home.mcp_configs_dir / "broken.json"
    config.write_text(json.dumps({"mcpServers": {"broken": {"command": command}}}))
    fake_api.respond = Script([Rule("MARK-BROKEN", [text("should not matter")])])
    rig.start_worker()
    rig.assign("t1", description="MARK-BROKEN: anything")
    err = expect(rig, protocol.ErrorReport)
    assert isinstance(err.payload, protocol.ErrorReport)
    assert err.payload.kind == "startup" and not err.payload.recoverable
    assert "MCP server 'broken'" in err.payload.message and str(config) in err.payload.message
    assert says in err.payload.message


# -- the pane -------------------------------------------------------------------------------------
@pytest.fixture
def tmux_socket() -> Iterator[str]:
    sock = new_socket()
    yield sock
    kill_tmux_server(sock)


def pane_text(sock: str) -> str:
    done = subprocess.run(
        ["tmux", "-L", sock, "capture-pane", "-p", "-J", "-S", "-200", "-t", "w1"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def type_into(sock: str, line: str) -> None:
    subprocess.run(["tmux", "-L", sock, "send-keys", "-t", "w1", "-l", line], check=True)
    subprocess.run(["tmux", "-L", sock, "send-keys", "-t", "w1", "Enter"], check=True)


def test_lines_typed_into_the_pane_reach_the_agent(
    rig: Rig, fake_api: FakeAPI, tmux_socket: str
) -> None:
    def heard(r: ApiRequest) -> Reply:
        return text("HEARD-PERSON" if r.contains("please also add c.txt") else "NO-PERSON")

    fake_api.respond = Script(
        [
            Rule(
                "MARK-TYPE",
                [
                    lambda r: text("KEPT-SEEN" if r.contains("KEPT-LINE-55") else "KEPT-MISSING"),
                ],
            ),
            Rule(
                "MARK-LISTEN",
                [tool("Bash", {"command": "sleep 4; echo slept", "description": "wait"}), heard],
            ),
        ]
    )
    argv = [sys.executable, "-m", "multibot", "--home", str(rig.home.root), "worker"]
    argv += ["--id", "w1", "--backend", "claude", "--generation", "1"]
    env = {**os.environ, **rig.env}
    tmux, pane = ["tmux", "-L", tmux_socket], shlex.join(argv)
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "t", "-n", "w1", "-x", "200", "-y", "50", pane],
        env=env,
        check=True,
    )
    wait_until(lambda: "type a line and Enter" in pane_text(tmux_socket), timeout=30)
    type_into(tmux_socket, "KEPT-LINE-55")  # no task yet: kept for the next
    wait_until(lambda: "kept for the next task" in pane_text(tmux_socket), timeout=10)
    rig.assign("t1", description="MARK-TYPE: say what you were told")
    first = expect(rig, protocol.TaskComplete)
    assert isinstance(first.payload, protocol.TaskComplete)
    assert first.payload.summary == "KEPT-SEEN", pane_text(tmux_socket)

    asked = len(main_requests(fake_api))
    rig.assign("t2", description="MARK-LISTEN: wait, then listen")
    wait_until(lambda: len(main_requests(fake_api)) > asked, timeout=90)  # its sleep runs
    type_into(tmux_socket, "hello worker, please also add c.txt")
    wait_until(lambda: "to the agent: hello worker" in pane_text(tmux_socket), timeout=10)
    done = expect(rig, protocol.TaskComplete, task_id="t2")
    assert isinstance(done.payload, protocol.TaskComplete)
    assert done.payload.summary == "HEARD-PERSON", pane_text(tmux_socket)
    said = [m.payload for m in rig.received(protocol.StatusUpdate)]
    person = [
        p.progress for p in said if isinstance(p, protocol.StatusUpdate) and p.kind == "person"
    ]
    assert person == ["KEPT-LINE-55", "hello worker, please also add c.txt"]
