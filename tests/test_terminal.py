"""The terminal side end to end: the demo run headless, the real tmux session and its panes.

Every test uses a private tmux socket (``multibot-test-<uuid>``) and a home under tmp_path,
and leaves no tmux server, process or worktree outside tmp_path behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import kill_tmux_server, new_socket, tmux_server_running, wait_until

from multibot.layout import Home
from multibot.panes import Tmux
from multibot.runner import stop_processes
from multibot.status import render, snapshot

ROOT = Path(__file__).resolve().parent.parent
SPAWN = ROOT / "scripts" / "spawn-master.sh"
CLEANUP = ROOT / "scripts" / "cleanup.sh"
DISCOVERY = "calc functions take two numbers and return a number; keep them pure"
DEMO_TIMEOUT = 180.0  # the demo takes well under a minute; this only bounds a hang


# -- helpers ----------------------------------------------------------------------------------
def processes_of(home: Path) -> dict[int, str]:
    """Every live process (not this one) naming home in its command line or MULTIBOT_HOME."""
    key = str(home).encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if cmd and (key in cmd or b"\0MULTIBOT_HOME=" + key + b"\0" in b"\0" + env + b"\0"):
            found[int(entry.name)] = cmd.replace(b"\0", b" ").decode(errors="replace")
    return found


def agent_states(home: Path, worker: str) -> list[str]:
    """The process states (R, S, T...) of worker's agent and everything it started."""
    marks = (b"MULTIBOT_HOME=" + str(home).encode(), b"MULTIBOT_WORKER_ID=" + worker.encode())
    states = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if all(m in env for m in marks):
            states.append(stat.rpartition(")")[2].split()[0])
    return states


def script_env(sock: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TMUX", "MULTIBOT_"))}
    env["MULTIBOT_TMUX_SOCKET"] = sock
    env["MULTIBOT_FOLLOW_TIMEOUT"] = str(int(DEMO_TIMEOUT))
    return env


@dataclass
class Ran:
    rc: int
    out: str
    seconds: float


def run_script(argv: list[str], sock: str, timeout: float) -> Ran:
    """Run a script as CI would (stdin not a terminal); kill its whole group on a hang."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=script_env(sock),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{argv[0]} still ran after {timeout:g}s:\n{out[-3000:]}")
    return Ran(proc.returncode, out, time.monotonic() - start)


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return r.stdout


def checkout(repo: Path, ref: str, dest: Path) -> Path:
    """Extract ref's tree into dest without touching the repository (no worktree left)."""
    data = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", ref], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def multibot(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multibot", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def leave_nothing(home: Path, sock: str) -> None:
    """Finalizer: close the tmux server, end what still runs for home (all of it is ours)."""
    kill_tmux_server(sock)
    if processes_of(home):
        stop_processes(Home.at(home), grace=2.0)


# -- 1. the demo, headless --------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Ran]]:
    """Run `spawn-master.sh --demo` once, as CI would; yield (home, socket, result)."""
    home = tmp_path_factory.mktemp("demo").resolve() / "home"
    sock = new_socket()
    try:
        ran = run_script([str(SPAWN), "--demo", "--home", str(home)], sock, DEMO_TIMEOUT)
        print(f"\ndemo wall clock: {ran.seconds:.1f}s (exit {ran.rc})")
        yield home, sock, ran
    finally:
        leave_nothing(home, sock)


@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_demo_runs_headless_and_merges_every_task(
    demo: tuple[Path, str, Ran], tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    home, sock, ran = demo
    record_property("demo_seconds", round(ran.seconds, 1))
    assert ran.rc == 0, ran.out[-4000:]
    assert "ended: done" in ran.out
    repo = home / "sample-repo"

    # The merged result, read from the integration branch itself.
    tree = checkout(repo, "multibot/integration", tmp_path / "integration")
    for name in ("calc/add.py", "calc/mul.py", "calc/__init__.py", "tests/test_calc.py"):
        assert (tree / name).is_file(), name
    readme = (tree / "README.md").read_text()
    assert "8080" in readme  # the master's answer to the config task's question
    assert DISCOVERY in readme  # a discovery by the add task, shared with the readme task
    assert "PORT = 8080" in (tree / "calc/config.py").read_text()
    tests = subprocess.run(
        [sys.executable, "-m", "unittest", "discover", "-s", "tests", "-q"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert tests.returncode == 0, tests.stderr
    assert "Ran 2 tests" in tests.stderr

    # The user's branch: untouched, checked out, clean; integration is built on it.
    assert git(repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert git(repo, "log", "--format=%s", "main").splitlines() == ["calc: empty package"]
    assert git(repo, "status", "--porcelain") == ""
    git(repo, "merge-base", "--is-ancestor", "main", "multibot/integration")

    # Nothing left running: no tmux server on the socket, no process of this home.
    assert not tmux_server_running(sock)
    wait_until(lambda: not processes_of(home), timeout=10)


def test_status_json_after_the_demo(demo: tuple[Path, str, Ran]) -> None:
    home, _, ran = demo
    assert ran.rc == 0, ran.out[-4000:]
    r = multibot(home, "status", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert {"workers", "tasks", "questions", "totals"} <= set(s)
    assert s["phase"] == "done"
    assert {t["id"]: t["status"] for t in s["tasks"]} == dict.fromkeys(
        ["add", "config", "mul", "package", "readme", "tests"], "merged"
    )
    assert s["totals"]["merged"] == s["totals"]["tasks"] == 6
    assert s["totals"]["failed"] == 0
    assert s["questions"] == []  # answered by the plan's faq, none waits for the person
    assert [w["id"] for w in s["workers"]] == ["w1", "w2", "w3"]
    assert all(w["status"] == "stopped" for w in s["workers"])
    assert s["problems"] == []
    # The text view is the same snapshot rendered.
    text = multibot(home, "status").stdout
    assert "TOTAL  6/6 merged, 0 failed" in text
    assert re.search(r"^readme\s+merged\s+1\s+w\d", text, re.M)  # tries: 1


def test_cleanup_keeps_unmerged_work_and_removes_merged(demo: tuple[Path, str, Ran]) -> None:
    home, sock, ran = demo
    assert ran.rc == 0, ran.out[-4000:]
    repo = home / "sample-repo"
    worktrees = sorted(p.name for p in (home / "worktrees").glob("w*") if p.is_dir())
    assert worktrees == ["w1", "w2", "w3"]
    # New work on w2's branch that was never merged, and work never committed in w3.
    w2, w3 = home / "worktrees" / "w2", home / "worktrees" / "w3"
    (w2 / "calc" / "div.py").write_text("def div(a, b):\n    return a / b\n")
    ident = ["-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    git(w2, "add", "calc/div.py")
    git(w2, *ident, "commit", "-q", "-m", "unmerged work")
    unmerged = git(w2, "rev-parse", "HEAD").strip()
    (w3 / "notes.txt").write_text("not committed\n")

    r = run_script([str(CLEANUP), "--home", str(home)], sock, 60)
    assert r.rc == 0, r.out
    assert "kept" in r.out and "--force" in r.out
    listed = git(repo, "worktree", "list", "--porcelain")
    assert f"worktree {home / 'worktrees' / 'w1'}\n" not in listed  # merged: removed
    assert not (home / "worktrees" / "w1").exists()
    assert (w2 / "calc" / "div.py").is_file()  # unmerged commit: kept, with its work
    assert git(w2, "rev-parse", "HEAD").strip() == unmerged
    assert (w3 / "notes.txt").read_text() == "not committed\n"  # uncommitted: kept
    assert not tmux_server_running(sock)

    r = run_script([str(CLEANUP), "--home", str(home), "--force"], sock, 60)
    assert r.rc == 0, r.out
    assert not w2.exists() and not w3.exists()
    assert git(repo, "cat-file", "-t", unmerged).strip() == "commit"  # the branch keeps it


def test_demo_with_a_bad_argument_fails_at_once_and_says_why(tmp_path: Path) -> None:
    home, sock = tmp_path / "home", new_socket()
    try:
        # Without the master pane being watched, this waited for MULTIBOT_FOLLOW_TIMEOUT.
        r = run_script([str(SPAWN), "--demo", "--home", str(home), "--no-such-option"], sock, 60)
        assert r.rc != 0
        assert "unrecognized arguments: --no-such-option" in r.out
        assert not tmux_server_running(sock)
        wait_until(lambda: not processes_of(home), timeout=10)
    finally:
        leave_nothing(home, sock)


def test_a_failed_start_shows_its_own_error_not_an_earlier_attempts(tmp_path: Path) -> None:
    """Issue 20 item 13: the FATAL of the previous attempt was printed above this one's."""
    home, sock = tmp_path / "home", new_socket()
    (home / "state" / "logs").mkdir(parents=True)
    earlier = "FATAL: claude not found (an earlier attempt)\n"
    (home / "state" / "logs" / "master.log").write_text(earlier)
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"goal": "g", "tasks": [{"id": "t1", "title": "t", "description": "d"}]})
    )
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    try:
        argv = [str(SPAWN), "--home", str(home), "--repo", str(not_a_repo), "--plan", str(plan)]
        r = run_script(argv, sock, 60)
        assert r.rc != 0
        assert "not a git repository" in r.out, r.out[-2000:]
        assert "an earlier attempt" not in r.out
    finally:
        leave_nothing(home, sock)


# -- 2. the tmux session, its panes, a pause by hand edit ---------------------------------------
def slow_task(tid: str, priority: int, release: Path) -> dict[str, object]:
    """A shell task that ticks until the test creates release (at most ~3 minutes)."""
    loop = (
        f"i=0; while [ ! -e {shlex.quote(str(release))} ] && [ $i -lt 900 ]; do "
        f"echo tick-{tid}-$i; i=$((i+1)); sleep 0.2; done"
    )
    return {
        "id": tid,
        "title": f"slow task {tid}",
        "description": f"Tick until released, then write {tid}.txt.",
        "model": "haiku",
        "priority": priority,
        "owns": [f"{tid}.txt"],
        "verify": f"test -s {tid}.txt",
        "commands": [loop, f"echo {tid} > {tid}.txt"],
    }


@pytest.fixture
def slow_run(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, str]]:
    """A repository, a home configured for shell workers, a plan of two slow tasks."""
    tmp = tmp_path.resolve()
    repo, home, release = tmp / "repo", tmp / "home", tmp / "release"
    repo.mkdir()
    (repo / "README.md").write_text("slow\n")
    ident = ["-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    git(repo, "add", "-A")
    git(repo, *ident, "commit", "-q", "-m", "start")
    (home / "config").mkdir(parents=True)
    config = {"max_workers": 2, "heartbeat_interval": 0.5, "idle_worker_timeout": 5}
    (home / "config" / "master-config.json").write_text(json.dumps(config))
    (home / "config" / "worker-template.json").write_text('{"backend": "shell"}')
    plan = tmp / "plan.json"
    tasks = [slow_task("t1", 2, release), slow_task("t2", 1, release)]
    plan.write_text(json.dumps({"goal": "two slow tasks", "tasks": tasks}))
    sock = new_socket()
    try:
        yield repo, home, plan, sock
    finally:
        release.touch()  # lets a loop that outlived everything end by itself too
        leave_nothing(home, sock)


def hand_edit(path: Path, **fields: object) -> None:
    """Change fields the way a person with an editor does: plain JSON, written in place."""
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2) + "\n")


def pane_by_title(tmux: Tmux, pattern: str) -> str | None:
    return next((p.pane_id for p in tmux.list_panes() if re.fullmatch(pattern, p.title)), None)


@pytest.mark.timeout(150)
def test_session_panes_titles_and_pause_by_hand_edit(
    slow_run: tuple[Path, Path, Path, str], tmp_path: Path
) -> None:
    repo, home, plan, sock = slow_run
    session = "mbtest"
    master_args = ["--repo", str(repo), "--plan", str(plan), "--backend", "shell"]
    log = open(tmp_path / "spawn.out", "w+")  # noqa: SIM115 (read back at the end)
    spawn = subprocess.Popen(
        [str(SPAWN), "--detach", "--home", str(home), "--session", session, *master_args],
        env=script_env(sock),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        tmux = Tmux(sock, session)
        wait_until(tmux.has_session, timeout=30)

        # The master window: the master pane and the live status pane; then one pane per worker.
        wait_until(lambda: {"master", "status"} <= {p.title for p in tmux.list_panes()})
        working = r"(w[12]) · (t[12]) · haiku · working"
        wait_until(
            lambda: len([p for p in tmux.list_panes() if re.fullmatch(working, p.title)]) == 2,
            timeout=30,
        )
        titles = {p.title for p in tmux.list_panes()}
        assert len(titles) == 4
        w1_title = next(t for t in titles if t.startswith("w1 · "))
        task = w1_title.split(" · ")[1]
        windows = subprocess.run(
            [
                "tmux",
                "-L",
                sock,
                "list-panes",
                "-s",
                "-t",
                f"={session}",
                "-F",
                "#{window_name} #{@multibot_title}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "master master\n" in windows and "master status\n" in windows
        assert f"workers {w1_title}\n" in windows
        status_pane = pane_by_title(tmux, "status")
        w1_pane = pane_by_title(tmux, re.escape(w1_title))
        assert status_pane and w1_pane
        wait_until(lambda: f"tick-{task}-" in tmux.capture(w1_pane))
        wait_until(lambda: re.search(r"^w1\s+working\s", tmux.capture(status_pane), re.M))

        # Pause w1 by editing its state file: the status pane, the pane title and the agent
        # itself (suspended: every process of it stopped) all follow.
        state = home / "state" / "workers" / "w1-state.json"
        hand_edit(state, paused=True)

        def shows(pattern: str) -> bool:
            return re.search(pattern, tmux.capture(status_pane), re.M) is not None

        wait_until(lambda: shows(r"^w1\s+paused\s"), timeout=20)
        wait_until(lambda: pane_by_title(tmux, rf"w1 · {task} · haiku · paused"), timeout=20)
        wait_until(lambda: (s := agent_states(home, "w1")) and set(s) == {"T"}, timeout=20)
        wait_until(lambda: "paused" in tmux.capture(w1_pane))
        wait_until(lambda: shows(r"^w2\s+working\s"))  # the other worker goes on

        hand_edit(state, paused=False)
        wait_until(lambda: shows(r"^w1\s+working\s"), timeout=20)
        wait_until(lambda: (s := agent_states(home, "w1")) and "T" not in s, timeout=20)
        wait_until(lambda: pane_by_title(tmux, rf"w1 · {task} · haiku · working"), timeout=20)

        # Let both tasks finish: the run ends, merged, and the script closes the session.
        (tmp_path / "release").touch()
        rc = spawn.wait(timeout=90)
        log.seek(0)
        out = log.read()
        assert rc == 0, out[-4000:]
        assert "ended: done" in out
        assert not tmux_server_running(sock)
        for tid in ("t1", "t2"):
            assert git(repo, "show", f"multibot/integration:{tid}.txt").strip() == tid
        wait_until(lambda: not processes_of(home), timeout=10)
    finally:
        if spawn.poll() is None:
            os.killpg(spawn.pid, signal.SIGKILL)
            spawn.wait()
        log.close()


# -- the status view never breaks on a broken hand edit ----------------------------------------
@pytest.mark.timeout(120)
def test_secrets_stay_out_of_tmux_and_runtime_files_are_private(
    slow_run: tuple[Path, Path, Path, str],
) -> None:
    """Issue 21 part 3: `multibot session` started the tmux server from the whole launching
    environment, so ANTHROPIC_API_KEY sat in `tmux show-environment -g` for the server's
    life; state/ and communication/ were 755 and their files 644."""
    repo, home, plan, sock = slow_run
    session = "mbsecret"
    secret = "sk-ant-test-" + uuid.uuid4().hex
    env = {**script_env(sock), "ANTHROPIC_API_KEY": secret, "GITHUB_TOKEN": "ghp-" + secret}
    master_args = ["--repo", str(repo), "--plan", str(plan), "--backend", "shell"]
    spawn = subprocess.Popen(  # it follows the run until the fixture ends it
        [str(SPAWN), "--detach", "--home", str(home), "--session", session, *master_args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        check_private(home, sock, session, secret)
    finally:
        os.killpg(spawn.pid, signal.SIGKILL)
        spawn.wait()


def check_private(home: Path, sock: str, session: str, secret: str) -> None:
    wait_until(lambda: (home / "state" / "heartbeats" / "w1.json").exists(), 30)
    for scope in (["-g"], ["-t", session]):
        shown = subprocess.run(
            ["tmux", "-L", sock, "show-environment", *scope], capture_output=True, text=True
        ).stdout
        assert secret not in shown, f"the secret is in tmux's environment ({scope})"
    assert not (home / "state" / "handed-secrets.json").exists()
    beat = json.loads((home / "state" / "heartbeats" / "w1.json").read_text())
    # Not on any command line, not in the worker's launch environment: the launch file
    # brought it, and is gone; the worker's agent has it (it needs it).
    worker_env = Path(f"/proc/{beat['pid']}/environ").read_bytes()
    assert secret.encode() not in worker_env
    assert not (home / "state" / "launch" / "w1.json").exists()
    wanted = f"ANTHROPIC_API_KEY={secret}".encode()

    def agents_with_it() -> list[int]:
        found = []
        for pid, cmd in processes_of(home).items():
            assert secret not in cmd, f"the secret is on a command line: {cmd}"
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes()
                if wanted in env and b"MULTIBOT_AGENT_KEY=" in env:
                    found.append(pid)
        return found

    wait_until(agents_with_it, 30)
    for folder in ("state", "communication", "worktrees"):
        assert stat.S_IMODE((home / folder).stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((home / "state" / "system-state.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.joinpath("communication/inbox/master").stat().st_mode) == 0o700


def test_status_survives_broken_files_and_names_them(tmp_path: Path) -> None:
    home = Home.at(tmp_path)
    home.questions_dir.mkdir(parents=True)
    home.tasks_dir.mkdir(parents=True)
    (home.questions_dir / "q-1.json").write_text('{"id": "q-1", ')  # no good copy to fall back on
    (home.tasks_dir / "t1.json").write_text('{\n  "version": 1,\n}\n')
    s = snapshot(home, now=0.0)
    assert sorted(Path(p.split(":")[0]).name for p in s["problems"]) == ["q-1.json", "t1.json"]
    assert s["tasks"] == [] and s["questions"] == []
    assert "PROBLEMS" in render(s)
    r = multibot(tmp_path, "dashboard", "--once")
    assert r.returncode == 0, r.stderr
    assert "q-1.json" in r.stdout and "t1.json" in r.stdout


@pytest.mark.timeout(120)
def test_a_killed_master_is_restarted_in_its_pane_and_resumes(
    slow_run: tuple[Path, Path, Path, str], tmp_path: Path
) -> None:
    repo, home, plan, sock = slow_run
    session = "mbrevive"
    master_args = ["--repo", str(repo), "--plan", str(plan), "--backend", "shell"]
    opened = multibot(home, "session", "--socket", sock, "--session", session, "--", *master_args)
    assert opened.returncode == 0, opened.stderr
    tmux = Tmux(sock, session)
    wait_until(lambda: pane_by_title(tmux, r"w1 · t\d · haiku · working"), timeout=30)
    system = home / "state" / "system-state.json"
    pid = json.loads(system.read_text())["master_pid"]
    os.kill(pid, signal.SIGKILL)
    master = pane_by_title(tmux, "master")
    assert master
    wait_until(lambda: tmux.is_dead(master))

    # No arguments: the master pane runs again and resumes the run in state/.
    again = multibot(home, "session", "--socket", sock, "--session", session)
    assert again.returncode == 0, again.stderr
    assert "restarted the master" in again.stdout
    wait_until(lambda: not tmux.is_dead(master), timeout=10)
    wait_until(lambda: "resuming run" in tmux.capture(master), timeout=30)
    (tmp_path / "release").touch()
    followed = multibot(home, "follow", "--socket", sock, "--session", session, "--timeout", "50")
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr
    assert git(repo, "show", "multibot/integration:t1.txt").strip() == "t1"
    assert git(repo, "show", "multibot/integration:t2.txt").strip() == "t2"
    # Over, the master is not started again: there is nothing to resume.
    wait_until(lambda: tmux.is_dead(master), timeout=10)
    last = multibot(home, "session", "--socket", sock, "--session", session)
    assert "nothing to resume" in last.stdout
    assert tmux.is_dead(master)


def test_demo_refuses_to_wipe_a_folder_that_is_not_a_demo_home(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "precious.py").write_text("x = 1\n")
    r = multibot(tmp_path, "demo-prepare")
    assert r.returncode != 0
    assert "not a demo home" in r.stderr
    assert (tmp_path / "src" / "precious.py").read_text() == "x = 1\n"
