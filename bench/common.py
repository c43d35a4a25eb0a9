"""Shared helpers of the benchmarks: a throw-away run in a private tmux server, /proc readings.

A ``BenchRun`` owns a temporary home, a small git repository and a private tmux server
(socket ``multibot-bench-<uuid>``). ``close()`` ends every process of the home, kills that
server and deletes the folder; use it with ``with`` so an exception or Ctrl-C cleans up too.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multibot.heartbeat import Heartbeat, read_heartbeat  # noqa: E402
from multibot.layout import MASTER_ID, Home  # noqa: E402
from multibot.panes import Tmux  # noqa: E402
from multibot.procs import home_processes  # noqa: E402
from multibot.runner import stop_processes  # noqa: E402
from multibot.state import SystemState, TaskRecord  # noqa: E402
from multibot.store import StateFile  # noqa: E402

T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
LIVE = ("idle", "working", "paused", "blocked")


# -- small numbers ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Return the q-quantile (nearest rank) of values; nan if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fmt(value: float | int | str | None, digits: int = 1) -> str:
    """Format a number for a table (nan and None as '-')."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Return rows as a plain text table, columns right-aligned but the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(parts))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def kv_line(values: dict[str, object]) -> str:
    """Return the final key=value summary line."""
    out = []
    for k, v in values.items():
        text = ("nan" if v != v else f"{v:.3f}") if isinstance(v, float) else str(v)
        out.append(f"{k}={text}")
    return " ".join(out)


def wait_for(
    pred: Callable[[], T | None], timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Poll pred until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or pred!r}")
        time.sleep(interval)  # polling other processes' files: nothing to block on


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """Describe this machine for the report: cores, memory, python, git, tmux, load, date."""

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "-"

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "multibot"])
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "git": version(["git", "--version"]).removeprefix("git version "),
        "tmux": version(["tmux", "-V"]).removeprefix("tmux "),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "pressure": pressure(),
        "commit": commit + (" + uncommitted changes in multibot/" if dirty else ""),
    }


def pressure() -> str:
    """Return the CPU and I/O pressure of the minute before the call (share of time stalled).

    On a shared virtual machine other tenants slow this one without showing in its load or its
    processes: a high figure here says that a run's times are the machine's, not multibot's.
    """
    said = []
    for kind, line in (("cpu", "some"), ("io", "full")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for row in Path(f"/proc/pressure/{kind}").read_text().splitlines():
                if row.startswith(line):
                    avg60 = float(row.split()[2].split("=")[1])
                    said.append(f"{kind} {avg60:.1f}%")
    return " ".join(said) or "-"


@contextlib.contextmanager
def cpu_limit(cpus: float | None) -> Iterator[None]:
    """Run the block, and every process it starts (master, workers, git, tmux, baselines),
    on at most `cpus` cores' worth of CPU: a cgroup with a CPU quota (root; cgroup v1's cpu
    controller, or v2). None: no limit. The same quota on machines of different speed, or at
    different moments, does not make them equal, but it shows what multibot does with less."""
    if cpus is None:
        yield
        return
    period = 10_000  # µs: a short period throttles in small slices instead of 0.1 s stalls
    v1 = Path("/sys/fs/cgroup/cpu")
    root = v1 if (v1 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    group = root / f"multibot-bench-{os.getpid()}"
    try:
        group.mkdir()
        if root == v1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        else:
            (group / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise SystemExit(f"--cpus needs root and a cgroup cpu controller: {exc}") from exc

    def removed() -> bool:
        with contextlib.suppress(OSError):
            group.rmdir()
        return not group.exists()

    try:
        yield
    finally:
        (root / "cgroup.procs").write_text(str(os.getpid()))
        # Processes the block started may take a moment to go; a group left is harmless.
        with contextlib.suppress(TimeoutError):
            wait_for(removed, 5, 0.1, f"cgroup {group} to empty")


def print_machine(info: dict[str, str]) -> None:
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """Return the CPU seconds (user + system) pid used; with children, its reaped children's too."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name may hold spaces and ')'
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int] | None:
    """Return (VmRSS, Pss) of pid in KiB; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
    pss = 0
    with contextlib.suppress(OSError, StopIteration, ValueError):
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        pss = next(int(x.split()[1]) for x in rollup if x.startswith("Pss:"))
    return rss, pss


def alive(pid: int) -> bool:
    """Return whether pid runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# -- a run ------------------------------------------------------------------------------------


def make_repo(path: Path) -> Path:
    """Create a git repository with one commit on main."""
    path.mkdir(parents=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=path, check=True)
    (path / "README.md").write_text("benchmark repository\n")
    subprocess.run([*git, "add", "-A"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=path, check=True)
    return path


def noop_task(tid: str, deps: Sequence[str] = (), commands: Sequence[str] = ()) -> dict[str, Any]:
    """Return a plan task that changes nothing (no commands: it succeeds with 'nothing to run')."""
    return {
        "id": tid,
        "title": tid,
        "description": "no-op",
        "dependencies": list(deps),
        "commands": list(commands),
        "model": "haiku",
    }


class TimelineTail:
    """Read state/timeline.jsonl incrementally (cheap to poll while the run goes on)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.events = path, 0, []  # type: ignore[var-annotated]
        self._rest = b""

    def poll(self) -> list[dict[str, Any]]:
        """Return the events appended since the last poll (and keep them in events)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(chunk)
        data = self._rest + chunk
        lines = data.split(b"\n")
        self._rest = lines.pop()  # an unfinished last line waits for the next poll
        new = []
        for line in lines:
            if line.strip():
                with contextlib.suppress(ValueError):
                    new.append(json.loads(line))
        self.events.extend(new)
        return new

    def find(self, event: str, **fields: object) -> list[dict[str, Any]]:
        """Return the events seen so far of this kind whose fields match."""
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]


class BenchRun:
    """A temporary home, repository and private tmux server for one master run."""

    def __init__(self, label: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"multibot-bench-{label}-"))
        self.home = Home.at(self.tmp / "home")
        self.home.config_dir.mkdir(parents=True)
        self.repo = make_repo(self.tmp / "repo")
        self.socket = f"multibot-bench-{uuid.uuid4().hex[:12]}"
        self.session = "bench"
        self.tmux = Tmux(self.socket, self.session)
        self.timeline = TimelineTail(self.home.timeline)
        self.launched_at = 0.0
        self.master_pid: int | None = None
        self.leftovers: list[int] = []
        self.read_messages: set[str] = set()  # names of the master's cur/ files read
        self.starts: dict[tuple[str, str], float] = {}  # see started_at
        self.backend = "shell"

    # -- set-up ------------------------------------------------------------------------------
    def configure(self, master: dict[str, Any], worker: dict[str, Any] | None = None) -> None:
        """Write config/master-config.json and config/worker-template.json."""
        self.home.master_config.write_text(json.dumps(master, indent=2))
        template = {"backend": "shell", **(worker or {})}
        self.home.worker_template.write_text(json.dumps(template, indent=2))

    def write_plan(self, tasks: list[dict[str, Any]], goal: str = "benchmark") -> Path:
        path = self.tmp / "plan.json"
        path.write_text(json.dumps({"goal": goal, "tasks": tasks}))
        return path

    def master_argv(self, plan: Path | None, profile: Path | None = None) -> list[str]:
        """Return the master's command line (resuming the home's run when plan is None)."""
        prefix = [PY, "-m", "cProfile", "-o", str(profile)] if profile else [PY]
        args = [*prefix, "-m", "multibot", "--home", str(self.home.root), "master"]
        if plan is not None:
            args += ["--repo", str(self.repo), "--plan", str(plan), "--backend", self.backend]
        return args

    def env(self) -> dict[str, str]:
        return {
            "MULTIBOT_HOME": str(self.home.root),
            "MULTIBOT_TMUX_SOCKET": self.socket,
            "MULTIBOT_TMUX_SESSION": self.session,
        }

    def start_master(self, plan: Path | None, profile: Path | None = None) -> int:
        """Start the master in the first pane of the private session; return its pid."""
        argv = self.master_argv(plan, profile)
        env = self.env()
        if profile:  # the workers too, one file each beside the master's
            env["MULTIBOT_PROFILE_DIR"] = str(profile.parent)
        self.launched_at = time.time()
        if self.tmux.has_session():
            pane = self.master_pane()
            self.tmux.respawn(pane, argv, cwd=self.home.root, env=env)
        else:
            self.tmux.ensure_session(self.session, argv, cwd=self.home.root, env=env)
        # The pane runs `exec python ...`: its pid is the master's.
        pid = wait_for(lambda: self.tmux.pane_pid(self.master_pane()), 10, what="master pane pid")
        self.master_pid = pid
        return pid

    def master_pane(self) -> str:
        return next(p.pane_id for p in self.tmux.list_panes() if p.title == MASTER_ID)

    def tmux_server_pid(self) -> int | None:
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["tmux", "-L", self.socket, "display-message", "-p", "#{pid}"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            return int(out) if out.isdigit() else None
        return None

    # -- reading the run ---------------------------------------------------------------------
    def heartbeats(self) -> dict[str, Heartbeat]:
        """Return the workers' current heartbeats by id (the master writes none)."""
        out: dict[str, Heartbeat] = {}
        with contextlib.suppress(FileNotFoundError):
            for path in self.home.heartbeats_dir.glob("*.json"):
                hb = read_heartbeat(path)
                if hb is not None and hb.process_id != MASTER_ID:
                    out[hb.process_id] = hb
        return out

    def system(self) -> SystemState:
        return StateFile(self.home.system_state, SystemState, default=SystemState).read()

    def task(self, tid: str) -> TaskRecord:
        return StateFile(self.home.task(tid), TaskRecord, default=None).read()

    def set_hold(self, tid: str, hold: bool) -> None:
        """Hold or release a task the way a person does: edit its file (locked, versioned)."""
        f = StateFile(self.home.task(tid), TaskRecord, default=None)
        f.update(lambda r: r.model_copy(update={"hold": hold}))

    def master_messages(self) -> list[dict[str, Any]]:
        """Return the messages the master received since the last call (its inbox keeps claimed
        files in cur/, and a file there never changes: each is read once)."""
        out = []
        cur = self.home.inbox(MASTER_ID).cur
        for path in sorted(cur.glob("*.json")):
            if path.name in self.read_messages:
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_bytes()))
                self.read_messages.add(path.name)
        return out

    def started_at(self) -> dict[tuple[str, str], float]:
        """Return when each worker started each task, by its own clock: (task, worker) -> time.

        The time is the sent_at of the worker's STATUS_UPDATE kind "started", sent right after
        the worker started the agent (its state file says so later: a lazy write). A task
        started twice (a retry) keeps its last start.
        """
        for m in self.master_messages():
            p = m.get("payload", {})
            if p.get("type") == "STATUS_UPDATE" and p.get("kind") == "started" and m.get("task_id"):
                self.starts[(m["task_id"], m["sender"])] = float(m["sent_at"])
        return dict(self.starts)

    def master_done(self) -> bool:
        return self.master_pid is not None and not alive(self.master_pid)

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """End every process of the run, kill the private tmux server, delete the folder."""
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
            stop_processes(self.home, grace=3.0)
        with contextlib.suppress(Exception):
            self.tmux.kill_server()
        # tmux leaves its socket file behind when its server is killed.
        tmpdir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        with contextlib.suppress(OSError):
            (tmpdir / self.socket).unlink()
        with contextlib.suppress(Exception):
            self.leftovers = sorted(home_processes(self.home))
        if os.environ.get("MULTIBOT_BENCH_KEEP"):  # for a post-mortem of the run's files
            print(f"(kept {self.tmp})")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit so every finally block (cleanup) runs."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def process_start_cost(argv: Sequence[str], runs: int = 5) -> float:
    """Return the median wall seconds to run argv to completion."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(list(argv), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def resident_kb(code: str) -> tuple[int, int]:
    """Return (VmRSS, Pss) in KiB of a python process that ran code and then waits."""
    proc = subprocess.Popen(
        [PY, "-c", f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return memory_kb(proc.pid) or (0, 0)
    finally:
        proc.kill()
        proc.wait()
