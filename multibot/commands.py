"""Running a shell command: in its own process group, with a timeout, output kept bounded."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

MAX_OUTPUT = 64 * 1024


def run_shell(
    command: str,
    cwd: Path,
    timeout: float | None,
    running: set[subprocess.Popen[bytes]] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Run a shell command in cwd in its own process group; return (exit code, output).

    running, if given, holds the process while it runs (for the caller to stop it); env is
    added to this process's environment.
    """
    proc = subprocess.Popen(
        command,
        shell=True,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if running is not None:
        running.add(proc)
    try:
        return _finish_shell(proc, timeout)
    finally:
        if running is not None:
            running.discard(proc)


def _finish_shell(proc: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Kill the whole group: children of a test runner would otherwise keep the pipe open.
        # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        text = out.decode("utf-8", errors="replace")
        return -signal.SIGKILL, tail(text + f"\n[killed: timed out after {timeout:g}s]")
    return proc.returncode, tail(out.decode("utf-8", errors="replace"))


def tail(text: str) -> str:
    """Keep the end of a long output (where test runners print their summary)."""
    if len(text) <= MAX_OUTPUT:
        return text
    return f"[... {len(text) - MAX_OUTPUT} characters cut]\n" + text[-MAX_OUTPUT:]
