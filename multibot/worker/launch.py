"""What a worker process starts with, and what its agent is started with.

Its key comes from the launch file the master left (read and deleted, see privacy.py); the
agent gets an environment that lets its `multibot` commands speak for this worker about its
task and no more, its context file, and the spec the backend runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from multibot import auth, privacy, protocol, sandbox
from multibot.agents import AgentSpec
from multibot.atomic import open_file
from multibot.auth import WorkerKey
from multibot.config import WorkerTemplate
from multibot.errors import UnsafePath
from multibot.layout import Home
from multibot.mcp import servers as mcp_servers
from multibot.prompts import task_prompt
from multibot.state import ContextMemory


def reset_file(path: Path, text: str) -> None:
    """Make the file at path hold text, rewritten in place (no reader is looking yet).

    Not truncated first: emptying a file frees its block, which costs a millisecond or more
    on a disk mounted with discard, on the way of every task's start.
    """
    data = text.encode("utf-8")
    try:
        fd = open_file(path, os.O_WRONLY | os.O_CREAT)
    except UnsafePath:  # a link planted in its place: drop the link, never write through it
        os.unlink(path)
        fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def agent_env(home: Home, key: WorkerKey, task_id: str) -> dict[str, str]:
    """Return the environment that lets the agent's `multibot` commands speak for this worker,
    about this task, and no more: they sign with a key for the task (see auth.py)."""
    bindir = str(Path(sys.executable).parent)
    return {
        "MULTIBOT_HOME": str(home.root),
        "MULTIBOT_WORKER_ID": key.worker_id,
        "MULTIBOT_TASK_ID": task_id,
        "MULTIBOT_GENERATION": str(key.generation),
        "MULTIBOT_AGENT_KEY": auth.agent_key(key.key, task_id).hex(),
        "MULTIBOT_CONTEXT_FILE": str(home.worker_context(key.worker_id)),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }


def worker_key(home: Home, worker_id: str, generation: int) -> WorkerKey:
    """This incarnation's key: from the launch file the master left (its secrets go into our
    environment, for the agent), or, for a worker started by hand, from the run key."""
    launch = privacy.take_launch(home, worker_id, generation)
    if launch is not None:
        key, env = launch
        os.environ.update(env)
        return WorkerKey(worker_id, generation, key)
    return WorkerKey(worker_id, generation, auth.load_keys(home).worker(worker_id, generation))


def agent_spec(
    task_id: str,
    a: protocol.TaskAssignment,
    cfg: WorkerTemplate,
    *,
    prompt: str,
    env: dict[str, str],
    resume_session: str | None,
    confined: tuple[tuple[str, ...], tuple[str, ...]],
    mcp_sources: dict[str, str] | None = None,
) -> AgentSpec:
    """What the backend runs for an assignment (confined: allowed tools, extra arguments;
    mcp_sources: the agent's MCP servers and the file each is from)."""
    allowed_tools, extra_args = confined
    return AgentSpec(
        task_id=task_id,
        prompt=prompt,
        cwd=Path(a.working_directory),
        model=a.model,
        commands=tuple(a.commands),
        env=env,
        resume_session=resume_session,
        timeout_s=a.budget.max_minutes * 60 if a.budget.max_minutes else None,
        budget_usd=a.budget.max_usd,
        permission_mode=cfg.permission_mode,
        allowed_tools=allowed_tools,
        disallowed_tools=cfg.disallowed_tools,
        claude_bin=cfg.claude_bin,
        extra_args=extra_args,
        mcp_sources=mcp_sources or {},
    )


def task_spec(
    home: Home,
    key: WorkerKey,
    cfg: WorkerTemplate,
    backend: str,
    m: protocol.Envelope,
    a: protocol.TaskAssignment,
    *,
    memory: ContextMemory,
    resume: str | None,
    identities: dict[str, dict[str, str]],
) -> AgentSpec:
    """The spec for an assignment whose branch is checked out: its prompt, its environment
    (the git identity of its worktree, cached in identities) and its confinement.
    Raises AgentError if the sandbox cannot be set up."""
    from multibot import checkout  # GitPython is slow to import, and workers start often

    task_id = m.task_id or "task"
    identity = identities.get(a.working_directory)
    if identity is None:  # two git calls: once per worktree for this process's life
        identity = checkout.identity_env(Path(a.working_directory))
        identities[a.working_directory] = identity
    env = {**identity, **agent_env(home, key, task_id)}
    allowed, extra = sandbox.confinement(cfg, backend, home, key.worker_id, a)
    mcp = backend == "claude" and cfg.mcp
    sources: dict[str, str] = {}
    if mcp:  # multibot's tools and permission prompt, and the configured servers
        servers = mcp_servers.for_agent(
            home,
            key.worker_id,
            task_id,
            worktree=a.working_directory,
            branch=a.branch,
            capabilities=a.capabilities,
            env={**os.environ, **env},
        )
        allowed, extra = (*allowed, *servers.allowed_tools), (*extra, *servers.args)
        sources = dict(servers.sources)
    prompt = (
        a.description
        if backend == "shell"
        else task_prompt(key.worker_id, task_id, a, memory, mcp=mcp)
    )
    return agent_spec(
        task_id,
        a,
        cfg,
        prompt=prompt,
        env=env,
        resume_session=resume,
        confined=(allowed, extra),
        mcp_sources=sources,
    )
