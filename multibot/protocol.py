"""The typed protocol: every message between multibot processes, as frozen pydantic models.

A message is an Envelope (id, type, sender, recipient, time, schema version, sender generation,
task id, correlation id) whose ``payload`` is one of the payload models below, chosen by the
``type`` literal. Unknown fields are refused; new fields get defaults so older files still parse.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from multibot.errors import DecodeError
from multibot.ids import check_branch, check_id, check_relpath

SCHEMA_VERSION = 1
BROADCAST = "*"
MAX_MESSAGE_BYTES = 1_000_000
_COMMIT = re.compile(r"[0-9a-f]{4,64}")
Branch = Annotated[str, AfterValidator(check_branch)]  # a branch name git takes as one

Model = Literal["haiku", "sonnet", "opus"]


class Frozen(BaseModel):
    """Base of every protocol model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# -- master to worker -----------------------------------------------------------------------


class Budget(Frozen):
    max_usd: float | None = None
    max_minutes: float | None = None


class TaskAssignment(Frozen):
    type: Literal["TASK_ASSIGNMENT"] = "TASK_ASSIGNMENT"
    title: str = ""
    description: str
    branch: Branch
    working_directory: str
    context: list[str] = []
    dependencies: list[str] = []
    priority: int = 0
    estimated_duration: float = 0.0
    model: Model = "sonnet"
    owns: list[str] = []
    verify: str | None = None
    budget: Budget = Budget()
    commands: list[str] = []
    attempt: int = 1
    base_branch: str = "multibot/integration"
    repo: str = ""
    capabilities: list[str] = []  # what the task needs: picks its MCP servers (mcp/servers.py)

    @field_validator("owns")
    @classmethod
    def _owns(cls, v: list[str]) -> list[str]:
        return [check_relpath(p, "owned path") for p in v]


class StatusRequest(Frozen):
    type: Literal["STATUS_REQUEST"] = "STATUS_REQUEST"


class Terminate(Frozen):
    type: Literal["TERMINATE"] = "TERMINATE"
    reason: str = ""
    graceful: bool = True


ContextKind = Literal["discovery", "answer", "feedback", "dependency_finished", "note"]


class ContextUpdate(Frozen):
    type: Literal["CONTEXT_UPDATE"] = "CONTEXT_UPDATE"
    kind: ContextKind
    text: str
    source: str = ""


# -- worker to master -----------------------------------------------------------------------

WorkerStatus = Literal["idle", "working", "blocked", "error", "paused", "stopped"]


class StatusUpdate(Frozen):
    type: Literal["STATUS_UPDATE"] = "STATUS_UPDATE"
    status: WorkerStatus
    progress: str = ""
    kind: Literal[
        "progress", "discovery", "blocked", "decision", "follow_up", "status", "started", "person"
    ] = "progress"
    current_tool: str | None = None
    turns: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    session_id: str | None = None


class ToolUse(Frozen):
    """A tool an agent wants to use outside its allow-list (from its permission tool)."""

    tool: str
    input: dict[str, Any] = {}


class Question(Frozen):
    type: Literal["QUESTION"] = "QUESTION"
    question: str
    context: str = ""
    permission: ToolUse | None = None  # a permission request: answered allow or deny


class Tokens(Frozen):
    input: int = 0
    output: int = 0


class TaskComplete(Frozen):
    type: Literal["TASK_COMPLETE"] = "TASK_COMPLETE"
    summary: str
    branch: Branch
    commit: str | None = None
    files_changed: list[str] = []
    cost_usd: float = 0.0
    tokens: Tokens = Tokens()
    turns: int = 0
    duration_s: float = 0.0
    discoveries: list[str] = []
    follow_ups: list[str] = []
    session_id: str | None = None

    @field_validator("commit")
    @classmethod
    def _commit(cls, v: str | None) -> str | None:
        if v is not None and not _COMMIT.fullmatch(v):
            raise ValueError(f"commit {v[:80]!r} is not a hex object name")
        return v


ErrorKind = Literal[
    "agent",
    "timeout",
    "budget",
    "git",
    "protocol",
    "startup",
    "terminated",
    "internal",
    "busy",
    "limit",  # the API limited or failed the call: no fault of the task (detail: the kind)
    "auth",  # the API refused the credentials: every call would fail so
    "context",  # the conversation grew too long for the model: a fresh session is needed
]


class ErrorReport(Frozen):
    type: Literal["ERROR"] = "ERROR"
    kind: ErrorKind
    message: str
    recoverable: bool = True
    detail: str = ""
    api_status: int | None = None  # the HTTP status of a limit, auth or context error
    reset_at: float | None = None  # when a usage limit lifts (epoch seconds), if the API said


# -- replies and broadcasts -----------------------------------------------------------------


class Answer(Frozen):
    """Reply to a QUESTION; the envelope's correlation_id is the question's message id."""

    type: Literal["ANSWER"] = "ANSWER"
    answer: str
    answered_by: str = "master"


class Broadcast(Frozen):
    """A notice for every worker (e.g. a shared discovery); recipient is '*' when sent."""

    type: Literal["BROADCAST"] = "BROADCAST"
    kind: ContextKind = "note"
    text: str
    source: str = ""


Payload = Annotated[
    TaskAssignment
    | StatusRequest
    | Terminate
    | ContextUpdate
    | StatusUpdate
    | Question
    | TaskComplete
    | ErrorReport
    | Answer
    | Broadcast,
    Field(discriminator="type"),
]

MessageType = Literal[
    "TASK_ASSIGNMENT",
    "STATUS_REQUEST",
    "TERMINATE",
    "CONTEXT_UPDATE",
    "STATUS_UPDATE",
    "QUESTION",
    "TASK_COMPLETE",
    "ERROR",
    "ANSWER",
    "BROADCAST",
]
MASTER_TO_WORKER = ("TASK_ASSIGNMENT", "STATUS_REQUEST", "TERMINATE", "CONTEXT_UPDATE", "ANSWER")
WORKER_TO_MASTER = ("STATUS_UPDATE", "QUESTION", "TASK_COMPLETE", "ERROR")

_seq = itertools.count()


def new_message_id(now_ns: int | None = None) -> str:
    """Return a unique id that sorts by creation time: <ns timestamp>-<pid>-<counter>."""
    ns = time.time_ns() if now_ns is None else now_ns
    return f"{ns:020d}-{os.getpid():07d}-{next(_seq):06d}"


class Envelope(Frozen):
    """One message: routing and bookkeeping around a typed payload."""

    # As new_message_id makes them (a pid has at most 8 digits), so that every name made from
    # an id (a question's file, q-<id>) stays a valid id.
    id: str = Field(default_factory=new_message_id, pattern=r"^[0-9]{20}-[0-9]{7,8}-[0-9]{6,12}$")
    schema_version: int = SCHEMA_VERSION
    sender: str
    recipient: str
    sent_at: float = Field(default_factory=time.time)
    generation: int = 0
    task_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    payload: Payload
    # <kind>.<generation>.<hmac-sha256 hex> over the message without it (see auth.py)
    mac: str | None = Field(default=None, max_length=100)

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        return check_id(v, "sender")

    @field_validator("recipient")
    @classmethod
    def _recipient(cls, v: str) -> str:
        return v if v == BROADCAST else check_id(v, "recipient")

    @field_validator("reply_to")
    @classmethod
    def _reply_to(cls, v: str | None) -> str | None:
        return v if v is None else check_id(v, "reply_to")

    @field_validator("task_id")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        return v if v is None else check_id(v, "task id")

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"schema version {v} is newer than this multibot ({SCHEMA_VERSION})")
        return v

    @property
    def type(self) -> MessageType:
        return self.payload.type


def make(
    payload: Any,
    *,
    sender: str,
    recipient: str,
    generation: int = 0,
    task_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> Envelope:
    """Wrap a payload in a new envelope."""
    return Envelope(
        sender=sender,
        recipient=recipient,
        generation=generation,
        task_id=task_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        payload=payload,
    )


def encode(message: Envelope) -> bytes:
    """Serialise a message to the bytes written in an inbox."""
    return message.model_dump_json(indent=2).encode() + b"\n"


def decode(raw: bytes, path: os.PathLike[str] | None = None) -> Envelope:
    """Parse and validate a message; DecodeError says what is wrong."""
    from pathlib import Path

    where = Path(path) if path is not None else None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DecodeError(
            where, raw[:200], f"message is {len(raw)} bytes (max {MAX_MESSAGE_BYTES})"
        )
    try:
        return Envelope.model_validate_json(raw)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(where, raw, _short(exc)) from exc


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc or '(message)'}: {err.get('msg')}")
        return "; ".join(parts)
    return str(exc)


ENVELOPE_ADAPTER: TypeAdapter[Envelope] = TypeAdapter(Envelope)


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a message envelope with every payload type."""
    return Envelope.model_json_schema()
