"""The one place that knows where multibot's files live under a home folder.

Everything multibot reads or writes at run time sits under a *home* (``--home``, or
``MULTIBOT_HOME``, or the project root). No other module builds these paths by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from multibot.ids import check_id

MASTER_ID = "master"
HUMAN_ID = "human"


def default_home() -> Path:
    """Return MULTIBOT_HOME if set, else the project root (the folder holding pyproject.toml)."""
    env = os.environ.get("MULTIBOT_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd().resolve()


@dataclass(frozen=True)
class InboxPaths:
    """A Maildir-style inbox: tmp/ (being written), new/ (delivered), cur/ (claimed), rejected/."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def new(self) -> Path:
        return self.root / "new"

    @property
    def cur(self) -> Path:
        return self.root / "cur"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def handled_log(self) -> Path:
        """Ids of messages whose effect is done, one per line (idempotency across crashes)."""
        return self.root / "handled.log"

    def dirs(self) -> tuple[Path, Path, Path, Path]:
        return (self.tmp, self.new, self.cur, self.rejected)


@dataclass(frozen=True)
class Home:
    """Paths of every runtime file under one home folder."""

    root: Path

    @classmethod
    def at(cls, root: Path | str | None = None) -> Home:
        return cls(Path(root).expanduser().resolve() if root else default_home())

    # -- top-level folders -------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def communication_dir(self) -> Path:
        return self.root / "communication"

    @property
    def worktrees_dir(self) -> Path:
        return self.root / "worktrees"

    @property
    def handed_secrets(self) -> Path:
        """The launching shell's secrets on their way to the master (see privacy.py)."""
        return self.state_dir / "handed-secrets.json"

    @property
    def run_key(self) -> Path:
        """The run's signing key, the root of every message's mac (see auth.py)."""
        return self.state_dir / "run.key"

    @property
    def launches_dir(self) -> Path:
        return self.state_dir / "launch"

    def launch_file(self, worker_id: str) -> Path:
        """A worker's key and secrets on their way from the master to its process."""
        return self.launches_dir / f"{check_id(worker_id, 'worker id')}.json"

    # -- config ------------------------------------------------------------------------
    @property
    def master_config(self) -> Path:
        return self.config_dir / "master-config.json"

    @property
    def worker_template(self) -> Path:
        return self.config_dir / "worker-template.json"

    @property
    def mcp_configs_dir(self) -> Path:
        return self.config_dir / "mcp-configs"

    # -- state -------------------------------------------------------------------------
    @property
    def system_state(self) -> Path:
        return self.state_dir / "system-state.json"

    @property
    def plan(self) -> Path:
        return self.state_dir / "plan.json"

    @property
    def context(self) -> Path:
        """Shared discoveries, visible to every worker."""
        return self.state_dir / "context.json"

    @property
    def timeline(self) -> Path:
        return self.state_dir / "timeline.jsonl"

    @property
    def tasks_dir(self) -> Path:
        return self.state_dir / "tasks"

    def task(self, task_id: str) -> Path:
        return self.tasks_dir / f"{check_id(task_id, 'task id')}.json"

    @property
    def workers_dir(self) -> Path:
        return self.state_dir / "workers"

    def worker_state(self, worker_id: str) -> Path:
        return self.workers_dir / f"{check_id(worker_id, 'worker id')}-state.json"

    def worker_memory(self, worker_id: str) -> Path:
        return self.workers_dir / f"{check_id(worker_id, 'worker id')}-memory.json"

    def worker_context(self, worker_id: str) -> Path:
        """Messages received mid-task, as text lines a shell task can read."""
        return self.workers_dir / f"{check_id(worker_id, 'worker id')}-context.txt"

    @property
    def heartbeats_dir(self) -> Path:
        return self.state_dir / "heartbeats"

    def heartbeat(self, process_id: str) -> Path:
        return self.heartbeats_dir / f"{check_id(process_id, 'process id')}.json"

    @property
    def questions_dir(self) -> Path:
        return self.state_dir / "questions"

    def question(self, question_id: str) -> Path:
        return self.questions_dir / f"{check_id(question_id, 'question id')}.json"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log(self, process_id: str) -> Path:
        return self.logs_dir / f"{check_id(process_id, 'process id')}.log"

    @property
    def demo_dir(self) -> Path:
        """Where ``--demo`` creates its sample repository."""
        return self.root / "demo"

    # -- communication -----------------------------------------------------------------
    @property
    def inboxes_dir(self) -> Path:
        return self.communication_dir / "inbox"

    def inbox(self, process_id: str) -> InboxPaths:
        return InboxPaths(self.inboxes_dir / check_id(process_id, "inbox id"))

    @property
    def locks_dir(self) -> Path:
        return self.communication_dir / "locks"

    # -- worktrees ---------------------------------------------------------------------
    @property
    def integration_worktree(self) -> Path:
        """Where merges into the integration branch happen (never the user's checkout)."""
        return self.worktrees_dir / "_integration"

    def merge_worktree(self, slot: int) -> Path:
        """Where the merge queue's candidate number slot (from 1) is built and checked."""
        if slot <= 1:
            return self.integration_worktree
        return self.worktrees_dir / f"_integration-{slot}"

    def verify_worktree(self, slot: int) -> Path:
        """Where tasks' verify commands run, one at a time each, on the task's commit."""
        return self.worktrees_dir / f"_verify-{slot}"

    @property
    def merge_queue(self) -> Path:
        return self.state_dir / "merge-queue.json"

    @property
    def archive_dir(self) -> Path:
        """Earlier runs' state, moved aside when a new run starts."""
        return self.state_dir / "archive"

    def worktree(self, worker_id: str) -> Path:
        return self.worktrees_dir / check_id(worker_id, "worker id")


def backup_of(path: Path) -> Path:
    """The last good copy of a state file, kept beside it."""
    return path.with_name(path.name + ".bak")


def lock_of(path: Path) -> Path:
    """The lock file guarding a state file's read-modify-write."""
    return path.with_name(path.name + ".lock")
