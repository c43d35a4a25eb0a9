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

The "teams" baseline is the agent-teams style of inbox: one JSON array FILE per recipient.
Each sender takes the file's lock (filelock), reads the array, appends its entry
({from, text, timestamp, read: false}), writes the whole array back (and syncs it, if fsync)
and lets go. The receiver polls once a second: under the lock it reads the array, takes the
entries not yet read and writes the array back with them marked read. A single sender flat out
(not paced) is also timed for multibot and teams, for the throughput of one sender.

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

import filelock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multibot import mailbox, protocol
from multibot.layout import Home

INBOX = "bench"
PACE_S = 0.001  # gap between sends of the single (latency) sender
TEAMS_POLL_S = 1.0  # the teams receiver looks at its inbox file once a second
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


def _teams_file(root: str) -> tuple[Path, filelock.FileLock]:
    path = Path(root) / "teams" / f"{INBOX}.json"
    return path, filelock.FileLock(f"{path}.lock")


def _write_whole(path: Path, data: bytes, fsync: bool) -> None:
    # In place, under the lock that every reader takes too: no reader sees half a file.
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _teams_sender(root: str, sender: str, count: int, pace: float, fsync: bool, go: Event) -> None:
    path, lock = _teams_file(root)
    go.wait()
    for seq in range(count):
        t0 = time.monotonic_ns()
        entry = {"from": sender, "text": f"{sender}:{seq}:{t0}", "timestamp": time.time()}
        with lock:
            inbox = json.loads(path.read_bytes() or b"[]")
            inbox.append({**entry, "read": False})
            _write_whole(path, json.dumps(inbox).encode(), fsync)
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


def _teams_receive(root: str, total: int, fsync: bool, tally: Tally, go: Event) -> None:
    path, lock = _teams_file(root)
    go.set()
    deadline = time.monotonic() + 120
    while sum(tally.seen.values()) < total and time.monotonic() < deadline:
        with lock:
            inbox = json.loads(path.read_bytes() or b"[]")
            now = time.monotonic_ns()
            new = [entry for entry in inbox if not entry["read"]]
            for entry in new:
                entry["read"] = True
            if new:
                _write_whole(path, json.dumps(inbox).encode(), fsync)
        for entry in new:
            tally.record(entry["text"], now)
        if sum(tally.seen.values()) < total:
            time.sleep(TEAMS_POLL_S)


# -- one run --------------------------------------------------------------------------------

Sender = Callable[[str, str, int, float, bool, Event], None]
Receive = Callable[[str, int, bool, Tally, Event], None]
IMPLS: dict[str, tuple[Sender, Receive]] = {
    "multibot": (_multibot_sender, _multibot_receive),
    "raw": (_raw_sender, _raw_receive),
    "teams": (_teams_sender, _teams_receive),
}


def run(impl: str, fsync: bool, senders: int, messages: int, paced: bool = True) -> Result:
    """Run one configuration in a fresh temporary home and count what arrived.

    A single sender is paced (one message per PACE_S) unless paced is False.
    """
    root = tempfile.mkdtemp(prefix="multibot-bench-")
    try:
        home = Home.at(root)
        mailbox.create_inbox(home, INBOX)
        for sub in ("tmp", "new", "cur"):
            (Path(root) / "raw" / sub).mkdir(parents=True)
        (Path(root) / "teams").mkdir()
        (Path(root) / "teams" / f"{INBOX}.json").write_bytes(b"[]")
        send, receive = IMPLS[impl]
        each = messages // senders
        pace = PACE_S if senders == 1 and paced else 0.0
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
            for impl in ("multibot", "raw", "teams"):
                r = run(impl, fsync, senders, messages)
                results.append(r)
                rate = f"{r.rate:8.0f}" if senders > 1 else f"{'(paced)':>8}"
                print(
                    f"{r.impl:9} {'on' if r.fsync else 'off':5} {r.senders:7d} {r.messages:6d}"
                    f" {r.pct(0.5):8.3f} {r.pct(0.99):8.3f} {rate} {r.lost:5d} {r.duplicated:4d}",
                    flush=True,
                )

    print("\none sender, flat out (not paced), fsync on:")
    flat = {impl: run(impl, True, 1, messages, paced=False) for impl in ("multibot", "teams")}
    for r in flat.values():
        print(
            f"{r.impl:9} {'on':5} {r.senders:7d} {r.messages:6d}"
            f" {r.pct(0.5):8.3f} {r.pct(0.99):8.3f} {r.rate:8.0f} {r.lost:5d} {r.duplicated:4d}",
            flush=True,
        )

    def pick(impl: str, senders: int) -> Result:
        return next(r for r in results if r.impl == impl and r.fsync and r.senders == senders)

    one, eight, raw_one = pick("multibot", 1), pick("multibot", 8), pick("raw", 1)
    teams_one, teams_eight = pick("teams", 1), pick("teams", 8)
    ours = [r for r in results if r.impl != "teams"]  # the original keys keep their meaning
    teams = [r for r in results if r.impl == "teams"] + [flat["teams"]]
    print()
    print(
        f"vs agent-teams style inbox file (fsync on): p50 {one.pct(0.5):.3f} ms vs "
        f"{teams_one.pct(0.5):.1f} ms ({teams_one.pct(0.5) / one.pct(0.5):.0f}x lower); "
        f"8 senders {eight.rate:.0f} vs {teams_eight.rate:.0f} msgs/s "
        f"({eight.rate / teams_eight.rate:.1f}x); 1 sender flat out "
        f"{flat['multibot'].rate:.0f} vs {flat['teams'].rate:.0f} msgs/s"
    )
    print()
    print(
        f"messages={sum(r.messages for r in ours)}"
        f" lost={sum(r.lost for r in ours)}"
        f" duplicated={sum(r.duplicated for r in ours)}"
        f" p50_ms={one.pct(0.5):.3f} p99_ms={one.pct(0.99):.3f}"
        f" msgs_per_s={eight.rate:.0f}"
        f" p50_ratio_vs_raw={one.pct(0.5) / raw_one.pct(0.5):.2f}"
        f" raw_p50_ms={raw_one.pct(0.5):.3f}"
        f" mean_ms={statistics.fmean(one.latencies_ms):.3f}"
        f" one_sender_msgs_per_s={flat['multibot'].rate:.0f}"
        f" teams_p50_ms={teams_one.pct(0.5):.3f} teams_p99_ms={teams_one.pct(0.99):.3f}"
        f" teams_8_p50_ms={teams_eight.pct(0.5):.3f} teams_8_p99_ms={teams_eight.pct(0.99):.3f}"
        f" teams_msgs_per_s={teams_eight.rate:.0f}"
        f" teams_one_sender_msgs_per_s={flat['teams'].rate:.0f}"
        f" teams_lost={sum(r.lost for r in teams)}"
        f" teams_duplicated={sum(r.duplicated for r in teams)}"
        f" p50_ratio_vs_teams={one.pct(0.5) / teams_one.pct(0.5):.4f}"
        f" p99_ratio_vs_teams={one.pct(0.99) / teams_one.pct(0.99):.4f}"
        f" msgs_per_s_ratio_vs_teams={eight.rate / teams_eight.rate:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
