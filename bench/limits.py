"""Benchmark the API's limits: N workers against a fake API with a token-bucket rate limit.

    .venv/bin/python bench/limits.py [--workers 8] [--tasks 24] [--turns 6] [--tokens 3000]
                                     [--rate 30000] [--burst 60000] [--latency 0.5]

Each run starts a real master (claude backend, private tmux server) on a fresh repository
with max_workers N. The workers run multibot's real claude backend, with bench/fake_claude.py
as the `claude` binary: a task is --turns calls to the fake API, each asking for --tokens input
tokens (a quarter more per earlier turn, as a context grows), answered after --latency seconds.
The fake API admits a call when its token bucket (--rate tokens a second, --burst at most)
holds the call's tokens, and answers 429 with retry-after 1 otherwise. A limited agent retries
once, then ends with the result Claude Code ends with (api_error_status 429): the worker
reports a limit, and the master resumes that session later without spending an attempt.

Two settings run in the same invocation, on the same API:
* adaptive: multibot's default: after a limit no agent starts until the backoff has passed,
  the agents allowed at once are halved, and each task finished allows one more (AIMD);
* fixed: adaptive_concurrency false: the same backoff, but always N agents at once, as a
  scheduler that does not adapt keeps them.

Measured: tasks merged per minute (first assignment to last merge), the 429s the API sent,
the tokens asked for by the calls it refused (sent in vain, and each a retry to make), the
tokens it admitted (the work itself, the same for both when nothing is redone), the limits
the master met, and the attempts the tasks used (one each: a limit spends none). The bucket
sustains rate / (tokens per call / latency) agents: 3 with the defaults, against 8 workers.

--repeat R runs R pairs, alternated, and compares their medians. Ends with one line of
key=value pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

SETTINGS = {"adaptive": True, "fixed": False}


class Bucket:
    """A token bucket: rate tokens a second, burst at most; a call takes its tokens or none."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, time.monotonic()
        self.lock = threading.Lock()
        self.admitted = self.refused = 0  # calls
        self.tokens_admitted = self.tokens_refused = 0

    def take(self, tokens: int) -> bool:
        with self.lock:
            now = time.monotonic()
            self.level = min(self.burst, self.level + (now - self.at) * self.rate)
            self.at = now
            if self.level >= tokens:
                self.level -= tokens
                self.admitted += 1
                self.tokens_admitted += tokens
                return True
            self.refused += 1
            self.tokens_refused += tokens
            return False


class FakeApi:
    """The Messages API as the benchmark needs it: a token bucket and a latency per call."""

    def __init__(self, bucket: Bucket, latency: float) -> None:
        self.bucket, self.latency = bucket, latency
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api.bucket.take(int(body["tokens"])):
                    time.sleep(api.latency)
                    self._send(200, {"type": "message", "content": []})
                else:
                    err = {"type": "rate_limit_error", "message": "rate limited"}
                    self._send(429, {"type": "error", "error": err}, {"retry-after": "1"})

            def _send(
                self, status: int, data: object, headers: dict[str, str] | None = None
            ) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                for k, v in {**(headers or {}), "Content-Length": str(len(raw))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Result:
    setting: str
    makespan: float
    merged: int
    failed: int
    attempts: int
    limits: int  # limits the master met
    refused: int  # 429s the API sent
    tokens_refused: int
    tokens_admitted: int
    min_allowed: int

    @property
    def per_min(self) -> float:
        return self.merged / self.makespan * 60 if self.makespan else 0.0


def run_one(args: argparse.Namespace, setting: str) -> Result:
    bucket = Bucket(args.rate, args.burst)
    api = FakeApi(bucket, args.latency)
    try:
        with BenchRun(f"limits-{setting}") as run:
            fake = run.tmp / "claude"
            fake.write_text(
                "#!/bin/sh\n"
                f"exec {PY} {Path(__file__).parent / 'fake_claude.py'} --api {api.url} "
                f"--turns {args.turns} --tokens {args.tokens} --state {run.tmp / 'sessions'} "
                '-- "$@"\n'
            )
            fake.chmod(0o755)
            run.configure(
                {
                    "max_workers": args.workers,
                    "adaptive_concurrency": SETTINGS[setting],
                    "limit_backoff": 1.0,
                    "limit_backoff_max": 8.0,
                    "idle_worker_timeout": 120,
                    "heartbeat_interval": 1.0,
                    "heartbeat_misses": 10,
                },
                {"backend": "claude", "claude_bin": str(fake), "sandbox": False},
            )
            run.backend = "claude"
            tasks = [
                {"id": f"t{i:02d}", "title": f"t{i:02d}", "description": f"task {i}"}
                for i in range(1, args.tasks + 1)
            ]
            run.start_master(run.write_plan(tasks))
            timeout = 120 + args.tasks * args.turns * (args.latency + 1) * 2
            wait_for(lambda: run.timeline.poll() is not None and run.master_done(), timeout, 0.2)
            run.timeline.poll()
            events = run.timeline.events
            first = min(e["t"] for e in events if e.get("event") == "assigned")
            merged = [e for e in events if e.get("event") == "merged"]
            last = max((e["t"] for e in merged), default=first)
            records = [run.task(t["id"]) for t in tasks]
            allowed = [
                int(e["text"].split(" workers allowed")[0].rsplit(" ", 3)[-3])
                for e in events
                if e.get("event") == "throttled" and " workers allowed" in e["text"]
            ]
            return Result(
                setting,
                last - first,
                len(merged),
                sum(r.status == "failed" for r in records),
                sum(r.attempts for r in records),
                sum(r.limits for r in records),
                bucket.refused,
                bucket.tokens_refused,
                bucket.tokens_admitted,
                min(allowed, default=args.workers),
            )
    finally:
        api.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--tasks", type=int, default=24)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--rate", type=float, default=30000.0)
    p.add_argument("--burst", type=float, default=60000.0)
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=1, help="pairs of runs, alternated")
    args = p.parse_args(argv)
    print_machine(machine())
    sustained = args.rate / (args.tokens * 1.625 / args.latency)
    print(
        f"== {args.workers} workers, {args.tasks} tasks of {args.turns} calls; the bucket "
        f"admits {args.rate:g} tokens/s (burst {args.burst:g}): about {sustained:.1f} agents"
    )
    results = []
    with sigterm_as_exit():
        for _ in range(args.repeat):
            for setting in SETTINGS:
                results.append(run_one(args, setting))
    headers = ["setting", "merged", "failed", "attempts", "seconds", "tasks/min", "429s",
               "limits met", "tokens refused", "tokens admitted", "fewest allowed"]  # fmt: skip
    rows = [
        [r.setting, r.merged, r.failed, r.attempts, fmt(r.makespan), fmt(r.per_min),
         r.refused, r.limits, r.tokens_refused, r.tokens_admitted, r.min_allowed]
        for r in results
    ]  # fmt: skip
    print(table(headers, rows))
    med = {
        setting: {
            key: statistics.median(getattr(r, key) for r in results if r.setting == setting)
            for key in ("per_min", "refused", "tokens_refused")
        }
        for setting in SETTINGS
    }
    a, f = med["adaptive"], med["fixed"]
    print(
        f"adaptive against fixed (medians of {args.repeat}): "
        f"{a['per_min'] / f['per_min']:.2f}x the tasks/min, "
        f"{a['refused'] / max(f['refused'], 1):.2f}x the 429s, "
        f"{a['tokens_refused'] / max(f['tokens_refused'], 1):.2f}x the tokens refused"
    )
    values: dict[str, object] = {}
    for setting, m in med.items():
        values |= {
            f"{setting}_tasks_per_min": round(m["per_min"], 2),
            f"{setting}_429s": m["refused"],
            f"{setting}_tokens_refused": m["tokens_refused"],
        }
    values["failed"] = sum(r.failed for r in results)
    values["attempts_per_task"] = round(
        sum(r.attempts for r in results) / sum(r.merged for r in results), 2
    )
    print(kv_line(values))
    return 0 if all(r.failed == 0 and r.merged == args.tasks for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
