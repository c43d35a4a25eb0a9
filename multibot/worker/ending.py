"""How a task's worktree is left when its agent stops: a stale lock cleared, the rest committed.

The worker calls these at a task's end and on a terminate; what they find (the commit, or the
HEAD when nothing was left to commit) is what the worker reports to the master.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from multibot import protocol
from multibot.agents import AgentOutcome
from multibot.errors import MultibotError


@dataclass(frozen=True)
class Settled:
    """A worktree after its task: the commit made of what was left, or HEAD if none was."""

    commit: str | None
    head: str | None
    outcome: AgentOutcome  # the agent's, or a git failure in its place


def clear_lock(worktree: Path, show: Callable[[str], None]) -> None:
    """Remove a stale index.lock from a worker's worktree (only its worker works there)."""
    from multibot import checkout  # GitPython is slow to import, and workers start often

    note = checkout.clear_stale_lock(worktree)
    if note is not None:
        show(f"! {note}")


def commit_left(a: protocol.TaskAssignment, message: str) -> str | None:
    """Commit what the agent left uncommitted; None if there was nothing."""
    from multibot import checkout

    return checkout.commit_all(Path(a.working_directory), message)


def settle(
    task_id: str, a: protocol.TaskAssignment, outcome: AgentOutcome, show: Callable[[str], None]
) -> Settled:
    """Clear a lock the agent's killed git may have left, then commit what is left."""
    from multibot import checkout

    cwd = Path(a.working_directory)
    clear_lock(cwd, show)
    try:
        head = checkout.settled(cwd)  # one git call tells that, the usual case
        if head is not None:
            return Settled(None, head, outcome)
        commit = commit_left(a, f"multibot: {task_id} {a.title}".rstrip())
        return Settled(commit, None if commit else checkout.head_commit(cwd), outcome)
    except MultibotError as exc:
        show(f"✗ commit failed: {exc}")
        return Settled(None, None, AgentOutcome(False, f"commit failed: {exc}", "git"))


def changed_files(a: protocol.TaskAssignment, settled: Settled, start: str | None) -> list[str]:
    """The files the task changed against its base (none when HEAD never moved)."""
    from multibot import checkout

    if settled.head is not None and settled.head == start:
        return []
    return checkout.changed_files(Path(a.working_directory), a.base_branch)
