"""Benchmark the file bus: delivery latency and throughput into one inbox.

    python bench/bus.py [--messages N] [--quick]

Runs multibot's mailbox and a minimal raw baseline side by side, with fsync on and off, with 1
sender process (paced, one message per millisecond: latency) and 8 sender processes (flat out:
throughput). Latency is from the start of a send (before building the message) to the receiver
holding the decoded message; CLOCK_MONOTONIC is system-wide, so sender and receiver stamps
compare. Throughput is messages / (last receipt - first send start).

The raw baseline has no framework: the sender writes json.dumps to tmp/, syncs (if fsync),
renames into new/ and syncs new/; the receiver polls new/ every 0.2 ms, renames each file into
cur/ and json.loads it. It keeps no ledger and validates nothing.

Ends with one line of key=value pairs summarising the durable (fsync) runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multibot import mailbox, protocol
from multibot.layout import Home

INBOX = "bench"
PACE_S = 0.001  # gap between sends of the single (latency) sender
fork = multiprocessing.get_context("fork")  # senders start at once, no re-import


@dataclass
class Result:
    impl: str
    fsync: bool
    senders: int
    messages: int
    latencies_ms: list[float]
    elapsed_s: float
    lost: int
    duplicated: int

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else float("nan")


# -- senders (child processes) --------------------------------------------------------------


def _multibot_sender(
    root: str, sender: str, count: int, pace: float, fsync: bool, go: Event
) -> None:
    home = Home.at(root)
    go.wait()
    for seq in range(count):
        t0 = time.monotonic_ns()
        text = f"{sender}:{seq}:{t0}"
        message = protocol.make(
            protocol.ContextUpdate(kind="note", text=text), sender=sender, recipient=INBOX
        )
        mailbox.send(home, message, fsync=fsync)
        if pace:
            time.sleep(pace)


def _raw_sender(root: str, sender: str, count: int, pace: float, fsync: bool, go: Event) -> None:
    inbox = Path(root) / "raw"
    pid = os.getpid()
    go.wait()
    for seq in range(count):
        t0 = time.monotonic_ns()
        data = json.dumps({"sender": sender, "recipient": INBOX, "text": f"{sender}:{seq}:{t0}"})
        name = f"{t0:020d}.{pid}.{seq}"
        tmp = inbox / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data.encode())
        if fsync:
            os.fsync(fd)
        os.close(fd)
        os.rename(tmp, inbox / "new" / f"{name}.json")
        if fsync:
            dfd = os.open(inbox / "new", os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        if pace:
            time.sleep(pace)


# -- receivers (this process) ---------------------------------------------------------------


class Tally:
    """Latency and counts of what arrived, keyed by (sender, seq)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, int]] = Counter()
        self.latencies_ms: list[float] = []
        self.first_t0 = 2**63
        self.last_ns = 0

    def record(self, text: str, now_ns: int) -> None:
        sender, seq, t0 = text.split(":")
        self.seen[(sender, int(seq))] += 1
        self.latencies_ms.append((now_ns - int(t0)) / 1e6)
        self.first_t0 = min(self.first_t0, int(t0))
        self.last_ns = now_ns


def _multibot_receive(root: str, total: int, fsync: bool, tally: Tally, go: Event) -> None:
    with mailbox.Receiver(Home.at(root), INBOX, durable=fsync) as rx:
        go.set()
        deadline = time.monotonic() + 120
        while sum(tally.seen.values()) < total and time.monotonic() < deadline:
            batch = rx.fetch()
            now = time.monotonic_ns()
            for message in batch:
                assert isinstance(message.payload, protocol.ContextUpdate)
                tally.record(message.payload.text, now)
            rx.done(*batch)
            if not batch:
                rx.wait(0.5)


def _raw_receive(root: str, total: int, fsync: bool, tally: Tally, go: Event) -> None:
    new, cur = Path(root) / "raw" / "new", Path(root) / "raw" / "cur"
    go.set()
    deadline = time.monotonic() + 120
    while sum(tally.seen.values()) < total and time.monotonic() < deadline:
        names = sorted(os.listdir(new))
        if not names:
            time.sleep(0.0002)
            continue
        for name in names:
            os.rename(new / name, cur / name)
            data = json.loads((cur / name).read_bytes())
            tally.record(data["text"], time.monotonic_ns())


# -- one run --------------------------------------------------------------------------------

Sender = Callable[[str, str, int, float, bool, Event], None]
Receive = Callable[[str, int, bool, Tally, Event], None]
IMPLS: dict[str, tuple[Sender, Receive]] = {
    "multibot": (_multibot_sender, _multibot_receive),
    "raw": (_raw_sender, _raw_receive),
}


def run(impl: str, fsync: bool, senders: int, messages: int) -> Result:
    """Run one configuration in a fresh temporary home and count what arrived."""
    root = tempfile.mkdtemp(prefix="multibot-bench-")
    try:
        home = Home.at(root)
        mailbox.create_inbox(home, INBOX)
        for sub in ("tmp", "new", "cur"):
            (Path(root) / "raw" / sub).mkdir(parents=True)
        send, receive = IMPLS[impl]
        each = messages // senders
        pace = PACE_S if senders == 1 else 0.0
        go = fork.Event()
        procs = [
            fork.Process(target=send, args=(root, f"s{k}", each, pace, fsync, go))
            for k in range(senders)
        ]
        for p in procs:  # forked before the receiver starts any thread
            p.start()
        tally = Tally()
        try:
            receive(root, each * senders, fsync, tally, go)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        expected = {(f"s{k}", i) for k in range(senders) for i in range(each)}
        return Result(
            impl=impl,
            fsync=fsync,
            senders=senders,
            messages=each * senders,
            latencies_ms=tally.latencies_ms,
            elapsed_s=(tally.last_ns - tally.first_t0) / 1e9,
            lost=len(expected - set(tally.seen)),
            duplicated=sum(n - 1 for n in tally.seen.values() if n > 1),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run")
    parser.add_argument("--quick", action="store_true", help="300 messages per run")
    args = parser.parse_args(argv)
    messages = 304 if args.quick else max(8, args.messages // 8 * 8)
    results: list[Result] = []
    header = f"{'impl':9} {'fsync':5} {'senders':>7} {'msgs':>6} {'p50 ms':>8} {'p99 ms':>8}"
    header += f" {'msgs/s':>8} {'lost':>5} {'dup':>4}"
    print(header)
    print("-" * len(header))
    for fsync in (True, False):
        for senders in (1, 8):
            for impl in ("multibot", "raw"):
                r = run(impl, fsync, senders, messages)
                results.append(r)
                rate = f"{r.rate:8.0f}" if senders > 1 else f"{'(paced)':>8}"
                print(
                    f"{r.impl:9} {'on' if r.fsync else 'off':5} {r.senders:7d} {r.messages:6d}"
                    f" {r.pct(0.5):8.3f} {r.pct(0.99):8.3f} {rate} {r.lost:5d} {r.duplicated:4d}",
                    flush=True,
                )

    def pick(impl: str, senders: int) -> Result:
        return next(r for r in results if r.impl == impl and r.fsync and r.senders == senders)

    one, eight, raw_one = pick("multibot", 1), pick("multibot", 8), pick("raw", 1)
    print()
    print(
        f"messages={sum(r.messages for r in results)}"
        f" lost={sum(r.lost for r in results)}"
        f" duplicated={sum(r.duplicated for r in results)}"
        f" p50_ms={one.pct(0.5):.3f} p99_ms={one.pct(0.99):.3f}"
        f" msgs_per_s={eight.rate:.0f}"
        f" p50_ratio_vs_raw={one.pct(0.5) / raw_one.pct(0.5):.2f}"
        f" raw_p50_ms={raw_one.pct(0.5):.3f}"
        f" mean_ms={statistics.fmean(one.latencies_ms):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
