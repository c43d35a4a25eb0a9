"""multibot's tools for an agent, served over MCP (``multibot mcp``, started by Claude Code).

Every tool speaks as the agent's own worker about its own task (see voice.py): the server
holds no other key. ``ask`` and ``permission`` wait for the master's answer, each in a reply
inbox of its own. ``permission`` is the agent's ``--permission-prompt-tool``: Claude Code calls it
for a tool use its allow-list does not cover, and it answers in the shape Claude Code reads,
``{"behavior": "allow", "updatedInput": ...}`` or ``{"behavior": "deny", "message": ...}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from multibot import __version__, permissions, protocol, voice
from multibot.config import load_worker
from multibot.errors import MultibotError
from multibot.ids import check_id
from multibot.layout import Home
from multibot.mcp.rpc import Server, Tool, ToolFailed
from multibot.mcp.servers import OURS
from multibot.state import TaskRecord
from multibot.store import StateFile


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Text(_Args):
    text: str = Field(min_length=1, description="What to tell the master, in a sentence or two.")


class FollowUp(_Args):
    title: str = Field(min_length=1, description="The new task's title.")
    description: str = Field("", description="What the new task should do.")


class Ask(_Args):
    question: str = Field(min_length=1, description="The question, self-contained.")
    context: str = Field("", description="What the master needs to know to answer it.")
    timeout_s: float = Field(600.0, ge=1, le=3600, description="Seconds to wait for an answer.")


class TaskQuery(_Args):
    task_id: str | None = Field(None, description="A task id; your own task when left out.")


class PermissionAsk(BaseModel):
    model_config = ConfigDict(extra="allow")  # Claude Code may add fields of its own
    tool_name: str
    input: dict[str, Any] = {}


REPORTS = {
    "report_progress": ("progress", "A short progress note, whenever you finish a step."),
    "report_discovery": (
        "discovery",
        "Something the other workers should know (an API, a convention, a gotcha); the master "
        "passes it on to them.",
    ),
    "report_decision": ("decision", "A choice you made that later work should respect."),
    "report_blocked": ("blocked", "You cannot go on without help: say what you need."),
}


class AgentTools:
    """The tools of one agent: its voice, and the run's home."""

    def __init__(self, home: Home, agent: voice.AgentVoice, permission_timeout: float) -> None:
        self.home, self.voice, self.permission_timeout = home, agent, permission_timeout

    def tools(self) -> list[Tool]:
        made = [
            Tool(name, about, Text, self._reporter(kind)) for name, (kind, about) in REPORTS.items()
        ]
        return [
            *made,
            Tool(
                "propose_follow_up",
                "Propose a task to be done after yours; the master adds it to the plan.",
                FollowUp,
                self.propose_follow_up,
            ),
            Tool(
                "ask",
                "Ask the master a question and wait for its answer (it may come from Opus or "
                "from the person).",
                Ask,
                self.ask,
            ),
            Tool(
                "status_of_task",
                "The status of a task of this run (yours by default): status, attempts, branch, "
                "dependencies, last error.",
                TaskQuery,
                self.status_of_task,
            ),
            Tool(
                "permission",
                "(Claude Code's permission prompt) Ask the master whether a tool use outside "
                "the allow-list may go ahead.",
                PermissionAsk,
                self.permission,
            ),
        ]

    def _reporter(self, kind: str) -> Any:
        def run(args: Text) -> str:
            self._send(kind, args.text)
            return f"reported {kind} to the master"

        return run

    def _send(self, kind: str, text: str) -> None:
        try:
            voice.report(self.home, self.voice, kind, text)
        except MultibotError as exc:
            raise ToolFailed(f"could not reach the worker: {exc}") from exc

    def propose_follow_up(self, args: FollowUp) -> str:
        text = f"{args.title}: {args.description}" if args.description else args.title
        self._send("follow_up", text)
        return "proposed to the master as a follow-up task"

    def ask(self, args: Ask) -> str:
        question = protocol.Question(question=args.question, context=args.context)
        try:
            return voice.ask(self.home, self.voice, question, args.timeout_s, sandboxed=False)
        except voice.AskTimeout:
            return (
                f"no answer within {args.timeout_s:g}s; go on with your best judgement or ask "
                "again later"
            )
        except MultibotError as exc:
            raise ToolFailed(f"could not ask: {exc}") from exc

    def status_of_task(self, args: TaskQuery) -> str:
        task_id = args.task_id or self.voice.task
        try:
            path = self.home.task(check_id(task_id, "task id"))
        except ValueError as exc:
            raise ToolFailed(str(exc)) from exc
        if not path.exists():
            raise ToolFailed(f"no task {task_id!r} in this run")
        rec = StateFile(path, TaskRecord, default=None).read()
        deps = []
        for dep in rec.task.dependencies:
            dep_path = self.home.task(dep)
            status = StateFile(dep_path, TaskRecord, default=None).read().status
            deps.append({"id": dep, "status": status})
        view = {
            "id": rec.task.id,
            "title": rec.task.title,
            "status": rec.status,
            "worker": rec.worker,
            "attempts": rec.attempts,
            "branch": rec.branch,
            "dependencies": deps,
            "last_error": rec.last_error[-1000:],
            "summary": rec.summary[-1000:],
        }
        return json.dumps(view, indent=1)

    def permission(self, args: PermissionAsk) -> str:
        use = protocol.ToolUse(tool=args.tool_name, input=args.input)
        text = permissions.question(self.voice.worker, use.tool, use.input)
        question = protocol.Question(question=text, permission=use)
        try:
            answer = voice.ask(
                self.home, self.voice, question, self.permission_timeout, sandboxed=False
            )
            decision = permissions.verdict(answer)
        except voice.AskTimeout:
            decision = permissions.Decision(
                False, f"no decision within {self.permission_timeout:g}s"
            )
        except MultibotError as exc:
            decision = permissions.Decision(False, f"the master could not be asked: {exc}")
        if decision.allow:
            return json.dumps({"behavior": "allow", "updatedInput": args.input})
        return json.dumps({"behavior": "deny", "message": f"the master said no: {decision.why}"})


def serve(home: Home) -> int:
    """Serve the agent's tools on stdin and stdout until Claude Code closes them."""
    agent = voice.agent_voice()
    tools = AgentTools(home, agent, load_worker(home).permission_timeout)
    return Server(OURS, __version__, tools.tools()).serve(sys.stdin, sys.stdout)
