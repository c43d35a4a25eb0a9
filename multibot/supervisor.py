"""Worker supervision policy: when a worker counts as dead, and when to restart it. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from multibot.heartbeat import Heartbeat


def backoff(restarts: int, base: float, cap: float) -> float:
    """Return the delay before restart number ``restarts`` (1-based): base, 2*base, ... <= cap."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


@dataclass
class Watch:
    """What the master has seen of one worker incarnation, on its own monotonic clock."""

    generation: int
    started: float
    last_seq: int | None = None
    last_change: float | None = None

    def observe(self, hb: Heartbeat | None, now: float) -> None:
        """Record a heartbeat read now (only this incarnation's beats count)."""
        if hb is None or hb.generation != self.generation:
            return
        if hb.seq != self.last_seq:
            self.last_seq, self.last_change = hb.seq, now

    def verdict(self, now: float, interval: float, misses: int, startup_grace: float) -> str | None:
        """Return why this incarnation is dead, or None while it is alive.

        Staleness is judged on the observer's monotonic clock from when the heartbeat's
        sequence number last moved, so wall-clock jumps on either side cause no false death.
        """
        if self.last_change is None:
            if now - self.started > startup_grace:
                return f"no heartbeat {now - self.started:.1f}s after start"
            return None
        silent = now - self.last_change
        if silent > interval * misses:
            return f"heartbeat stale for {silent:.1f}s (interval {interval:g}s)"
        return None
