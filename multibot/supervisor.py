"""Worker supervision policy: how long to wait before restarting a dead worker. Pure."""

from __future__ import annotations


def backoff(restarts: int, base: float, cap: float) -> float:
    """Return the delay before restart number ``restarts`` (1-based): base, 2*base, ... <= cap."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))
