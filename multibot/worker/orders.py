"""What a worker does with an assignment, decided from what it is doing (pure).

The worker process acts on the verdict: it starts the task, keeps it for after a pause,
or answers the master with the error the verdict carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from multibot import protocol

Action = Literal["start", "defer", "ignore", "refuse"]


@dataclass(frozen=True)
class Verdict:
    action: Action
    note: str = ""  # what the pane shows
    error: protocol.ErrorReport | None = None  # what the master is told (refuse)


def judge_assignment(
    worker_id: str,
    worktree: Path,
    task_id: str,
    a: protocol.TaskAssignment,
    *,
    current: str | None,
    finished: set[tuple[str, int]],
    paused: bool,
) -> Verdict:
    """Whether to take an assignment: only in this worker's worktree, one task at a time,
    never an attempt already reported, and not while paused."""
    if a.working_directory and Path(a.working_directory).resolve() != worktree.resolve():
        message = f"{a.working_directory} is not {worker_id}'s worktree ({worktree})"
        error = protocol.ErrorReport(kind="protocol", message=message, recoverable=False)
        return Verdict("refuse", f"! refused {task_id}: {message}", error)
    if current == task_id:
        return Verdict("ignore")  # the same assignment again (master restarted): already on it
    if current is not None:
        busy = protocol.ErrorReport(kind="busy", message=f"busy with {current}", recoverable=True)
        return Verdict("refuse", "", busy)
    if (task_id, a.attempt) in finished:
        # Re-sent by a master that restarted before it read our report: that is on its way.
        return Verdict("ignore", f"… {task_id} attempt {a.attempt} is done already; not again")
    if paused:
        return Verdict("defer", f"… {task_id} waits until resumed")
    return Verdict("start")
