"""Agent backends: what actually does a task inside a worker (Claude Code, or a shell)."""

from __future__ import annotations

from multibot.agents.base import Agent, AgentEvent, AgentOutcome, AgentSpec
from multibot.errors import AgentError

BACKENDS = ("claude", "shell")


def make_agent(backend: str) -> Agent:
    """Return a new agent of the named backend."""
    if backend == "shell":
        from multibot.agents.shell import ShellAgent

        return ShellAgent()
    if backend == "claude":
        from multibot.agents.claude import ClaudeAgent

        return ClaudeAgent()
    raise AgentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Agent", "AgentEvent", "AgentOutcome", "AgentSpec", "make_agent"]
