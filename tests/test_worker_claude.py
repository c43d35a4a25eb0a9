"""The worker process with the Claude backend: the real worker, the real claude, a fake API.

Each test plays the master: it writes the worker template, starts `multibot worker --backend
claude` as a subprocess, sends it messages through its inbox and reads the master inbox. The
fake Messages API is the model; it records every request, so a test can check what the model
saw and in which session.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakeapi import ApiRequest, FakeAPI, Reply, Rule, Script, error, text, tool

from multibot import permissions, procs, protocol
from tests.helpers import wait_until
from tests.rig import Rig, expect, git_rev, git_show, processes_under

pytestmark = pytest.mark.timeout(120)

TASK_S = 90.0  # how long a scripted task may take end to end (the binary is slow to start)


def worker_state(rig: Rig) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(rig.home.worker_state("w1").read_text())
    return data


def main_requests(fake: FakeAPI) -> list[ApiRequest]:
    return fake.messages_requests()


def test_write_task_commits_and_reports(rig: Rig, fake_api: FakeAPI) -> None:
    target = rig.home.worktree("w1") / "hello.txt"
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
    rig.start_worker()
    rig.assign("t1", description="MARK-WRITE: create hello.txt")
    started = expect(rig, protocol.StatusUpdate, kind="started")
    assert started.task_id == "t1"
    done = expect(rig, protocol.TaskComplete)
    p = done.payload
    assert isinstance(p, protocol.TaskComplete)
    assert done.task_id == "t1" and done.generation == 1
    assert p.summary == "Wrote hello.txt." and p.branch == "multibot/t1"
    assert p.files_changed == ["hello.txt"] and p.commit
    assert git_show(rig, p.commit, "hello.txt") == "hello world\n"
    assert git_show(rig, "multibot/t1", "hello.txt") == "hello world\n"
    assert p.cost_usd > 0 and p.tokens.input >= 200 and p.tokens.output > 0
    assert p.turns == 2 and p.duration_s > 0
    assert p.session_id and all(r.session_id == p.session_id for r in main_requests(fake_api))
    state = worker_state(rig)
    assert state["sessions"]["t1"] == p.session_id == state["session_id"]
    assert state["status"] == "idle" and state["current_task"] is None


def test_a_question_goes_to_the_master_and_the_answer_to_the_model(
    rig: Rig, fake_api: FakeAPI
) -> None:
    def answered(r: ApiRequest) -> Reply:
        results = r.tool_results()
        return text(f"port is {results[-1].strip()}" if results else "no tool result")

    ask = 'multibot ask "which port?" --timeout 30'
    fake_api.respond = Script(
        [Rule("MARK-ASK", [tool("Bash", {"command": ask, "description": "ask"}), answered])]
    )
    rig.start_worker()
    rig.assign("t2", description="MARK-ASK: find out the port")
    q = expect(rig, protocol.Question)
    assert isinstance(q.payload, protocol.Question) and q.payload.question == "which port?"
    assert q.sender == "w1" and q.task_id == "t2" and q.reply_to
    asked = len(main_requests(fake_api))
    assert not fake_api.saw("PORT-4242")
    rig.send(protocol.Answer(answer="PORT-4242"), "t2", correlation_id=q.id)  # as the master
    done = expect(rig, protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    after = main_requests(fake_api)[asked:]
    assert after and "PORT-4242" in after[0].tool_results()[-1]
    assert done.payload.summary == "port is PORT-4242"
    assert all(r.session_id == done.payload.session_id for r in after)


def test_a_context_update_reaches_the_model_mid_task(rig: Rig, fake_api: FakeAPI) -> None:
    fake_api.respond = Script(
        [
            Rule(
                "MARK-CTX",
                [
                    tool("Bash", {"command": "sleep 2; echo done", "description": "wait"}),
                    lambda r: text("SAW-CONTEXT" if r.contains("CTX-9137") else "NO-CONTEXT"),
                ],
            ),
            # Landed between turns, the message is a turn of its own: same answer.
            Rule("CTX-9137", [text("SAW-CONTEXT")]),
        ]
    )
    rig.start_worker()
    rig.assign("t3", description="MARK-CTX: wait a little")
    # The model has asked for the slow command: the task is running.
    wait_until(lambda: main_requests(fake_api), timeout=TASK_S)
    rig.send(protocol.ContextUpdate(kind="note", text="use CTX-9137", source="w2"), "t3")
    done = expect(rig, protocol.TaskComplete)
    p = done.payload
    assert isinstance(p, protocol.TaskComplete)
    assert p.summary == "SAW-CONTEXT", rig.output()
    informed = [r for r in main_requests(fake_api) if r.contains("CTX-9137")]
    assert informed and all(r.session_id == p.session_id for r in informed)
    assert informed[0].at < done.sent_at  # the model had it before the task ended
    assert not main_requests(fake_api)[0].contains("CTX-9137")


def test_a_killed_worker_resumes_the_same_session(
    rig: Rig, fake_api: FakeAPI, tmp_path: Path
) -> None:
    running = rig.home.worktree("w1") / "slow.pid"  # where its sandboxed commands may write

    def resumed(r: ApiRequest) -> bool:
        return r.conversation_text().count("MARK-RESUME") >= 2  # the prompt came twice

    fake_api.respond = Script(
        [
            Rule(
                "MARK-RESUME",
                [
                    lambda r: (
                        text("RESUMED-OK")
                        if resumed(r)
                        else tool("Bash", {"command": "echo EARLIER-STEP", "description": "a"})
                    ),
                    lambda r: (
                        text("RESUMED-OK")
                        if resumed(r)
                        else tool(
                            "Bash",
                            {"command": f"echo $$ > {running}; sleep 60", "description": "slow"},
                        )
                    ),
                    text("RESUMED-OK"),
                ],
            )
        ]
    )
    first = rig.start_worker(generation=1)
    assignment = rig.assign("t4", description="MARK-RESUME: a long job")
    wait_until(lambda: running.exists() and running.read_text().strip(), timeout=TASK_S)
    state = worker_state(rig)
    session = state["sessions"]["t4"]
    assert session
    before = len(main_requests(fake_api))

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # The worker is gone; its agent lives on in its own process group. Find it as the master
    # does before a restart (by the environment agents inherit), and kill it likewise.
    # Claude Code runs its Bash tool in a process group of its own: killing the agent's group
    # alone would leave the tool's shell behind.
    strays = procs.stray_agents(rig.home, "w1", 2)
    groups = {os.getpgid(pid) for pid in strays}
    assert len(groups) >= 2  # the agent's own group, and its Bash tool's
    for pid in strays:
        procs.kill(pid)
    wait_until(lambda: not processes_under(rig.home.worktree("w1")), timeout=10)

    rig.start_worker(generation=2)
    rig.send(assignment.payload, task_id="t4")  # the master re-sends after a restart
    wait_until(lambda: len(main_requests(fake_api)) > before, timeout=TASK_S)
    again = main_requests(fake_api)[before]
    assert again.session_id == session
    assert again.contains("EARLIER-STEP")  # the earlier conversation is there
    done = expect(rig, protocol.TaskComplete)
    p = done.payload
    assert isinstance(p, protocol.TaskComplete)
    assert done.generation == 2 and p.summary == "RESUMED-OK" and p.session_id == session
    assert all(r.session_id == session for r in main_requests(fake_api))
    assert worker_state(rig)["sessions"]["t4"] == session
    assert "(resuming session)" in rig.home.log("w1").read_text()


def test_an_api_error_is_an_error_message_and_the_worker_goes_idle(
    rig: Rig, fake_api: FakeAPI
) -> None:
    fake_api.respond = Script(
        [Rule("MARK-FAIL", [error(400, "invalid_request_error", "SCRIPTED-BAD-REQUEST")])]
    )
    rig.start_worker()
    rig.assign("t5", description="MARK-FAIL: this breaks")
    err = expect(rig, protocol.ErrorReport)
    p = err.payload
    assert isinstance(p, protocol.ErrorReport)
    assert err.task_id == "t5" and p.kind == "agent" and p.recoverable
    assert "400" in p.message and "SCRIPTED-BAD-REQUEST" in p.message
    state = worker_state(rig)
    assert state["status"] == "idle" and state["current_task"] is None
    req = rig.send(protocol.StatusRequest())
    reply = expect(rig, protocol.StatusUpdate, kind="status")
    assert reply.correlation_id == req.id
    assert isinstance(reply.payload, protocol.StatusUpdate) and reply.payload.status == "idle"


def test_a_missing_claude_binary_is_a_startup_error_not_a_crash(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig(str(tmp_path / "nowhere" / "claude"))
    proc = rig.start_worker()
    rig.assign("t6", description="anything")
    err = expect(rig, protocol.ErrorReport, timeout=30)
    p = err.payload
    assert isinstance(p, protocol.ErrorReport)
    assert err.task_id == "t6" and p.kind == "startup" and not p.recoverable
    assert "claude binary not found" in p.message and "nowhere" in p.message
    assert "worker-template.json" in p.message  # it says how to fix it
    req = rig.send(protocol.StatusRequest())
    reply = expect(rig, protocol.StatusUpdate, timeout=30, kind="status")
    assert reply.correlation_id == req.id and proc.poll() is None
    assert worker_state(rig)["current_task"] is None


def test_an_agent_is_confined_to_its_worktree_and_can_still_work(
    rig: Rig, fake_api: FakeAPI, tmp_path: Path
) -> None:
    """Issue 21 part 1: an agent's Bash commands could write to another worker's worktree, the
    user's checkout, state/ and ~/.bashrc, reach any address, and its Write tool wrote
    anywhere. In the sandbox (on by default) they cannot; it still commits, reports, asks."""
    import http.server
    import threading

    hits: list[str] = []

    class Counting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = rig.home.worktree("w2")
    rig.git.ensure_worktree(other)
    home_dir = Path(rig.env["HOME"])
    targets = {
        "OTHER": other / "x.txt",
        "CHECKOUT": rig.git.root / "x.txt",
        "HOME": home_dir / ".bashrc",
        "STATE": rig.home.state_dir / "x.json",
    }
    probes = "; ".join(
        f"(echo x > {path}) 2>/dev/null && echo WROTE-{name} || echo REFUSED-{name}"
        for name, path in targets.items()
    )
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    fetch = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"
    script = (
        f"{probes}; cat {rig.home.run_key} >/dev/null 2>&1 && echo READ-KEY || echo NO-KEY; "
        f"python3 -c {shlex.quote(fetch)} >/dev/null 2>&1 && echo NET-OK || echo NET-REFUSED; "
        "echo mine > mine.txt && git add mine.txt && git commit -qm mine && echo COMMITTED; "
        # after the commit: HEAD is not where they are, so a move would change them
        "git update-ref refs/heads/main HEAD 2>/dev/null && echo MOVED-MAIN || echo MAIN-SAFE; "
        "git update-ref refs/heads/multibot/integration HEAD 2>/dev/null "
        "&& echo MOVED-INTEGRATION || echo INTEGRATION-SAFE; "
        "multibot report discovery SANDBOXED-NEWS && echo REPORTED"
    )
    outside = rig.git.root / "written-by-tool.txt"
    fake_api.respond = Script(
        [
            Rule(
                "MARK-JAIL",
                [
                    tool("Bash", {"command": script, "description": "probe"}),
                    tool("Write", {"file_path": str(outside), "content": "no\n"}),
                    text("probed"),
                ],
            )
        ]
    )
    main_before = git_rev(rig, "main")
    integration_before = git_rev(rig, "multibot/integration")
    try:
        rig.start_worker()
        rig.assign("t1", description="MARK-JAIL: probe the walls")
        news = expect(rig, protocol.StatusUpdate, kind="discovery")
        # The Write outside is put to the master (the rig), which answers by its rule.
        asked = expect(rig, protocol.Question)
        use = asked.payload.permission  # type: ignore[union-attr]
        assert use is not None and use.tool == "Write"
        ruled = permissions.outside(use.tool, use.input, rig.home.worktree("w1"))
        assert ruled is not None and not ruled.allow
        rig.send(protocol.Answer(answer=f"deny: {ruled.why}"), "t1", correlation_id=asked.id)
        done = expect(rig, protocol.TaskComplete)
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(news.payload, protocol.StatusUpdate)
    assert news.payload.progress == "SANDBOXED-NEWS" and news.task_id == "t1"
    results = "\n".join(r for req in main_requests(fake_api) for r in req.tool_results())
    for name in targets:
        assert f"REFUSED-{name}" in results, results
    for said in ("NO-KEY", "NET-REFUSED", "MAIN-SAFE", "INTEGRATION-SAFE", "COMMITTED", "REPORTED"):
        assert said in results, results
    assert not any(path.exists() for path in targets.values())
    assert hits == [] and not outside.exists()
    assert git_rev(rig, "main") == main_before
    assert git_rev(rig, "multibot/integration") == integration_before
    assert isinstance(done.payload, protocol.TaskComplete)
    assert git_show(rig, done.payload.commit or "", "mine.txt") == "mine\n"
    memory = json.loads(rig.home.worker_memory("w1").read_text())
    assert memory["discoveries"] == ["SANDBOXED-NEWS"]  # remembered by the worker
