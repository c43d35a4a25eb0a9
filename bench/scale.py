"""Benchmark scale: N shell-backend workers in a private tmux server running no-op tasks.

    .venv/bin/python bench/scale.py [--quick] [--workers 10,25,50] [--tasks M] [--window S]
                                    [--profile DIR] [--cpus C]

Each run starts a real master (`python -m multibot master --backend shell`) in a private tmux
server, with max_workers N, idle_worker_timeout 3600 s, heartbeat_interval 1 s, no verify.
Every task but the warm-ups is a no-op: no commands (the shell agent succeeds with "nothing
to run") and no owned files, so what is measured is multibot's own coordination: bus, state
files, git branch/worktree/merge handling, tmux, supervision. The default is one run per
--workers count (phases 1 and 2) and one run of 20 workers (all phases); --quick is one run
of 10 workers.

1. start-up: N tasks warm-1..warm-N with no dependencies, so the master starts N workers at
   once. Measured: from launching the master to the last "worker-started" timeline event
   (spawned), and to every worker's first heartbeat of its generation with a live status
   (beating; the beat's own time stamp, polled every 20 ms). Each warm-up waits for a file
   the benchmark creates once all N beat, so every worker runs exactly one: a worker's first
   task opens the repository and its worktree, and none of the measured tasks below is one.
2. idle: a task "gate" depends on every warm-up; the benchmark holds it (sets "hold": true in
   state/tasks/gate.json, as a person would) as soon as the file exists. Once the warm-ups are
   merged, N workers are idle, the run is unfinished and nothing is ready: CPU of the master
   (its own, and with its reaped git/tmux children), of the tmux server and of all workers is
   read from /proc/<pid>/stat over idle_s seconds; resident memory (VmRSS, and Pss) of every
   worker process (pids from their heartbeats) is read from /proc/<pid>/status.
3. latency: the gate is released; K chains of L tasks each (chain-k-j depends on
   chain-k-(j-1); chain-k-1 on the gate). K < N, so a worker is always free and nothing
   queues. For each task: ready = the timeline "merged" event of its dependency; assigned =
   its "assigned" event; started = sent_at of the worker's own STATUS_UPDATE kind "started"
   (read back from the master's inbox cur/), stamped right after the worker started the agent.
   (TaskRecord.ready_at is not used: the master sets it at plan load for every task,
   dependencies or not.)
4. throughput: M tasks bulk-i, each depending on every chain's last task, so all become ready
   at one instant, the merge of the last of those; merged/min = M / (last bulk merge - that
   instant), and run-and-verified/min likewise from the "verified" events. The phase stops
   after --window seconds at most: then what merged within the window counts. CPU is read
   over this phase as "busy".

Baselines in the same run: starting a bare `python -c pass`; starting a python that imports
what a worker imports; the resident memory of both; a plain fan-out of no-op tasks to N
persistent processes over pipes (the coordination floor without files, git or tmux); and the
git floor: the 3 git commands a branch-per-task flow needs at least per task, run in sequence.

Ends with one line of key=value pairs. docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import pstats
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LIVE,
    PY,
    BenchRun,
    cpu_limit,
    cpu_seconds,
    fmt,
    kv_line,
    machine,
    make_repo,
    memory_kb,
    noop_task,
    pct,
    print_machine,
    process_start_cost,
    resident_kb,
    sigterm_as_exit,
    table,
    wait_for,
)

WORKER_IMPORTS = "import multibot.cli, multibot.worker, multibot.worktrees, multibot.agents.shell"
TARGET_WORKERS = 50
TARGET_TASKS_PER_MIN = 3000.0
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 60.0


@dataclass
class Cpu:
    """CPU used over a window, in % of one core."""

    seconds: float = 0.0
    master: float = float("nan")
    master_all: float = float("nan")  # with its reaped children (git, tmux clients)
    tmux: float = float("nan")
    workers: float = float("nan")  # all workers together, with their reaped children
    gone: list[int] = field(default_factory=list)  # worker pids that ended within the window


@dataclass
class ScaleResult:
    workers: int
    spawned_s: float = float("nan")
    beating_s: float = float("nan")
    beat_after_spawn_s: list[float] = field(default_factory=list)
    idle: Cpu = field(default_factory=Cpu)
    busy: Cpu = field(default_factory=Cpu)
    rss_kb: list[int] = field(default_factory=list)
    pss_kb: list[int] = field(default_factory=list)
    master_rss_kb: int = 0
    pane_shells: int = 0
    bulk: int = 0
    window_s: float = 0.0
    bulk_done: int = 0  # merged in the bulk phase
    bulk_verified: int = 0  # finished by their workers and verified in the bulk phase
    bulk_s: float = float("nan")
    verified_s: float = float("nan")
    assign_to_start_ms: list[float] = field(default_factory=list)
    chain_ready_to_assigned_ms: list[float] = field(default_factory=list)
    chain_ready_to_started_ms: list[float] = field(default_factory=list)
    chain_assigned_to_started_ms: list[float] = field(default_factory=list)
    failed: int = 0
    notes: list[str] = field(default_factory=list)

    def cpu_ms_per_task(self, part: str = "") -> float:
        """CPU of the bulk phase per task merged in it, in ms: of one part (master_all, tmux,
        workers) or of all three."""
        b = self.busy
        parts = [part] if part else ["master_all", "tmux", "workers"]
        total = sum(v for p in parts if not math.isnan(v := getattr(b, p)))  # nan: not measured
        return total / 100 * b.seconds / self.bulk_done * 1000 if self.bulk_done else float("nan")

    @property
    def tasks_per_min(self) -> float:
        return self.bulk_done / self.bulk_s * 60 if self.bulk_s > 0 else float("nan")

    @property
    def verified_per_min(self) -> float:
        return self.bulk_verified / self.verified_s * 60 if self.verified_s > 0 else float("nan")


class CpuMeter:
    """Reads the CPU counters of the master, the tmux server and the workers."""

    def __init__(self, run: BenchRun, worker_pids: Sequence[int]) -> None:
        self.run, self.pids = run, list(worker_pids)
        self.tmux_pid = run.tmux_server_pid()

    def read(self) -> tuple[float, float, float, float, dict[int, float]]:
        assert self.run.master_pid is not None
        master = cpu_seconds(self.run.master_pid) or 0.0
        master_all = cpu_seconds(self.run.master_pid, children=True) or 0.0
        tmux = (cpu_seconds(self.tmux_pid) or 0.0) if self.tmux_pid else float("nan")
        workers = {p: c for p in self.pids if (c := cpu_seconds(p, children=True)) is not None}
        return time.monotonic(), master, master_all, tmux, workers

    @staticmethod
    def between(
        a: tuple[float, float, float, float, dict[int, float]],
        b: tuple[float, float, float, float, dict[int, float]],
    ) -> Cpu:
        """CPU between two reads; a worker gone by the second read is left out (and named)."""
        dt = b[0] - a[0]
        pc = [100 * (y - x) / dt for x, y in zip(a[1:4], b[1:4], strict=True)]
        gone = sorted(set(a[4]) - set(b[4]))
        workers = sum(b[4][p] - a[4][p] for p in a[4] if p in b[4])
        return Cpu(dt, *pc, 100 * workers / dt, gone)


def plan_tasks(
    n: int, bulk: int, chains: int, chain_len: int, release: Path
) -> list[dict[str, object]]:
    hold = f"until [ -e {release} ]; do sleep 0.05; done"  # one warm-up per worker
    tasks = [noop_task(f"warm-{i}", commands=[hold]) for i in range(1, n + 1)]
    tasks.append(noop_task("gate", [f"warm-{i}" for i in range(1, n + 1)]))
    tails = ["gate"]
    if chains:
        tails = []
        for k in range(1, chains + 1):
            prev = "gate"
            for j in range(1, chain_len + 1):
                tid = f"chain-{k}-{j}"
                tasks.append(noop_task(tid, [prev]))
                prev = tid
            tails.append(prev)
    tasks += [noop_task(f"bulk-{i}", tails) for i in range(1, bulk + 1)]
    return tasks


def run_scale(
    n: int,
    bulk: int,
    chains: int,
    chain_len: int,
    idle_s: float,
    window_s: float,
    profile: Path | None = None,
) -> ScaleResult:
    """Run one master with n workers through the phases above; return what was measured."""
    res = ScaleResult(workers=n, bulk=bulk, window_s=window_s)
    what = f"{n} warm-up tasks, start-up and idle only"
    if bulk or chains:
        what = (
            f"{n} warm-up, {chains}x{chain_len} chained, {bulk} bulk tasks (bulk phase at "
            f"most {window_s:g}s)"
        )
    print(f"\n== {n} workers: {what}", flush=True)
    with BenchRun(f"scale{n}") as run:
        run.configure(
            {
                "max_workers": n,
                "idle_worker_timeout": 3600,
                "heartbeat_interval": 1.0,
                "verify": None,
            }
        )
        release = run.home.root / "warm-ups-go"
        plan = run.write_plan(plan_tasks(n, bulk, chains, chain_len, release))
        run.start_master(plan, profile)
        wait_for(run.home.task("gate").exists, 60, 0.01, "the master to write gate.json")
        run.set_hold("gate", True)

        # 1. start-up
        first: dict[str, float] = {}
        deadline = time.monotonic() + 60 + 2 * n
        while len(first) < n:
            for wid, hb in run.heartbeats().items():
                if wid not in first and hb.status in LIVE and hb.generation == 1:
                    first[wid] = hb.time
            if run.master_done() or time.monotonic() > deadline:
                raise RuntimeError(f"only {len(first)} of {n} workers came up")
            time.sleep(0.02)
        run.timeline.poll()
        spawned = {e["worker"]: e["t"] for e in run.timeline.find("worker-started")}
        res.spawned_s = max(spawned.values()) - run.launched_at
        res.beating_s = max(first.values()) - run.launched_at
        res.beat_after_spawn_s = [first[w] - spawned[w] for w in first if w in spawned]
        print(f"   all {n} workers beating {res.beating_s:.1f}s after launch", flush=True)
        release.touch()

        def merged() -> dict[str, float]:
            return _merged(run)

        warm = [f"warm-{i}" for i in range(1, n + 1)]
        wait_for(lambda: all(t in merged() for t in warm), 120 + 2 * n, 0.1, "warm-ups merged")
        gate = run.task("gate")
        if gate.status != "pending" or not gate.hold:
            res.notes.append(f"gate was {gate.status} (hold {gate.hold}): idle phase not clean")

        # 2. idle
        def all_idle() -> dict[str, int] | None:
            hbs = run.heartbeats()
            if len(hbs) == n and all(hb.status == "idle" for hb in hbs.values()):
                return {w: hb.pid for w, hb in hbs.items()}
            return None

        pids = wait_for(all_idle, 30, 0.1, "every worker to be idle")
        time.sleep(1.0)  # the master's last writes after the final merge settle first
        meter = CpuMeter(run, list(pids.values()))
        a = meter.read()
        time.sleep(idle_s)
        res.idle = CpuMeter.between(a, meter.read())
        if res.idle.gone:
            res.notes.append(f"worker pids {res.idle.gone} ended while idle: not counted")
        for pid in pids.values():
            mem = memory_kb(pid)
            if mem:
                res.rss_kb.append(mem[0])
                res.pss_kb.append(mem[1])
            res.pane_shells += _parent_name(pid) in ("sh", "dash", "bash")
        assert run.master_pid is not None
        res.master_rss_kb = (memory_kb(run.master_pid) or (0, 0))[0]
        print(f"   idle {idle_s:g}s: master {res.idle.master:.1f}% of a core", flush=True)

        # 3. chains (they start when the gate is merged), then 4. bulk
        run.set_hold("gate", False)
        if bulk == 0 and chains == 0:  # start-up and idle only: the gate ends the run
            wait_for(run.master_done, 60 + n, 0.1, "the master to end the run")
        else:
            _busy(run, res, meter, chains, chain_len, bulk, window_s, profile)
        run.timeline.poll()
        _analyse(run, res, chains, chain_len, bulk)
        for e in run.timeline.find("worker-dead"):  # a restart disturbs every figure of the run
            res.notes.append(f"the master judged a worker dead: {e.get('text', '')}")
        if bulk:
            print(
                f"   {res.bulk_done} tasks merged ({res.tasks_per_min:.0f}/min), "
                f"{res.bulk_verified} verified ({res.verified_per_min:.0f}/min)",
                flush=True,
            )
    if run.leftovers:
        res.notes.append(f"processes left after cleanup: {run.leftovers}")
    return res


def _merged(run: BenchRun) -> dict[str, float]:
    """Return the merge time of every task merged so far (from the timeline)."""
    ended = run.master_done()
    run.timeline.poll()
    done = {e["task"]: e["t"] for e in run.timeline.find("merged")}
    if ended and not run.timeline.find("run-finished"):
        raise RuntimeError("the master ended before the run was over")
    return done


def _busy(
    run: BenchRun,
    res: ScaleResult,
    meter: CpuMeter,
    chains: int,
    chain_len: int,
    bulk: int,
    window_s: float,
    profile: Path | None,
) -> None:
    """Wait for the chains, then for the bulk tasks (at most window_s); read CPU meanwhile."""
    tails = [f"chain-{k}-{chain_len}" for k in range(1, chains + 1)] if chains else ["gate"]
    wait_for(
        lambda: all(t in _merged(run) for t in tails),
        60 + 3 * chains * chain_len,
        0.05,
        "the chains to merge",
    )
    busy_from = meter.read()
    ready = max(_merged(run)[t] for t in tails)
    wanted = [f"bulk-{i}" for i in range(1, bulk + 1)]
    while True:
        done = _merged(run)
        if all(t in done for t in wanted) or time.time() >= ready + window_s:
            break
        time.sleep(0.1)  # polling the timeline file
    res.busy = CpuMeter.between(busy_from, meter.read())
    if res.busy.gone:
        res.notes.append(f"worker pids {res.busy.gone} ended while busy: not counted")
    verified = sorted(e["t"] for e in run.timeline.find("verified") if e["task"] in wanted)
    ends = sorted(done[t] for t in wanted if t in done)
    if len(ends) == bulk:
        res.bulk_done, res.bulk_s = bulk, ends[-1] - ready
        res.bulk_verified, res.verified_s = len(verified), verified[-1] - ready
        wait_for(run.master_done, 60, 0.1, "the master to end the run")
        return
    # time-boxed: what was merged (and verified) within the window
    res.bulk_done = sum(1 for t in ends if t <= ready + window_s)
    res.bulk_verified = sum(1 for t in verified if t <= ready + window_s)
    res.bulk_s = res.verified_s = window_s
    res.notes.append(
        f"throughput time-boxed: {res.bulk_done} of {bulk} bulk tasks merged in the "
        f"{window_s:g}s window"
    )
    if profile is not None:  # a profile is written only when the master returns
        assert run.master_pid is not None
        os.kill(run.master_pid, signal.SIGINT)
        wait_for(run.master_done, 60, 0.1, "the master to end")


def _parent_name(pid: int) -> str:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        return Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return "?"


def _analyse(run: BenchRun, res: ScaleResult, chains: int, chain_len: int, bulk: int) -> None:
    merged = {e["task"]: e["t"] for e in run.timeline.find("merged")}
    assigned = {e["task"]: (e["t"], e["worker"]) for e in run.timeline.find("assigned")}
    started = run.started_at()
    res.failed = len(run.timeline.find("task-failed"))
    for k in range(1, chains + 1):
        for j in range(1, chain_len + 1):
            tid, dep = f"chain-{k}-{j}", "gate" if j == 1 else f"chain-{k}-{j - 1}"
            if tid not in assigned or dep not in merged:
                continue
            t_assigned, wid = assigned[tid]
            t_started = started.get((tid, wid))
            res.chain_ready_to_assigned_ms.append((t_assigned - merged[dep]) * 1000)
            if t_started is not None:
                res.chain_ready_to_started_ms.append((t_started - merged[dep]) * 1000)
                res.chain_assigned_to_started_ms.append((t_started - t_assigned) * 1000)
    for i in range(1, bulk + 1):
        tid = f"bulk-{i}"
        if tid in assigned and (tid, assigned[tid][1]) in started:
            res.assign_to_start_ms.append(
                (started[(tid, assigned[tid][1])] - assigned[tid][0]) * 1000
            )


# -- baselines --------------------------------------------------------------------------------


def _fanout_worker(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send((msg, time.time()))  # started (and, a no-op, finished)


def fanout(workers: int, tasks: int, chain: int) -> tuple[float, list[float]]:
    """Return tasks/min of no-op tasks fanned out to persistent processes over pipes, and the
    ready-to-started latencies (ms) of a chain run one task at a time."""
    ctx = multiprocessing.get_context("fork")
    pairs = [ctx.Pipe() for _ in range(workers)]
    procs = [ctx.Process(target=_fanout_worker, args=(child,)) for _, child in pairs]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pairs]
    try:
        todo = list(range(tasks))
        t0 = time.perf_counter()
        busy = 0
        for c in conns:
            if todo:
                c.send(todo.pop())
                busy += 1
        while busy:
            for ready_conn in wait(conns):
                assert isinstance(ready_conn, Connection)
                ready_conn.recv()
                busy -= 1
                if todo:
                    ready_conn.send(todo.pop())
                    busy += 1
        rate = tasks / (time.perf_counter() - t0) * 60
        latencies = []
        ready = time.time()
        for i in range(chain):
            conns[i % workers].send(i)
            _, started = conns[i % workers].recv()
            latencies.append((started - ready) * 1000)
            ready = time.time()  # the next task is ready once this one is done
        return rate, latencies
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def git_floor(tasks: int) -> float:
    """Return tasks/min when each task costs only the git a branch-per-task flow needs."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="multibot-bench-git-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        wt = Path(tmp) / "wt"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(wt)], cwd=repo, check=True)
        tip = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        t0 = time.perf_counter()
        for i in range(tasks):
            # master: branch the task off integration in the worker's worktree
            subprocess.run(["git", "switch", "-q", "-c", f"t{i}", tip], cwd=wt, check=True)
            # worker: anything to commit?
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=wt, check=True, stdout=subprocess.DEVNULL
            )
            # master: anything to merge?
            subprocess.run(
                ["git", "rev-list", "--count", f"t{i}", "--not", tip],
                cwd=repo,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return tasks / (time.perf_counter() - t0) * 60


@dataclass
class Baselines:
    py_start_ms: float
    worker_import_ms: float
    bare_rss_kb: int
    import_rss_kb: int
    fanout_per_min: float
    fanout_latency_ms: list[float]
    git_per_min: float


def baselines(workers: int, quick: bool) -> Baselines:
    print("\n== baselines", flush=True)
    runs = 3 if quick else 7
    fan_rate, fan_lat = fanout(workers, 2000 if quick else 20000, 200)
    return Baselines(
        py_start_ms=process_start_cost([PY, "-c", "pass"], runs) * 1000,
        worker_import_ms=process_start_cost([PY, "-c", WORKER_IMPORTS], runs) * 1000,
        bare_rss_kb=resident_kb("pass")[0],
        import_rss_kb=resident_kb(WORKER_IMPORTS)[0],
        fanout_per_min=fan_rate,
        fanout_latency_ms=fan_lat,
        git_per_min=git_floor(30 if quick else 100),
    )


# -- the report -------------------------------------------------------------------------------


def print_profile(path: Path, lines: int = 25) -> None:
    """Print the master's hottest functions (cumulative, then own time)."""
    if not path.exists():
        print(f"(no profile written at {path})")
        return
    for key in ("cumulative", "tottime"):
        print(f"\n-- master profile, by {key} ({path})")
        stats = pstats.Stats(str(path))
        stats.sort_stats(key).print_stats(lines)
    workers = sorted(path.parent.glob("w*-g*.prof"))
    if workers:
        print(f"\n-- all {len(workers)} worker profiles together, by own time")
        stats = pstats.Stats(*map(str, workers))
        stats.sort_stats("tottime").print_stats(lines)


def report(
    results: list[ScaleResult], main: ScaleResult, base: Baselines, cores: float
) -> dict[str, object]:
    mb = 1024.0
    print("\n== start-up, idle and busy cost by number of workers (CPU in % of one core)")
    rows = []
    for r in results:
        rows.append(
            [
                r.workers,
                fmt(r.spawned_s),
                fmt(r.beating_s),
                fmt(pct(r.beat_after_spawn_s, 0.5), 2),
                fmt(r.idle.master),
                fmt(r.idle.master_all),
                fmt(r.idle.tmux),
                fmt(r.idle.workers),
                fmt(r.idle.workers / r.workers, 2),
                fmt(r.busy.master),
                fmt(r.busy.master_all),
                fmt(r.busy.workers),
                fmt(pct(r.rss_kb, 0.5) / mb),
                fmt(max(r.rss_kb, default=0) / mb),
                fmt(pct(r.pss_kb, 0.5) / mb),
                fmt(r.master_rss_kb / mb),
            ]
        )
    print(
        table(
            [
                "workers",
                "spawned s",
                "beating s",
                "beat-spawn s",
                "idle master",
                "+git/tmux",
                "tmux srv",
                "workers",
                "per worker",
                "busy master",
                "+git/tmux",
                "workers",
                "RSS MB p50",
                "RSS max",
                "PSS p50",
                "master RSS",
            ],
            rows,
        )
    )
    if any(r.pane_shells for r in results):
        print(
            f"(a /bin/sh stays between tmux and {max(r.pane_shells for r in results)} "
            "worker processes: its memory is not counted above)"
        )

    print(f"\n== throughput and latency ({main.workers} workers, no-op tasks)")
    tput: list[list[object]] = [
        [
            "multibot: merged",
            main.bulk_done,
            fmt(main.bulk_s, 2),
            fmt(main.tasks_per_min, 0),
            fmt(pct(main.assign_to_start_ms, 0.5)),
            fmt(pct(main.assign_to_start_ms, 0.99)),
        ],
        [
            "multibot: run and verified (not yet merged)",
            main.bulk_verified,
            fmt(main.verified_s, 2),
            fmt(main.verified_per_min, 0),
            "",
            "",
        ],
        [
            f"fan-out baseline ({main.workers} procs, pipes)",
            "",
            "",
            fmt(base.fanout_per_min, 0),
            "",
            "",
        ],
        ["git floor (3 git commands/task)", "", "", fmt(base.git_per_min, 0), "", ""],
    ]
    print(table(["", "tasks", "seconds", "tasks/min", "assign→start p50 ms", "p99 ms"], tput))
    print(
        f"CPU per merged task in the bulk phase: {fmt(main.cpu_ms_per_task(), 1)} ms (master "
        f"with its git and tmux clients {fmt(main.cpu_ms_per_task('master_all'), 1)}, workers "
        f"with their git {fmt(main.cpu_ms_per_task('workers'), 1)}, tmux server "
        f"{fmt(main.cpu_ms_per_task('tmux'), 1)}): {cores:g} cores allow about "
        f"{fmt(cores * 60_000 / main.cpu_ms_per_task(), 0)} tasks/min"
    )
    lat = [
        ["multibot chains: ready → assigned", *_p(main.chain_ready_to_assigned_ms)],
        ["multibot chains: assigned → started", *_p(main.chain_assigned_to_started_ms)],
        ["multibot chains: ready → started", *_p(main.chain_ready_to_started_ms)],
        ["fan-out baseline: ready → started", *_p(base.fanout_latency_ms)],
    ]
    print()
    print(table(["latency (ms)", "n", "p50", "p90", "p99", "max"], lat))
    print("\n== process baselines")
    print(
        table(
            ["", "start ms", "RSS MB"],
            [
                ["python -c pass", fmt(base.py_start_ms), fmt(base.bare_rss_kb / mb)],
                [
                    "python importing a worker's modules",
                    fmt(base.worker_import_ms),
                    fmt(base.import_rss_kb / mb),
                ],
            ],
        )
    )

    biggest = max(results, key=lambda r: r.workers)
    rss_max = max((max(r.rss_kb, default=0) for r in results), default=0) / mb
    p99 = pct(main.chain_ready_to_started_ms, 0.99)
    all_up = biggest.workers >= TARGET_WORKERS and biggest.beating_s == biggest.beating_s
    detect: list[tuple[str, str, str, bool | None]] = [
        (
            "workers at once",
            f"{TARGET_WORKERS}",
            f"{biggest.workers} (all beating in {biggest.beating_s:.1f}s)",
            all_up if biggest.workers >= TARGET_WORKERS else None,
        ),
        (
            "no-op tasks/min, 20 workers",
            f">= {TARGET_TASKS_PER_MIN:.0f}",
            f"{main.tasks_per_min:.0f} ({main.workers} workers)",
            main.tasks_per_min >= TARGET_TASKS_PER_MIN if main.workers == 20 else None,
        ),
        (
            "ready → started p99",
            f"<= {TARGET_P99_MS:.0f} ms",
            f"{p99:.0f} ms",
            p99 <= TARGET_P99_MS,
        ),
        (
            "resident per worker",
            f"<= {TARGET_RSS_MB:.0f} MB",
            f"{rss_max:.1f} MB max",
            rss_max <= TARGET_RSS_MB,
        ),
    ]
    verdict = {True: "met", False: "MISSED", None: "not run"}
    print("\n== targets")
    print(
        table(
            ["target", "wanted", "measured", "met"],
            [[a, b, c, verdict[d]] for a, b, c, d in detect],
        )
    )
    for r in results:
        for note in r.notes:
            print(f"note ({r.workers} workers): {note}")
    return {
        "workers_max": biggest.workers,
        "all_beating_s": biggest.beating_s,
        "idle_master_cpu_pct": biggest.idle.master,
        "idle_master_all_cpu_pct": biggest.idle.master_all,
        "idle_worker_cpu_pct": biggest.idle.workers / biggest.workers,
        "rss_mb_p50": pct(biggest.rss_kb, 0.5) / mb,
        "rss_mb_max": rss_max,
        "tput_workers": main.workers,
        "tasks_per_min": main.tasks_per_min,
        "cpu_ms_per_task": main.cpu_ms_per_task(),
        "verified_per_min": main.verified_per_min,
        "fanout_tasks_per_min": base.fanout_per_min,
        "git_floor_tasks_per_min": base.git_per_min,
        "tput_ratio_vs_git_floor": main.tasks_per_min / base.git_per_min,
        "ready_to_started_p50_ms": pct(main.chain_ready_to_started_ms, 0.5),
        "ready_to_started_p99_ms": p99,
        "fanout_p50_ms": pct(base.fanout_latency_ms, 0.5),
        "py_start_ms": base.py_start_ms,
        "failed": sum(r.failed for r in results),
        "leftover_processes": sum(
            bool(n.startswith("processes left")) for r in results for n in r.notes
        ),
        "targets_met": sum(d is True for *_, d in detect),
        "targets_missed": sum(d is False for *_, d in detect),
    }


def _p(values: list[float]) -> list[str]:
    return [
        str(len(values)),
        fmt(pct(values, 0.5)),
        fmt(pct(values, 0.9)),
        fmt(pct(values, 0.99)),
        fmt(max(values, default=float("nan"))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of 10 workers (< 1 min)")
    parser.add_argument("--tasks", type=int, default=None, help="bulk tasks of the 20-worker run")
    parser.add_argument(
        "--workers",
        default="10,25,50",
        help="worker counts of the start-up and idle runs ('' for none)",
    )
    parser.add_argument(
        "--window", type=float, default=150.0, help="longest bulk phase, seconds (time-box)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the throughput run's master under cProfile, keep it here",
    )
    parser.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="run everything on at most this many cores' worth of CPU (a cgroup quota; root)",
    )
    args = parser.parse_args(argv)
    info = machine()
    if args.cpus is not None:
        info["cpu quota"] = f"{args.cpus:g} cores"
    print_machine(info)
    profile = args.profile.resolve() / "master.prof" if args.profile else None
    if profile:
        profile.parent.mkdir(parents=True, exist_ok=True)
    results: list[ScaleResult] = []
    with sigterm_as_exit(), cpu_limit(args.cpus):
        if args.quick:
            main_run = run_scale(10, args.tasks or 30, 2, 5, 4.0, 25.0, profile)
            results.append(main_run)
        else:
            for n in (int(x) for x in args.workers.split(",") if x.strip()):
                results.append(run_scale(n, 0, 0, 0, 6.0, 0.0))
            main_run = run_scale(20, args.tasks or 600, 4, 50, 6.0, args.window, profile)
            results.append(main_run)
            results.sort(key=lambda r: r.workers)
        base = baselines(main_run.workers, args.quick)
    summary = report(results, main_run, base, args.cpus or os.cpu_count() or 1)
    if profile:
        print(
            f"\nnote: the {main_run.workers}-worker run's master ran under cProfile: its "
            "figures above are slower than without it"
        )
        print_profile(profile)
    print()
    print(kv_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
