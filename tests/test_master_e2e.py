"""The master end to end: shell-backend workers in the panes of a private tmux server.

Each test runs the real `multibot master` as a child process whose workers become panes of a
tmux session on a socket of its own, drives it the way a person would (hand edits of state
files, signals to processes) and ends by counting: every task merged exactly once on the
integration branch, nothing lost, nothing run twice where it matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import pytest

from multibot import auth, mailbox, protocol
from multibot.layout import MASTER_ID, Home, lock_of
from multibot.panes import Tmux
from multibot.timeline import read_timeline
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

SESSION = "mb"
RUN_TIMEOUT = 90.0  # a whole run; each takes 5-20 s on an idle machine
CONFIG: dict[str, Any] = {
    "max_workers": 3,
    # Generous liveness: a loaded 2-core machine may stall a worker for a second or two.
    "heartbeat_interval": 0.5,
    "heartbeat_misses": 8,
    "restart_backoff": 0.2,
    "restart_backoff_max": 1.0,
    "idle_worker_timeout": 2,
    "question_policy": "human",
    "rescan_interval": 0.5,
}
MERGE = re.compile(r"^multibot: merge task (\S+)")


def read_json(path: Path, timeout: float = 10.0) -> Any:
    """Read a state file; a system write hides it for an instant (rename to .prev, link back)."""

    def attempt() -> Any:
        try:
            return [json.loads(path.read_text(encoding="utf-8"))]
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    return wait_until(attempt, timeout, interval=0.01)[0]


def hand_edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a state file the way a person does: load, change, write in place (no lock)."""
    data = read_json(path)
    change(data)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def hold_for(pred: Callable[[], object], seconds: float, what: str) -> None:
    """Check that pred stays true over a period (the only way to see that nothing happens)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), what
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Return whether pid runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def proc_cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def processes_of(home: Path, socket: str) -> list[int]:
    """Return the pids of this user's processes started for a run (cmdline or environment)."""
    needle = str(home).encode()
    ours = {b"MULTIBOT_HOME=" + needle, f"MULTIBOT_TMUX_SOCKET={socket}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in cmdline.split(b"\0") or ours.intersection(environ):
            found.append(int(entry.name))
    return found


class Run:
    """A repository, a home, a private tmux session, and the master run as a child process."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.home = Home(tmp / "home")
        self.marks = tmp / "marks"  # what tasks' commands record, outside every worktree
        self.marks.mkdir()
        self.repo = tmp / "repo"
        self.repo.mkdir()
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=self.repo, check=True)
        (self.repo / "README.md").write_text("test repository\n")
        subprocess.run([*git, "add", "-A"], cwd=self.repo, check=True)
        subprocess.run([*git, "commit", "-qm", "init"], cwd=self.repo, check=True)
        self.home.config_dir.mkdir(parents=True)
        self.home.master_config.write_text(json.dumps(config, indent=2))
        self.home.worker_template.write_text('{"backend": "shell"}\n')
        self.plan_file = tmp / "plan.json"
        self.socket = f"multibot-test-{uuid.uuid4().hex[:12]}"
        self.tmux = Tmux(self.socket, SESSION, config_file="/dev/null")
        self.masters: list[subprocess.Popen[bytes]] = []
        try:
            self.first_pane = self.tmux.ensure_session(SESSION, "exec sleep 86400", cwd=tmp)
        except BaseException:
            self.close()
            raise

    # -- driving ------------------------------------------------------------------------
    def plan(self, tasks: list[dict[str, Any]], **extra: Any) -> None:
        data = {"goal": "end-to-end test", **extra, "tasks": tasks}
        self.plan_file.write_text(json.dumps(data, indent=2))

    def start_master(self, *args: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIBOT_")}
        env.update(MULTIBOT_TMUX_SOCKET=self.socket, MULTIBOT_TMUX_SESSION=SESSION)
        argv = [sys.executable, "-m", "multibot", "--home", str(self.home.root), "master"]
        argv += ["--repo", str(self.repo), "--plan", str(self.plan_file), "--backend", "shell"]
        with open(self.tmp / f"master-{len(self.masters) + 1}.out", "wb") as out:
            proc = subprocess.Popen(
                [*argv, *args],
                cwd=self.tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.masters.append(proc)
        return proc

    def kill_master(self) -> None:
        """SIGKILL the master process alone (its workers live on in their panes)."""
        proc = self.masters[-1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """Wait for the master to end the run; return its exit code."""
        return self.masters[-1].wait(timeout=timeout)

    # -- looking ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return dict(read_json(self.home.system_state))

    def worker(self, wid: str) -> dict[str, Any]:
        return dict(self.state()["workers"].get(wid) or {})

    def task(self, tid: str) -> dict[str, Any]:
        return dict(read_json(self.home.task(tid)))

    def timeline(self) -> list[dict[str, Any]]:
        return list(read_timeline(self.home.timeline))  # a line being written: "damaged-line"

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.timeline() if e.get("event") == kind]

    def has_event(self, kind: str, **match: object) -> bool:
        return any(all(e.get(k) == v for k, v in match.items()) for e in self.events(kind))

    def mark(self, name: str) -> list[str]:
        path = self.marks / name
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def merges(self) -> Counter[str]:
        """Count the merge commits per task on the integration branch."""
        log = subprocess.run(
            ["git", "log", "--format=%s", "multibot/integration"],
            cwd=self.repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return Counter(m.group(1) for line in log.splitlines() if (m := MERGE.match(line)))

    def show(self, path: str, rev: str = "multibot/integration") -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"],
            cwd=self.repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def heartbeat_pid(self, wid: str) -> int:
        return int(read_json(self.home.heartbeat(wid))["pid"])

    def pane_ids(self) -> list[str]:
        return [p.pane_id for p in self.tmux.list_panes()]

    def pane_title(self, pane: str) -> str:
        return next((p.title for p in self.tmux.list_panes() if p.pane_id == pane), "")

    # -- the end ------------------------------------------------------------------------
    def assert_done(self, tasks: list[str], code: int) -> None:
        """Every task merged exactly once, the run done, nothing else merged."""
        assert code == 0, f"master exit code {code}"
        assert self.merges() == Counter({t: 1 for t in tasks})
        assert self.state()["phase"] == "done"
        for t in tasks:
            assert self.task(t)["status"] == "merged", t
        assert {p.stem for p in self.home.tasks_dir.glob("*.json")} == set(tasks)

    def close(self) -> None:
        for proc in self.masters:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its group: a check it runs goes too
            proc.wait()
        try:
            self.tmux.kill_server()
        finally:
            socket_file = Path(
                os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.socket
            )
            socket_file.unlink(missing_ok=True)
            # Last resort, by pid: agents, and the master's checks, run in sessions of their
            # own and outlive panes and masters.
            for pid in processes_of(self.home.root, self.socket):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def dump(self) -> None:
        """Print what the master and workers said (shown by pytest when a test fails)."""
        for out in sorted(self.tmp.glob("master-*.out")):
            print(f"===== {out.name}\n{out.read_text(errors='replace')[-6000:]}")
        for log in sorted(self.home.logs_dir.glob("w*.log")):
            print(f"===== {log.name}\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def make(**config: Any) -> Run:
        run = Run(tmp_path, {**CONFIG, **config})
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.dump()
        run.close()


def stamp(run: Run, name: str) -> str:
    """A command appending the time to a marks file."""
    return f"date +%s.%N >> {run.marks / name}"


def wait_for(run: Run, flag: str) -> str:
    """A command that waits until the test creates the flag file."""
    return f"until [ -f {run.marks / flag} ]; do sleep 0.1; done"


def shell_task(tid: str, *commands: str, **extra: Any) -> dict[str, Any]:
    """A plan entry for the shell backend, titled and described by its id unless told."""
    return {"id": tid, "title": tid, "description": tid, "commands": list(commands), **extra}


def release(run: Run, flag: str) -> None:
    (run.marks / flag).write_text("go\n")


# == 1. dependencies and file conflicts ======================================================
def test_a_graph_with_dependencies_and_file_conflicts_is_merged_once(make_run: Any) -> None:
    run: Run = make_run(max_workers=3)

    def task(tid: str, body: list[str], **extra: Any) -> dict[str, Any]:
        commands = [stamp(run, f"{tid}.start"), *body, stamp(run, f"{tid}.end")]
        return {"id": tid, "title": tid, "description": f"do {tid}", "commands": commands, **extra}

    run.plan(
        [
            task(
                "base1",
                ["mkdir -p lib && echo one > lib/one.txt", "sleep 1"],
                owns=["lib/one.txt"],
                priority=2,
            ),
            task(
                "base2",
                ["mkdir -p lib && echo two > lib/two.txt", "sleep 1"],
                owns=["lib/two.txt"],
                priority=2,
            ),
            # c1 and c2 own the same file: they must never run at the same time.
            task("c1", ["echo c1 >> shared.txt", "sleep 1.5"], owns=["shared.txt"], priority=3),
            task("c2", ["echo c2 >> shared.txt", "sleep 1.5"], owns=["shared.txt"], priority=3),
            task(
                "join",
                ["cat lib/one.txt lib/two.txt > lib/join.txt"],
                owns=["lib/join.txt"],
                dependencies=["base1", "base2"],
                verify="grep -q two lib/join.txt",
            ),
            task(
                "final",
                ["cat lib/join.txt shared.txt > final.txt"],
                owns=["final.txt"],
                dependencies=["join", "c1", "c2"],
            ),
        ]
    )
    run.start_master()
    tasks = ["base1", "base2", "c1", "c2", "join", "final"]
    run.assert_done(tasks, run.finish())

    spans = {t: (float(run.mark(f"{t}.start")[0]), float(run.mark(f"{t}.end")[0])) for t in tasks}
    assert all(len(run.mark(f"{t}.start")) == 1 for t in tasks), "a task ran twice"
    (s1, e1), (s2, e2) = spans["c1"], spans["c2"]
    assert e1 < s2 or e2 < s1, f"c1 {spans['c1']} and c2 {spans['c2']} overlapped"
    assert spans["join"][0] > max(spans["base1"][1], spans["base2"][1])
    assert spans["final"][0] > max(spans["join"][1], e1, e2)
    # Never more than max_workers tasks at once.
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 3
    lines = run.show("shared.txt").split()
    assert sorted(lines) == ["c1", "c2"]
    assert run.show("final.txt").split() == ["one", "two", *lines]
    assert all(run.task(t)["attempts"] == 1 for t in tasks)


# == 2. a worker killed mid-task ==============================================================
def test_a_killed_worker_is_restarted_in_its_pane_and_its_task_finished(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    part1 = (
        '[ -f part1.txt ] || { echo "gen $MULTIBOT_GENERATION" > part1.txt && '
        "git add part1.txt && git commit -qm 'part 1'; }"
    )
    run.plan(
        [
            {
                "id": "slow",
                "title": "slow",
                "description": "slow",
                "owns": ["part1.txt", "part2.txt"],
                "commands": [
                    part1,
                    f'echo "$MULTIBOT_GENERATION $$" >> {run.marks / "slow.runs"}; '
                    + wait_for(run, "go"),
                    'echo "done by $MULTIBOT_GENERATION" > part2.txt',
                ],
            },
            {
                "id": "after",
                "title": "after",
                "description": "after",
                "dependencies": ["slow"],
                "commands": ["cat part1.txt part2.txt > after.txt"],
            },
        ]
    )
    run.start_master()
    wait_until(lambda: run.mark("slow.runs"), 60)
    wid = run.task("slow")["worker"]
    wait_until(lambda: run.worker(wid).get("pane_id"), 30)
    before = run.worker(wid)
    assert before["generation"] == 1 and before["pane_id"] in run.pane_ids()
    first_agent = int(run.mark("slow.runs")[0].split()[1])
    pid = run.heartbeat_pid(wid)
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: run.worker(wid).get("generation") == 2, 30)
    after = run.worker(wid)
    assert after["pane_id"] == before["pane_id"] and after["restarts"] == 1
    assert after["pane_id"] in run.pane_ids()
    wait_until(lambda: len(run.mark("slow.runs")) == 2, 30)
    assert run.mark("slow.runs")[1].split()[0] == "2"
    assert run.heartbeat_pid(wid) != pid
    assert run.has_event("worker-dead", worker=wid)
    # The dead incarnation's agent must not work on beside the new one.
    wait_until(lambda: not pid_alive(first_agent), 30)
    release(run, "go")

    run.assert_done(["slow", "after"], run.finish())
    assert run.show("part1.txt") == "gen 1\n"  # committed before the kill: kept
    assert run.show("part2.txt") == "done by 2\n"
    assert run.show("after.txt") == "gen 1\ndone by 2\n"
    assert run.task("slow")["attempts"] == 1
    assert run.state()["workers"][wid]["generation"] == 2


# == 3. the master killed and started again ===================================================
def test_a_killed_master_resumes_without_losing_or_doubling_anything(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)

    def task(tid: str, body: list[str], **extra: Any) -> dict[str, Any]:
        ran = f'echo "$MULTIBOT_TASK_ID $MULTIBOT_GENERATION" >> {run.marks / "runs"}'
        return {
            "id": tid,
            "title": tid,
            "description": tid,
            "owns": [f"{tid}.txt"],
            "commands": [ran, *body, f"echo {tid} > {tid}.txt"],
            **extra,
        }

    verified, hung = run.marks / "a.verify", run.marks / "merge-hung"
    run.plan(
        [
            # Its first check hangs: the first kill falls while the master runs it.
            task(
                "a",
                ["sleep 0.5"],
                verify=f"echo $$ >> {verified}; [ $(wc -l < {verified}) -gt 1 ] || sleep 60",
            ),
            task("b", ["sleep 1"]),
            task("c", [wait_for(run, "c-go")], dependencies=["a"]),
            task("d", ["sleep 0.5"], dependencies=["a", "b"]),
            task("e", ["sleep 0.5"], dependencies=["c"]),
            task("f", ["sleep 0.5"], dependencies=["d", "e"]),
        ],
        # The project check after the first merge that brings c.txt hangs: the third kill
        # falls in the middle of that merge.
        verify=f"if [ -f c.txt ] && [ ! -f {hung} ]; then touch {hung}; sleep 60; fi",
    )
    run.start_master()
    wait_until(lambda: run.mark("a.verify"), 60)
    run.kill_master()
    assert run.task("a")["status"] == "verifying"
    run.start_master()
    wait_until(lambda: run.task("c")["status"] == "running", 60)
    run.kill_master()  # the second time with a task running
    release(run, "c-go")
    run.start_master()
    wait_until(hung.exists, 60)
    # Shown while it runs: c, or b if b's report waited for this master too (one batch, b first).
    wait_until(lambda: run.state()["git"]["merging"] in ("b", "c"), 10)
    run.kill_master()  # the third time in the middle of a merge
    run.start_master()

    tasks = ["a", "b", "c", "d", "e", "f"]
    run.assert_done(tasks, run.finish())
    assert len(run.events("master-restarted")) == 3
    assert any("multibot/c" in e["text"] for e in run.events("merge-recovered"))
    assert sorted(line.split()[0] for line in run.mark("runs")) == tasks, "a task ran twice"
    for t in tasks:
        assert run.task(t)["attempts"] == 1, t
        # No assignment of a task once its worker had reported it complete.
        done_at = min(
            e["t"]
            for e in run.events("message")
            if e.get("type") == "TASK_COMPLETE" and e.get("task") == t
        )
        assert all(e["t"] <= done_at for e in run.events("assigned") if e.get("task") == t), t
    assert [e.get("task") for e in run.events("merged")].count("a") == 1


# == 4. pause and resume by hand edit =========================================================
def test_pause_by_hand_edit_holds_assignments_and_suspends_agents(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    run.plan(
        [
            {
                "id": "slow",
                "title": "slow",
                "description": "slow",
                "owns": ["slow.txt"],
                "priority": 1,
                "commands": [
                    f"echo $$ > {run.marks / 'slow.pid'}; {wait_for(run, 'go')}",
                    "echo slow > slow.txt",
                ],
            },
            {
                "id": "side",
                "title": "side",
                "description": "side",
                "owns": ["side.txt"],
                "commands": ["echo side > side.txt"],
            },
            {
                "id": "later",
                "title": "later",
                "description": "later",
                "dependencies": ["slow"],
                "commands": ["cat slow.txt > later.txt"],
            },
        ]
    )
    run.start_master("--approve")
    wait_until(
        lambda: run.home.system_state.exists() and run.state()["phase"] == "awaiting_approval", 60
    )

    def set_paused(value: bool) -> None:
        hand_edit(run.home.system_state, lambda d: d.update(paused=value))

    # Paused before the plan is approved: the approved plan's tasks wait, no worker starts.
    set_paused(True)
    wait_until(lambda: run.has_event("paused"), 30)
    hand_edit(run.home.plan, lambda d: d.update(approved=True))
    wait_until(lambda: run.has_event("plan-approved"), 30)
    hold_for(
        lambda: (
            not run.state()["workers"]
            and all(run.task(t)["status"] == "pending" for t in ("slow", "side", "later"))
        ),
        2.0,
        "a task was assigned while paused",
    )
    assert run.state()["paused"] is True and run.pane_ids() == [run.first_pane]

    set_paused(False)
    wait_until(lambda: run.mark("slow.pid"), 60)
    agent = int(run.mark("slow.pid")[0])
    wid = run.task("slow")["worker"]
    wait_until(lambda: run.task("side")["status"] == "merged", 60)

    # Paused mid-run: the running agent is stopped where it is and does not move on.
    wait_until(lambda: run.task("slow")["status"] == "running", 30)
    set_paused(True)
    wait_until(lambda: proc_state(agent) == "T", 30)
    wait_until(lambda: read_json(run.home.worker_state(wid))["status"] == "paused", 30)
    release(run, "go")
    hold_for(
        lambda: (
            proc_state(agent) == "T"
            and run.task("slow")["status"] == "running"
            and run.task("later")["status"] == "pending"
        ),
        2.0,
        "work went on while paused",
    )
    set_paused(False)
    run.assert_done(["slow", "side", "later"], run.finish())
    assert run.show("later.txt") == "slow\n"
    assert len(run.events("paused")) == 2 and len(run.events("resumed")) == 2


# == 5. plan approval by hand edit ============================================================
def test_the_plan_runs_as_edited_by_hand_before_approval(make_run: Any) -> None:
    run: Run = make_run()
    run.plan(
        [
            {
                "id": "one",
                "title": "one",
                "description": "first version",
                "commands": ["echo original > one.txt"],
            },
            {
                "id": "two",
                "title": "two",
                "description": "to be removed",
                "commands": ["echo two > two.txt"],
            },
            {
                "id": "three",
                "title": "three",
                "description": "three",
                "dependencies": ["one"],
                "commands": ["cat one.txt > three.txt"],
            },
        ]
    )
    run.start_master("--approve")
    wait_until(
        lambda: run.home.system_state.exists() and run.state()["phase"] == "awaiting_approval", 60
    )
    assert not run.state()["workers"] and run.pane_ids() == [run.first_pane]
    assert not list(run.home.tasks_dir.glob("*.json"))

    def edit(plan: dict[str, Any]) -> None:
        plan["tasks"] = [t for t in plan["tasks"] if t["id"] != "two"]
        one = plan["tasks"][0]
        one["description"] = "edited by hand"
        one["commands"] = ["echo edited > one.txt"]
        plan["approved"] = True

    hand_edit(run.home.plan, edit)
    run.assert_done(["one", "three"], run.finish())
    assert run.show("one.txt") == "edited\n" and run.show("three.txt") == "edited\n"
    assert run.task("one")["task"]["description"] == "edited by hand"
    assert not run.home.task("two").exists()
    assert "two" not in run.merges()


# == 6. a question escalated to the person and answered by hand edit ==========================
def test_a_question_answered_by_hand_edit_reaches_the_task(make_run: Any) -> None:
    run: Run = make_run(question_policy="human")
    run.plan(
        [
            {
                "id": "paint",
                "title": "paint",
                "description": "ask for a colour",
                "commands": ["multibot ask 'which colour?' --timeout 60 > colour.txt"],
            },
        ]
    )
    run.start_master()

    def pending_question() -> Path | None:
        for path in run.home.questions_dir.glob("*.json"):
            q = read_json(path)
            if q["status"] == "pending" and q["escalated"]:
                return path
        return None

    path = wait_until(pending_question, 60)
    assert path is not None
    q = read_json(path)
    assert q["question"] == "which colour?" and q["task_id"] == "paint"
    hand_edit(path, lambda d: d.update(answer="blue"))
    run.assert_done(["paint"], run.finish())
    assert run.show("colour.txt") == "blue\n"
    q = read_json(path)
    assert q["status"] == "delivered" and q["answered_by"] == "human"


# == 7. a worker that cannot start ============================================================
def test_a_worker_crashing_at_start_up_backs_off_and_fails_clearly(make_run: Any) -> None:
    run: Run = make_run(max_restarts=1, verify_attempts=2, max_workers=1)
    run.plan(
        [
            {
                "id": "never",
                "title": "never",
                "description": "never runs",
                "commands": ["echo never > never.txt"],
            },
        ]
    )
    run.start_master("--approve")
    wait_until(
        lambda: run.home.system_state.exists() and run.state()["phase"] == "awaiting_approval", 60
    )
    # The master has read the template; every worker it starts from now on refuses it.
    run.home.worker_template.write_text('{"backend": "shell", "tick": -1}\n')
    hand_edit(run.home.plan, lambda d: d.update(approved=True))

    code = run.finish()
    assert code == 1
    state = run.state()
    assert state["phase"] == "failed"
    workers = state["workers"]
    assert workers and all(w["status"] == "failed" for w in workers.values())
    assert all(w["failure_reason"] and w["restarts"] == 2 for w in workers.values())
    rec = run.task("never")
    assert rec["status"] == "failed" and rec["last_error"]
    assert run.merges() == Counter()
    assert run.has_event("worker-failed")
    # The second worker took the task over; workers check out their own branches, so one
    # that never started made no worktree that could hold the branch.
    assert not run.home.worktree("w1").exists()
    assert list(dict.fromkeys(e["worker"] for e in run.events("assigned"))) == ["w1", "w2"]
    # The crash stays readable in the worker's dead pane.
    panes = [w["pane_id"] for w in workers.values()]
    assert any("tick" in run.tmux.capture(p) for p in panes)


# == 8. a frozen worker ======================================================================
def test_a_frozen_worker_is_replaced_and_its_stale_messages_ignored(make_run: Any) -> None:
    run: Run = make_run(max_workers=1)
    run.plan(
        [
            {
                "id": "cold",
                "title": "cold",
                "description": "cold",
                "owns": ["effect.txt"],
                "commands": [
                    f'echo "$MULTIBOT_GENERATION $$" >> {run.marks / "cold.runs"}; '
                    f"{wait_for(run, 'go')}; echo effect >> effect.txt",
                ],
            },
        ]
    )
    run.start_master()
    wait_until(lambda: run.mark("cold.runs"), 60)
    wid = run.task("cold")["worker"]
    pane = wait_until(lambda: run.worker(wid).get("pane_id"), 30)
    first_agent = int(run.mark("cold.runs")[0].split()[1])
    pid = run.heartbeat_pid(wid)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: run.worker(wid).get("generation") == 2, 60)
        wait_until(lambda: len(run.mark("cold.runs")) == 2, 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # thawed, if still there: it must find itself replaced
    assert run.worker(wid)["pane_id"] == pane
    dead = [e for e in run.events("worker-dead") if e.get("worker") == wid]
    assert dead and "no new heartbeat" in dead[0]["text"]
    wait_until(lambda: not pid_alive(pid), 30)
    wait_until(lambda: not pid_alive(first_agent), 30)

    # A late report from the frozen generation changes nothing.
    late = protocol.make(
        protocol.TaskComplete(summary="late", branch="multibot/cold"),
        sender=wid,
        recipient=MASTER_ID,
        generation=1,
        task_id="cold",
    )
    late = auth.sign(late, auth.load_keys(run.home).worker(wid, 1), 1)  # as generation 1 did
    mailbox.send(run.home, late)
    wait_until(lambda: run.has_event("stale-message-ignored", message=late.id), 30)
    assert run.task("cold")["status"] in ("assigned", "running")  # not verifying, not merged
    release(run, "go")

    run.assert_done(["cold"], run.finish())
    assert run.show("effect.txt") == "effect\n"
    assert run.task("cold")["attempts"] == 1


# == 3b. restarts around a launch, and without tmux ===========================================
def two_tasks(run: Run) -> None:
    """t1 waits for the flag "go" and counts its runs; t2 comes after it."""
    first = f"echo $$ >> {run.marks / 't1.runs'}; {wait_for(run, 'go')}"
    run.plan([shell_task("t1", first, "echo 1 > 1"), shell_task("t2", "echo 2 > 2")])


def test_a_worker_launched_just_before_a_master_crash_is_adopted(make_run: Any) -> None:
    run: Run = make_run(max_workers=1)
    two_tasks(run)
    run.start_master()
    wait_until(lambda: run.mark("t1.runs"), 60)
    wait_until(lambda: run.task("t1")["status"] == "running", 30)
    pid = run.heartbeat_pid("w1")
    pane = run.worker("w1")["pane_id"]
    run.kill_master()
    # As if the master died between starting w1 and writing system-state.json.
    hand_edit(run.home.system_state, lambda d: d["workers"].clear())
    run.tmux.set_title(pane, "not titled yet")
    run.start_master()
    wait_until(lambda: run.has_event("worker-adopted", worker="w1"), 30)
    # Found in its pane (from its heartbeat's pid), which gets its title back.
    wait_until(lambda: run.worker("w1").get("pane_id") == pane, 30)
    wait_until(lambda: run.pane_title(pane).startswith("w1 · t1"), 30)
    release(run, "go")
    run.assert_done(["t1", "t2"], run.finish())
    assert len(run.mark("t1.runs")) == 1
    log = run.home.log("w1").read_text()
    assert log.count("worker w1 ready") == 1, "a second w1 was started"
    assert list(run.state()["workers"]) == ["w1"]
    wait_until(lambda: not pid_alive(pid), 30)  # told to stop at the end like any other


def t1_running_without_tmux(make_run: Any) -> tuple[Run, int]:
    """A --no-tmux master on two_tasks with t1 running on w1: the run, and w1's pid."""
    run: Run = make_run(max_workers=1)
    two_tasks(run)
    run.start_master("--no-tmux")
    wait_until(lambda: run.mark("t1.runs"), 60)
    wait_until(lambda: run.task("t1")["status"] == "running", 30)
    return run, run.heartbeat_pid("w1")


def test_a_killed_master_without_tmux_resumes_its_running_workers(make_run: Any) -> None:
    run, pid = t1_running_without_tmux(make_run)
    run.kill_master()  # its workers run in sessions of their own: they live on
    run.start_master("--no-tmux")
    wait_until(lambda: run.has_event("master-restarted"), 30)
    release(run, "go")
    run.assert_done(["t1", "t2"], run.finish())
    assert len(run.mark("t1.runs")) == 1, "t1 ran twice"
    assert not run.events("worker-dead")
    assert run.state()["workers"]["w1"]["generation"] == 1
    assert run.pane_ids() == [run.first_pane]
    wait_until(lambda: not pid_alive(pid), 30)


def test_sigterm_stops_a_master_without_tmux_and_its_workers(make_run: Any) -> None:
    """Issue 20 item 8: SIGTERM (systemd, timeout, kill) left the workers running with no
    master, under PPid 1, idle for ever. It stops them, as supervisord and systemd do, and
    the run resumes when the master starts again."""
    run, pid = t1_running_without_tmux(make_run)
    os.kill(run.masters[-1].pid, signal.SIGTERM)
    run.masters[-1].wait(timeout=30)
    wait_until(lambda: not pid_alive(pid), 20)
    assert run.state()["phase"] == "running"  # unfinished: resumed by the next master
    run.start_master("--no-tmux")
    release(run, "go")
    run.assert_done(["t1", "t2"], run.finish())


def test_ctrl_c_leaves_the_workers_of_a_master_without_tmux_to_be_adopted(
    make_run: Any,
) -> None:
    """Issue 20 item 22: a --no-tmux master that ended without finishing its run (Ctrl-C,
    a crash) killed its workers after 10 s, so every running task started again."""
    run, pid = t1_running_without_tmux(make_run)
    os.kill(run.masters[-1].pid, signal.SIGINT)
    run.masters[-1].wait(timeout=30)
    assert pid_alive(pid), "the worker was killed with its master"
    run.start_master("--no-tmux")
    wait_until(lambda: run.has_event("master-restarted"), 30)
    release(run, "go")
    run.assert_done(["t1", "t2"], run.finish())
    assert len(run.mark("t1.runs")) == 1, "t1 ran twice"
    assert run.state()["workers"]["w1"]["generation"] == 1


# == 11. a merge conflict goes back as a task, is resolved and merged ========================
def test_a_merge_conflict_is_handed_back_resolved_and_merged(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    left_merged = f"git -C {run.repo} cat-file -e multibot/integration:shared.txt"
    resolve = (
        'if grep -q "conflicts in shared.txt" "$MULTIBOT_CONTEXT_FILE"; then '
        "git merge --no-edit -X ours multibot/integration; "
        # First attempt: its branch exists already; write only once left is merged, so the
        # two branches certainly diverge and this one's merge conflicts.
        f"else touch {run.marks / 'right-started'}; "
        f"until {left_merged} 2>/dev/null; do sleep 0.05; done; echo right > shared.txt; fi"
    )
    run.plan(
        [
            # Neither claims shared.txt, so both run at once and the second merge conflicts.
            {
                "id": "left",
                "title": "left",
                "description": "left",
                "priority": 2,
                # Only once right's branch exists (its worker has started it).
                "commands": [wait_for(run, "right-started"), "echo left > shared.txt"],
            },
            {
                "id": "right",
                "title": "right",
                "description": "right",
                "priority": 1,
                "commands": [resolve],
            },
        ]
    )
    run.start_master()
    run.assert_done(["left", "right"], run.finish())
    right = run.task("right")
    assert right["attempts"] == 2
    assert any("conflicts in shared.txt" in f for f in right["feedback"])
    assert run.show("shared.txt") == "right\n"  # the resolution kept the task's side


# == 12. hold, priority and cancel by hand edit ===============================================
def test_hold_priority_and_cancel_by_hand_edit(make_run: Any) -> None:
    run: Run = make_run(max_workers=1)
    run.plan(
        [
            shell_task("first", wait_for(run, "first-go"), "echo first > first.txt"),
            shell_task("low", "echo low > low.txt"),
            shell_task("high", "echo high > high.txt"),
            shell_task("held", "echo held > held.txt"),
            shell_task(
                "doomed",
                "echo partial > doomed.txt; sleep 300",
                description="runs until cancelled",
                dependencies=["high"],
            ),
        ]
    )
    run.start_master()
    wait_until(
        lambda: run.home.task("held").exists() and run.task("first")["status"] == "running", 60
    )
    hand_edit(run.home.task("held"), lambda d: d.update(hold=True))
    hand_edit(run.home.task("high"), lambda d: d["task"].update(priority=9))
    # Taken in by the master (the timeline says so), not just written by us.
    wait_until(
        lambda: (
            run.has_event("task-edited", task="held") and run.has_event("task-edited", task="high")
        ),
        10,
    )
    release(run, "first-go")
    wait_until(lambda: run.task("doomed")["status"] == "running", 60)
    # One worker: the edited priority decided the order; the held task never started.
    assert run.task("high")["assigned_at"] < run.task("low")["assigned_at"]
    assert run.task("held")["status"] == "pending" and run.task("held")["attempts"] == 0
    hand_edit(run.home.task("doomed"), lambda d: d.update(cancel=True))
    hand_edit(run.home.task("held"), lambda d: d.update(cancel=True))
    code = run.finish()
    assert code == 0
    assert run.state()["phase"] == "done"
    assert run.task("doomed")["status"] == "cancelled"
    assert run.task("held")["status"] == "cancelled"
    assert run.merges() == Counter({"first": 1, "low": 1, "high": 1})
    # The cancelled task's work in progress was committed on its branch, not lost.
    assert run.show("doomed.txt", rev="multibot/doomed") == "partial\n"


def test_a_broken_hand_edit_of_a_task_file_is_kept_and_the_task_written_once_fixed(
    make_run: Any,
) -> None:
    run: Run = make_run(max_workers=1)
    run.plan(
        [
            shell_task("a", wait_for(run, "a-go"), "echo a > a.txt"),
            shell_task("b", wait_for(run, "b-go"), "echo b > b.txt", dependencies=["a"]),
        ]
    )
    run.start_master()
    wait_until(lambda: run.home.task("a").exists() and run.task("a")["status"] == "running", 60)
    good = run.home.task("a").read_text(encoding="utf-8")
    broken = good.replace('"status"', '"status" "oops"', 1)  # a missing colon
    run.home.task("a").write_text(broken, encoding="utf-8")
    release(run, "a-go")
    # The run goes on (a is merged, b starts) but the person's file is left exactly as saved.
    wait_until(
        lambda: run.has_event("merged", task="a") and run.task("b")["status"] == "running", 60
    )
    wait_until(lambda: any("a.json" in e.get("text", "") for e in run.events("bad-edit")), 30)
    assert run.home.task("a").read_text(encoding="utf-8") == broken
    # Fixed by the person: the master writes what happened meanwhile.
    run.home.task("a").write_text(good, encoding="utf-8")
    wait_until(lambda: run.task("a")["status"] == "merged", 30)
    release(run, "b-go")
    assert run.finish() == 0
    assert run.merges() == Counter({"a": 1, "b": 1})


def test_after_the_tmux_server_dies_the_run_resumes_in_new_panes(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    run.plan(
        [
            shell_task("a", wait_for(run, "go"), "echo a > a.txt"),
            shell_task("b", wait_for(run, "go"), "echo b > b.txt"),
            shell_task("c", "echo c > c.txt", dependencies=["a"]),
        ]
    )
    run.start_master()
    wait_until(lambda: all(run.task(t)["status"] == "running" for t in "ab"), 60)
    old = {w: run.worker(w)["pane_id"] for w in ("w1", "w2")}
    # The server dies (its panes, workers and agents with it), then the master: it ran in a
    # pane of that server when started as the README says.
    run.tmux.kill_server()
    run.kill_master()
    # `multibot session` starts a new server; in it, panes that happen to have the old ids.
    run.tmux.ensure_session(SESSION, "exec sleep 86400", cwd=run.tmp)
    decoys = [run.tmux.add_pane("decoy", "exec sleep 86400") for _ in range(3)]
    decoy_pids = {p: run.tmux.pane_pid(p) for p in decoys}
    assert set(old.values()) & set(decoys), "the new server should reuse an old pane id"
    release(run, "go")
    run.start_master()
    run.assert_done(["a", "b", "c"], run.finish())
    assert run.has_event("pane-forgotten", worker="w1")
    # No pane of the new server was taken for an old one: the decoys run as they were.
    assert {p: run.tmux.pane_pid(p) for p in decoys} == decoy_pids
    for w in ("w1", "w2"):
        assert run.worker(w)["pane_id"] not in decoys


def test_a_worker_takes_its_next_task_while_its_last_one_is_verified_elsewhere(
    make_run: Any,
) -> None:
    run: Run = make_run(max_workers=1)
    checked = run.marks / "a.checked"
    run.plan(
        [
            shell_task(
                "a",
                "echo a > a.txt",
                "echo left behind > untracked.txt",  # committed by the worker: it is a's work
                priority=1,
                verify=(
                    f"touch {run.marks / 'a.verifying'}; {wait_for(run, 'a-go')}; "
                    f'echo "$PWD $(git rev-parse HEAD)" > {checked}; test -f a.txt'
                ),
            ),
            shell_task("b", "echo b > b.txt"),
        ]
    )
    run.start_master()
    wait_until(lambda: (run.marks / "a.verifying").exists(), 60)
    # The one worker is not held while a's check runs: b is done meanwhile.
    wait_until(lambda: run.task("b")["status"] in ("verified", "merged"), 30)
    assert run.task("a")["status"] == "verifying"
    release(run, "a-go")
    assert run.finish() == 0
    where, commit = checked.read_text().split()
    assert Path(where).name.startswith("_verify-")  # not the worker's worktree
    assert commit == run.task("a")["commit"]  # exactly what a's worker committed
    assert run.merges() == Counter({"a": 1, "b": 1})


def test_a_hanging_verify_is_killed_at_its_timeout_and_holds_up_no_merge(
    make_run: Any,
) -> None:
    run: Run = make_run(max_workers=2, verify_timeout_minutes=0.05)  # 3 s
    hung = run.marks / "h.hung"
    run.plan(
        [
            # Its first check hangs (and would for ten minutes); the second passes.
            shell_task(
                "h",
                "echo h > h.txt",
                verify=f"if [ ! -f {hung} ]; then touch {hung}; sleep 600; fi",
                priority=2,
            ),
            shell_task("x", wait_for(run, "h.hung"), "echo x > x.txt"),
            shell_task("y", wait_for(run, "h.hung"), "echo y > y.txt"),
        ]
    )
    run.start_master()
    wait_until(hung.exists, 60)
    wait_until(lambda: run.task("x")["status"] == "merged", 30)
    wait_until(lambda: run.task("y")["status"] == "merged", 30)
    assert run.task("h")["status"] == "verifying"  # x and y were merged past it
    assert run.finish() == 0
    h = run.task("h")
    assert h["attempts"] == 2 and "timed out" in h["feedback"][0]
    assert run.merges() == Counter({"h": 1, "x": 1, "y": 1})
    assert not [p for p in processes_of(run.home.root, run.socket) if "sleep 600" in proc_cmd(p)]


def test_a_commit_a_person_puts_on_the_integration_branch_is_kept(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    run.plan(
        [
            shell_task("z", "echo z > z.txt", owns=["z.txt"]),
            shell_task("a", wait_for(run, "a-go"), "echo a > a.txt", owns=["a.txt"]),
            shell_task("b", "echo b > b.txt", owns=["b.txt"], dependencies=["a"]),
        ]
    )
    run.start_master()
    wait_until(lambda: run.task("z")["status"] == "merged", 60)
    # A person commits on multibot/integration in a checkout of their own, then leaves it.
    mine = run.tmp / "mine"
    git = ["git", "-c", "user.name=p", "-c", "user.email=p@p"]
    subprocess.run(
        [*git, "worktree", "add", "-q", str(mine), "multibot/integration"], cwd=run.repo, check=True
    )
    (mine / "person.txt").write_text("by hand\n")
    subprocess.run([*git, "add", "person.txt"], cwd=mine, check=True)
    subprocess.run([*git, "commit", "-qm", "a person's commit"], cwd=mine, check=True)
    person = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=mine, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "switch", "-q", "--detach"], cwd=mine, check=True)
    release(run, "a-go")
    run.assert_done(["z", "a", "b"], run.finish())
    ancestor = ["git", "merge-base", "--is-ancestor", person, "multibot/integration"]
    assert subprocess.run(ancestor, cwd=run.repo).returncode == 0, "the person's commit was lost"
    assert run.show("person.txt") == "by hand\n"
    for t in ("z", "a", "b"):  # b started from the person's commit: not blamed for its file
        assert run.task(t)["attempts"] == 1, run.task(t)["feedback"]


def test_a_batch_that_breaks_the_project_check_is_bisected_and_never_lands(
    make_run: Any,
) -> None:
    run: Run = make_run(max_workers=4, check_concurrency=1)
    once = run.marks / "bad.once"
    bad = f"if [ -f {once} ]; then git rm -q bad.txt; else touch {once}; echo broken > bad.txt; fi"
    checks, failed, waited = (run.marks / n for n in ("checks", "failed", "waited"))
    run.plan(
        [
            shell_task(
                t,
                wait_for(run, "go"),
                *([bad, "sleep 0.5"] if t == "t3" else []),  # never first: it is batched
                f"echo {t} > {t}.txt",
            )
            for t in ("t1", "t2", "t3", "t4")
        ],
        # The project check: its first run waits until the test has seen every task verified
        # (so the rest come in one batch); it fails while bad.txt is there; and its first run
        # after a failure (a step of the bisection) waits, for the master to be killed then.
        verify=(
            f"echo $$ >> {checks}; "
            f"if [ $(wc -l < {checks}) -eq 1 ]; then {wait_for(run, 'first-go')}; fi; "
            f"if [ -f {failed} ] && [ ! -f {waited} ]; then touch {waited}; "
            f"{wait_for(run, 'check-go')}; fi; "
            f"if [ -f bad.txt ]; then touch {failed}; exit 1; fi"
        ),
    )
    run.start_master()
    release(run, "go")
    wait_until(lambda: len(run.mark("checks")) == 1, 60)
    wait_until(
        lambda: sum(run.task(t)["status"] == "verified" for t in ("t1", "t2", "t3", "t4")) == 4, 60
    )
    release(run, "first-go")
    wait_until(waited.exists, 60)
    run.kill_master()  # in the middle of the bisection
    queue = json.loads(run.home.merge_queue.read_text())
    assert any(g["suspect"] for g in queue["groups"])  # the bisection was written down
    run.start_master()
    release(run, "check-go")
    run.assert_done(["t1", "t2", "t3", "t4"], run.finish())
    assert run.task("t3")["attempts"] == 2
    assert "project check" in run.task("t3")["feedback"][0]
    for t in ("t1", "t2", "t4"):
        assert run.task(t)["attempts"] == 1, t
    assert run.has_event("culprit", task="t3")
    # No tip of the integration branch ever held the breakage.
    tips = subprocess.run(
        ["git", "rev-list", "--first-parent", "multibot/integration"],
        cwd=run.repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for tip in tips:
        held = subprocess.run(["git", "cat-file", "-e", f"{tip}:bad.txt"], cwd=run.repo)
        assert held.returncode != 0, f"{tip} holds bad.txt"


def test_a_task_file_locked_by_another_process_holds_up_only_that_task(make_run: Any) -> None:
    run: Run = make_run(max_workers=2)
    run.plan(
        [
            shell_task("a", wait_for(run, "a-go"), "echo a > a.txt"),
            shell_task("b", wait_for(run, "b-go"), "echo b > b.txt"),
        ]
    )
    run.start_master()
    wait_until(lambda: all(run.task(t)["status"] == "running" for t in "ab"), 60)
    # Another process (an editor's plugin, a stuck script) holds a's file: the master's write
    # of it waits for the lock, up to 10 s, then tries again. The rest of the run goes on.
    with filelock.FileLock(str(lock_of(run.home.task("a")))):
        release(run, "a-go")
        wait_until(lambda: run.has_event("verified", task="a"), 30)  # a's write is waiting now
        release(run, "b-go")
        wait_until(lambda: run.task("b")["status"] == "merged", 8)
        assert run.task("a")["status"] == "running"  # its file is still the locked one
    wait_until(lambda: run.task("a")["status"] == "merged", 30)
    assert run.finish() == 0
    assert run.merges() == Counter({"a": 1, "b": 1})
