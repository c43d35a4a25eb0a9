"""Shared test helpers: wait on a condition with a deadline instead of sleeping; tmux on a
private socket."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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


# -- tmux: every test on a private socket -----------------------------------------------------
def new_socket() -> str:
    return f"multibot-test-{uuid.uuid4().hex[:12]}"


def socket_file(sock: str) -> Path:
    return Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", sock)


def tmux_server_running(sock: str) -> bool:
    r = subprocess.run(["tmux", "-L", sock, "list-sessions"], capture_output=True, check=False)
    return r.returncode == 0


def kill_tmux_server(sock: str) -> None:
    subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, check=False)
    socket_file(sock).unlink(missing_ok=True)  # tmux leaves it behind
