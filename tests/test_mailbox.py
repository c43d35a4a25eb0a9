"""The file bus: RELIABILITY items 1-9 at the delivery layer, each ending with a count.

Real processes are used where an item says "killed": senders forked and SIGKILLed mid-write,
receivers (tests/bus_child.py) that SIGKILL themselves at chosen points or are killed at random.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bus_child
import pytest
from helpers import wait_until

from multibot import doorbell, mailbox, maildir, protocol
from multibot.errors import AskTimeout, SendError, UnknownRecipient, UnsafePath
from multibot.layout import Home
from multibot.protocol import Envelope

CHILD = Path(__file__).with_name("bus_child.py")
RESCAN = 0.5


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_until(lambda: set(threading.enumerate()) <= before, timeout=5)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home.at(tmp_path)
    mailbox.create_inbox(h, "master")
    return h


def note(sender: str, recipient: str, text: str) -> Envelope:
    return bus_child.note(sender, recipient, text)


def text_of(message: Envelope) -> str:
    assert isinstance(message.payload, protocol.ContextUpdate)
    return message.payload.text


def collect(rx: mailbox.Receiver, count: int, timeout: float) -> list[Envelope]:
    """Fetch and mark done until count messages arrived or the deadline passed."""
    got: list[Envelope] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batch = rx.fetch()
        got.extend(batch)
        rx.done(*batch)
        if len(got) < count:
            rx.wait(deadline - time.monotonic())
    return got


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=120
    )


# -- basics ---------------------------------------------------------------------------------


def test_send_then_fetch_then_done(home: Home) -> None:
    mailbox.create_inbox(home, "w1")
    sent = note("w1", "master", "hello")
    path = mailbox.send(home, sent)
    assert path == home.inbox("master").new / f"{sent.id}.json"
    with mailbox.Receiver(home, "master") as rx:
        (got,) = rx.fetch()
        assert got == sent
        assert not rx.is_handled(sent.id)
        rx.done(got)
        assert rx.is_handled(sent.id)
        assert rx.fetch() == []
    assert files(home.inbox("master").cur) == [path.name]  # kept for audit
    assert home.inbox("master").handled_log.read_text() == f"{sent.id}\n"


def test_a_staged_message_is_delivered_only_when_published(home: Home) -> None:
    first, second = note("w1", "master", "first"), note("w1", "master", "second")
    staged = mailbox.stage(home, first)
    dropped = mailbox.stage(home, second)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == []  # written and synced, but not in new/
        assert staged.publish() == home.inbox("master").new / f"{first.id}.json"
        dropped.discard()
        assert rx.fetch() == [first]
        assert rx.fetch() == []
    assert files(home.inbox("master").tmp) == []


def test_send_to_star_needs_broadcast(home: Home) -> None:
    with pytest.raises(ValueError, match="broadcast"):
        mailbox.send(home, note("w1", "*", "hi"))


# -- item 1: sender killed while writing ---------------------------------------------------


def test_sender_killed_at_random_points_leaves_only_whole_messages(home: Home) -> None:
    fork = multiprocessing.get_context("fork")  # no pydantic re-import: 30 kills stay fast
    rng = random.Random(1234)
    acked: set[str] = set()
    leftovers: set[str] = set()
    kills = 30
    for _ in range(kills):
        r, w = os.pipe()
        child = fork.Process(
            target=bus_child.send_forever, args=(str(home.root), "master", "w1", w)
        )
        child.start()
        os.close(w)
        out, want = b"", rng.randint(0, 2)
        while out.count(b"\n") < want:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        time.sleep(rng.uniform(0, 0.004))  # the random kill point, not synchronisation
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        while chunk := os.read(r, 65536):
            out += chunk
        os.close(r)
        acked.update(line for line in out.decode().split("\n") if line)
        leftovers.update(os.listdir(home.inbox("master").tmp))
    print(f"{len(leftovers)} half-written tmp files left by {kills} kills")
    with mailbox.Receiver(home, "master") as rx:
        assert files(home.inbox("master").tmp) == []  # writers are dead: cleaned at start
        got = rx.fetch()
        rx.done(*got)
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids))  # nothing twice
    assert acked <= set(ids)  # nothing lost
    assert len(set(ids) - acked) <= kills  # at most the one in flight per kill
    assert files(home.inbox("master").rejected) == []  # every file in new/ was whole
    assert files(home.inbox("master").new) == []


def test_tmp_leftovers_cleaned_by_writer_liveness_and_age(home: Home) -> None:
    tmp = home.inbox("master").tmp
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid is dead
    host = socket.gethostname()
    dead_file = tmp / f"1.P{gone.pid}Q0.{host}"
    live_file = tmp / f"2.P{os.getpid()}Q0.{host}"
    old_file = tmp / f"3.P{os.getpid()}Q1.{host}"
    for f in (dead_file, live_file, old_file):
        f.write_bytes(b'{"half": ')
    os.utime(old_file, (time.time() - 3600, time.time() - 3600))
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == []
    assert files(tmp) == [live_file.name]  # a live writer's young file is left alone


# -- item 2: name collisions ---------------------------------------------------------------


def test_same_temporary_name_does_not_overwrite(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailbox, "unique_name", lambda prefix="": f"{prefix}1.P1Q1.host")
    busy = home.inbox("master").tmp / "1.P1Q1.host"
    busy.write_bytes(b"another writer, mid-write")  # same name, held by a concurrent sender
    first, second = note("w1", "master", "one"), note("w1", "master", "two")
    mailbox.send(home, first)
    mailbox.send(home, second)
    assert busy.read_bytes() == b"another writer, mid-write"
    with mailbox.Receiver(home, "master", watch=False, tmp_max_age_s=1e9) as rx:
        assert [text_of(m) for m in rx.fetch()] == ["one", "two"]


def test_same_final_name_keeps_both(home: Home) -> None:
    base = note("w1", "master", "one")
    twin = base.model_copy(update={"payload": protocol.ContextUpdate(kind="note", text="two")})
    a, b = mailbox.send(home, base), mailbox.send(home, twin)
    assert a != b and a.exists() and b.exists()  # neither overwrote the other
    with mailbox.Receiver(home, "master", watch=False) as rx:
        got = rx.fetch()
        assert [text_of(m) for m in got] == ["one"]  # one id, one message (issue 20 item 6)
        rx.done(*got)
        late = twin.model_copy(update={"payload": protocol.ContextUpdate(kind="note", text="3")})
        mailbox.send(home, late)  # same name as a file already in cur/
        assert rx.fetch() == []  # its id is handled: not delivered again...
    assert len(files(home.inbox("master").cur)) == 3  # ...and nothing was overwritten


# -- items 3 and 4: receiver killed ---------------------------------------------------------


def _fill(home: Home, owner: str, count: int) -> int:
    mailbox.create_inbox(home, owner)
    for i in range(count):
        mailbox.send(home, note("w1", owner, f"w1:{i}"), fsync=False)
    return sum(range(count))


def _check_effect(state_path: Path, count: int, total: int) -> None:
    state = bus_child.load_state(state_path)
    assert len(state["applied"]) == len(set(state["applied"])) == count  # each once
    assert state["total"] == total


@pytest.mark.parametrize("point", ["--crash-after-claim", "--crash-after-effect"])
def test_receiver_killed_then_restarted_applies_each_once(
    home: Home, tmp_path: Path, point: str
) -> None:
    total = _fill(home, "eff", 20)
    state = tmp_path / "effect.json"
    crashed = run_child("effect", str(home.root), "eff", str(state), "20", point, "5")
    assert crashed.returncode == -signal.SIGKILL
    report = mailbox.inbox_report(home, "eff")
    assert report.waiting == [] and len(report.claimed_unhandled) == 16
    applied = len(bus_child.load_state(state)["applied"])
    assert applied == (4 if point == "--crash-after-claim" else 5)  # effect done, not recorded
    again = run_child("effect", str(home.root), "eff", str(state), "20")
    assert again.returncode == 0, again.stderr
    _check_effect(state, 20, total)
    report = mailbox.inbox_report(home, "eff")
    assert report.claimed_unhandled == [] and report.handled == 20


def test_receiver_killed_at_random_points(home: Home, tmp_path: Path) -> None:
    count = 300
    total = _fill(home, "eff", count)
    state = tmp_path / "effect.json"
    rng = random.Random(99)
    args = [sys.executable, str(CHILD), "effect", str(home.root), "eff", str(state), str(count)]
    kills, progress = 0, [0]

    def applied() -> int:
        return len(bus_child.load_state(state)["applied"])

    while True:
        child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            if kills < 6:
                target = progress[-1] + rng.randint(1, 40)
                wait_until(lambda t=target, c=child: applied() >= t or c.poll() is not None, 60)
                time.sleep(rng.uniform(0, 0.002))  # the random kill point
                child.kill()
                kills += 1
                progress.append(applied())
            if child.wait(timeout=60) == 0:
                break
        finally:
            child.kill()
            child.wait()
            if child.stdout:
                child.stdout.close()
    print(f"applied after each kill: {progress}")
    _check_effect(state, count, total)


# -- item 5: many senders at once -----------------------------------------------------------


def test_four_sender_processes_each_message_handled_once(home: Home) -> None:
    senders, each = 4, 500
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "send", str(home.root), "master", f"s{k}", str(each)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(senders)
    ]
    try:
        with mailbox.Receiver(home, "master", rescan_s=RESCAN) as rx:
            got = collect(rx, senders * each, timeout=120)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs)
    acked = {line for out in outs for line in out.split()}
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids)) == senders * each  # nothing twice
    assert set(ids) == acked  # nothing lost
    for k in range(senders):  # and each sender's messages in its send order
        seq = [int(text_of(m).split(":")[1]) for m in got if m.sender == f"s{k}"]
        assert seq == list(range(each))


# -- item 6: lost events --------------------------------------------------------------------


def _one_more(home: Home, rx: mailbox.Receiver, text: str) -> None:
    """Send one message while the receiver loop is between fetches; it must wait, then get it."""
    assert rx.fetch() == []
    sent = note("w1", "master", text)
    mailbox.send(home, sent)
    deadline = time.monotonic() + RESCAN * 3
    got: list[Envelope] = []
    while not got and time.monotonic() < deadline:
        rx.wait(deadline - time.monotonic())
        got = rx.fetch()
        rx.done(*got)
    assert [m.id for m in got] == [sent.id]


def test_dead_observer_is_restarted_and_rescan_delivers(home: Home) -> None:
    with mailbox.Receiver(home, "master", rescan_s=RESCAN) as rx:
        observer = rx._observer
        assert observer is not None and observer.is_alive()
        observer.stop()
        observer.join()
        _one_more(home, rx, "after observer death")
        assert rx._observer is not None and rx._observer.is_alive()
        assert rx._observer is not observer


def test_new_folder_deleted_and_recreated(home: Home) -> None:
    new = home.inbox("master").new
    with mailbox.Receiver(home, "master", rescan_s=RESCAN) as rx:
        shutil.rmtree(new)
        new.mkdir()
        _one_more(home, rx, "after recreate")
        shutil.rmtree(new)  # deleted and left missing: the receiver recreates it

        def repaired() -> bool:
            rx.wait(0.05)
            return new.is_dir()

        wait_until(repaired, timeout=RESCAN * 3)
        _one_more(home, rx, "after repair")
        _one_more(home, rx, "and the doorbell works again")


def test_events_lost_rescan_delivers_within_interval(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doorbell._ArrivalEmitter, "queue_event", lambda self, event: None)
    with mailbox.Receiver(home, "master", rescan_s=RESCAN) as rx:
        assert rx.fetch() == []
        mailbox.send(home, note("w1", "master", "silent"))
        assert rx.wait() is False  # no ring: the interval ran out
        assert [text_of(m) for m in rx.fetch()] == ["silent"]


def test_doorbell_rings_on_arrival(home: Home) -> None:
    with mailbox.Receiver(home, "master", rescan_s=30) as rx:
        mailbox.send(home, note("w1", "master", "ding"))
        assert rx.wait(10) is True
        assert [text_of(m) for m in rx.fetch()] == ["ding"]


# -- item 7: messages waiting before the receiver starts -----------------------------------


def test_waiting_messages_handled_in_order(home: Home) -> None:
    sent = [note(f"w{i % 3}", "master", str(i)) for i in range(60)]
    for m in sent:
        mailbox.send(home, m, fsync=False)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        got = rx.fetch()
        rx.done(*got)
    assert [m.id for m in got] == [m.id for m in sent]


# -- item 8: bad files ----------------------------------------------------------------------


def _envelope_dict(**changes: object) -> dict[str, object]:
    data: dict[str, object] = json.loads(protocol.encode(note("bob", "master", "x")))
    data.update(changes)
    return data


def test_bad_files_set_aside_sender_told_and_flow_goes_on(home: Home) -> None:
    mailbox.create_inbox(home, "bob")
    new = home.inbox("master").new
    bad = {
        "a-malformed.json": b'{"id": "1", "sender": "bob", "payload": {',
        "b-schema.json": json.dumps(_envelope_dict(payload={"type": "CONTEXT_UPDATE"})).encode(),
        "c-unknown-type.json": json.dumps(_envelope_dict(payload={"type": "LAUNCH"})).encode(),
        "d-recipient.json": json.dumps(_envelope_dict(recipient="carol")).encode(),
        "e-oversized.json": b'{"sender": "bob", "x": "' + b"y" * 1_100_000 + b'"}',
        "f-anonymous.json": b"not json at all",
        "f-deep.json": b"[" * 100_000 + b"]" * 100_000,
    }
    for name, raw in bad.items():
        (new / name).write_bytes(raw)
    os.symlink("/etc/hostname", new / "g-symlink.json")
    (new / "h-folder.json").mkdir()
    os.mkfifo(new / "i-fifo.json")  # opening it for reading must not block the loop
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == []
        good = note("w1", "master", "still flowing")
        mailbox.send(home, good)
        assert rx.fetch() == [good]
    rejected = home.inbox("master").rejected
    names = [*bad, "g-symlink.json", "h-folder.json", "i-fifo.json"]
    assert files(rejected) == sorted([*names, *(f"{n}.reason.json" for n in names)])
    reasons = {n: json.loads((rejected / f"{n}.reason.json").read_text()) for n in names}
    assert "payload.CONTEXT_UPDATE.text" in reasons["b-schema.json"]["reason"]
    assert "LAUNCH" in reasons["c-unknown-type.json"]["reason"]
    assert "carol" in reasons["d-recipient.json"]["reason"]
    assert "bytes (max" in reasons["e-oversized.json"]["reason"]
    assert all(r["reason"] and r["time"] for r in reasons.values())
    report = mailbox.inbox_report(home, "master")
    assert [e.name for e in report.rejected] == names
    assert report.to_dict()["rejected"][3]["sender"] == "bob"
    with mailbox.Receiver(home, "bob", watch=False) as bob:
        errors = bob.fetch()
    told = {e.payload.message.split()[1] for e in errors if e.type == "ERROR"}  # type: ignore[union-attr]
    assert told == {"a-malformed.json", "b-schema.json", "c-unknown-type.json",
                    "d-recipient.json", "e-oversized.json"}  # fmt: skip
    for e in errors:
        assert isinstance(e.payload, protocol.ErrorReport)
        assert e.payload.kind == "protocol" and e.payload.recoverable is False
        assert e.payload.detail == reasons[e.payload.message.split()[1]]["reason"]


def test_one_message_twice_in_one_fetch_is_delivered_once(home: Home) -> None:
    """Issue 20 item 6: <id>.json and <id>_copy.json (the names the bus's clash handling
    makes) in new/ at once; the fetch filtered only ids already handled."""
    sent = note("w1", "master", "once")
    path = mailbox.send(home, sent)
    shutil.copy(path, path.with_name(f"{sent.id}_0badc0de.json"))
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == [sent]
        rx.done(sent)
        assert rx.fetch() == []
    with mailbox.Receiver(home, "master", watch=False) as rx:  # and after a restart
        assert rx.fetch() == []


def test_a_dot_file_in_new_is_set_aside(home: Home) -> None:
    """Issue 20 item 23: a hidden file in new/ was never looked at, nor shown."""
    (home.inbox("master").new / ".sneaky.json").write_bytes(b"{}")
    assert mailbox.inbox_report(home, "master").waiting == [".sneaky.json"]
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == []
    (entry,) = mailbox.inbox_report(home, "master").rejected
    assert entry.name == "sneaky.json" and "starts with a dot" in entry.reason
    assert os.listdir(home.inbox("master").new) == []


def test_a_message_set_aside_goes_to_rejected_and_is_not_delivered_again(home: Home) -> None:
    poison, good = note("w1", "master", "poison"), note("w1", "master", "good")
    mailbox.send(home, poison)
    mailbox.send(home, good)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        got = rx.fetch()
        assert got == [poison, good]
        rx.set_aside(poison, "Traceback: it broke the handler")
        rx.done(good)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == []
    (entry,) = mailbox.inbox_report(home, "master").rejected
    assert entry.name == f"{poison.id}.json" and "broke the handler" in entry.reason


def test_an_id_longer_than_multibot_makes_is_refused() -> None:
    """Issue 20 item 15: a 40-digit counter passed validation, and the question file named
    after it was not a valid id, which stopped the master at every restart."""
    made = protocol.new_message_id()
    assert protocol.decode(note("w1", "master", "x").model_copy(update={"id": made})
                           .model_dump_json().encode()).id == made  # fmt: skip
    raw = json.loads(note("w1", "master", "x").model_dump_json())
    raw["id"] = "00000000000000000001-0000001-" + "9" * 40
    with pytest.raises(Exception, match="id"):
        protocol.decode(json.dumps(raw).encode())


def test_unknown_recipient_is_an_error_and_creates_nothing(home: Home) -> None:
    before = files(home.inboxes_dir)
    with pytest.raises(UnknownRecipient):
        mailbox.send(home, note("w1", "nobody", "hello?"))
    assert files(home.inboxes_dir) == before


# -- item 9: disk full, failed fsync --------------------------------------------------------


def _enospc(*args: object) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["write", "fsync", "fsync-dir"])
def test_disk_full_or_failed_fsync(
    home: Home, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    inbox = home.inbox("master")
    real_fsync = os.fsync
    if failing == "write":
        monkeypatch.setattr(os, "write", _enospc)
    elif failing == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    else:  # the file syncs, the directory does not: the link must be taken back

        def dir_fails(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                _enospc()
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", dir_fails)
    with pytest.raises(SendError, match="No space left"):
        mailbox.send(home, note("w1", "master", "lost?"))
    assert files(inbox.new) == [] and files(inbox.tmp) == []
    monkeypatch.undo()  # space is back
    sent = note("w1", "master", "works again")
    mailbox.send(home, sent)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.fetch() == [sent]


# -- request / response, broadcast ----------------------------------------------------------


def _answering(home: Home, stop: threading.Event) -> None:
    with mailbox.Receiver(home, "master", rescan_s=0.1) as rx:
        while not stop.is_set():
            for m in rx.fetch():
                if isinstance(m.payload, protocol.Question):
                    answer = protocol.Answer(answer=m.payload.question.upper())
                    mailbox.reply(home, m, answer, "master")
                rx.done(m)
            rx.wait()


def test_request_gets_the_correlated_reply(home: Home) -> None:
    stop = threading.Event()
    responder = threading.Thread(target=_answering, args=(home, stop))
    responder.start()
    try:
        for text in ("why?", "how?"):
            ask = protocol.make(protocol.Question(question=text), sender="w1", recipient="master")
            answer = mailbox.request(home, ask, timeout=20, rescan_s=0.2)
            assert answer.correlation_id == ask.id and answer.sender == "master"
            assert isinstance(answer.payload, protocol.Answer)
            assert answer.payload.answer == text.upper()
    finally:
        stop.set()
        responder.join()
    assert mailbox.list_inboxes(home) == ["master"]  # the ephemeral inbox is gone


def test_request_times_out_and_cleans_up(home: Home) -> None:
    ask = protocol.make(protocol.Question(question="hello?"), sender="w1", recipient="master")
    with pytest.raises(AskTimeout):
        mailbox.request(home, ask, timeout=0.3, rescan_s=0.1)
    assert mailbox.list_inboxes(home) == ["master"]
    (waiting,) = mailbox.inbox_report(home, "master").waiting
    assert json.loads((home.inbox("master").new / waiting).read_bytes())["reply_to"].startswith(
        "ask-"
    )


def test_reply_without_reply_to_goes_to_sender(home: Home) -> None:
    mailbox.create_inbox(home, "w1")
    question = protocol.make(protocol.Question(question="q"), sender="w1", recipient="master")
    path = mailbox.reply(home, question, protocol.Answer(answer="a"), "master", generation=3)
    assert path.parent == home.inbox("w1").new
    answer = protocol.decode(path.read_bytes())
    assert answer.correlation_id == question.id and answer.generation == 3


def test_broadcast_skips_sender_and_ephemeral_inboxes(home: Home) -> None:
    for owner in ("w1", "w2", "ask-0123abcd"):
        mailbox.create_inbox(home, owner)
    message = protocol.make(protocol.Broadcast(text="all hands"), sender="master", recipient="*")
    paths = mailbox.broadcast(home, message)
    assert sorted(p.parent.parent.name for p in paths) == ["w1", "w2"]
    for owner in ("w1", "w2"):
        with mailbox.Receiver(home, owner, watch=False) as rx:
            assert rx.fetch() == [message]
    assert mailbox.inbox_report(home, "master").waiting == []
    with pytest.raises(ValueError):
        mailbox.broadcast(home, note("master", "w1", "not a broadcast"))


# -- audit, pruning, ledger -----------------------------------------------------------------


def test_prune_keeps_unhandled_and_compacts_ledger(home: Home) -> None:
    sent = [note("w1", "master", str(i)) for i in range(10)]
    for m in sent:
        mailbox.send(home, m, fsync=False)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        got = rx.fetch()
        rx.done(*got[:8])  # the last two stay claimed but unhandled
        assert rx.prune(max_count=3) == 5
        cur = files(home.inbox("master").cur)
        assert [maildir.id_of(n) for n in cur] == [m.id for m in sent[5:]]
        assert home.inbox("master").handled_log.read_text().split() == [m.id for m in sent[5:8]]
        assert rx.prune(max_age_s=60, now=sent[9].sent_at + 3600) == 3
        rx.done(sent[9])  # the ledger fd follows the compacted file
    report = mailbox.inbox_report(home, "master")
    assert report.handled == 1 and len(report.claimed_unhandled) == 1


def test_torn_ledger_line_is_repaired(home: Home) -> None:
    first, second = note("w1", "master", "1"), note("w1", "master", "2")
    home.inbox("master").handled_log.write_text(f"{first.id}\n{second.id[:9]}")  # torn append
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.is_handled(first.id) and not rx.is_handled(second.id)
        rx.done(second)
    with mailbox.Receiver(home, "master", watch=False) as rx:
        assert rx.is_handled(second.id)


def test_inbox_report(home: Home) -> None:
    for i in range(3):
        mailbox.send(home, note("w1", "master", str(i)))
    report = mailbox.inbox_report(home, "master")
    assert len(report.waiting) == 3 and report.handled == 0
    assert json.loads(json.dumps(report.to_dict()))["owner"] == "master"
    with pytest.raises(UnknownRecipient):
        mailbox.inbox_report(home, "ghost")


# -- symlinks in the inbox folders ---------------------------------------------------------


def _plant_link(home: Home, folder: str, tmp_path: Path) -> Path:
    """Swap the master inbox's folder for a link to an outside folder holding an old file."""
    outside = tmp_path / f"outside-{folder}"
    outside.mkdir()
    precious = outside / "precious.txt"
    precious.write_text("the user's file\n")
    os.utime(precious, (1, 1))  # far older than any tmp/ age limit
    target = getattr(home.inbox("master"), folder)
    shutil.rmtree(target)
    target.symlink_to(outside, target_is_directory=True)
    return outside


@pytest.mark.parametrize("folder", ["tmp", "new"])
def test_a_symlinked_inbox_folder_is_refused_and_nothing_goes_through_it(
    home: Home, tmp_path: Path, folder: str
) -> None:
    outside = _plant_link(home, folder, tmp_path)
    with pytest.raises(UnsafePath, match=f"master/{folder} is a symbolic link"):
        mailbox.send(home, note("w1", "master", "through the link?"))
    with pytest.raises(UnsafePath, match="symbolic link"):  # a restart of its owner
        mailbox.Receiver(home, "master", watch=False, tmp_max_age_s=0)
    assert sorted(os.listdir(outside)) == ["precious.txt"]  # nothing written, nothing deleted
    assert (outside / "precious.txt").read_text() == "the user's file\n"


def test_a_folder_swapped_for_a_link_while_receiving_is_not_followed(
    home: Home, tmp_path: Path
) -> None:
    with mailbox.Receiver(home, "master", watch=False, tmp_max_age_s=0) as rx:
        outside = _plant_link(home, "cur", tmp_path)
        os.utime(home.inbox("master").new, None)
        rx.prune(max_count=0, rejected_max_age_s=0)  # deletes through its own descriptors
        with pytest.raises(UnsafePath, match="master/cur is a symbolic link"):
            mailbox.create_inbox(home, "master")
    assert sorted(os.listdir(outside)) == ["precious.txt"]


def test_a_symlinked_root_inbox_is_refused(home: Home, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    shutil.copytree(home.inbox("master").root, real)
    shutil.rmtree(home.inbox("master").root)
    home.inbox("master").root.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafePath, match="inbox/master is a symbolic link"):
        mailbox.send(home, note("w1", "master", "through the link?"))
    assert os.listdir(real / "new") == [] and os.listdir(real / "tmp") == []
