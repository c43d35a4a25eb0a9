"""Configuration: config/master-config.json and config/worker-template.json, every default here.

Both files are optional; a missing key takes its default. A wrong value is a ConfigError that
names the file and the setting, and says what is expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from multibot.errors import ConfigError
from multibot.layout import Home


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MasterConfig(_Config):
    """config/master-config.json."""

    max_workers: int = Field(3, ge=1, le=200, description="Most workers running at once.")
    heartbeat_interval: float = Field(1.0, gt=0, description="Seconds between worker heartbeats.")
    heartbeat_misses: int = Field(3, ge=1, description="Missed beats before a worker is dead.")
    restart_backoff: float = Field(1.0, ge=0, description="First restart delay; doubles each time.")
    restart_backoff_max: float = Field(30.0, ge=0, description="Longest restart delay.")
    max_restarts: int = Field(
        4, ge=0, description="Restarts within restart_window before a worker is marked failed."
    )
    restart_window: float = Field(
        600.0,
        gt=0,
        description="Seconds a worker must live to have its restarts forgotten (as systemd's "
        "StartLimitIntervalSec).",
    )
    question_policy: Literal["auto", "human", "auto_with_window"] = Field(
        "auto",
        description="Who answers workers' questions: Opus, the person, or Opus after a "
        "window in which the person may answer first.",
    )
    override_window: float = Field(30.0, ge=0, description="Seconds for auto_with_window.")
    max_attempts: int = Field(
        3,
        ge=1,
        validation_alias=AliasChoices("max_attempts", "verify_attempts"),
        description="Attempts a task gets in all: a failed verify, check or review, a merge "
        "conflict, a worker that died on it each spend one (`verify_attempts`, its old name, "
        "is read too).",
    )
    verify_concurrency: int | None = Field(
        None,
        ge=1,
        description="Verify commands run at once; null: the machine's cores, at least 2.",
    )
    verify_timeout_minutes: float = Field(
        10.0, gt=0, description="A verify command running longer is killed and fails."
    )
    check_concurrency: int = Field(
        2,
        ge=1,
        description="Project checks run at once: above 1, the next batch is checked on top of "
        "the one being checked (speculative), and thrown away if that one fails.",
    )
    merge_batch_max: int = Field(
        8, ge=1, description="Most tasks merged and checked together (1: a check per merge)."
    )
    merge_batch_wait: float = Field(
        1.0,
        ge=0,
        description="Seconds a batch that is not full waits for more tasks while some are "
        "being verified (a burst of tasks goes in one batch).",
    )
    check_timeout_minutes: float = Field(
        30.0, gt=0, description="A project check running longer is killed and fails."
    )
    review: bool = Field(False, description="Have Opus review each diff before merging.")
    verify: str | None = Field(None, description="Project check run after every merge.")
    integration_branch: str = Field(
        "multibot/integration", description="Where finished tasks are merged."
    )
    base_branch: str | None = Field(None, description="Branch to start from; None = HEAD.")
    approve_plan: bool = Field(False, description="Wait for the person to approve the plan.")
    budget_usd: float | None = Field(None, ge=0, description="Stop assigning past this spend.")
    task_budget_usd: float | None = Field(None, ge=0, description="Per-task spend limit.")
    task_timeout_minutes: float = Field(60.0, gt=0, description="A task running longer stops.")
    planner_model: str = Field("opus", description="Model that plans, answers and reviews.")
    planner_attempts: int = Field(3, ge=1, description="Tries to get a valid plan from Opus.")
    limit_backoff: float = Field(
        5.0, gt=0, description="First wait after an API limit (429, 529, 5xx); doubles each time."
    )
    limit_backoff_max: float = Field(120.0, gt=0, description="Longest wait after an API limit.")
    adaptive_concurrency: bool = Field(
        True,
        description="After an API limit, halve the agents allowed at once, and grow them back "
        "one per task finished (false: always max_workers).",
    )
    limit_wait_max: float = Field(
        3600.0,
        gt=0,
        description="Seconds of API limits in all after which the run pauses itself "
        "(`multibot resume all` goes on).",
    )
    permission_allow: tuple[str, ...] = Field(
        (),
        description="Tool uses outside the workers' allow-list that are always allowed, as "
        "Tool or Tool(glob), e.g. Bash(npm test*) (docs/mcp.md).",
    )
    permission_deny: tuple[str, ...] = Field(
        (), description="Tool uses always denied, e.g. Bash(rm -rf *); read before the allow."
    )
    permission_policy: Literal["auto", "human", "deny"] = Field(
        "auto",
        description="Who decides a tool use no rule names: Opus (the person when Opus is not "
        "available), the person (a question), or nobody (denied).",
    )
    idle_worker_timeout: float = Field(30.0, ge=0, description="Stop a worker idle this long.")
    max_panes_per_window: int = Field(6, ge=1, le=20, description="Worker panes per window.")
    tick: float = Field(0.05, gt=0, le=5, description="Master loop period, seconds.")
    rescan_interval: float = Field(1.0, gt=0, description="Inbox rescan without events.")
    worktree_setup: str | None = Field(None, description="Shell command run in new worktrees.")
    tmux_socket: str = Field("multibot", description="tmux -L socket of the session.")
    tmux_session: str = Field("multibot", description="tmux session name.")
    claude_bin: str = Field("claude", description="The claude binary the planner runs.")

    @field_validator("permission_allow", "permission_deny")
    @classmethod
    def _rules(cls, rules: tuple[str, ...]) -> tuple[str, ...]:
        from multibot.permissions import check_rule

        wrong = [w for w in map(check_rule, rules) if w]
        if wrong:
            raise ValueError("; ".join(wrong))
        return rules


class WorkerTemplate(_Config):
    """config/worker-template.json: how workers run their agent."""

    backend: Literal["claude", "shell"] = Field("claude", description="What runs a task.")
    model: Literal["haiku", "sonnet", "opus"] = Field(
        "sonnet", description="Model when a task names none."
    )
    permission_mode: str = Field("acceptEdits", description="claude --permission-mode.")
    allowed_tools: tuple[str, ...] = Field(
        description="claude --allowedTools.",
        default=(
            "Bash",
            "Read",
            "Write",
            "Edit",
            "MultiEdit",
            "Glob",
            "Grep",
            "TodoWrite",
        ),
    )
    disallowed_tools: tuple[str, ...] = Field((), description="claude --disallowedTools.")
    extra_args: tuple[str, ...] = Field((), description="More arguments for claude.")
    capabilities: tuple[str, ...] = Field((), description="What workers offer tasks that need it.")
    claude_bin: str = Field("claude", description="The claude binary workers run.")
    sandbox: bool = Field(
        True, description="Run each agent's commands in Claude Code's sandbox (docs/security.md)."
    )
    sandbox_network: tuple[str, ...] = Field(
        (), description="Domains the agents' commands may reach (e.g. pypi.org, *.npmjs.org)."
    )
    sandbox_write: tuple[str, ...] = Field(
        (), description="More paths the agents' commands may write (e.g. ~/.cache/pip)."
    )
    mcp: bool = Field(
        True,
        description="Give claude agents multibot's MCP tools (report, ask...) and send their "
        "permission requests to the master (docs/mcp.md).",
    )
    permission_timeout: float = Field(
        900.0,
        gt=0,
        le=3600,
        description="Seconds a permission request waits for a decision: then denied.",
    )
    tick: float = Field(0.05, gt=0, le=5, description="Worker loop period, seconds.")


def _load(path: Path, model: type[_Config]) -> _Config:
    if not path.exists():
        return model()
    try:
        data = json.loads(path.read_text() or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys allowed
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"{path}: setting {loc!r}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from exc


def load_master(home: Home) -> MasterConfig:
    """Read config/master-config.json (defaults for what it does not say)."""
    cfg = _load(home.master_config, MasterConfig)
    assert isinstance(cfg, MasterConfig)
    return cfg


def load_worker(home: Home) -> WorkerTemplate:
    """Read config/worker-template.json (defaults for what it does not say)."""
    cfg = _load(home.worker_template, WorkerTemplate)
    assert isinstance(cfg, WorkerTemplate)
    return cfg


def settings_table(model: type[_Config]) -> str:
    """Return a Markdown table of a config model's settings, defaults and meanings (for docs)."""
    rows = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for name, f in model.model_fields.items():
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        rows.append(f"| `{name}` | `{json.dumps(default)}` | {f.description or ''} |")
    return "\n".join(rows)
