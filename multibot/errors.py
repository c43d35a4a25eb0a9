"""One error root for multibot; every leaf carries the data a person needs to act."""

from __future__ import annotations

from pathlib import Path


class MultibotError(Exception):
    """Root of every error multibot raises on purpose."""


class InvalidId(MultibotError, ValueError):
    """An identifier, branch name or path from a message or file is not acceptable."""

    def __init__(self, kind: str, value: object, reason: str) -> None:
        self.kind, self.value, self.reason = kind, value, reason
        super().__init__(f"invalid {kind} {value!r}: {reason}")


class DecodeError(MultibotError):
    """A message or state file could not be parsed or validated."""

    def __init__(self, path: Path | None, raw: bytes, cause: str) -> None:
        self.path, self.raw, self.cause = path, raw, cause
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{cause}")


class UnknownRecipient(MultibotError):
    """A message was addressed to an id that has no inbox."""

    def __init__(self, recipient: str, inbox: Path) -> None:
        self.recipient, self.inbox = recipient, inbox
        super().__init__(f"no inbox for recipient {recipient!r} (expected {inbox})")


class SendError(MultibotError):
    """A message could not be made durable (disk full, failed fsync); nothing was delivered."""


class StateError(MultibotError):
    """A state file is invalid; carries the file, line, column and field at fault."""

    def __init__(
        self,
        path: Path,
        problem: str,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.problem, self.line, self.column, self.field = (
            path,
            problem,
            line,
            column,
            field,
        )
        where = str(path)
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {problem}")


class WriteFailed(StateError):
    """A state file could not be written (a full disk, a failed sync): the state stays in
    memory and the write is tried again; nothing is wrong with the file itself."""


class UnsafePath(MultibotError):
    """A runtime path under the home is a symbolic link, or not the kind of file expected:
    multibot never writes, deletes or appends through one."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        super().__init__(
            f"{path} {what}: multibot does not follow links in its runtime folders; "
            "remove it (multibot makes what it needs anew)"
        )


class LockTimeout(MultibotError):
    """A lock could not be taken in time; names the process that holds it, if known."""

    def __init__(self, path: Path, holder: str | None, waited: float) -> None:
        self.path, self.holder, self.waited = path, holder, waited
        who = f" held by {holder}" if holder else ""
        super().__init__(f"lock {path}{who}: not acquired after {waited:.1f}s")


class AskTimeout(MultibotError):
    """A request got no reply within its timeout."""

    def __init__(self, correlation_id: str, timeout: float) -> None:
        self.correlation_id, self.timeout = correlation_id, timeout
        super().__init__(f"no answer to {correlation_id} within {timeout:g}s")


class ConfigError(MultibotError):
    """A configuration file is missing a value or holds a wrong one."""


class PlanError(MultibotError):
    """A plan is invalid (bad schema, cycle, unknown dependency); lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid plan:\n" + "\n".join(f"  - {p}" for p in problems))


class GitError(MultibotError):
    """A git operation failed, or the repository is not usable."""


class MergeBlocked(GitError):
    """The merge queue cannot move the integration branch now; no task is to blame.

    kind is "checked-out" (a person has the branch checked out), "moved" (the branch moved
    under the queue: a person's commit) or "locked" (a git lock held by a live process).
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class TmuxError(MultibotError):
    """A tmux operation failed."""


class AgentError(MultibotError):
    """An agent backend could not start or run (e.g. the claude binary is missing)."""


class WorkerDied(MultibotError):
    """A worker process ended or went silent."""

    def __init__(self, worker: str, reason: str) -> None:
        self.worker, self.reason = worker, reason
        super().__init__(f"worker {worker} died: {reason}")
