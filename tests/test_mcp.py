"""multibot's MCP parts without a binary: the JSON-RPC server, the permission rules, the
configured servers and the agent's first output line about them."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from multibot import permissions
from multibot.agents.claude import failed_servers
from multibot.config import MasterConfig
from multibot.errors import AgentError, ConfigError
from multibot.layout import Home
from multibot.mcp import servers
from multibot.mcp.rpc import Server, Tool
from multibot.mcp.tools import FollowUp, Text


def echo_server() -> Server:
    tools = [
        Tool("echo", "say it back", Text, lambda a: f"echo {a.text}"),
        Tool("boom", "fails", FollowUp, lambda a: 1 / 0),
    ]
    return Server("t", "1", tools)


def call(server: Server, name: str, arguments: object) -> dict[str, object]:
    msg = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    answer = server.handle({**msg, "params": {"name": name, "arguments": arguments}})
    assert answer is not None and answer["id"] == 7
    result: dict[str, object] = answer["result"]
    return result


def test_initialize_answers_the_version_asked_for_and_lists_typed_tools() -> None:
    s = echo_server()
    init = s.handle({"id": 1, "method": "initialize", "params": {"protocolVersion": "2025-03-26"}})
    assert init is not None and init["result"]["protocolVersion"] == "2025-03-26"
    assert "tools" in init["result"]["capabilities"]
    assert s.handle({"method": "notifications/initialized"}) is None
    listed = s.handle({"id": 2, "method": "tools/list"})
    assert listed is not None
    echo = listed["result"]["tools"][0]
    assert echo["name"] == "echo" and echo["inputSchema"]["required"] == ["text"]
    assert echo["inputSchema"]["properties"]["text"]["type"] == "string"
    unknown = s.handle({"id": 3, "method": "resources/list"})
    assert unknown is not None and unknown["error"]["code"] == -32601


def test_a_bad_call_is_a_tool_error_that_says_what_is_wrong() -> None:
    s = echo_server()
    assert call(s, "echo", {"text": "hi"}) == {
        "content": [{"type": "text", "text": "echo hi"}],
        "isError": False,
    }
    missing = call(s, "echo", {})
    assert missing["isError"] and "text: Field required" in str(missing["content"])
    extra = call(s, "echo", {"text": "x", "loud": True})
    assert extra["isError"] and "loud" in str(extra["content"])
    nothing = call(s, "nope", {})
    assert nothing["isError"] and "one of echo, boom" in str(nothing["content"])
    crashed = call(s, "boom", {"title": "x"})
    assert crashed["isError"] and "boom failed: division by zero" in str(crashed["content"])


def test_serve_answers_each_line_and_survives_garbage() -> None:
    lines = [
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        "{not json",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "x"}},
            }
        ),
    ]
    out = io.StringIO()
    assert echo_server().serve(io.StringIO("\n".join(lines) + "\n"), out) == 0
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {"jsonrpc": "2.0", "id": 1, "result": {}} in answers
    assert any(a.get("error", {}).get("code") == -32700 for a in answers)
    assert any(a.get("id") == 2 and "echo x" in json.dumps(a) for a in answers)


# -- permissions ------------------------------------------------------------------------------
def test_rules_match_the_tool_and_what_it_works_on_deny_first() -> None:
    allow, deny = ["Bash(npm test*)", "WebFetch"], ["Bash(npm test --publish*)"]
    npm = {"command": "npm test -- -k x"}
    assert permissions.decide(allow, deny, "Bash", npm) == permissions.Decision(
        True, "allowed by the rule Bash(npm test*)"
    )
    publish = {"command": "npm test --publish now"}
    decided = permissions.decide(allow, deny, "Bash", publish)
    assert decided is not None and not decided.allow
    assert permissions.decide(allow, deny, "Bash", {"command": "curl x"}) is None
    assert permissions.decide(allow, deny, "WebFetch", {"url": "https://x"}) is not None
    assert permissions.decide(["Write(/tmp/*)"], [], "Write", {"file_path": "/tmp/a"})
    assert permissions.decide(["Write(/tmp/*)"], [], "Write", {"file_path": "/etc/a"}) is None


def test_an_answer_reads_as_allow_only_when_it_starts_so() -> None:
    assert permissions.verdict("Allow: it only reads").allow
    assert permissions.verdict("yes").allow
    assert not permissions.verdict("deny: it deletes files").allow
    assert not permissions.verdict("I would not allow that").allow
    assert not permissions.verdict("").allow


def test_a_file_tool_may_not_write_outside_the_worktree(tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    (wt / "src").mkdir(parents=True)
    (wt / "out").symlink_to(tmp_path)
    assert permissions.outside("Write", {"file_path": str(wt / "src/a.py")}, wt) is None
    assert permissions.outside("Edit", {"file_path": "src/a.py"}, wt) is None  # relative
    for escape in (str(tmp_path / "x"), str(wt / ".." / "x"), str(wt / "out" / "x"), "~/.bashrc"):
        denied = permissions.outside("Write", {"file_path": escape}, wt)
        assert denied is not None and not denied.allow, escape
    assert permissions.outside("Bash", {"command": "echo > /x"}, wt) is None  # the sandbox's


def test_a_bad_rule_in_config_is_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match="'Bash\\(x' is not Tool or Tool"):
        MasterConfig(permission_allow=("Bash(x",))


# -- configured servers -----------------------------------------------------------------------
def configure(home: Home, name: str, data: object) -> Path:
    home.mcp_configs_dir.mkdir(parents=True, exist_ok=True)
    path = home.mcp_configs_dir / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_servers_get_the_task_values_and_keep_secrets_named(tmp_path: Path) -> None:
    home = Home(tmp_path)
    server = {
        "command": "sh",
        "args": ["-c", "serve {branch}"],
        "env": {"WT": "{worktree}", "TOKEN": "${PROBE_TOKEN}", "OPT": "${OPTIONAL:-x}"},
    }
    configure(home, "probe.json", {"mcpServers": {"probe": server}, "workers": ["w1"]})
    configure(home, "gh.json", {"mcpServers": {"gh": {"command": "sh"}}, "capabilities": ["gh"]})
    got = servers.for_agent(
        home,
        "w1",
        "t1",
        worktree="/wt",
        branch="multibot/t1",
        capabilities=[],
        env={"PATH": "/usr/bin:/bin", "PROBE_TOKEN": "s3cret"},
    )
    config = json.loads(got.config)["mcpServers"]
    assert set(config) == {"multibot", "probe"}  # gh: only for tasks that need it
    assert config["probe"]["args"] == ["-c", "serve multibot/t1"]
    assert config["probe"]["env"] == {
        "WT": "/wt",
        "TOKEN": "${PROBE_TOKEN}",
        "OPT": "${OPTIONAL:-x}",
    }
    assert "s3cret" not in got.config
    assert got.sources["probe"].endswith("probe.json")
    other = servers.for_agent(
        home, "w2", "t1", worktree="/wt", branch="b", capabilities=["gh"], env={"PATH": "/bin"}
    )
    assert set(json.loads(other.config)["mcpServers"]) == {"multibot", "gh"}


def test_a_server_that_cannot_start_is_named_before_the_agent_starts(tmp_path: Path) -> None:
    home = Home(tmp_path)
    path = configure(home, "x.json", {"mcpServers": {"x": {"command": "no-such-mcp-server"}}})
    args = dict(worktree="/wt", branch="b", capabilities=[], env={"PATH": "/bin"})
    with pytest.raises(AgentError, match=f"MCP server 'x' \\({path}\\): command 'no-such-mcp"):
        servers.for_agent(home, "w1", "t1", **args)  # type: ignore[arg-type]
    configure(home, "x.json", {"mcpServers": {"x": {"command": "sh", "env": {"K": "${NOPE}"}}}})
    with pytest.raises(AgentError, match=r"MCP server 'x' .* needs NOPE in the environment"):
        servers.for_agent(home, "w1", "t1", **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ('{"mcpServers": {', "x.json:1:"),
        ({"servers": {}}, 'expected {"mcpServers"'),
        ({"mcpServers": {"multibot": {"command": "sh"}}}, "multibot's own server"),
        ({"mcpServers": {"y": {"args": []}}}, "'y': needs a command"),
        ({"mcpServers": {"y": {"command": "sh", "args": "-c"}}}, "args must be a list"),
        ({"mcpServers": {}, "worker": ["w1"]}, "unknown keys ['worker']"),
    ],
)
def test_a_broken_config_file_is_an_error_naming_the_file(
    tmp_path: Path, data: object, says: str
) -> None:
    home = Home(tmp_path)
    configure(home, "x.json", data)
    with pytest.raises(ConfigError, match=r"x\.json") as err:
        servers.load(home.mcp_configs_dir)
    assert says in str(err.value)


def test_a_server_that_failed_to_start_is_named_from_the_first_line() -> None:
    init = {
        "type": "system",
        "subtype": "init",
        "mcp_servers": [
            {"name": "multibot", "status": "connected"},
            {"name": "probe", "status": "failed"},
        ],
    }
    sources = {"multibot": "multibot's own", "probe": "config/mcp-configs/p.json"}
    said = failed_servers(init, sources)
    assert said is not None and "'probe' (config/mcp-configs/p.json) failed to start" in said
    assert failed_servers({**init, "mcp_servers": init["mcp_servers"][:1]}, sources) is None
    assert failed_servers({"type": "assistant"}, sources) is None


# -- the tools, with the test as the worker -------------------------------------------------------
def test_an_ask_and_a_permission_request_wait_at_once_and_get_their_own_answers(
    tmp_path: Path,
) -> None:
    import threading

    from multibot import auth, mailbox, protocol, voice
    from multibot.mcp.tools import AgentTools, Ask, PermissionAsk

    home = Home(tmp_path)
    key = auth.WorkerKey("w1", 1, auth.create_keys(home).worker("w1", 1))
    mailbox.create_inbox(home, "w1")
    agent = voice.AgentVoice("w1", "t1", 1, auth.agent_key(key.key, "t1"))
    tools = AgentTools(home, agent, permission_timeout=20)
    got: dict[str, str] = {}
    asking = [
        threading.Thread(
            target=lambda: got.update(ask=tools.ask(Ask(question="port?", timeout_s=20)))
        ),
        threading.Thread(
            target=lambda: got.update(
                permission=tools.permission(
                    PermissionAsk(tool_name="Bash", input={"command": "make deploy"})
                )
            )
        ),
    ]
    for t in asking:
        t.daemon = True  # a failing test must not wait for them at exit
        t.start()
    seen: list[protocol.Envelope] = []
    with mailbox.Receiver(home, "w1", verify=lambda m: key.check(m, "t1")) as worker:
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:  # both wait now, neither answered
            for m in worker.fetch():
                worker.done(m)
                seen.append(m)
            worker.wait(0.1)
    assert len(seen) == 2 and len({m.reply_to for m in seen}) == 2
    for m in seen:  # answered as the worker passes the master's answers on
        p = m.payload
        assert isinstance(p, protocol.Question)
        text = "deny: not today" if p.permission else "8080"
        answer = protocol.make(
            protocol.Answer(answer=text),
            sender="w1",
            recipient=m.reply_to or "",
            task_id="t1",
            correlation_id=m.id,
        )
        mailbox.send(home, key.sign_for_agent(answer, "t1"))
    for t in asking:
        t.join(timeout=20)
    assert got["ask"] == "8080"
    assert json.loads(got["permission"]) == {
        "behavior": "deny",
        "message": "the master said no: deny: not today",
    }
    assert not [p for p in home.inboxes_dir.iterdir() if p.name.startswith("ask-")]


def test_status_of_task_tells_the_task_and_its_dependencies(tmp_path: Path) -> None:
    from multibot import auth, voice
    from multibot.mcp.rpc import ToolFailed
    from multibot.mcp.tools import AgentTools, TaskQuery
    from multibot.state import PlanTask, TaskRecord
    from multibot.store import StateFile

    home = Home(tmp_path)
    home.tasks_dir.mkdir(parents=True)
    for tid, status, deps in (("a", "merged", []), ("b", "running", ["a"])):
        rec = TaskRecord(
            task=PlanTask(id=tid, title=f"do {tid}", description=tid, dependencies=deps),
            status=status,
            attempts=1,
        )
        StateFile(home.task(tid), TaskRecord, default=lambda r=rec: r).update(lambda r: r)
    agent = voice.AgentVoice("w1", "b", 1, auth.agent_key(b"k" * 32, "b"))
    tools = AgentTools(home, agent, permission_timeout=1)
    mine = json.loads(tools.status_of_task(TaskQuery()))
    assert mine["id"] == "b" and mine["status"] == "running" and mine["attempts"] == 1
    assert mine["dependencies"] == [{"id": "a", "status": "merged"}]
    assert json.loads(tools.status_of_task(TaskQuery(task_id="a")))["status"] == "merged"
    with pytest.raises(ToolFailed, match="no task 'zz'"):
        tools.status_of_task(TaskQuery(task_id="zz"))
    with pytest.raises(ToolFailed, match="task id"):
        tools.status_of_task(TaskQuery(task_id="../x"))
