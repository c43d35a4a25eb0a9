"""Shared test helpers: wait on a condition with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll pred until it returns something truthy; return that, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout:g}s: {pred!r}")
        time.sleep(interval)
