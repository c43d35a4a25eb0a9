"""Heartbeats: the writer's throttle, garbage-proof reading, and pure judges under clock jumps."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from multibot.heartbeat import (
    Heartbeat,
    HeartbeatTracker,
    HeartbeatWriter,
    State,
    judge,
    read_heartbeat,
)


class Clock:
    """A settable clock: call it for the time, assign .now to move it (any direction)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def beat(seq: int, *, time: float = 1000.0, generation: int = 1, pid: int = 4242) -> Heartbeat:
    return Heartbeat(
        process_id="w1",
        pid=pid,
        generation=generation,
        status="busy",
        time=time,
        monotonic=float(seq),
        interval=1.0,
        seq=seq,
        host="h",
    )


# -- writer and reader ------------------------------------------------------------------------
def test_beats_are_throttled_unless_the_status_changes(tmp_path: Path) -> None:
    path = tmp_path / "hb" / "w1.json"
    wall, mono = Clock(1000.0), Clock(50.0)
    writer = HeartbeatWriter(path, "w1", 3, 0.9, clock=wall, monotonic=mono)
    assert writer.beat("idle")
    hb = read_heartbeat(path)
    assert hb is not None
    assert (hb.process_id, hb.pid, hb.generation, hb.status) == ("w1", os.getpid(), 3, "idle")
    assert (hb.time, hb.monotonic, hb.interval, hb.seq) == (1000.0, 50.0, 0.9, 1)
    mono.now = 50.2
    assert not writer.beat("idle"), "less than interval/3 since the last beat"
    assert writer.beat("busy"), "a new status is written at once"
    mono.now = 50.4
    assert not writer.beat("busy")
    wall.now = 10.0  # the wall clock jumps back hours: beats must not stop
    mono.now = 50.6
    assert writer.beat("busy")
    hb = read_heartbeat(path)
    assert hb is not None and (hb.seq, hb.status, hb.time) == (3, "busy", 10.0)


def test_beats_rewrite_one_file_in_place_whole(tmp_path: Path) -> None:
    path = tmp_path / "hb" / "w1.json"
    mono = Clock(0.0)
    writer = HeartbeatWriter(path, "w1", 1, 1.0, monotonic=mono)
    assert writer.beat("working on a rather long status line")
    first = os.stat(path)
    assert first.st_size % 512 == 0
    mono.now = 1.0
    assert writer.beat("idle")  # shorter: padded to the size already written, nothing left over
    assert os.stat(path).st_ino == first.st_ino and os.stat(path).st_size == first.st_size
    hb = read_heartbeat(path)
    assert hb is not None and (hb.seq, hb.status) == (2, "idle") and hb.intact()
    assert path.read_bytes().rstrip(b" ").endswith(b"}")
    assert [p.name for p in path.parent.iterdir()] == ["w1.json"], "no temp file left"
    # Someone else's file at the path (a new incarnation), or none: the writer makes its own.
    other = HeartbeatWriter(path, "w1", 2, 1.0, monotonic=mono)
    assert other.beat("idle")
    mono.now = 2.0
    assert writer.beat("idle")
    hb = read_heartbeat(path)
    assert hb is not None and (hb.generation, hb.seq) == (1, 3)
    path.unlink()
    mono.now = 3.0
    assert writer.beat("idle")
    hb = read_heartbeat(path)
    assert hb is not None and hb.seq == 4
    writer.close()
    other.close()


def test_a_read_that_catches_a_beat_half_written_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "w1.json"
    old = beat(7, time=1000.0).sealed().model_dump_json().encode()
    new = beat(8, time=1001.5).sealed().model_dump_json().encode()
    assert len(old) == len(new) and old != new
    cut = old.index(b'"monotonic"')  # new up to the middle, old after: valid JSON, wrong values
    path.write_bytes(new[:cut] + old[cut:])
    assert json.loads(path.read_bytes())["seq"] == 7  # it parses, but is neither beat
    assert read_heartbeat(path) is None
    path.write_bytes(new.ljust(512))
    assert read_heartbeat(path) == beat(8, time=1001.5).sealed()
    path.write_bytes(beat(9).model_dump_json(exclude={"check"}).encode())
    assert read_heartbeat(path) == beat(9), "a beat without a check (not ours) is taken as is"


def test_a_failed_beat_is_kept_and_retried_next_call(tmp_path: Path) -> None:
    blocker = tmp_path / "hb"
    blocker.write_text("a file where the folder should be")
    mono = Clock()
    writer = HeartbeatWriter(blocker / "w1.json", "w1", 1, 1.0, monotonic=mono)
    assert not writer.beat("idle")
    assert isinstance(writer.last_error, OSError)
    blocker.unlink()
    assert writer.beat("idle"), "not throttled: nothing was written"
    assert writer.last_error is None
    hb = read_heartbeat(blocker / "w1.json")
    assert hb is not None and hb.seq == 1


def test_garbage_heartbeat_files_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "w1.json"
    assert read_heartbeat(path) is None
    good = beat(1).model_dump()
    for content in [
        b"",
        b"\x00\xff garbage",
        b"{",
        b"[]",
        json.dumps({**good, "seq": "many"}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "pid"}).encode(),
        json.dumps({**good, "status": "x" * 100_000}).encode(),
    ]:
        path.write_bytes(content)
        assert read_heartbeat(path) is None, content[:40]
    path.write_bytes(json.dumps(good).encode())
    assert read_heartbeat(path) == beat(1)
    assert read_heartbeat(tmp_path) is None, "a folder is not a heartbeat"


@settings(deadline=None)  # a file per example: this machine's disk takes its time now and then
@given(raw=st.binary(max_size=300))
def test_read_heartbeat_never_raises(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w1.json"
        path.write_bytes(raw)
        assert read_heartbeat(path) is None or isinstance(read_heartbeat(path), Heartbeat)


# -- judge: wall clock --------------------------------------------------------------------------
def test_judge_by_wall_clock() -> None:
    hb = beat(5, time=1000.0)
    assert judge(hb, 1000.5, 1.0).state is State.ALIVE
    assert judge(hb, 1003.9, 1.0).state is State.ALIVE, "within misses * interval + tolerance"
    stale = judge(hb, 1004.5, 1.0)
    assert stale.state is State.STALE and stale.dead and stale.age == 4.5
    assert judge(hb, 1004.5, 1.0, misses=5).state is State.ALIVE


def test_judge_counts_a_beat_from_the_future_as_fresh() -> None:
    hb = beat(5, time=1000.0)
    back = judge(hb, 1000.0 - 3600, 1.0)  # the observer's clock went back an hour
    assert back.state is State.ALIVE and back.age == 0.0 and "future" in back.reason


def test_judge_missing_wrong_generation_and_start_up_grace() -> None:
    assert judge(None, 100.0, 1.0).state is State.MISSING
    assert judge(None, 100.0, 1.0, started=98.0).state is State.STARTING
    assert judge(None, 100.0, 1.0, started=90.0).state is State.MISSING
    assert judge(None, 100.0, 1.0, started=500.0).state is State.STARTING, "clock went back"
    old = beat(9, time=100.0, generation=1)
    verdict = judge(old, 100.0, 1.0, generation=2)
    assert verdict.state is State.MISSING and "generation 1" in verdict.reason
    assert judge(old, 100.0, 1.0, generation=1).state is State.ALIVE


def test_judge_respects_a_writer_that_declared_a_longer_interval() -> None:
    hb = beat(1, time=1000.0).model_copy(update={"interval": 10.0})
    assert judge(hb, 1020.0, 1.0).state is State.ALIVE
    assert judge(hb, 1040.0, 1.0).state is State.STALE


# -- tracker: the observer's monotonic clock ------------------------------------------------------
def test_tracker_stale_when_seq_stops_whatever_the_wall_clock_says() -> None:
    tracker = HeartbeatTracker(interval=1.0, misses=3, tolerance=0.0)
    tracker.expect(generation=1, now=0.0)
    assert tracker.observe(None, 0.5).state is State.STARTING
    walls = [1000.0, 10.0, 9_999_999.0, -5.0]  # the writer's wall clock jumping about
    for i, wall in enumerate(walls):
        assert tracker.observe(beat(i + 1, time=wall), 1.0 + i).state is State.ALIVE
    last = beat(len(walls), time=2e9)  # seq stops; its wall time says "just now" forever
    assert tracker.observe(last, 6.0).state is State.ALIVE
    stale = tracker.observe(last, 7.5)
    assert stale.state is State.STALE and stale.age == 3.5
    assert tracker.observe(beat(len(walls) + 1, time=0.0), 8.0).state is State.ALIVE, "back"


def test_tracker_ignores_other_generations_and_reused_pids() -> None:
    tracker = HeartbeatTracker(interval=1.0, misses=3, tolerance=0.0)
    tracker.expect(generation=2, now=0.0, pid=200)
    frozen_old = beat(50, generation=1, pid=100)  # thawed after it was replaced
    assert tracker.observe(frozen_old, 1.0).state is State.STARTING
    assert tracker.observe(beat(51, generation=1, pid=100), 2.0).state is State.STARTING
    reused = beat(1, generation=2, pid=999)  # the right generation from the wrong process
    assert tracker.observe(reused, 2.5).state is State.STARTING
    missing = tracker.observe(frozen_old, 3.5)
    assert missing.state is State.MISSING and "generation 1" in missing.reason
    assert tracker.observe(beat(1, generation=2, pid=200), 4.0).state is State.ALIVE
    # The old one overwrites the file afterwards: judged by the current one's last beat.
    assert tracker.observe(frozen_old, 5.0).state is State.ALIVE
    assert tracker.observe(frozen_old, 7.5).state is State.STALE


def test_tracker_without_expect_starts_timing_at_first_sight() -> None:
    tracker = HeartbeatTracker(interval=1.0, misses=2, tolerance=0.5)
    assert tracker.observe(None, 100.0).state is State.STARTING
    assert tracker.observe(None, 102.6).state is State.MISSING
    assert tracker.observe(beat(7), 103.0).state is State.ALIVE


@given(
    gaps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=30),
    walls=st.lists(st.floats(-1e12, 1e12), min_size=30, max_size=30),
)
def test_tracker_never_kills_a_process_that_keeps_beating(
    gaps: list[float], walls: list[float]
) -> None:
    tracker = HeartbeatTracker(interval=1.0, misses=3, tolerance=0.0)
    tracker.expect(generation=1, now=0.0)
    now = 0.0
    for seq, gap in enumerate(gaps, start=1):
        now += gap
        assert not tracker.observe(beat(seq, time=walls[seq - 1]), now).dead
