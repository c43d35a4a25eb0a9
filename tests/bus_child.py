"""Child processes for the file-bus tests: senders and receivers that tests kill with SIGKILL.

python tests/bus_child.py send HOME RECIPIENT SENDER COUNT [--nofsync]
    send COUNT messages (text "SENDER:i"), printing each id once send() returned
python tests/bus_child.py effect HOME OWNER STATE EXPECT [--crash-after-claim K]
                                                       [--crash-after-effect K]
    handle messages until EXPECT distinct ones are applied; the effect is an atomic JSON
    state file holding both the running total and the ids applied (idempotency by id)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multibot import mailbox, protocol  # noqa: E402
from multibot.atomic import atomic_write  # noqa: E402
from multibot.layout import Home  # noqa: E402


def note(sender: str, recipient: str, text: str) -> protocol.Envelope:
    """Build a small CONTEXT_UPDATE message."""
    return protocol.make(
        protocol.ContextUpdate(kind="note", text=text), sender=sender, recipient=recipient
    )


def send_many(home: Home, recipient: str, sender: str, count: int, fsync: bool) -> None:
    """Send count numbered messages, printing each id once it is delivered."""
    for i in range(count):
        message = note(sender, recipient, f"{sender}:{i}")
        mailbox.send(home, message, fsync=fsync)
        print(message.id, flush=True)


def send_forever(home_root: str, recipient: str, sender: str, out_fd: int) -> None:
    """Send messages of random size until killed; write each delivered id to out_fd."""
    home = Home.at(home_root)
    rng = random.Random(os.getpid())
    i = 0
    while True:
        size = rng.choice((10, 1000, 100_000, 400_000))
        message = note(sender, recipient, f"{sender}:{i}:" + "x" * size)
        mailbox.send(home, message)
        os.write(out_fd, f"{message.id}\n".encode())  # < PIPE_BUF: a whole line or nothing
        i += 1


def load_state(path: Path) -> dict[str, Any]:
    """Read the effect's state file (empty state if absent)."""
    try:
        state: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        state = {"total": 0, "applied": []}
    return state


def run_effect(
    home: Home,
    owner: str,
    state_path: Path,
    expect: int,
    crash_after_claim: int | None,
    crash_after_effect: int | None,
) -> None:
    """Apply each message once to the state file; SIGKILL self at the chosen point."""
    seen = 0
    with mailbox.Receiver(home, owner, rescan_s=0.2) as rx:
        print("ready", flush=True)
        while True:
            for message in rx.fetch():
                seen += 1
                if seen == crash_after_claim:
                    os.kill(os.getpid(), signal.SIGKILL)
                state = load_state(state_path)
                if message.id not in state["applied"]:  # the effect's own idempotency check
                    payload = message.payload
                    assert isinstance(payload, protocol.ContextUpdate)
                    state["total"] += int(payload.text.rsplit(":", 1)[1])
                    state["applied"].append(message.id)
                    atomic_write(state_path, json.dumps(state).encode(), fsync=False)
                if seen == crash_after_effect:
                    os.kill(os.getpid(), signal.SIGKILL)
                rx.done(message)
            if len(load_state(state_path)["applied"]) >= expect:
                return
            rx.wait()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send")
    s.add_argument("home")
    s.add_argument("recipient")
    s.add_argument("sender")
    s.add_argument("count", type=int)
    s.add_argument("--nofsync", action="store_true")
    e = sub.add_parser("effect")
    e.add_argument("home")
    e.add_argument("owner")
    e.add_argument("state")
    e.add_argument("expect", type=int)
    e.add_argument("--crash-after-claim", type=int)
    e.add_argument("--crash-after-effect", type=int)
    args = parser.parse_args(argv)
    home = Home.at(args.home)
    if args.role == "send":
        send_many(home, args.recipient, args.sender, args.count, not args.nofsync)
    else:
        run_effect(
            home,
            args.owner,
            Path(args.state),
            args.expect,
            args.crash_after_claim,
            args.crash_after_effect,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
