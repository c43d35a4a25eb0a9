"""What a worker is told when its task goes back, and what an assignment says. Pure.

Change the wording a worker gets on a conflict, a failed verify or a broken project check
here; the master only picks which one applies.
"""

from __future__ import annotations

from multibot import protocol
from multibot.config import MasterConfig
from multibot.state import TaskRecord
from multibot.worktrees import MergeOutcome

OUTPUT_SHOWN = 3000  # the tail of a command's output a worker is shown
SIDE_SHOWN = 1500  # of each side of a conflicting file
CONFLICTS_SHOWN = 10


def verify_failed(rec: TaskRecord, output: str) -> str:
    return f"verify `{rec.task.verify}` failed:\n{output[-OUTPUT_SHOWN:]}"


def broke_check(rec: TaskRecord, output: str) -> str:
    return (
        f"the project check failed with {rec.id} merged, so it was not merged:\n"
        f"{output[-OUTPUT_SHOWN:]}"
    )


def conflict(outcome: MergeOutcome, into: str) -> str:
    """What a task whose branch could not join a candidate on into is told."""
    branch = outcome.branch
    if outcome.status == "missing":
        return f"{outcome.output}; the task is done again"
    files = ", ".join(c.path for c in outcome.conflicts)
    sides = "\n".join(
        f"--- {c.path} on {into}:\n{(c.ours or '(deleted)')[:SIDE_SHOWN]}\n"
        f"--- {c.path} on {branch}:\n{(c.theirs or '(deleted)')[:SIDE_SHOWN]}"
        for c in outcome.conflicts[:CONFLICTS_SHOWN]
    )
    return (
        f"merging {branch} into {into} conflicts in {files}. Merge {into} into your "
        f"branch, resolve the conflicts and commit.\n{sides}"
    )


def worker_failed(wid: str, restarts: int, reason: str) -> str:
    return f"worker {wid} failed after {restarts} restarts ({reason}) while on this task"


def assignment(
    rec: TaskRecord,
    config: MasterConfig,
    *,
    worktree: str,
    context: list[str],
    base_branch: str,
    repo: str,
) -> protocol.TaskAssignment:
    """The assignment of rec's current attempt, to be done in worktree on rec.branch."""
    t = rec.task
    assert rec.branch is not None
    return protocol.TaskAssignment(
        title=t.title,
        description=t.description,
        branch=rec.branch,
        working_directory=worktree,
        context=context,
        dependencies=t.dependencies,
        priority=t.priority,
        estimated_duration=t.estimate_minutes * 60,
        model=t.model,
        owns=t.owns,
        verify=t.verify,
        budget=protocol.Budget(
            max_usd=config.task_budget_usd, max_minutes=config.task_timeout_minutes
        ),
        commands=t.commands,
        attempt=rec.attempts,
        base_branch=base_branch,
        repo=repo,
        capabilities=t.capabilities,
    )


def context_full(rec: TaskRecord, message: str) -> str:
    """The feedback for a task whose session grew too long for the model: a fresh one
    continues from the work committed so far."""
    return (
        f"Your previous session on this task ended because its context was too long "
        f"({message[:200]}). This is a fresh session. The work done so far is committed on "
        f"your branch {rec.branch}: read its `git log` and its diff against the integration "
        "branch to see it, then finish the task without starting over."
    )
