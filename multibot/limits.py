"""The API's limits and failures: what kind a failed call was, and how the run rides them out.

Pure: no I/O, and the caller passes the time and the random draw.

**Kinds.** Claude Code ends a call the API refused with a result that says so in fields
(measured on 2.1.328 against a loopback API): ``is_error`` true, ``api_error_status`` (the
HTTP status), ``api_error_type`` (the API's error type) and ``terminal_reason``
("api_error", "prompt_too_long", "image_error"). ``classify`` reads those fields, never the
prose of ``result``. A ``rate_limit_event`` stream line whose ``rate_limit_info.status`` is
"rejected" carries ``resetsAt``, the moment a usage limit (a subscription's five-hour or
weekly window) lifts: with it, a 429 is a usage limit, which waits until then.

**What each kind costs.** A limit, an overload or a server error is not the task's fault: it
spends no attempt, and the task's own session is resumed later. A failed authentication stops
the run, since every call would fail the same way. A context that is too long is the task's
own problem: it starts again in a fresh session, told of its progress.

**The throttle.** After a limit the run is throttled: no new agent starts until the backoff
(exponential, with jitter) or the reset time has passed, and the number of agents allowed to
run at once is halved, of those still running (the limited agent has stopped); each task that
then finishes without a limit lets one more run, up to ``max_workers`` (additive increase,
multiplicative decrease, as TCP does). Measured in bench/limits.py, halving at each limit did
better than once per spell of throttling: the running agents keep meeting the limit while the
spell lasts, and once a spell left too many of them running. The time spent throttled adds
up; past ``limit_wait_max`` the run pauses itself, saying why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["rate_limit", "overloaded", "usage_limit", "server", "auth", "too_long"]
WAITS: frozenset[str] = frozenset({"rate_limit", "overloaded", "usage_limit", "server"})

AUTH_FIX = (
    "Fix: give multibot a valid key (ANTHROPIC_API_KEY in the shell that starts it, or log "
    "in with `claude` and /login), then start the master again: it continues the run where "
    "it stopped. No task was failed and no attempt was spent."
)

_AUTH_TYPES = {"authentication_error", "permission_error"}
_TOO_LONG_REASONS = {"prompt_too_long", "image_error"}
_MS_EPOCH = 1e11  # a resetsAt above this is in milliseconds (seconds reach it in year 5138)


@dataclass(frozen=True)
class Trouble:
    """A call the API refused or failed: its kind, its HTTP status, and when a limit lifts."""

    kind: Kind
    status: int | None = None
    reset_at: float | None = None  # epoch seconds, for a usage limit
    message: str = ""

    @property
    def waits(self) -> bool:
        """Whether waiting cures it: the task is not at fault and keeps its attempts."""
        return self.kind in WAITS

    def label(self) -> str:
        """Short, for a status line: "429", "529", "usage limit", "401"."""
        if self.kind == "usage_limit":
            return "usage limit"
        return str(self.status) if self.status else self.kind.replace("_", " ")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def classify(result: Mapping[str, Any], reset_at: float | None = None) -> Trouble | None:
    """The kind of trouble a Claude Code result reports, or None if it is no API failure.

    reset_at: when a usage limit lifts, as a ``rate_limit_event`` said (see reset_time)."""
    if not result.get("is_error"):
        return None
    status = _int(result.get("api_error_status"))
    etype = str(result.get("api_error_type") or "")
    reason = str(result.get("terminal_reason") or "")
    message = str(result.get("result") or "")[:500]
    kind: Kind | None = None
    if reason in _TOO_LONG_REASONS or status == 413 or etype == "request_too_large":
        kind = "too_long"
    elif status in (401, 403) or etype in _AUTH_TYPES:
        kind = "auth"
    elif status == 429 or etype == "rate_limit_error":
        kind = "usage_limit" if reset_at is not None else "rate_limit"
    elif status == 529 or etype == "overloaded_error":
        kind = "overloaded"
    elif (status is not None and status >= 500) or etype == "api_error":
        kind = "server"
    if kind is None:
        return None
    return Trouble(kind, status, reset_at if kind == "usage_limit" else None, message)


def reset_time(line: Mapping[str, Any]) -> float | None:
    """When a usage limit lifts, from a ``rate_limit_event`` line that says it was hit."""
    info = line.get("rate_limit_info")
    if line.get("type") != "rate_limit_event" or not isinstance(info, Mapping):
        return None
    resets = info.get("resetsAt")
    if info.get("status") != "rejected" or not isinstance(resets, int | float):
        return None
    return float(resets) / 1000 if resets > _MS_EPOCH else float(resets)


def backoff(streak: int, base: float, cap: float, draw: float) -> float:
    """The wait after the streak-th limit in a row: base doubled each time, at most cap, and
    drawn (draw in [0, 1)) from its upper half, so that limited agents do not come back as
    one ("equal jitter")."""
    full = min(cap, base * 2.0 ** max(0, streak - 1))
    return full / 2 + full / 2 * draw


class Backoff(Protocol):
    @property
    def limit_backoff(self) -> float: ...
    @property
    def limit_backoff_max(self) -> float: ...


def wait_for(trouble: Trouble, streak: int, cfg: Backoff, now: float, draw: float = 0.5) -> float:
    """Seconds to wait after the streak-th limit in a row: until the reset time the API gave,
    else the backoff."""
    if trouble.reset_at is not None and trouble.reset_at > now:
        return trouble.reset_at - now + draw
    return backoff(streak, cfg.limit_backoff, cfg.limit_backoff_max, draw)


@dataclass
class Throttle:
    """The run's answer to the API's limits: when agents may start, and how many may run."""

    ceiling: int  # max_workers
    allowed: int = 0  # agents allowed to run at once; 0 until set (see __post_init__)
    until: float = 0.0  # no agent starts before this (epoch seconds)
    streak: int = 0  # limits since the last success
    hits: int = 0  # limits in all
    waited: float = 0.0  # seconds spent throttled, in spells that ended
    since: float | None = None  # the start of the spell under way
    last: str = ""  # what the last limit was, and from whom: "429 from w3"
    adaptive: bool = True  # False: the number allowed stays at the ceiling

    def __post_init__(self) -> None:
        self.allowed = self.allowed or self.ceiling

    def limited(self, now: float, who: str, trouble: Trouble, running: int, wait: float) -> float:
        """Take in a limit met by who while running agents ran, to be waited out for wait
        seconds (see wait_for); return the next try's time."""
        self.hits += 1
        self.streak += 1
        if self.adaptive:  # of those running: each limited agent has stopped already
            self.allowed = max(1, min(self.allowed, max(running, 1)) // 2)
        self.until = max(self.until, now + wait)
        if self.since is None:
            self.since = now
        self.last = f"{trouble.label()} from {who}"
        return self.until

    def succeeded(self) -> None:
        """A task's agent ended without a limit: one more may run (up to the ceiling)."""
        self.streak = 0
        self.allowed = min(self.ceiling, self.allowed + 1)

    def throttled(self, now: float) -> bool:
        """Whether no agent may start now; ends the spell once its time has passed."""
        if self.since is not None and now >= self.until:
            self.waited += max(0.0, self.until - self.since)
            self.since = None
        return self.since is not None

    def total_wait(self, now: float) -> float:
        """Seconds spent throttled, the spell under way included."""
        return self.waited + (min(now, self.until) - self.since if self.since is not None else 0)

    def reset_wait(self) -> None:
        """Start counting the wait again (the person resumed a run that paused itself)."""
        self.waited, self.since, self.until, self.streak = 0.0, None, 0.0, 0

    def room(self, on_agents: int) -> int:
        """How many more agents may start now, with on_agents running or about to."""
        return max(0, self.allowed - on_agents)

    def line(self, now: float) -> str:
        """For the status view: "throttled: 429 from w3, next try 22:31:05, 6 of 10 workers
        allowed", or how many are allowed after an earlier limit, or "" if none was met."""
        allowed = f"{self.allowed} of {self.ceiling} workers allowed"
        if self.since is not None and now < self.until:
            at = time.strftime("%H:%M:%S", time.localtime(self.until))
            return f"throttled: {self.last}, next try {at}, {allowed}"
        if self.allowed < self.ceiling:
            return f"recovering from {self.last}: {allowed}"
        return ""
