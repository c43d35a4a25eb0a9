"""Benchmark the start path piece by piece: one worker alone, and two of its steps.

    .venv/bin/python bench/startpath.py [--tasks N]

1. One real worker process (`python -m multibot worker`, shell backend), no master, no tmux:
   the benchmark sends it N no-op assignments one after the other, as the master would (its
   repository, its worktree, the integration branch as base), and waits for each report.
   Measured: the worker's CPU per task from /proc (its own, and with its reaped git children)
   and the time per task. This is what every no-op task costs a worker on this machine, with
   nothing else running: on a loaded machine the same CPU is what the workers compete for.
2. `git switch -c <branch> <tip>` against `git switch -c <branch>` in a worktree already at
   the tip, and against the worker's quick start there (`GitRepo.quick_start` with the
   worktree vouched clean: its lock, HEAD read by GitPython, no `git status`, then
   `git switch -c <branch>`), alternated.
3. Putting a message into an inbox (`mailbox.stage` then `publish`), synced and not synced
   (assignments are not synced: their task file is the record), alternated.

Ends with one line of key=value pairs. docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PY,
    cpu_seconds,
    fmt,
    kv_line,
    machine,
    make_repo,
    pct,
    print_machine,
    table,
    wait_for,
)
from multibot import mailbox, protocol
from multibot.layout import MASTER_ID, Home
from multibot.worktrees import GitRepo


def worker_cost(tmp: Path, tasks: int) -> dict[str, float]:
    """Run one worker through tasks no-op assignments; return its cost per task."""
    home = Home(tmp / "home")
    git = GitRepo(make_repo(tmp / "repo"), home.integration_worktree)
    git.ensure_integration()
    mailbox.create_inbox(home, MASTER_ID)
    mailbox.create_inbox(home, "w1")
    inbox = mailbox.Receiver(home, MASTER_ID, rescan_s=0.2)
    argv = [PY, "-m", "multibot", "--home", str(home.root), "worker", "--id", "w1"]
    argv += ["--backend", "shell"]
    with open(tmp / "worker.out", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def run(tid: str) -> None:
            payload = protocol.TaskAssignment(
                title=tid,
                description=tid,
                branch=git.branch_for(tid),
                working_directory=str(home.worktree("w1")),
                attempt=1,
                base_branch=git.integration,
                repo=str(git.root),
            )
            message = protocol.make(payload, sender=MASTER_ID, recipient="w1", task_id=tid)
            mailbox.send(home, message)

            def reported() -> bool:
                got = inbox.fetch()
                inbox.done(*got)
                for m in got:
                    if isinstance(m.payload, protocol.ErrorReport):
                        raise RuntimeError(f"the worker failed {tid}: {m.payload.message}")
                return any(isinstance(m.payload, protocol.TaskComplete) for m in got)

            wait_for(reported, 30, what=f"the report of {tid}", interval=0.001)

        for i in range(3):  # the first makes the worktree, the careful way
            run(f"warm-{i}")
        own, all_, t0 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, True), time.perf_counter()
        for i in range(tasks):
            run(f"t{i}")
        took = time.perf_counter() - t0
        own2, all2 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, True)
        assert None not in (own, all_, own2, all2), "the worker died"
        return {
            "worker_ms_per_task": took / tasks * 1000,
            "worker_cpu_ms_per_task": (own2 - own) / tasks * 1000,  # type: ignore[operator]
            "worker_cpu_with_git_ms_per_task": (all2 - all_) / tasks * 1000,  # type: ignore[operator]
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        inbox.close()


def alternated(runs: int, **ways: Callable[[int], None]) -> dict[str, list[float]]:
    """Time each way runs times, taking turns; return the times in ms."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(runs):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way(i)
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


def steps(tmp: Path, runs: int) -> dict[str, list[float]]:
    """Time git switch -c with and without the tip and the quick start, and a message synced
    or not."""
    repo = make_repo(tmp / "steps-repo")
    wt = tmp / "steps-wt"
    subprocess.run(["git", "worktree", "add", "-q", "-b", "w", str(wt)], cwd=repo, check=True)
    tip = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()

    def switch(*at: str) -> Callable[[int], None]:
        def way(i: int) -> None:
            argv = ["git", "switch", "-q", "--no-track", "-c", f"b{len(at)}-{i}", *at]
            subprocess.run(argv, cwd=wt, check=True)

        return way

    git = GitRepo(repo, tmp / "steps-home" / "_integration")
    git.ensure_integration()

    def quick(i: int) -> None:
        if git.quick_start(wt, f"q{i}", clean_at=tip) is None:
            raise RuntimeError("the quick start fell back to the careful way")

    home = Home(tmp / "steps-home")
    mailbox.create_inbox(home, "w1")

    def put(sync: bool) -> Callable[[int], None]:
        def way(i: int) -> None:
            m = protocol.make(protocol.StatusRequest(), sender=MASTER_ID, recipient="w1")
            mailbox.stage(home, m, fsync=sync).publish()

        return way

    return {
        **alternated(
            runs,
            **{
                "git switch -c <b> <tip>": switch(tip),
                "git switch -c <b>": switch(),
                "quick start, vouched clean": quick,
            },
        ),
        **alternated(
            runs * 2, **{"message into an inbox, synced": put(True), "not synced": put(False)}
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="no-op tasks for the worker")
    args = parser.parse_args()
    print_machine(machine())
    with tempfile.TemporaryDirectory(prefix="multibot-bench-start-") as name:
        tmp = Path(name)
        cost = worker_cost(tmp, args.tasks)
        times = steps(tmp, 150)
    print(f"\n== one worker alone, {args.tasks} no-op tasks one after the other")
    rows = [
        ["time per task (send, start, finish, report)", fmt(cost["worker_ms_per_task"])],
        ["worker CPU per task", fmt(cost["worker_cpu_ms_per_task"])],
        ["worker CPU per task with its git children", fmt(cost["worker_cpu_with_git_ms_per_task"])],
    ]
    print(table(["", "ms"], rows))
    print("\n== steps of the start path, alternated (ms)")
    rows = [
        [k, len(v), fmt(pct(v, 0.5), 2), fmt(pct(v, 0.9), 2), fmt(pct(v, 0.99), 2)]
        for k, v in times.items()
    ]
    print(table(["step", "n", "p50", "p90", "p99"], rows))
    keys = ["switch_tip", "switch_here", "quick_start", "message_synced", "message_unsynced"]
    print()
    print(
        kv_line(
            {
                **cost,
                **{f"{k}_p50_ms": pct(v, 0.5) for k, v in zip(keys, times.values(), strict=True)},
                **{f"{k}_p99_ms": pct(v, 0.99) for k, v in zip(keys, times.values(), strict=True)},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
