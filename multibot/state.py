"""State shapes: every JSON file under ``state/``, as pydantic models.

These files are what every process knows, and what a person reads and edits. Each has an
integer ``version`` bumped by every system write (see ``multibot.store``). Fields a person may
edit by hand are marked "(editable)" in their description; docs/state.md lists them all.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from multibot.ids import check_branch, check_id, check_relpath
from multibot.protocol import Model, Tokens, ToolUse

STATE_SCHEMA_VERSION = 1


class Record(BaseModel):
    """Base of every state file model: unknown fields refused, assignment validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StateFileModel(Record):
    version: int = Field(
        0, ge=0, le=2**53, strict=True, description="Bumped by every system write."
    )
    schema_version: int = STATE_SCHEMA_VERSION


# -- tasks ------------------------------------------------------------------------------------

TaskStatus = Literal[
    "pending",  # waiting for dependencies or a worker
    "assigned",  # sent to a worker, not yet acknowledged
    "running",  # the worker is on it
    "verifying",  # finished, its verify command is running
    "verified",  # verified, waiting in the merge queue
    "merged",  # merged into the integration branch: done
    "failed",  # gave up after its attempts; see last_error
    "cancelled",  # cancelled by the person
]
# The groups of task statuses the master and the status view speak of.
ON_WORKER = ("assigned", "running")  # a worker has it
ACTIVE = ("assigned", "running", "verifying", "verified")  # begun, not yet merged
OVER = ("merged", "cancelled")  # nothing more will happen to it


class PlanTask(Record):
    """One task of a plan: what to do, what it needs, what it owns, how to check it."""

    id: str
    title: str
    description: str
    dependencies: list[str] = []
    priority: int = Field(0, strict=True, description="Higher runs first (editable).")
    owns: list[str] = Field([], description="Files or globs this task may change.")
    model: Model = Field(
        "sonnet", description="haiku for simple, sonnet for normal, opus for hard."
    )
    verify: str | None = Field(None, description="Shell command run in the worktree when done.")
    estimate_minutes: float = 10.0
    commands: list[str] = Field([], description="Shell backend: commands to run in order.")
    capabilities: list[str] = Field([], description="Worker capabilities this task needs.")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "task id")

    @field_validator("dependencies")
    @classmethod
    def _deps(cls, v: list[str]) -> list[str]:
        return [check_id(d, "dependency") for d in v]

    @field_validator("owns")
    @classmethod
    def _owns(cls, v: list[str]) -> list[str]:
        return [check_relpath(p, "owned path") for p in v]


class FaqEntry(Record):
    """A known answer: a question containing every word of ``match`` gets ``answer``."""

    match: str
    answer: str


class Plan(StateFileModel):
    """state/plan.json: the task graph, from Opus or a plan file."""

    goal: str = ""
    source: Literal["opus", "file"] = "file"
    approved: bool = Field(
        False, strict=True, description="(editable) Set true to let the run start."
    )
    tasks: list[PlanTask] = []
    faq: list[FaqEntry] = []
    verify: str | None = Field(None, description="Project-level check run after each merge.")
    notes: str = ""


class TaskRecord(StateFileModel):
    """state/tasks/<id>.json: one task's definition and progress."""

    task: PlanTask
    status: TaskStatus = "pending"
    hold: bool = Field(
        False, strict=True, description="(editable) Do not start this task while true."
    )
    cancel: bool = Field(False, strict=True, description="(editable) Set true to cancel the task.")
    worker: str | None = None
    attempts: int = 0
    limits: int = Field(0, description="Times the API limited it (no attempt spent).")
    runs: int = Field(
        0, description="Times a worker began it: attempts, and again after its worker died."
    )
    branch: str | None = None
    commit: str | None = None
    merge_commit: str | None = None
    summary: str = ""
    discoveries: list[str] = []
    files_changed: list[str] = []
    last_error: str = ""
    feedback: list[str] = []
    cost_usd: float = 0.0
    tokens: Tokens = Tokens()
    turns: int = 0
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    ready_at: float | None = None
    origin: str = Field("plan", description="plan, follow-up of <task>, or conflict of <task>.")
    seal: str = Field(
        "",
        description="A digest of the fields only the system writes: a hand edit of one of "
        "them (status, commands, ...) is found and refused.",
    )

    def sealed(self) -> TaskRecord:
        """This record with its seal set, as the system writes it."""
        return self.model_copy(update={"seal": self.seal_of()})

    def seal_of(self) -> str:
        """A digest of the fields only the system writes (all but version, hold, cancel,
        task.priority and the seal itself)."""
        data = self.model_dump(mode="json", exclude={"version", "hold", "cancel", "seal"})
        data["task"].pop("priority", None)
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def forged(self) -> bool:
        """Whether a field only the system writes was changed by hand since it wrote the
        file (a file written before seals existed has none, and is taken as it is)."""
        return bool(self.seal) and self.seal != self.seal_of()

    @property
    def id(self) -> str:
        return self.task.id


# -- workers ----------------------------------------------------------------------------------

WorkerStatusName = Literal[
    "starting", "idle", "working", "blocked", "error", "paused", "failed", "stopped"
]
LIVE_WORKER = ("starting", "idle", "working", "blocked", "paused", "error")  # has a process
GONE_WORKER = ("failed", "stopped")  # not restarted


class WorkerInfo(Record):
    """What the master knows of one worker (in system-state.json)."""

    id: str
    status: WorkerStatusName = "starting"
    current_task: str | None = None
    branch: str | None = None
    working_directory: str | None = None
    last_heartbeat: float | None = None
    capabilities: list[str] = []
    generation: int = 0
    pid: int | None = None
    pane_id: str | None = None
    pane_server: str | None = Field(None, description="Where pane_id means something.")
    restarts: int = 0
    next_restart_at: float | None = None
    died_at: float | None = None  # when it last died (restarts are counted in a window)
    failure_reason: str = ""
    model: str | None = None
    cost_usd: float = 0.0
    tasks_done: int = 0
    idle_since: float | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "worker id")


class BranchInfo(Record):
    name: str
    task_id: str
    worker: str | None = None
    last_commit: str | None = None
    merged: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_branch(v)


class QueueView(Record):
    """The verify and merge pipeline as the status view shows it (see state/merge-queue.json)."""

    verifying: list[str] = Field([], description="Tasks whose verify command runs now.")
    checking: list[list[str]] = Field([], description="Batches in flight, the next to land first.")
    bisecting: bool = Field(False, description="A failed batch is being split.")
    paused: str | None = Field(None, description="Why the queue waits, if it does.")
    checks: int = Field(0, description="Project checks run in this run.")
    last_check_s: float | None = Field(None, description="How long the last check took.")


class GitState(Record):
    repo: str = ""
    base: str = ""
    integration_branch: str = "multibot/integration"
    branches: list[BranchInfo] = []
    merge_queue: list[str] = []
    last_merge_commit: str | None = None
    merging: str | None = Field(None, description="First task of the batch being merged now.")
    queue: QueueView = QueueView()


class QueueGroup(Record):
    """One batch of the merge queue and its candidate (multibot/master/merging.py)."""

    ids: list[str]
    suspect: bool = Field(False, description="A half of a failed batch, checked apart.")
    state: Literal["waiting", "building", "checking", "passed", "failed"] = "waiting"
    slot: int = 0
    base: str | None = None
    commit: str | None = None
    merges: dict[str, str | None] = {}
    output: str = ""
    token: int = 0
    since: float = 0.0
    split: int = 0


class MergeQueueRecord(StateFileModel):
    """state/merge-queue.json: the merge queue's batches, written before each is acted on."""

    groups: list[QueueGroup] = []
    checks: int = 0


class Totals(Record):
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    turns: int = 0


class Metrics(Record):
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    tasks_total: int = 0
    tasks_merged: int = 0
    tasks_failed: int = 0
    questions: int = 0
    restarts: int = 0
    messages_refused: int = 0  # messages that did not prove their sender (see auth.py)
    totals: Totals = Totals()


class LimitsView(Record):
    """How the run rides out the API's limits (see limits.py); written by the master."""

    throttled: bool = False  # no agent starts until next_try
    next_try: float | None = None
    allowed: int = 0  # agents allowed to run at once (adaptive: halved after a limit)
    ceiling: int = 0  # max_workers
    hits: int = 0  # limits met in this run
    waited_s: float = 0.0  # time spent throttled; past limit_wait_max the run pauses itself
    last: str = ""  # the last limit, and from whom: "429 from w3"
    line: str = ""  # what the status view shows


class TaskIndex(Record):
    active: list[str] = []
    pending: list[str] = []
    completed: list[str] = []
    failed: list[str] = []


Phase = Literal["starting", "planning", "awaiting_approval", "running", "done", "failed", "stopped"]


class SystemState(StateFileModel):
    """state/system-state.json: the master's view of the whole run."""

    run_id: str = ""
    phase: Phase = "starting"
    paused: bool = Field(
        False, strict=True, description="(editable) Pause everything: no new work."
    )
    goal: str = ""
    backend: str = "shell"
    master_pid: int | None = None
    master_generation: int = 0
    opus_session: str | None = None
    workers: dict[str, WorkerInfo] = {}
    tasks: TaskIndex = TaskIndex()
    git: GitState = GitState()
    metrics: Metrics = Metrics()
    limits: LimitsView = LimitsView()
    message: str = Field("", description="Last notable event, for the status view.")


class PauseView(BaseModel):
    """What a worker reads of system-state.json: only whether everything is paused.

    Workers look whenever the file changes; validating the master's whole view (every task,
    worker and branch) each time would cost each of them far more than this one field.
    """

    model_config = ConfigDict(extra="ignore")

    version: int = 0
    paused: bool = False


# -- a worker's own files ---------------------------------------------------------------------


class CurrentTask(Record):
    task_id: str
    title: str = ""
    model: str = ""
    started_at: float = Field(default_factory=time.time)
    attempt: int = 1


class WorkerGit(Record):
    branch: str | None = None
    last_commit: str | None = None
    uncommitted_changes: bool = False


class WorkerCommunication(Record):
    last_master_contact: float | None = None


class WorkerState(StateFileModel):
    """state/workers/<id>-state.json: written by the worker; ``paused`` is for the person."""

    id: str
    paused: bool = Field(False, strict=True, description="(editable) Suspend this worker's agent.")
    status: WorkerStatusName = "starting"
    generation: int = 0
    pid: int | None = None
    backend: str = "shell"
    current_task: CurrentTask | None = None
    session_id: str | None = Field(None, description="Claude session, resumed after restart.")
    sessions: dict[str, str] = Field({}, description="Claude session per task id.")
    current_tool: str | None = None
    turns: int = 0
    cost_usd: float = 0.0
    git: WorkerGit = WorkerGit()
    communication: WorkerCommunication = WorkerCommunication()


class Decision(Record):
    text: str
    task_id: str | None = None
    at: float = Field(default_factory=time.time)


class ContextMemory(StateFileModel):
    """state/workers/<id>-memory.json: what the worker learned, fed back into its prompts."""

    files: list[str] = []
    concepts: list[str] = []
    decisions: list[Decision] = []
    blockers: list[str] = []
    discoveries: list[str] = []
    notes: list[str] = Field([], description="Answers, feedback and context received.")


# -- shared -----------------------------------------------------------------------------------


class Discovery(Record):
    worker: str
    task_id: str | None = None
    text: str
    at: float = Field(default_factory=time.time)


class SharedContext(StateFileModel):
    """state/context.json: discoveries shared with every worker."""

    discoveries: list[Discovery] = []


QuestionStatus = Literal["pending", "answered", "delivered"]


class QuestionRecord(StateFileModel):
    """state/questions/<id>.json: a worker's question; the person answers by editing it."""

    id: str
    message_id: str
    worker: str
    task_id: str | None = None
    question: str
    context: str = ""
    reply_to: str | None = None
    asked_at: float = Field(default_factory=time.time)
    status: QuestionStatus = "pending"
    answer: str | None = Field(None, strict=True, description="(editable) Write the answer here.")
    answered_by: str | None = None
    answered_at: float | None = None
    escalated: bool = False
    permission: ToolUse | None = Field(
        None, description="Set for a permission request: answer allow, or deny with a reason."
    )


def state_models() -> dict[str, type[BaseModel]]:
    """Return every state file's model, by a name used for schema files."""
    return {
        "system-state": SystemState,
        "plan": Plan,
        "task": TaskRecord,
        "worker-state": WorkerState,
        "worker-memory": ContextMemory,
        "context": SharedContext,
        "question": QuestionRecord,
        "merge-queue": MergeQueueRecord,
    }


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()
