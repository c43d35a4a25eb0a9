"""What a person types into a worker's pane: read off the terminal, for the agent.

A line typed while a claude agent runs goes into its session as a message from the person;
one typed while no task runs (or as a task ends) is kept and given to the next task with its
prompt. The shell backend runs fixed commands, which typed text cannot steer: it is recorded
and the pane says so. Every line goes to the master's timeline too.

The terminal is read on a thread of its own (a blocking read), which rings the inbox's
doorbell so that the loop takes a line at once. Only a terminal is read: a worker started
with a pipe or /dev/null on stdin (tests, plain processes) has no person at it.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import TextIO

PERSON = "Message from the person at your worker's pane (answer it in your work, not by asking):"


def for_agent(text: str) -> str:
    """A typed line as the agent's session gets it."""
    return f"{PERSON} {text}"


def kept_section(lines: list[str]) -> str:
    """The prompt's section for lines typed before the task began."""
    return "\n".join(["", "## Typed at your pane by the person, before this task began", *lines])


class PaneInput:
    """The lines typed into the pane, taken one turn of the loop at a time."""

    def __init__(self, ring: Callable[[], None], stdin: TextIO | None = None) -> None:
        self.stdin = sys.stdin if stdin is None else stdin
        self.ring = ring
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.kept: list[str] = []  # typed while no task ran: for the next one
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Read the pane's terminal from now on; False if stdin is not a terminal."""
        try:
            if not self.stdin.isatty():
                return False
        except (OSError, ValueError):
            return False
        self._thread = threading.Thread(target=self._read, name="pane-input", daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        while True:
            try:
                line = self.stdin.readline()
            except (OSError, ValueError):
                return
            if not line:
                return  # the terminal is gone
            if line.strip():
                self.lines.put(line.strip())
                self.ring()

    def take(self) -> list[str]:
        """The lines typed since the last call."""
        out: list[str] = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def keep(self, line: str) -> None:
        """Keep a line for the next task (no agent runs to take it now)."""
        self.kept.append(line)

    def take_kept(self) -> list[str]:
        kept, self.kept = self.kept, []
        return kept
