"""Benchmark recovery: a worker killed or frozen mid-task, and the master killed mid-run.

    .venv/bin/python bench/recovery.py [--quick]

Each run starts a real master (shell backend) in a private tmux server, config:
heartbeat_interval I (0.5 s, and 1.0 s unless --quick), heartbeat_misses 3,
restart_backoff = restart_backoff_max = 0.2 s (every restart waits the same), max_restarts 20.

Worker scenarios (one worker, tasks `sleep 2` run one after the other):
* kill: 0.5 s into a task the worker process gets SIGKILL (its pane's shell exits with it).
* freeze: 0.5 s into a task the worker gets SIGSTOP: the process stays, only its heartbeat
  stops, which is the case the heartbeat exists for.
Measured from the signal (the benchmark's time.time() just before os.kill): detection = the
timeline's "worker-dead" event for that worker; replacement running = the first heartbeat of
the next generation with a live status (its own time stamp, polled every 10 ms); task done =
the task's "merged" event (the replacement runs the 2 s task again from the start). Baseline:
heartbeat_interval x heartbeat_misses, the detection bound the configuration promises.

Merge queue scenario (4 workers, 16 tasks, a 1.5 s project check that two tasks break on
their first attempt): the master is killed while a batch is checked, and again while a half of
a failed batch is checked (a bisection), and started again each time; every task must be
merged exactly once, with nothing failed.

Master scenario (3 workers, 60 tasks `sleep 0.3`): SIGKILL to the master mid-run; as soon as
its pane is dead the benchmark starts it again in the same pane (resuming from state/).
Measured: kill to the timeline's "master-restarted" event (state rebuilt), and to the first
"assigned" or "merged" event after it (back in control). Baseline: starting a python that
imports the master's modules, the floor of any restart. Afterwards every task must be merged
exactly once.

Ends with one line of key=value pairs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LIVE,
    PY,
    BenchRun,
    alive,
    fmt,
    kv_line,
    machine,
    noop_task,
    pct,
    print_machine,
    process_start_cost,
    sigterm_as_exit,
    table,
    wait_for,
)

MISSES = 3
BACKOFF = 0.2
TASK_S = 2.0
INTO_TASK_S = 0.5
MASTER_IMPORTS = "import multibot.cli, multibot.runner, multibot.master, multibot.worktrees"
TARGET_DETECT_INTERVALS = 3.0
TARGET_REPLACE_S = 5.0


@dataclass
class WorkerCase:
    how: str  # "kill" | "freeze"
    interval: float
    task: str
    detect_s: float = float("nan")
    replaced_s: float = float("nan")  # signal -> first beat of the next generation
    merged_s: float = float("nan")
    reason: str = ""
    worker: str = "w1"
    load: int = 1  # workers of the run, all busy

    @property
    def label(self) -> str:
        busy = f", {self.load} busy workers" if self.load > 1 else ""
        return f"{self.how} @ {self.interval:g}s{busy}"

    @property
    def replace_after_detect_s(self) -> float:
        return self.replaced_s - self.detect_s

    @property
    def detect_intervals(self) -> float:
        return self.detect_s / self.interval


@dataclass
class MasterCase:
    restarted_s: float = float("nan")  # kill -> "master-restarted"
    control_s: float = float("nan")  # kill -> first assigned/merged after it
    respawn_s: float = float("nan")  # kill -> the benchmark started it again


@dataclass
class MasterRun:
    cases: list[MasterCase] = field(default_factory=list)
    tasks: int = 0
    merged_once: int = 0
    merged_twice: int = 0
    recovered_after_merged: int = 0  # seen merged, then recovered as merged by the next master
    failed: int = 0


def worker_cases(interval: float, kills: int, freezes: int) -> list[WorkerCase]:
    """Run one master with one worker and break it kills + freezes times, a task each."""
    cases = [WorkerCase("kill", interval, f"k{i}") for i in range(1, kills + 1)]
    cases += [WorkerCase("freeze", interval, f"f{i}") for i in range(1, freezes + 1)]
    print(
        f"\n== worker recovery, heartbeat_interval {interval:g}s: {kills} kill(s), "
        f"{freezes} freeze(s)",
        flush=True,
    )
    with BenchRun(f"recovery-w{interval:g}") as run:
        run.configure(
            {
                "max_workers": 1,
                "heartbeat_interval": interval,
                "heartbeat_misses": MISSES,
                "restart_backoff": BACKOFF,
                "restart_backoff_max": BACKOFF,
                "max_restarts": 20,
                "idle_worker_timeout": 3600,
            }
        )
        tasks, prev = [], None
        for c in cases:
            tasks.append(noop_task(c.task, [prev] if prev else [], [f"sleep {TASK_S:g}"]))
            prev = c.task
        run.start_master(run.write_plan(tasks))
        for c in cases:
            _break_worker(run, c)
            print(
                f"   {c.how:6} {c.task}: dead after {c.detect_s:.2f}s, replaced after "
                f"{c.replaced_s:.2f}s, merged after {c.merged_s:.2f}s",
                flush=True,
            )
        wait_for(run.master_done, 60, 0.1, "the run to finish")
    return cases


def loaded_cases(interval: float, workers: int, hows: list[str]) -> list[WorkerCase]:
    """Break workers one after another while every worker of the run is busy."""
    cases = [
        WorkerCase(h, interval, "", worker=f"w{2 + 3 * i}", load=workers)
        for i, h in enumerate(hows)
    ]
    print(
        f"\n== worker recovery under load: {workers} workers on `sleep {TASK_S:g}` tasks, "
        f"heartbeat_interval {interval:g}s: {', '.join(hows)}",
        flush=True,
    )
    with BenchRun(f"recovery-load{workers}") as run:
        run.configure(
            {
                "max_workers": workers,
                "heartbeat_interval": interval,
                "heartbeat_misses": MISSES,
                "restart_backoff": BACKOFF,
                "restart_backoff_max": BACKOFF,
                "max_restarts": 20,
                "idle_worker_timeout": 3600,
            }
        )
        n = workers * 12
        tasks = [noop_task(f"l{i}", [], [f"sleep {TASK_S:g}"]) for i in range(1, n + 1)]
        run.start_master(run.write_plan(tasks))
        wait_for(
            lambda: sum(hb.status == "working" for hb in run.heartbeats().values()) >= workers,
            60 + workers * 2,
            0.05,
            "every worker to be busy",
        )
        for c in cases:
            _break_worker(run, c)
            print(
                f"   {c.how:6} {c.worker} on {c.task}: dead after {c.detect_s:.2f}s, replaced "
                f"after {c.replaced_s:.2f}s, merged after {c.merged_s:.2f}s",
                flush=True,
            )
    return cases


def _break_worker(run: BenchRun, c: WorkerCase) -> None:
    """Signal c.worker INTO_TASK_S into a task (c.task, or any it starts from now on) and time
    what the master does.

    The start is the worker's own "started" message (its state file names the task only
    LAZY_STATE_S later): a task picked by its state file could end, with a busy worker, before
    the signal, which then fell on the next one.
    """
    wid = c.worker
    looking = time.time()

    def on_task() -> tuple[int, int, str, float] | None:
        hb = run.heartbeats().get(wid)
        if hb is None or hb.status != "working":
            return None
        starts = [
            (at, tid)
            for (tid, w), at in run.started_at().items()
            if w == wid and (tid == c.task if c.task else at >= looking)
        ]
        if not starts:
            return None
        at, tid = max(starts)
        return hb.pid, hb.generation, tid, at

    pid, gen, c.task, started = wait_for(on_task, 60, 0.02, f"{wid} to start {c.task or 'a task'}")
    time.sleep(max(0.0, started + INTO_TASK_S - time.time()))  # mid-task on purpose
    run.timeline.poll()
    dead_before = len(run.timeline.find("worker-dead", worker=wid))
    t0 = time.time()
    os.kill(pid, signal.SIGKILL if c.how == "kill" else signal.SIGSTOP)

    replaced: float | None = None
    deadline = time.monotonic() + 60
    while replaced is None:
        hb = run.heartbeats().get(wid)
        if hb is not None and hb.generation > gen and hb.status in LIVE:
            replaced = hb.time
        if time.monotonic() > deadline:
            raise TimeoutError(f"no replacement for {wid} after {c.how} of {c.task}")
        time.sleep(0.01)  # polling the heartbeat file

    def merged() -> float | None:
        run.timeline.poll()
        found = run.timeline.find("merged", task=c.task)
        return found[0]["t"] if found else None

    t_merged = wait_for(merged, 90, 0.05, f"{c.task} to merge")
    dead = run.timeline.find("worker-dead", worker=wid)[dead_before:]
    if dead:
        c.detect_s, c.reason = dead[0]["t"] - t0, dead[0].get("text", "")
    c.replaced_s, c.merged_s = replaced - t0, t_merged - t0
    if c.how == "freeze" and alive(pid):
        os.kill(pid, signal.SIGKILL)  # the master should have; never leave it stopped


def kill_and_restart(run: BenchRun) -> MasterCase:
    """SIGKILL the run's master, start it again in its pane; time its way back."""
    c = MasterCase()
    assert run.master_pid is not None
    restarted_before = len(run.timeline.find("master-restarted"))
    t0 = time.time()
    os.kill(run.master_pid, signal.SIGKILL)
    wait_for(lambda: not alive(run.master_pid or 0), 10, 0.005, "the master to die")
    wait_for(lambda: run.tmux.is_dead(run.master_pane()), 10, 0.005, "its pane")
    c.respawn_s = time.time() - t0
    run.start_master(None)

    def back(before: int = restarted_before) -> tuple[float, float] | None:
        run.timeline.poll()
        found = run.timeline.find("master-restarted")[before:]
        if not found:
            return None
        t_restart = found[0]["t"]
        acts = [
            e["t"]
            for e in run.timeline.events
            if e["event"] in ("assigned", "merged", "check-started") and e["t"] >= t_restart
        ]
        return (t_restart, min(acts)) if acts else None

    t_restart, t_act = wait_for(back, 60, 0.02, "the master to act again")
    c.restarted_s, c.control_s = t_restart - t0, t_act - t0
    return c


def count_merges(run: BenchRun, out: MasterRun) -> None:
    """Fill out's merge counts from the run's timeline."""
    # A merge is done twice if the master says "merged" twice. A merge that landed just
    # before a kill is recorded by the next master as "merge-recovered" (git says it is in,
    # and nothing is done): that task's one merge, or the same one again if the kill fell
    # between the "merged" line and the task file that says so.
    merges: dict[str, int] = {}
    for e in run.timeline.find("merged"):
        merges[e.get("task", "")] = merges.get(e.get("task", ""), 0) + 1
    recovered = {e.get("task", "") for e in run.timeline.find("merge-recovered")}
    merged = {t for t in (merges.keys() | recovered) if t}
    out.merged_once = sum(1 for t in merged if merges.get(t, 0) <= 1)
    out.merged_twice = sum(1 for t in merged if merges.get(t, 0) > 1)
    out.recovered_after_merged = sum(1 for t in recovered if merges.get(t, 0))
    out.failed = len(run.timeline.find("task-failed"))


def queue_cases() -> MasterRun:
    """The master killed in a batch's project check, then in a bisection, and started again.

    4 workers, 16 tasks `sleep 0.3`, a project check of 1.5 s that fails while a file left by
    q03 or q11 (on their first attempt) is there; check_concurrency 2. Each kill falls while
    the check runs: the first on a batch, the second on a half of a failed batch.
    """
    out = MasterRun(tasks=16)
    print("\n== master recovery in the merge queue: killed in a batch check, in a bisection")
    with BenchRun("recovery-q") as run:
        marks = run.tmp / "marks"
        marks.mkdir()
        run.configure(
            {
                "max_workers": 4,
                "heartbeat_interval": 0.5,
                "heartbeat_misses": MISSES,
                "idle_worker_timeout": 3600,
                "check_concurrency": 2,
                "verify": "sleep 1.5; ! ls broken-* >/dev/null 2>&1",
            }
        )
        tasks = []
        for i in range(1, out.tasks + 1):
            tid, cmds = f"q{i:02d}", ["sleep 0.3"]
            if tid in ("q03", "q11"):
                once = marks / tid
                cmds.append(
                    f"if [ -f {once} ]; then git rm -q broken-{tid}; "
                    f"else touch {once}; echo x > broken-{tid}; fi"
                )
            tasks.append(noop_task(tid, [], cmds))
        run.start_master(run.write_plan(tasks))
        for bisecting in (False, True):

            def checking(bisecting: bool = bisecting) -> bool:
                run.timeline.poll()
                started = run.timeline.find("check-started")
                last = started[-1] if started else None
                return last is not None and ("bisecting" in last["text"]) == bisecting

            wait_for(checking, 120, 0.02, "a check to run")
            out.cases.append(kill_and_restart(run))
            c = out.cases[-1]
            where = "a bisection" if bisecting else "a batch check"
            print(
                f"   killed in {where}: restarted after {c.restarted_s:.2f}s, checking or "
                f"merging again after {c.control_s:.2f}s",
                flush=True,
            )
        wait_for(run.master_done, 180, 0.1, "the run to finish")
        run.timeline.poll()
        count_merges(run, out)
    return out


def master_cases(restarts: int) -> MasterRun:
    """Run 3 workers through 60 short tasks, killing and restarting the master `restarts` times."""
    out = MasterRun(tasks=60)
    print(f"\n== master recovery: {restarts} SIGKILL(s) and restart(s)", flush=True)
    with BenchRun("recovery-m") as run:
        run.configure(
            {
                "max_workers": 3,
                "heartbeat_interval": 0.5,
                "heartbeat_misses": MISSES,
                "restart_backoff": BACKOFF,
                "restart_backoff_max": BACKOFF,
                "idle_worker_timeout": 3600,
            }
        )
        tasks = [noop_task(f"m{i}", [], ["sleep 0.3"]) for i in range(1, out.tasks + 1)]
        run.start_master(run.write_plan(tasks))
        for k in range(restarts):

            def merged_enough(k: int = k) -> bool:
                run.timeline.poll()
                return len(run.timeline.find("merged")) >= 6 * (k + 1)

            wait_for(merged_enough, 60, 0.05, "tasks to merge before the kill")
            c = kill_and_restart(run)
            out.cases.append(c)
            print(
                f"   kill {k + 1}: restarted after {c.restarted_s:.2f}s, in control after "
                f"{c.control_s:.2f}s",
                flush=True,
            )
        wait_for(run.master_done, 120, 0.1, "the run to finish")
        run.timeline.poll()
        count_merges(run, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="interval 0.5 s only, one of each")
    args = parser.parse_args(argv)
    print_machine(machine())
    intervals = (0.5,) if args.quick else (0.5, 1.0)
    kills, freezes, restarts = (1, 1, 1) if args.quick else (3, 2, 3)
    cases: list[WorkerCase] = []
    with sigterm_as_exit():
        for interval in intervals:
            cases += worker_cases(interval, kills, freezes)
        load_hows = ["kill"] if args.quick else ["kill", "freeze", "kill"]
        cases += loaded_cases(0.5, 10, load_hows)
        master = master_cases(restarts)
        queue = queue_cases()
        floor = process_start_cost([PY, "-c", MASTER_IMPORTS], 3 if args.quick else 5)

    print("\n== worker recovery (seconds after the signal; 'intervals' = detection / interval)")
    rows = []
    for label in dict.fromkeys(c.label for c in cases):
        cs = [c for c in cases if c.label == label]
        interval = cs[0].interval
        rows.append(
            [
                label,
                len(cs),
                fmt(interval * MISSES, 2),
                fmt(pct([c.detect_s for c in cs], 0.5), 2),
                fmt(max(c.detect_s for c in cs), 2),
                fmt(max(c.detect_intervals for c in cs), 1),
                fmt(pct([c.replace_after_detect_s for c in cs], 0.5), 2),
                fmt(max(c.replace_after_detect_s for c in cs), 2),
                fmt(pct([c.replaced_s for c in cs], 0.5), 2),
                fmt(pct([c.merged_s for c in cs], 0.5), 2),
                fmt(pct([c.merged_s - TASK_S for c in cs], 0.5), 2),
            ]
        )
    print(
        table(
            [
                "case",
                "n",
                "bound I*misses",
                "detect p50",
                "detect max",
                "max intervals",
                "replace after detect p50",
                "max",
                "replaced p50",
                "merged p50",
                "merged - task",
            ],
            rows,
        )
    )
    print(
        f"(a task takes {TASK_S:g}s and is run again from its start by the replacement; "
        f"restart_backoff {BACKOFF:g}s)"
    )
    for c in cases:
        if c.reason:
            print(f"   {c.label}, {c.worker} on {c.task}: {c.reason}")

    print("\n== master recovery (seconds after SIGKILL)")
    mrows = [
        [f"kill {i + 1}", fmt(c.respawn_s, 3), fmt(c.restarted_s, 2), fmt(c.control_s, 2)]
        for i, c in enumerate(master.cases)
    ]
    mrows.append(["baseline: python importing the master's modules", "", fmt(floor, 2), ""])
    print(table(["", "restart issued", "master-restarted", "first assign/merge"], mrows))
    print(
        f"tasks: {master.tasks}, merged once: {master.merged_once}, merged twice: "
        f"{master.merged_twice}, failed: {master.failed} (merges seen again after a kill: "
        f"{master.recovered_after_merged})"
    )

    print(
        f"merge queue: tasks {queue.tasks}, merged once: {queue.merged_once}, merged twice: "
        f"{queue.merged_twice}, failed: {queue.failed}; back in control after "
        + ", ".join(f"{c.control_s:.2f}s" for c in queue.cases)
        + " (a batch check, a bisection)"
    )

    kill_detect = max((c.detect_intervals for c in cases if c.how == "kill"), default=float("nan"))
    freeze_detect = max(
        (c.detect_intervals for c in cases if c.how == "freeze"), default=float("nan")
    )
    replace = max((c.replace_after_detect_s for c in cases), default=float("nan"))
    targets = [
        (
            "dead worker detected (SIGKILL)",
            f"<= {TARGET_DETECT_INTERVALS:g} intervals",
            f"{kill_detect:.1f} intervals max",
            kill_detect <= TARGET_DETECT_INTERVALS,
        ),
        (
            "frozen worker detected (SIGSTOP)",
            f"<= {TARGET_DETECT_INTERVALS:g} intervals",
            f"{freeze_detect:.1f} intervals max",
            freeze_detect <= TARGET_DETECT_INTERVALS,
        ),
        (
            "replaced after detection",
            f"<= {TARGET_REPLACE_S:g} s",
            f"{replace:.2f} s max",
            replace <= TARGET_REPLACE_S,
        ),
        (
            "master kill: nothing lost or done twice",
            "every task merged once",
            f"{master.merged_once}/{master.tasks} once, {master.merged_twice} twice",
            master.merged_once == master.tasks and not master.merged_twice,
        ),
        (
            "master kill in a batch check and a bisection",
            "every task merged once",
            f"{queue.merged_once}/{queue.tasks} once, {queue.merged_twice} twice",
            queue.merged_once == queue.tasks and not queue.merged_twice and not queue.failed,
        ),
    ]
    print("\n== targets")
    print(
        table(
            ["target", "wanted", "measured", "met"],
            [[a, b, c, "met" if d else "MISSED"] for a, b, c, d in targets],
        )
    )

    k05 = [c for c in cases if c.interval == 0.5 and c.how == "kill" and c.load == 1]
    f05 = [c for c in cases if c.interval == 0.5 and c.how == "freeze" and c.load == 1]
    loaded = [c for c in cases if c.load > 1]
    summary: dict[str, object] = {
        "kill_detect_s": pct([c.detect_s for c in k05], 0.5),
        "kill_detect_intervals_max": kill_detect,
        "freeze_detect_s": pct([c.detect_s for c in f05], 0.5),
        "freeze_detect_intervals_max": freeze_detect,
        "detect_bound_s": 0.5 * MISSES,
        "replace_after_detect_s_max": replace,
        "kill_task_merged_s": pct([c.merged_s for c in k05], 0.5),
        "load_detect_s_max": max((c.detect_s for c in loaded), default=float("nan")),
        "load_replace_after_detect_s_max": max(
            (c.replace_after_detect_s for c in loaded), default=float("nan")
        ),
        "master_restarted_s": pct([c.restarted_s for c in master.cases], 0.5),
        "master_control_s": pct([c.control_s for c in master.cases], 0.5),
        "master_start_floor_s": floor,
        "merged_twice": master.merged_twice,
        "queue_merged_twice": queue.merged_twice,
        "queue_merged_once": queue.merged_once,
        "failed": master.failed,
        "targets_met": sum(d for *_, d in targets),
        "targets_missed": sum(not d for *_, d in targets),
    }
    print()
    print(kv_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
