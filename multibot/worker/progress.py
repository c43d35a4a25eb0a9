"""What a worker's agent is doing on its task: turns, tool, cost, and its output shown, capped."""

from __future__ import annotations

from collections.abc import Callable

from multibot import protocol
from multibot.agents import AgentEvent
from multibot.agents.stream import render

TASK_OUTPUT_SHOWN = 5_000_000  # bytes of a task's output shown in the pane and log


class Progress:
    """One task's counters, reset at its start, and the lines of output it shows."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self.show = show
        self.reset()

    def reset(self) -> None:
        self.turns, self.cost = 0, 0.0
        self.current_tool: str | None = None
        self.output_bytes, self.output_hidden = 0, 0  # a task's output shown, lines not

    def take(self, event: AgentEvent) -> None:
        """Count a tool call or a cost, and show the event's line."""
        if event.kind == "tool":
            self.current_tool = str(event.data.get("name") or event.text)
            self.turns += 1
        elif event.kind == "cost":
            self.cost = float(event.data.get("cost_usd", self.cost))
        line = render(event)
        if line:
            self.show_output(line)

    def show_output(self, line: str) -> None:
        """Show an agent's line, up to TASK_OUTPUT_SHOWN bytes a task; past that the lines
        are counted, not logged (a task printing 100 MB made two logs of 211 MB each)."""
        self.output_bytes += len(line) + 10  # as logged: "HH:MM:SS " before, "\n" after
        if self.output_bytes <= TASK_OUTPUT_SHOWN:
            self.show(line)
            return
        if not self.output_hidden:
            self.show(f"[output past {TASK_OUTPUT_SHOWN // 1_000_000} MB is not logged]")
        self.output_hidden += 1

    def ended(self) -> None:
        if self.output_hidden:
            self.show(f"[{self.output_hidden} lines of output were not logged]")

    def update(
        self, status: str, kind: str, progress: str, elapsed: float
    ) -> protocol.StatusUpdate:
        return protocol.StatusUpdate(
            status=status,
            kind=kind,
            progress=progress,
            current_tool=self.current_tool,
            turns=self.turns,
            cost_usd=self.cost,
            elapsed_s=elapsed,
        )
