"""Benchmark the verify -> merge pipeline with checks that take time, against the serial baseline.

    .venv/bin/python bench/pipeline.py                      # the issue's two sleep scenarios
    .venv/bin/python bench/pipeline.py --case pytest        # a CPU-bound project check (pytest)
    .venv/bin/python bench/pipeline.py --tasks 24 --work 1 --verify 2 --check 3 --workers 8 \
        --fail-verify t05 --break-check ""

Each scenario runs a real master (shell backend, private tmux server) on a fresh repository,
once per pipeline setting, in the same run:
* multibot: the defaults (merge_batch_max 8, check_concurrency 2: the next batch is checked
  on top of the one being checked), and one-check: the same with one check at a time;
* baseline: merge_batch_max 1 and check_concurrency 1, a project check per merge, one at a time.
A task is `sleep WORK` and a file of its own; its verify command is `sleep VERIFY` (a task in
--fail-verify fails its first one); the project check is `sleep CHECK` and fails while a file
left by a task in --break-check is there (that task removes it on its second attempt).
The sleeps make the figures measure the pipeline's structure, not this machine's speed.

Measured from the first assignment to the last merge (the makespan), against the structural
bound ceil(tasks/workers)*work + verify + check (the work in waves, the last wave's verify, one
project check); the number of project checks; for a batch that failed, the checks from its
failure to its culprit, against 1 + 2*ceil(log2(batch size)). The pytest case replaces the
sleeps of the check by a real test suite that uses the CPU (--suite-s seconds of it), where
batching is what saves time.

Ends with one line of key=value pairs.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PY,
    BenchRun,
    fmt,
    kv_line,
    machine,
    print_machine,
    sigterm_as_exit,
    table,
    wait_for,
)

SETTINGS = {
    "multibot": {"merge_batch_max": 8, "check_concurrency": 2},
    "one-check": {"merge_batch_max": 8, "check_concurrency": 1},
    "baseline": {"merge_batch_max": 1, "check_concurrency": 1},
}


@dataclass
class Scenario:
    label: str
    tasks: int
    work: float
    verify: float
    check: float
    workers: int
    fail_verify: tuple[str, ...] = ()
    break_check: tuple[str, ...] = ()
    suite_s: float = 0.0  # > 0: the project check is a pytest suite using this much CPU

    @property
    def bound(self) -> float:
        check = self.suite_s or self.check
        return math.ceil(self.tasks / self.workers) * self.work + self.verify + check


@dataclass
class Result:
    setting: str
    makespan: float
    checks: int
    merged: int
    failed: int
    to_culprit: list[tuple[int, int]]  # (failed batch size, checks from failure to culprit)
    tips_clean: bool


def plan_tasks(s: Scenario, marks: Path) -> list[dict[str, Any]]:
    tasks = []
    for n in range(1, s.tasks + 1):
        tid = f"t{n:02d}"
        commands = [f"sleep {s.work:g}", f"echo {tid} > {tid}.txt"]
        if tid in s.break_check:
            first = marks / f"{tid}.broke"
            commands.append(
                f"if [ -f {first} ]; then git rm -q broken-{tid}; "
                f"else touch {first}; echo broken > broken-{tid}; fi"
            )
        verify = f"sleep {s.verify:g}"
        if tid in s.fail_verify:
            once = marks / f"{tid}.verify"
            verify += f"; if [ ! -f {once} ]; then touch {once}; exit 1; fi"
        tasks.append(
            {
                "id": tid,
                "title": tid,
                "description": tid,
                "commands": commands,
                "verify": verify,
                "model": "haiku",
            }
        )
    return tasks


SUITE = """
import hashlib, os, time
import pytest

SECONDS = float(os.environ.get("SUITE_S", "1"))


@pytest.mark.parametrize("n", range(8))
def test_work(n):
    end = time.process_time() + SECONDS / 8
    h = b"x"
    while time.process_time() < end:
        h = hashlib.sha256(h).digest()
    assert not [p for p in os.listdir(".") if p.startswith("broken-")]
"""


def run_one(s: Scenario, setting: str) -> Result:
    with BenchRun(f"pipeline-{setting}") as run:
        marks = run.tmp / "marks"
        marks.mkdir()
        if s.suite_s:
            suite = run.repo / "tests"
            suite.mkdir()
            (suite / "test_suite.py").write_text(textwrap.dedent(SUITE))
            git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
            subprocess.run([*git, "add", "-A"], cwd=run.repo, check=True)
            subprocess.run([*git, "commit", "-qm", "suite"], cwd=run.repo, check=True)
            check = f"SUITE_S={s.suite_s:g} {PY} -m pytest -q -x -p no:cacheprovider tests"
        else:
            check = f"sleep {s.check:g}; ! ls broken-* >/dev/null 2>&1"
        run.configure(
            {
                "max_workers": s.workers,
                "verify": check,
                "verify_concurrency": s.workers,
                "idle_worker_timeout": 60,
                **SETTINGS[setting],
            }
        )
        plan = run.write_plan(plan_tasks(s, marks))
        run.start_master(plan)
        timeout = 60 + s.tasks * (s.check + s.suite_s * 2 + s.work + s.verify) * 2
        wait_for(lambda: run.timeline.poll() is not None and run.master_done(), timeout, 0.2)
        run.timeline.poll()
        events = run.timeline.events
        first = min(e["t"] for e in events if e.get("event") == "assigned")
        merged = [e for e in events if e.get("event") == "merged"]
        last = max((e["t"] for e in merged), default=first)
        checks = [e for e in events if e.get("event") == "check-started"]
        return Result(
            setting,
            last - first,
            len(checks),
            len(merged),
            len([e for e in events if e.get("event") == "task-failed"]),
            to_culprit(events),
            tips_clean(run),
        )


def to_culprit(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """For each failed batch that led to a culprit: its size, and the checks it cost."""
    out = []
    for k, e in enumerate(events):
        if e.get("event") != "check-failed" or e.get("text", "").find("bisecting") >= 0:
            continue
        batch = set(e.get("tasks") or [])
        if any(
            p.get("event") == "check-started"
            and p.get("t", 0) < e["t"]
            and "bisecting" in p["text"]
            and set(p.get("tasks") or []) <= batch
            for p in events[:k]
        ):
            continue  # a step of an earlier bisection
        checks = 1
        for later in events[k + 1 :]:
            tasks = set(later.get("tasks") or [])
            if later.get("event") == "check-started" and tasks and tasks <= batch:
                checks += 1
            if later.get("event") == "culprit" and later.get("task") in batch:
                out.append((len(batch), checks))
                break
    return out


def tips_clean(run: BenchRun) -> bool:
    """Whether no first-parent commit of the integration branch holds a broken-* file."""
    revs = subprocess.run(
        ["git", "rev-list", "--first-parent", "multibot/integration"],
        cwd=run.repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rev in revs:
        names = subprocess.run(
            ["git", "ls-tree", "--name-only", rev], cwd=run.repo, capture_output=True, text=True
        ).stdout.split()
        if any(n.startswith("broken-") for n in names):
            return False
    return True


def report(s: Scenario, results: list[Result]) -> dict[str, object]:
    print(
        f"\n== {s.label}: {s.tasks} tasks x (work {s.work:g}s, verify {s.verify:g}s, "
        + (f"pytest check ~{s.suite_s:g}s CPU" if s.suite_s else f"check {s.check:g}s")
        + f") on {s.workers} workers; fail verify: {','.join(s.fail_verify) or '-'}; "
        f"break check: {','.join(s.break_check) or '-'}"
    )
    print(f"   structural bound ceil(N/W)*work + verify + check = {s.bound:g}s")
    rows = []
    for r in results:
        culprit = "; ".join(
            f"batch {n}: {c} checks (bound {1 + 2 * math.ceil(math.log2(n)) if n > 1 else 1})"
            for n, c in r.to_culprit
        )
        rows.append(
            [
                r.setting,
                fmt(r.makespan),
                fmt(r.makespan / s.bound, 2) + "x",
                r.checks,
                f"{r.merged}/{s.tasks}",
                r.failed,
                "yes" if r.tips_clean else "NO",
                culprit or "-",
            ]
        )
    print(
        table(
            [
                "setting",
                "makespan s",
                "x bound",
                "checks",
                "merged",
                "failed",
                "tips clean",
                "to culprit",
            ],
            rows,
        )
    )
    key = s.label.split()[0]
    return {
        f"{key}_{r.setting.replace(', ', '_').replace(' ', '_')}_x": r.makespan / s.bound
        for r in results
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["sleep", "pytest", "all"], default="sleep")
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--work", type=float, default=1.0)
    parser.add_argument("--verify", type=float, default=2.0)
    parser.add_argument("--check", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--fail-verify", default="t05")
    parser.add_argument("--break-check", default="")
    parser.add_argument("--suite-s", type=float, default=3.0, help="CPU seconds of the suite")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which settings to run")
    args = parser.parse_args(argv)
    ids = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
    if args.tasks is not None:
        scenarios = [
            Scenario(
                "custom",
                args.tasks,
                args.work,
                args.verify,
                args.check,
                args.workers,
                ids(args.fail_verify),
                ids(args.break_check),
            )
        ]
    else:
        scenarios = []
        if args.case in ("sleep", "all"):
            scenarios += [
                Scenario("verify-fail", 24, 1, 2, 3, 8, fail_verify=("t05",)),
                Scenario("check-break", 16, 1, 1, 2, 8, break_check=("t05",)),
            ]
        if args.case in ("pytest", "all"):
            scenarios.append(
                Scenario("pytest", 16, 1, 0.5, 0, 8, break_check=("t05",), suite_s=args.suite_s)
            )
    print_machine(machine())
    summary: dict[str, object] = {}
    settings = [s for s in args.settings.split(",") if s]
    with sigterm_as_exit():
        for s in scenarios:
            results = [run_one(s, setting) for setting in settings]
            summary.update(report(s, results))
    print()
    print(kv_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
