"""Between a worker's agent and the master: the agent's `report` and `ask`, remembered and
passed on under the worker's key; the master's answer to the `ask` still waiting for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from multibot import mailbox, permissions, protocol
from multibot.auth import WorkerKey
from multibot.errors import MultibotError
from multibot.layout import MASTER_ID, Home
from multibot.state import ContextMemory
from multibot.store import StateFile
from multibot.worker.outbox import Outbox
from multibot.worker.report import remember_note, remember_report
from multibot.worker.writes import StateWrites


class Relay:
    """The agent's questions still open, and how its words travel."""

    def __init__(
        self,
        home: Home,
        key: WorkerKey,
        memory: StateFile[ContextMemory],
        writes: StateWrites,
        outbox: Outbox,
        show: Callable[[str], None],
    ) -> None:
        self.home, self.key, self.memory, self.writes = home, key, memory, writes
        self.outbox, self.show = outbox, show
        # our agent's questions: id -> (the inbox its `multibot ask` waits in, the question)
        self.asked: dict[str, tuple[str | None, str]] = {}

    def from_agent(self, m: protocol.Envelope) -> None:
        """Our agent's `multibot report` or `ask` (checked by the inbox): remember what it
        says and pass it on to the master, signed as ours."""
        p, task = m.payload, m.task_id
        if isinstance(p, protocol.Question) and p.permission is not None:
            self.asked[m.id] = (m.reply_to, "")  # a permission: nothing to remember
            use = p.permission
            self.show(f"🔐 asks the master: {permissions.describe(use.tool, use.input, 120)}")
        elif isinstance(p, protocol.Question):
            self.asked[m.id] = (m.reply_to, p.question)
            self.show(f"?  {p.question}")
        elif isinstance(p, protocol.StatusUpdate):
            self.show(f"✎  {p.kind}: {p.progress}")
            remember = remember_report(p.kind, p.progress, task)
            if remember is not None:
                self.writes.other(self.memory, remember)
        onward = m.model_copy(update={"recipient": MASTER_ID, "mac": None})
        self.outbox.put(self.key.sign(onward))

    def answers(self, m: protocol.Envelope) -> bool:
        """Whether m answers a question our agent asked."""
        return m.correlation_id in self.asked

    def answer(self, m: protocol.Envelope, p: protocol.Answer, task: str | None) -> bool:
        """Pass the master's answer to the `multibot ask` waiting for it; False when that
        gave up (the answer then goes into the agent's context like any message)."""
        waiting_in, question = self.asked.pop(m.correlation_id or "")
        if question:
            self.writes.other(self.memory, remember_note(f"Q: {question} A: {p.answer}"))
        else:
            self.show(f"🔐 the master says: {p.answer[:200]}")
        task = m.task_id or task
        if task is not None and waiting_in and self.home.inbox(waiting_in).root.is_dir():
            onward = m.model_copy(update={"recipient": waiting_in, "mac": None})
            with contextlib.suppress(MultibotError):
                mailbox.send(self.home, self.key.sign_for_agent(onward, task))
                return True
        return False
