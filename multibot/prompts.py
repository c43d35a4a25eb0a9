"""Prompts: what a worker's agent is told, and what Opus is asked. Pure text building."""

from __future__ import annotations

from multibot.protocol import TaskAssignment
from multibot.state import ContextMemory

AGENT_COMMANDS = """\
You are one worker in a team run by a master process. Talk to the master with these shell
commands (run them with your Bash tool; they already know which worker you are):
  multibot report progress "TEXT"    short progress note, whenever you finish a step
  multibot report discovery "TEXT"   something other workers should know (an API, a gotcha)
  multibot report blocked "TEXT"     you cannot go on without help
  multibot report decision "TEXT"    a choice you made that later work should respect
  multibot report follow_up "TEXT"   a task that should be done after yours (the master adds it)
  multibot ask "QUESTION"            ask the master; waits for the answer and prints it
Messages from the master (answers, feedback, discoveries of other workers) may arrive while you
work, as new user messages: read them and take them into account."""

AGENT_TOOLS = """\
You are one worker in a team run by a master process. Talk to the master with the tools of the
multibot MCP server (they already know which worker you are):
  mcp__multibot__report_progress     short progress note, whenever you finish a step
  mcp__multibot__report_discovery    something other workers should know (an API, a gotcha)
  mcp__multibot__report_blocked      you cannot go on without help
  mcp__multibot__report_decision     a choice you made that later work should respect
  mcp__multibot__propose_follow_up   a task that should be done after yours (the master adds it)
  mcp__multibot__ask                 ask the master; waits for the answer and returns it
  mcp__multibot__status_of_task      the status of your task, or of another task of the run
A tool use outside your allow-list is put to the master, which allows or denies it.
Messages from the master or from the person at your pane (answers, feedback, discoveries of
other workers) may arrive while you work, as new user messages: read them and take them into
account."""


def task_prompt(
    worker_id: str, task_id: str, a: TaskAssignment, memory: ContextMemory, *, mcp: bool = False
) -> str:
    """Return the prompt that starts (or resumes) a task for a Claude worker (mcp: whether it
    has multibot's MCP tools, else it is told of the shell commands)."""
    parts = [
        f"# Task {task_id}: {a.title}".rstrip(": "),
        a.description.strip(),
        "",
        f"Working directory: {a.working_directory} (git branch {a.branch}). Work only here.",
    ]
    if a.owns:
        parts.append("Files you own (change only these): " + ", ".join(a.owns))
    if a.verify:
        parts.append(f"When you are done, this must pass: `{a.verify}`")
    if a.dependencies:
        parts.append("This task builds on finished tasks: " + ", ".join(a.dependencies))
    if a.context:
        parts += ["", "## Context from the master", *[f"- {c}" for c in a.context]]
    remembered = memory_lines(memory)
    if remembered:
        parts += ["", "## Your memory from earlier work", *remembered]
    if a.attempt > 1:
        parts += ["", f"This is attempt {a.attempt}: your earlier work on this branch is kept."]
    parts += [
        "",
        AGENT_TOOLS if mcp else AGENT_COMMANDS,
        "",
        f"You are worker {worker_id}. Commit your work with git when it is complete; uncommitted "
        "changes are committed for you at the end. End with a one-paragraph summary.",
    ]
    return "\n".join(parts)


def memory_lines(memory: ContextMemory, limit: int = 12) -> list[str]:
    """Return the memory file as short prompt lines, newest last."""
    lines: list[str] = []
    if memory.files:
        lines.append("- Files touched: " + ", ".join(memory.files[-limit:]))
    lines += [f"- Concept: {c}" for c in memory.concepts[-limit:]]
    lines += [f"- Decision: {d.text}" for d in memory.decisions[-limit:]]
    lines += [f"- Discovery: {d}" for d in memory.discoveries[-limit:]]
    lines += [f"- Blocker: {b}" for b in memory.blockers[-limit:]]
    lines += [f"- Note: {n}" for n in memory.notes[-limit:]]
    return lines
