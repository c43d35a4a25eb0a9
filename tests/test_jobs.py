"""The master's background jobs: in lanes, results and errors reported, keys unique."""

from __future__ import annotations

import threading

from multibot.master.jobs import Done, Jobs
from tests.helpers import wait_until


def test_jobs_run_in_order_and_report_values_and_errors() -> None:
    checks = Jobs()
    gate = threading.Event()
    order: list[str] = []

    def slow() -> str:
        gate.wait(10)
        order.append("slow")
        return "ok"

    def boom() -> None:
        order.append("boom")
        raise RuntimeError("no disk")

    assert checks.submit(("verify", "a"), slow)
    assert not checks.submit(("verify", "a"), slow)  # same key while pending: refused
    assert checks.submit(("merge", "b"), boom)
    assert checks.busy("merge") and checks.pending(("verify", "a"))
    assert checks.poll() == []  # nothing finished while the first job waits
    assert order == []
    checks.release(checks.seal())
    gate.set()
    results: list[Done] = []
    wait_until(lambda: results.extend(checks.poll()) or len(results) == 2)
    assert order == ["slow", "boom"]
    assert results[0] == Done(("verify", "a"), value="ok")
    assert isinstance(results[1].error, RuntimeError)
    assert not checks.busy("merge") and not checks.pending(("verify", "a"))
    checks.close()


def test_a_job_starts_only_when_released() -> None:
    before = set(threading.enumerate())
    checks = Jobs()
    ran = threading.Event()
    assert checks.submit("job", ran.set)
    # Held until the turn that submitted it is committed: no thread exists that could run it.
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("master-")]
    assert not ran.is_set() and checks.pending("job")
    checks.release(checks.seal())
    assert ran.wait(10)
    results: list[Done] = []
    wait_until(lambda: results.extend(checks.poll()) or bool(results))
    assert results == [Done("job", value=None)]
    checks.close()


def test_sealed_jobs_start_when_their_batch_is_released_and_never_after_close() -> None:
    before = set(threading.enumerate())
    checks = Jobs()
    first, second = threading.Event(), threading.Event()
    assert checks.submit("first", first.set)
    turn = checks.seal()
    assert checks.submit("second", second.set)  # a later turn's job: not in the batch
    checks.release(turn)
    assert first.wait(10)
    results: list[Done] = []
    wait_until(lambda: results.extend(checks.poll()) or bool(results))
    assert results == [Done("first", value=None)]
    assert not second.is_set() and checks.pending("second")
    checks.close()

    # A master shutting down with a turn still being written: its sealed merge must not start.
    closing = Jobs()
    assert closing.submit("merge", second.set)
    batch = closing.seal()
    closing.close()
    closing.release(batch)
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("master-")]
    assert not second.is_set()


def test_lanes_run_side_by_side_up_to_their_size() -> None:
    jobs = Jobs(lanes={"verify": 3, "build": 1})
    gate = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def job(name: str) -> object:
        def run() -> str:
            with lock:
                started.append(name)
            gate.wait(10)
            return name

        return run

    for n in range(4):
        assert jobs.submit(("verify", n), job(f"v{n}"), "verify")
    assert jobs.submit(("build", 0), job("b0"), "build")
    jobs.release(jobs.seal())
    # Three verifies and the build run at once; the fourth verify waits for a free thread.
    wait_until(lambda: len(started) == 4)
    assert sorted(started) == ["b0", "v0", "v1", "v2"]
    gate.set()
    results: list[Done] = []
    wait_until(lambda: results.extend(jobs.poll()) or len(results) == 5)
    assert sorted(str(d.value) for d in results) == ["b0", "v0", "v1", "v2", "v3"]
    jobs.close()
