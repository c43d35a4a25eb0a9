"""How an agent's own tools speak: as its worker, about its task, and no more.

`multibot report`/`ask` (the shell commands) and `multibot mcp` (the agent's MCP server) both
send through here. They sign with the task key in the agent's environment (see auth.py): the
worker checks the signature, remembers what was said and passes it on to the master under its
own key; an answer comes back the same way, into the inbox the request waits in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from multibot import auth, mailbox, protocol
from multibot.errors import AskTimeout, MultibotError
from multibot.layout import Home

ENV_KEYS = ("MULTIBOT_WORKER_ID", "MULTIBOT_TASK_ID", "MULTIBOT_AGENT_KEY")
REPORT_KINDS = ("progress", "discovery", "blocked", "decision", "follow_up")


class AgentVoice(NamedTuple):
    """What an agent's tools speak with: its worker, task, generation and task key."""

    worker: str
    task: str
    generation: int
    key: bytes

    def say(self, payload: Any) -> protocol.Envelope:
        """A message from this agent to its own worker, which checks it and passes it on."""
        message = protocol.make(
            payload,
            sender=self.worker,
            recipient=self.worker,
            generation=self.generation,
            task_id=self.task,
        )
        return self.sign(message)

    def sign(self, message: protocol.Envelope) -> protocol.Envelope:
        return auth.sign(message, self.key, self.generation, auth.AGENT)

    def heard(self, message: protocol.Envelope) -> auth.Refusal | None:
        """(reply inbox) None if the reply was signed by our worker for this task."""
        claim = auth.mac_of(message)
        if claim is not None and claim.kind == auth.AGENT and auth.verifies(message, self.key):
            return None
        return auth.Refusal(f"{message.type} from {message.sender!r} is not from our worker")


def agent_voice(env: Mapping[str, str] = os.environ) -> AgentVoice:
    """The voice the agent's environment gives; MultibotError if it is not an agent's."""
    missing = [k for k in ENV_KEYS if not env.get(k)]
    if missing:
        raise MultibotError(
            f"{', '.join(missing)} not set: `multibot report`, `ask` and `mcp` are run by a "
            "worker's agent, which has them in its environment"
        )
    key = auth.key_from_hex(env["MULTIBOT_AGENT_KEY"], "MULTIBOT_AGENT_KEY")
    return AgentVoice(
        env["MULTIBOT_WORKER_ID"],
        env["MULTIBOT_TASK_ID"],
        int(env.get("MULTIBOT_GENERATION", "0")),
        key,
    )


def report(home: Home, voice: AgentVoice, kind: str, text: str) -> None:
    """Tell the master something (one of REPORT_KINDS); the worker remembers it too."""
    if kind not in REPORT_KINDS:
        raise MultibotError(f"unknown report kind {kind!r}: one of {', '.join(REPORT_KINDS)}")
    status = "blocked" if kind == "blocked" else "working"
    payload = protocol.StatusUpdate(status=status, kind=kind, progress=text)
    mailbox.send(home, voice.say(payload))


def ask(
    home: Home,
    voice: AgentVoice,
    question: protocol.Question,
    timeout: float,
    *,
    sandboxed: bool = True,
) -> str:
    """Ask the master and return its answer; AskTimeout if none comes within timeout.
    sandboxed: the asker runs in the agent's sandbox (`multibot ask`), which lets it write
    only the worker's lasting reply inbox, so it waits there; else (the MCP server, outside
    the sandbox) each request waits in an inbox of its own, so that an `ask` and a permission
    request can wait at once."""
    from multibot import sandbox

    reply = mailbox.request(
        home,
        voice.say(question),
        timeout=timeout,
        sign=voice.sign,
        verify=voice.heard,
        reply_inbox=sandbox.reply_inbox(voice.worker) if sandboxed else None,
    )
    payload = reply.payload
    return payload.answer if isinstance(payload, protocol.Answer) else str(payload)


__all__ = ["AgentVoice", "AskTimeout", "agent_voice", "ask", "report"]
