"""The API's limits: what kind a failed call was, and the throttle that rides them out."""

from __future__ import annotations

from typing import Any

import pytest

from multibot.limits import Throttle, Trouble, backoff, classify, reset_time, wait_for


def result(status: int | None, etype: str = "", reason: str = "api_error") -> dict[str, Any]:
    """A result line as Claude Code 2.1.328 ends a refused call (measured, loopback API)."""
    return {
        "type": "result",
        "subtype": "success",
        "is_error": True,
        "api_error_status": status,
        "api_error_type": etype,
        "terminal_reason": reason,
        "result": "API Error: ...",
    }


@pytest.mark.parametrize(
    ("status", "etype", "reason", "kind"),
    [
        (429, "rate_limit_error", "api_error", "rate_limit"),
        (529, "overloaded_error", "api_error", "overloaded"),
        (500, "api_error", "api_error", "server"),
        (503, "", "api_error", "server"),
        (401, "authentication_error", "api_error", "auth"),
        (403, "permission_error", "api_error", "auth"),
        (413, "request_too_large", "image_error", "too_long"),
        (400, "invalid_request_error", "prompt_too_long", "too_long"),
    ],
)
def test_a_refused_call_is_classified_from_its_fields(
    status: int, etype: str, reason: str, kind: str
) -> None:
    trouble = classify(result(status, etype, reason))
    assert trouble is not None and trouble.kind == kind and trouble.status == status


def test_what_is_no_api_failure_is_not_classified() -> None:
    assert classify({"type": "result", "is_error": False, "result": "429 rate limit"}) is None
    # A failure of the task's own (a bad request, the agent gave up) is not a limit, whatever
    # its text says: the fields decide, not the prose.
    assert classify(result(400, "invalid_request_error")) is None
    assert classify({"is_error": True, "subtype": "error_max_turns", "result": "429"}) is None


def test_a_429_with_a_reset_time_is_a_usage_limit_that_waits_until_then() -> None:
    event = {
        "type": "rate_limit_event",
        "rate_limit_info": {"status": "rejected", "resetsAt": 1_800_000_000},
    }
    reset = reset_time(event)
    assert reset == 1_800_000_000
    in_ms = {**event, "rate_limit_info": {"status": "rejected", "resetsAt": 1_800_000_000_000}}
    assert reset_time(in_ms) == reset
    assert reset_time({**event, "rate_limit_info": {"status": "allowed", "resetsAt": 1}}) is None
    trouble = classify(result(429, "rate_limit_error"), reset)
    assert trouble is not None and trouble.kind == "usage_limit" and trouble.waits

    class Cfg:
        limit_backoff, limit_backoff_max = 5.0, 60.0

    assert wait_for(trouble, 1, Cfg(), now=reset - 600, draw=0.5) == 600.5
    assert wait_for(Trouble("rate_limit", 429), 1, Cfg(), now=0, draw=0.0) == 2.5


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    assert [backoff(n, 1.0, 8.0, 1.0) for n in range(1, 6)] == [1, 2, 4, 8, 8]
    assert backoff(3, 1.0, 8.0, 0.0) == 2.0  # half of 4: the least a draw gives


def test_the_throttle_halves_concurrency_and_grows_it_back_one_at_a_time() -> None:
    t = Throttle(ceiling=10)
    assert t.allowed == 10 and not t.throttled(0) and t.line(0) == ""
    until = t.limited(100.0, "w3", Trouble("rate_limit", 429), running=10, wait=22.0)
    assert until == 122.0 and t.allowed == 5
    assert t.throttled(110.0) and t.room(on_agents=3) == 2
    assert "throttled: 429 from w3" in t.line(110.0) and "5 of 10 workers allowed" in t.line(110.0)
    t.limited(111.0, "w1", Trouble("overloaded", 529), running=4, wait=5.0)
    assert t.allowed == 2 and t.until == 122.0  # half of the 4 running; the later wait
    assert not t.throttled(122.0)
    assert t.total_wait(500.0) == 22.0  # the spell from 100 to 122
    for _ in range(3):
        t.succeeded()
    assert t.allowed == 5 and t.line(140.0).startswith("recovering from 529 from w1")
    for _ in range(20):
        t.succeeded()
    assert t.allowed == 10 and t.line(140.0) == ""


def test_the_wait_counts_every_spell_until_the_person_resumes() -> None:
    t = Throttle(ceiling=2)
    t.limited(0.0, "w1", Trouble("rate_limit", 429), running=2, wait=10.0)
    assert t.total_wait(4.0) == 4.0
    t.throttled(10.0)
    t.limited(20.0, "w1", Trouble("rate_limit", 429), running=1, wait=10.0)
    assert t.allowed == 1 and t.total_wait(25.0) == 15.0
    t.reset_wait()
    assert t.total_wait(25.0) == 0.0 and not t.throttled(25.0)
