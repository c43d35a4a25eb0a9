"""The worker process with the shell backend, driven through its inbox like the master does."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from multibot import mailbox, procs, protocol
from multibot import worker as worker_module
from multibot.heartbeat import read_heartbeat
from multibot.layout import MASTER_ID
from multibot.state import WorkerState
from multibot.store import StateFile
from multibot.worker import Worker, branches
from multibot.worktrees import GitRepo, TaskStart
from tests.helpers import wait_until
from tests.rig import Rig, git_rev, git_show


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()
    # An agent the test suspended must not outlive it.
    pid_file = tmp_path / "home" / "worktrees" / "w1" / "agent.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_a_task_runs_commits_and_reports(rig: Rig) -> None:
    rig.start_worker()
    rig.assign("t1", ["echo hello > out.txt", "multibot report progress 'half way'"])
    started = rig.expect(protocol.StatusUpdate, kind="started")
    assert started.task_id == "t1" and started.generation == 1
    assert rig.expect(protocol.StatusUpdate, progress="half way").sender == "w1"
    done = rig.expect(protocol.TaskComplete)
    p = done.payload
    assert isinstance(p, protocol.TaskComplete)
    assert p.files_changed == ["out.txt"] and p.commit
    assert git_show(rig, p.commit, "out.txt") == "hello\n"
    state = json.loads(rig.home.worker_state("w1").read_text())
    assert state["status"] == "idle" and state["current_task"] is None


def test_a_short_task_costs_one_state_write_a_longer_one_shows_while_it_runs(rig: Rig) -> None:
    rig.start_worker()
    path = rig.home.worker_state("w1")
    rig.assign("quick", [])
    rig.expect(protocol.TaskComplete)
    before = json.loads(path.read_text())
    rig.assign("quick2", [])
    rig.expect(protocol.TaskComplete)
    after = json.loads(path.read_text())
    # Its start was still unwritten when it ended: the end's write says both. (A task with no
    # commands starts and ends in one turn of the worker's loop, whatever the machine's speed.)
    assert after["version"] == before["version"] + 1
    assert after["git"]["branch"] == "multibot/quick2" and after["current_task"] is None
    rig.assign("slow", [f"sleep {worker_module.LAZY_STATE_S * 6}"])
    rig.expect(protocol.StatusUpdate, kind="started")
    state = StateFile(path, WorkerState)  # reads it whole even while the worker writes it
    running = wait_until(lambda: state.read().current_task, 10)
    assert running.task_id == "slow" and state.read().status == "working"
    rig.expect(protocol.TaskComplete)
    assert json.loads(path.read_text())["current_task"] is None


def test_an_assignment_sent_again_runs_once(rig: Rig) -> None:
    """A master that restarted sends again the assignments its task files hold (a task's start
    is written lazily): the worker on that task, or done with it, runs it once, quietly."""
    rig.start_worker()
    go, runs = rig.tmp / "go", rig.tmp / "runs"
    first = rig.assign("dup", [f"echo run >> {runs}", f"until [ -e {go} ]; do sleep 0.05; done"])
    rig.expect(protocol.StatusUpdate, kind="started")
    rig.send(first.payload, task_id="dup")  # again, while it runs
    go.touch()
    rig.expect(protocol.TaskComplete, task_id="dup")
    rig.send(first.payload, task_id="dup")  # and again, once it is done
    rig.assign("after", [])  # handled in order: after both of the above
    rig.expect(protocol.TaskComplete, task_id="after")
    assert runs.read_text() == "run\n"
    assert not rig.received(protocol.ErrorReport), rig.output()
    assert not rig.received(protocol.TaskComplete), "dup was reported twice"


def test_a_question_is_answered_through_the_bus(rig: Rig) -> None:
    rig.start_worker()
    rig.assign("t2", ["multibot ask 'which port?' --timeout 30 > port.txt"])
    q = rig.expect(protocol.Question)
    assert isinstance(q.payload, protocol.Question) and q.payload.question == "which port?"
    assert q.sender == "w1" and q.task_id == "t2" and q.reply_to
    # As the master does: the answer goes to the worker, which passes it on to its agent.
    rig.send(protocol.Answer(answer="8080"), "t2", correlation_id=q.id)
    done = rig.expect(protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    assert git_show(rig, done.payload.commit or "", "port.txt").strip() == "8080"
    memory = json.loads(rig.home.worker_memory("w1").read_text())
    assert any("8080" in n for n in memory["notes"])


def test_a_context_update_reaches_the_running_task(rig: Rig) -> None:
    rig.start_worker()
    rig.assign(
        "t3",
        [
            'until grep -q "use tabs" "$MULTIBOT_CONTEXT_FILE"; do sleep 0.05; done',
            'cp "$MULTIBOT_CONTEXT_FILE" seen.txt',
        ],
    )
    rig.expect(protocol.StatusUpdate, kind="started")
    rig.send(protocol.ContextUpdate(kind="discovery", text="use tabs", source="w2"), "t3")
    done = rig.expect(protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    assert "use tabs" in git_show(rig, done.payload.commit or "", "seen.txt")


def test_status_request_is_answered_without_disturbing_the_task(rig: Rig) -> None:
    rig.start_worker()
    rig.assign("t4", ["sleep 1", "echo ok > ok.txt"])
    rig.expect(protocol.StatusUpdate, kind="started")
    req = rig.send(protocol.StatusRequest())
    reply = rig.expect(protocol.StatusUpdate, kind="status")
    assert reply.correlation_id == req.id
    assert isinstance(reply.payload, protocol.StatusUpdate) and reply.payload.status == "working"
    rig.expect(protocol.TaskComplete)


def test_a_failing_command_is_an_error_message(rig: Rig) -> None:
    rig.start_worker()
    rig.assign("t5", ["echo about to fail", "exit 7"])
    err = rig.expect(protocol.ErrorReport)
    assert isinstance(err.payload, protocol.ErrorReport)
    assert "exit 7" in err.payload.message and "about to fail" in err.payload.message


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_pause_by_hand_edit_stops_and_continues_the_agent(rig: Rig) -> None:
    rig.start_worker()
    counter = rig.home.worktree("w1") / "count.txt"
    rig.assign(
        "t6",
        [
            "echo $$ > agent.pid; for i in $(seq 1 40); do echo $i > count.txt; "
            "sleep 0.05; done; rm agent.pid"
        ],
    )
    rig.expect(protocol.StatusUpdate, kind="started")
    pid = int(
        wait_until(
            lambda: (
                (rig.home.worktree("w1") / "agent.pid").exists()
                and (rig.home.worktree("w1") / "agent.pid").read_text().strip()
            )
        )
    )
    state_path = rig.home.worker_state("w1")
    data = json.loads(state_path.read_text())
    data["paused"] = True
    state_path.write_text(json.dumps(data, indent=2))  # a person's edit, in place
    wait_until(lambda: proc_state(pid) == "T", 5)
    frozen = counter.read_text()
    # While stopped, the counter cannot move: check it over a few worker ticks.
    wait_until(lambda: json.loads(state_path.read_text())["status"] == "paused", 5)
    assert counter.read_text() == frozen and proc_state(pid) == "T"
    data = json.loads(state_path.read_text())
    data["paused"] = False
    state_path.write_text(json.dumps(data, indent=2))
    wait_until(lambda: proc_state(pid) != "T", 5)
    done = rig.expect(protocol.TaskComplete, timeout=30)
    assert isinstance(done.payload, protocol.TaskComplete)
    assert git_show(rig, done.payload.commit or "", "count.txt").strip() == "40"


def test_terminate_commits_work_in_progress_and_reports(rig: Rig) -> None:
    proc = rig.start_worker()
    rig.assign("t7", ["echo draft > draft.txt; sleep 30"])
    rig.expect(protocol.StatusUpdate, kind="started")
    wait_until(lambda: (rig.home.worktree("w1") / "draft.txt").exists())
    rig.send(protocol.Terminate(reason="test"))
    err = rig.expect(protocol.ErrorReport, kind="terminated")
    assert isinstance(err.payload, protocol.ErrorReport) and "committed" in err.payload.message
    assert proc.wait(timeout=10) == 0
    assert git_show(rig, "multibot/t7", "draft.txt") == "draft\n"


def test_an_older_generation_cannot_come_back(rig: Rig) -> None:
    new = rig.start_worker(generation=2)
    wait_until(
        lambda: (
            rig.home.worker_state("w1").exists()
            and json.loads(rig.home.worker_state("w1").read_text())["generation"] == 2
        )
    )
    old = rig.start_worker(generation=1)
    assert old.wait(timeout=20) == 3  # EXIT_REPLACED: it writes nothing and leaves
    assert json.loads(rig.home.worker_state("w1").read_text())["generation"] == 2
    assert new.poll() is None


def test_a_slow_worktree_setup_does_not_stop_the_heartbeat(rig: Rig) -> None:
    # The first task makes the worktree and runs the setup hook (installing packages, say):
    # far longer than the 3 heartbeat intervals after which the master judges a worker dead.
    gate, ran = rig.tmp / "hook-may-end", rig.tmp / "hook-ran"
    slow_setup_first_task(rig, f"until [ -e {gate} ]; do sleep 0.05; done; touch {ran}")

    def seq() -> int:
        hb = read_heartbeat(rig.home.heartbeat("w1"))
        return hb.seq if hb is not None else 0

    first = seq()
    wait_until(lambda: seq() >= first + 8, 20)  # over 5 intervals, still beating
    req = rig.send(protocol.StatusRequest())  # and still reading its inbox
    reply = rig.expect(protocol.StatusUpdate, kind="status")
    assert reply.correlation_id == req.id
    assert isinstance(reply.payload, protocol.StatusUpdate) and reply.payload.status == "working"
    assert not ran.exists() and not rig.received(protocol.TaskComplete)
    gate.touch()
    rig.expect(protocol.StatusUpdate, kind="started")
    done = rig.expect(protocol.TaskComplete).payload
    assert isinstance(done, protocol.TaskComplete) and done.files_changed == ["done.txt"]
    assert ran.exists()


def test_terminate_while_the_branch_is_prepared_reports_and_exits(rig: Rig) -> None:
    hook = rig.tmp / "hook.pid"
    proc = slow_setup_first_task(rig, f"echo $$ > {hook}; sleep 300")
    pid = int(wait_until(lambda: hook.exists() and hook.read_text().strip(), 20))
    rig.send(protocol.Terminate(reason="test"))
    err = rig.expect(protocol.ErrorReport, kind="terminated")
    assert err.task_id == "t9" and isinstance(err.payload, protocol.ErrorReport)
    assert "before it started" in err.payload.message
    assert proc.wait(timeout=10) == 0  # without waiting for the hook
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10)  # which was stopped too


def test_a_hook_left_by_a_killed_worker_is_found_as_a_stray(rig: Rig) -> None:
    hook = rig.tmp / "hook.pid"
    proc = slow_setup_first_task(rig, f"echo $$ > {hook}; sleep 300")
    pid = int(wait_until(lambda: hook.exists() and hook.read_text().strip(), 20))
    proc.kill()  # the worker alone: the hook runs in a session of its own
    proc.wait(timeout=10)
    assert Path(f"/proc/{pid}").exists()
    # What the master runs before starting generation 2 in the pane (kill_old_incarnation).
    assert pid in procs.stray_agents(rig.home, "w1", 2)
    assert pid not in procs.stray_agents(rig.home, "w1", 1)  # not its own generation's
    procs.kill(pid)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or proc_state(pid) == "Z", 10)


def slow_setup_first_task(rig: Rig, hook: str) -> subprocess.Popen[bytes]:
    """Start w1 with a worktree setup hook and give it task t9; return once the hook runs."""
    rig.home.master_config.parent.mkdir(parents=True, exist_ok=True)
    rig.home.master_config.write_text(
        json.dumps({"heartbeat_interval": 0.2, "worktree_setup": hook})
    )
    proc = rig.start_worker()
    payload = protocol.TaskAssignment(
        title="t9",
        description="do t9",
        branch="multibot/t9",
        working_directory=str(rig.home.worktree("w1")),
        commands=["echo done > done.txt"],
        repo=str(rig.git.root),
    )
    rig.send(payload, task_id="t9")
    wait_until(lambda: (rig.home.worktree("w1") / ".git").exists(), 20)  # the hook runs now
    return proc


def run_here(
    w: Worker, rig: Rig, task_id: str, commands: list[str], verify: str | None = None
) -> protocol.Envelope:
    """Give an in-process worker a task as the master does (it checks out the branch itself)."""
    payload = protocol.TaskAssignment(
        title=task_id,
        description=f"do {task_id}",
        branch=f"multibot/{task_id}",
        working_directory=str(rig.home.worktree("w1")),
        commands=commands,
        verify=verify,
        repo=str(rig.git.root),
    )
    w.handle(protocol.make(payload, sender=MASTER_ID, recipient="w1", task_id=task_id))

    def ended() -> protocol.Envelope | None:
        w.step()
        done = rig.received(protocol.TaskComplete) + rig.received(protocol.ErrorReport)
        return next((m for m in done if m.task_id == task_id), None)

    m = wait_until(ended, 20)
    rig.got.remove(m)
    return m


def test_a_tidy_worker_starts_its_next_branch_the_quick_way(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick: list[tuple[str | None, TaskStart | None]] = []  # (clean_at, what it made)
    original = GitRepo.quick_start

    def spy(
        self: GitRepo, worktree: Path, task_id: str, clean_at: str | None = None
    ) -> TaskStart | None:
        quick.append((clean_at, original(self, worktree, task_id, clean_at)))
        return quick[-1][1]

    monkeypatch.setattr(GitRepo, "quick_start", spy)
    wt = rig.home.worktree("w1")
    tip = git_rev(rig, "multibot/integration")
    w = Worker(rig.home, "w1", generation=1, out=io.StringIO())
    try:
        w.register()
        first = run_here(w, rig, "t1", ["echo hello > out.txt"]).payload
        assert isinstance(first, protocol.TaskComplete) and first.files_changed == ["out.txt"]
        assert quick == []  # a new process looks carefully (and makes the worktree)

        # Moments after t1's end found it all committed: that check stands, git is not asked.
        nothing = run_here(w, rig, "t2", ["true"]).payload
        assert quick == [(first.commit, TaskStart("multibot/t2", tip))]
        assert isinstance(nothing, protocol.TaskComplete)
        assert nothing.files_changed == [] and nothing.commit == tip

        # Something left a file in the worktree between tasks (a person, long enough after
        # the last check that `git status` looks again).
        (wt / "stray.txt").write_text("left behind\n")
        with monkeypatch.context() as m:
            m.setattr(branches, "CLEAN_TRUST_S", 0.0)
            refused = run_here(w, rig, "t3", ["true"]).payload
        assert quick[-1] == (None, None)
        assert isinstance(refused, protocol.ErrorReport) and refused.kind == "git"
        assert "uncommitted changes (stray.txt)" in refused.message
        (wt / "stray.txt").unlink()

        # After an error the next start is careful; after that one ends well, quick again.
        assert isinstance(run_here(w, rig, "t4", ["true"]).payload, protocol.TaskComplete)
        assert len(quick) == 2
        commits = run_here(
            w, rig, "t5", ["echo mine > mine.txt && git add mine.txt && git commit -qm mine"]
        ).payload
        assert len(quick) == 3 and quick[-1][0] == tip and quick[-1][1] is not None
        assert isinstance(commits, protocol.TaskComplete) and commits.files_changed == ["mine.txt"]
        assert commits.commit == git_rev(rig, "multibot/t5") != tip
        assert git_show(rig, "multibot/t5", "mine.txt") == "mine\n"
        left = run_here(w, rig, "t6", ["echo draft > draft.txt"]).payload
        assert isinstance(left, protocol.TaskComplete) and left.files_changed == ["draft.txt"]
        assert left.commit == git_rev(rig, "multibot/t6") != tip

        # A task with a verify command is vouched for like any other: the master runs the
        # command in a worktree of its own, on the task's commit, never in this one.
        run_here(w, rig, "t7", ["true"], verify="make check")
        assert quick[-1][0] == left.commit
        run_here(w, rig, "t8", ["true"])
        assert quick[-1] == (tip, TaskStart("multibot/t8", tip))  # t7 left it at the tip
    finally:
        w.agent.stop(1.0)
        w.inbox.close()
        w._log.close()


def test_a_stale_index_lock_in_the_worktree_fails_no_task(rig: Rig) -> None:
    # A git killed mid-command (the agent's, or the worker's own) leaves index.lock behind:
    # every later git there would fail on it. No git runs there now: it is removed.
    plant = 'touch "$(git rev-parse --absolute-git-dir)/index.lock"'
    rig.start_worker()
    rig.assign("t1", ["echo one > one.txt", plant])
    first = rig.expect(protocol.TaskComplete).payload
    assert isinstance(first, protocol.TaskComplete) and first.files_changed == ["one.txt"]
    gitdir = Path(
        subprocess.run(
            ["git", "rev-parse", "--absolute-git-dir"],
            cwd=rig.home.worktree("w1"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    branch = rig.git.start_task(rig.home.worktree("w1"), "t2")
    (gitdir / "index.lock").write_text("")  # and one left between two tasks
    fields = {
        "title": "t2",
        "description": "t2",
        "branch": branch,
        "commands": ["echo two > two.txt"],
    }
    fields["working_directory"] = str(rig.home.worktree("w1"))
    rig.send(protocol.TaskAssignment.model_validate(fields), task_id="t2")
    second = rig.expect(protocol.TaskComplete).payload
    assert isinstance(second, protocol.TaskComplete) and second.files_changed == ["two.txt"]
    assert "stale" in rig.output()


def test_a_child_printing_fast_is_read_a_bounded_share_at_a_time(tmp_path: Path) -> None:
    """Issue 20 item 16: the worker drained every queued line before it came back to its
    heartbeat, so a task printing a million lines got its worker judged dead again and
    again. A drain takes at most LINES_PER_DRAIN lines, and the child waits on its pipe
    once LINES_BUFFERED are read but not taken (memory stays bounded)."""
    from multibot.agents.base import LINES_BUFFERED, LINES_PER_DRAIN, ChildProcess

    child = ChildProcess(["seq", "1", "200000"], cwd=tmp_path, env=dict(os.environ))
    try:
        wait_until(lambda: child.lines.qsize() >= LINES_BUFFERED, 20)
        assert child.returncode() is None  # held by backpressure, not done
        lines, ended = child.drain()
        assert len(lines) == LINES_PER_DRAIN and not ended
        assert lines[:2] == ["1", "2"]
        assert child.lines.qsize() <= LINES_BUFFERED
        total = len(lines)
        while not ended:
            more, ended = child.drain()
            total += len(more)
        assert total == 200_000
    finally:
        child.terminate(1.0)


def test_a_task_that_prints_a_lot_is_logged_up_to_a_cap(rig: Rig) -> None:
    """Issue 20 item 11: 100 MB of output made two logs of 211 MB each."""
    rig.start_worker()
    rig.assign("t1", ["seq 1 2000000", "echo done > done.txt"])  # ~15 MB
    done = rig.expect(protocol.TaskComplete, timeout=90).payload
    assert isinstance(done, protocol.TaskComplete) and done.files_changed == ["done.txt"]
    log = rig.home.log("w1").read_text()
    assert len(log) < worker_module.TASK_OUTPUT_SHOWN + 1_000_000
    assert "is not logged" in log and "lines of output were not logged" in log


def test_a_report_that_cannot_be_sent_is_sent_once_the_disk_has_room(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 3, the worker's side: a TASK_COMPLETE that failed to send (disk full)
    was dropped with a line in the log, and its task stayed running with the master."""
    from multibot.errors import SendError

    w = Worker(rig.home, "w1", generation=1, out=io.StringIO())
    real = mailbox.send
    full = {"on": True}

    def send(home: object, message: protocol.Envelope, **kw: object) -> object:
        if full["on"]:
            raise SendError("cannot deliver: [Errno 28] No space left on device")
        return real(home, message, **kw)  # type: ignore[arg-type]

    try:
        w.register()
        monkeypatch.setattr(mailbox, "send", send)
        w.send(protocol.StatusUpdate(status="working", kind="progress", progress="one"))
        w.send(protocol.StatusUpdate(status="working", kind="progress", progress="two"))
        w.step()
        assert rig.received(protocol.StatusUpdate) == []
        full["on"] = False
        w.step()
        got = [m.payload.progress for m in rig.received(protocol.StatusUpdate)]  # type: ignore[union-attr]
        assert got[-2:] == ["one", "two"]  # in order, once each
        assert w.outbox.unsent == []
    finally:
        w.inbox.close()
        w.heartbeat.close()
        w._log.close()


def test_the_run_s_pause_is_read_off_the_loop_that_beats(rig: Rig) -> None:
    """Issue 20 item 4: every worker read and parsed system-state.json (as big as the run,
    rewritten twice a second) in the loop that beats."""
    import threading

    from multibot.state import SystemState

    w = Worker(rig.home, "w1", generation=1, out=io.StringIO())
    readers: list[str] = []
    real = w.pause.system.read

    def read() -> object:
        readers.append(threading.current_thread().name)
        return real()

    w.pause.system.read = read  # type: ignore[method-assign]
    try:
        w.register()
        f = StateFile(rig.home.system_state, SystemState, default=SystemState)
        f.update(lambda s: s.model_copy(update={"paused": True}))
        wait_until(lambda: (w.step(), w.paused)[1], 10)
        f.update(lambda s: s.model_copy(update={"paused": False}))
        wait_until(lambda: (w.step(), not w.paused)[1], 10)
        assert readers and all(r.startswith("pause-look") for r in readers)
    finally:
        w.pause.close()
        w.inbox.close()
        w.heartbeat.close()
        w._log.close()


def test_forged_orders_are_refused_and_the_real_ones_taken(rig: Rig, tmp_path: Path) -> None:
    """Issue 21: a TERMINATE dropped into w3's inbox with sender "master" made it kill its
    agent; a forged TASK_ASSIGNMENT with a working_directory elsewhere was run there."""
    from multibot import auth

    rig.start_worker(generation=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rig.assign("t1", ['until [ -f "$MULTIBOT_HOME/go" ]; do sleep 0.05; done', "echo 1 > one"])
    rig.expect(protocol.StatusUpdate, kind="started")
    agent = auth.agent_key(rig.keys.worker("w1", 2), "t1")
    stop = protocol.make(protocol.Terminate(), sender=MASTER_ID, recipient="w1", task_id="t1")
    outside = protocol.TaskAssignment(
        title="x",
        description="x",
        branch="multibot/x",
        working_directory=str(elsewhere),
        commands=["touch pwned"],
    )
    run_there = protocol.make(outside, sender=MASTER_ID, recipient="w1", task_id="x")
    forgeries = [
        stop,  # unsigned
        auth.sign(stop, agent, 2, auth.AGENT),  # the agent's own key
        auth.sign(stop, rig.keys.worker("w2", 2), 2),  # another worker's key
        auth.sign(stop.model_copy(update={"sender": "human"}), rig.keys.worker("w1", 2), 2),
        run_there,  # an unsigned assignment, for a folder elsewhere
    ]
    for forged in forgeries:
        mailbox.send(rig.home, forged)
    stale = auth.sign(stop, rig.keys.worker("w1", 1), 1)  # for the incarnation before
    mailbox.send(rig.home, stale)
    wait_until(lambda: len(mailbox.inbox_report(rig.home, "w1").rejected) == len(forgeries) + 1, 20)
    reasons = [r.reason for r in mailbox.inbox_report(rig.home, "w1").rejected]
    assert any("sent before a restart" in r for r in reasons)
    assert any("only the master gives orders" in r for r in reasons)
    (rig.home.root / "go").touch()
    done = rig.expect(protocol.TaskComplete, task_id="t1")  # it was never stopped
    assert isinstance(done.payload, protocol.TaskComplete)
    # A signed assignment for a folder that is not its worktree is refused, and said so.
    rig.send(outside, "x")
    error = rig.expect(protocol.ErrorReport, task_id="x")
    assert isinstance(error.payload, protocol.ErrorReport)
    assert "not w1's worktree" in error.payload.message
    assert not (elsewhere / "pwned").exists()
    # And the real order is still taken.
    rig.send(protocol.Terminate(reason="done"))
    wait_until(lambda: rig.procs[-1].poll() is not None, 20)


def test_a_symlinked_context_file_or_log_is_never_written_through(rig: Rig, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's file\n")
    log = rig.home.log("w1")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.symlink_to(precious)
    refused = rig.start_worker()
    assert refused.wait(timeout=30) != 0
    assert f"{log} is a symbolic link" in rig.outputs[-1].read_text()
    log.unlink()
    context = rig.home.worker_context("w1")
    context.parent.mkdir(parents=True, exist_ok=True)
    context.symlink_to(precious)
    rig.start_worker(generation=2)
    rig.assign("t1", ['cp "$MULTIBOT_CONTEXT_FILE" seen.txt'], context=["use tabs"])
    done = rig.expect(protocol.TaskComplete)
    assert isinstance(done.payload, protocol.TaskComplete)
    assert git_show(rig, done.payload.commit or "", "seen.txt") == "use tabs\n"
    assert precious.read_text() == "the user's file\n"
    assert not context.is_symlink() and not log.is_symlink()


def test_an_assignment_is_judged_by_what_the_worker_is_doing(tmp_path: Path) -> None:
    from multibot.worker.orders import judge_assignment

    tree = tmp_path / "w1"
    tree.mkdir()
    a = protocol.TaskAssignment(
        description="d", branch="multibot/t1", working_directory=str(tree), attempt=2
    )

    def judge(**kw: object) -> str:
        args: dict = {"current": None, "finished": set(), "paused": False, **kw}
        return judge_assignment("w1", tree, "t1", a, **args).action

    assert judge() == "start"
    assert judge(paused=True) == "defer"
    assert judge(current="t1") == "ignore"
    assert judge(finished={("t1", 2)}) == "ignore"
    assert judge(finished={("t1", 1)}) == "start"
    busy = judge_assignment("w1", tree, "t1", a, current="t0", finished=set(), paused=False)
    assert busy.action == "refuse" and busy.error and busy.error.kind == "busy"
    away = a.model_copy(update={"working_directory": str(tmp_path)})
    far = judge_assignment("w1", tree, "t1", away, current="t0", finished=set(), paused=False)
    assert far.error and far.error.kind == "protocol" and not far.error.recoverable
