"""What a worker tells the master at a task's end, and what it remembers of its agent's words.

Pure: the worker reads git and its files, then these say what follows from them.
"""

from __future__ import annotations

from collections.abc import Callable

from multibot import protocol
from multibot.agents import AgentOutcome
from multibot.limits import Trouble
from multibot.state import ContextMemory, Decision

MAX_NOTES = 200
_ERROR_KINDS = {"timeout": "timeout", "budget": "budget", "git": "git", "startup": "startup"}


def end_report(
    task_id: str,
    a: protocol.TaskAssignment,
    outcome: AgentOutcome,
    *,
    commit: str,
    files: list[str],
    discoveries: list[str],
    elapsed: float,
) -> tuple[protocol.Payload, str]:
    """The TASK_COMPLETE (or ERROR) for a task that ended, and the line the pane shows."""
    if outcome.ok:
        done = protocol.TaskComplete(
            summary=outcome.summary,
            branch=a.branch,
            commit=commit,
            files_changed=files,
            cost_usd=outcome.cost_usd,
            tokens=protocol.Tokens(input=outcome.input_tokens, output=outcome.output_tokens),
            turns=outcome.turns,
            duration_s=elapsed,
            discoveries=discoveries,
            session_id=outcome.session_id,
        )
        return done, f"✓ {task_id} done in {elapsed:.1f}s: {outcome.summary[:200]}"
    if outcome.trouble is not None:
        return _trouble_report(task_id, outcome, outcome.trouble)
    kind = _ERROR_KINDS.get(outcome.error_kind or "", "agent")
    error = protocol.ErrorReport(
        kind=kind,
        message=outcome.summary[-2000:],
        recoverable=kind not in ("budget", "startup"),
        detail=outcome.error_kind or "",
    )
    return error, f"✗ {task_id} failed ({outcome.error_kind}): {outcome.summary[-300:]}"


def _trouble_report(
    task_id: str, outcome: AgentOutcome, trouble: Trouble
) -> tuple[protocol.Payload, str]:
    """The ERROR for a call the API refused: a limit (the master resumes the session later),
    a bad credential (the run stops), or a context too long (a fresh session follows)."""
    kind: protocol.ErrorKind = (
        "limit" if trouble.waits else "auth" if trouble.kind == "auth" else "context"
    )
    error = protocol.ErrorReport(
        kind=kind,
        message=outcome.summary[-2000:],
        detail=trouble.kind,
        api_status=trouble.status,
        reset_at=trouble.reset_at,
    )
    then = {
        "limit": "the master resumes this session later",
        "auth": "the run stops until the credentials are fixed",
        "context": "a fresh session takes it on",
    }[kind]
    return error, f"⏳ {task_id}: API {trouble.label()} ({trouble.kind}); {then}"


Remember = Callable[[ContextMemory], ContextMemory]


def remember_report(kind: str, text: str, task_id: str | None) -> Remember | None:
    """What the agent's own `multibot report` adds to the worker's memory, if anything."""
    if kind == "discovery":
        return lambda mem: mem.model_copy(update={"discoveries": [*mem.discoveries, text]})
    if kind == "blocked":
        return lambda mem: mem.model_copy(update={"blockers": [*mem.blockers, text]})
    if kind == "decision":
        decision = Decision(text=text, task_id=task_id)
        return lambda mem: mem.model_copy(update={"decisions": [*mem.decisions, decision]})
    return None


def remember_note(line: str) -> Remember:
    """A note kept (the last MAX_NOTES): other workers' discoveries, answers, messages.
    ``discoveries`` holds this worker's own, which its TASK_COMPLETE reports."""
    return lambda mem: mem.model_copy(update={"notes": [*mem.notes, line][-MAX_NOTES:]})


def remember_file(path: str) -> Remember:
    """A file the agent touched (the last MAX_NOTES)."""

    def touched(mem: ContextMemory) -> ContextMemory:
        if path not in mem.files:
            mem.files = [*mem.files, path][-MAX_NOTES:]
        return mem

    return touched
