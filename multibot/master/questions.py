"""Workers' questions: recorded, answered from the plan's FAQ, by Opus or by the person, and
the answer sent back through the turn's outbox (delivered once it is in the worker's inbox)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from multibot import permissions, protocol
from multibot.advisor import Advice, Advisor
from multibot.config import MasterConfig
from multibot.layout import Home
from multibot.state import Discovery, FaqEntry, QuestionRecord, TaskRecord, WorkerInfo
from multibot.store import StateFile

DISCOVERIES_SHOWN = 20  # the latest discoveries Opus is shown with a question


def faq_answer(faq: Sequence[FaqEntry], question: str) -> str | None:
    """Return the answer of the first FAQ entry whose every word is in the question."""
    words = question.lower()
    for entry in faq:
        if all(w in words for w in entry.match.lower().split()):
            return entry.answer
    return None


def run_context(
    goal: str,
    tasks: Sequence[TaskRecord],
    discoveries: Sequence[Discovery],
    workers: Sequence[WorkerInfo],
    asker: str,
    context: str,
) -> str:
    """What Opus is told of the run along with a worker's question (and its context)."""
    lines = [f"Goal: {goal}", "Tasks:"]
    lines += [f"- {t.id} [{t.status}] {t.task.title}" for t in tasks]
    if discoveries:
        shown = discoveries[-DISCOVERIES_SHOWN:]
        lines += ["Discoveries:", *[f"- {d.worker}: {d.text}" for d in shown]]
    lines += ["Workers:", *[f"- {i.id}: {i.status} on {i.current_task or '-'}" for i in workers]]
    lines += [f"Asked by {asker}. {context}"]
    return "\n".join(lines)


@dataclass(frozen=True)
class Voice:
    """How the questions speak to the rest of the master."""

    send: Callable[[protocol.Envelope], None]  # into the turn's outbox
    reply: Callable[[QuestionRecord, str, str], protocol.Envelope]  # (question, answer, by)
    event: Callable[..., None]  # (kind, text, **fields)
    show: Callable[[str], None]
    context: Callable[[str, str], str]  # (asker, its context) -> what Opus is told


class Questions:
    """The open questions (state/questions/<id>.json not yet delivered) and their answers."""

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        advisor: Advisor,
        voice: Voice,
        *,
        sandboxed: bool = False,
    ) -> None:
        self.home, self.config, self.advisor, self.voice = home, config, advisor, voice
        self.sandboxed = sandboxed  # the workers' agents are confined to their worktrees
        self.open: dict[str, StateFile[QuestionRecord]] = {}
        self.window: dict[str, float] = {}  # question id -> when Opus answers it (see asked)
        self.sending: set[str] = set()  # answers in the outbox, not yet in the inbox
        self.resend: set[str] = set()  # answered, not delivered: sent again at the next look

    def load(self) -> None:
        """Take the undelivered questions back after a restart (answers are sent again)."""
        for path in sorted(self.home.questions_dir.glob("*.json")):
            q = StateFile(path, QuestionRecord, default=None)
            status = q.read().status
            if status != "delivered":
                self.open[path.stem] = q
            if status == "answered":
                self.resend.add(path.stem)

    def asked(
        self, m: protocol.Envelope, p: protocol.Question, faq: Sequence[FaqEntry], now: float
    ) -> bool:
        """Record a worker's question and start answering it; False if known already."""
        qid = "q-" + m.id
        if qid in self.open or self.home.question(qid).exists():
            return False  # redelivered after a restart: already recorded
        q = QuestionRecord(
            id=qid,
            message_id=m.id,
            worker=m.sender,
            task_id=m.task_id,
            question=p.question,
            context=p.context,
            reply_to=m.reply_to,
            permission=p.permission,
        )
        f = StateFile(self.home.question(qid), QuestionRecord, default=lambda: q)
        self.home.questions_dir.mkdir(parents=True, exist_ok=True)
        f.update(lambda _: q)
        self.open[qid] = f
        if p.permission is not None:
            self._permission(qid, f, m.sender, p.permission)
            return True
        self.voice.event(
            "question", f"{m.sender} asks: {p.question}", question=qid, worker=m.sender
        )
        known = faq_answer(faq, p.question)
        policy = self.config.question_policy
        if known is not None:
            self.answer(qid, known, "plan faq")
        elif policy == "auto" and self.advisor.available:
            self.advisor.ask(qid, p.question, self.voice.context(m.sender, p.context))
        else:
            f.update(lambda r: r.model_copy(update={"escalated": True}))
            self.voice.show(
                f"❓ question for you ({qid}) from {m.sender}: {p.question}\n"
                f'   answer with: multibot answer {qid} "..."  (or edit {f.path})'
            )
            if policy == "auto_with_window" and self.advisor.available:
                self.window[qid] = now + self.config.override_window
        return True

    def _permission(
        self, qid: str, f: StateFile[QuestionRecord], worker: str, use: protocol.ToolUse
    ) -> None:
        """Decide a tool use outside the worker's allow-list: by the rules, by Opus, or by
        the person (a question like any other, answered allow or deny)."""
        cfg, what = self.config, permissions.describe(use.tool, use.input)
        self.voice.event("permission", f"{worker} asks to use {what}", question=qid, worker=worker)
        decided = permissions.decide(cfg.permission_allow, cfg.permission_deny, use.tool, use.input)
        if self.sandboxed:
            worktree = self.home.worktree(worker)
            decided = permissions.outside(use.tool, use.input, worktree) or decided
        if decided is not None:
            self.answer(qid, ("allow: " if decided.allow else "deny: ") + decided.why, "policy")
        elif cfg.permission_policy == "deny":
            self.answer(qid, "deny: no rule allows it (permission_policy is deny)", "policy")
        elif cfg.permission_policy == "auto" and self.advisor.available:
            q = f.read()
            self.advisor.ask(qid, q.question, self.voice.context(worker, ""))
        else:
            f.update(lambda r: r.model_copy(update={"escalated": True}))
            self.voice.show(
                f"🔐 permission request ({qid}) from {worker}: {what}\n"
                f'   answer with: multibot answer {qid} allow  (or deny "why"; or edit {f.path})'
            )

    def answer(self, qid: str, text: str, by: str) -> None:
        """Record an answer and send it to the asking worker; it counts as delivered once it
        is in the worker's inbox (see sent), and is sent again until then."""
        f = self.open.get(qid)
        if f is None or qid in self.sending:
            return
        q = f.read()
        if q.status == "delivered":
            return
        if q.status != "answered" or q.answer != text:
            q = f.update(
                lambda r: r.model_copy(
                    update={"status": "answered", "answer": text, "answered_by": by}
                )
            )
            if q.permission is None:
                self.voice.event(
                    "answer", f"{qid} answered by {by}: {text}", question=qid, answered_by=by
                )
            else:
                allowed = permissions.verdict(text).allow
                what = permissions.describe(q.permission.tool, q.permission.input)
                self.voice.event(
                    "permission-allowed" if allowed else "permission-denied",
                    f"{q.worker} {'may' if allowed else 'may not'} use {what} ({by}: {text})",
                    question=qid,
                    answered_by=by,
                )
        self.window.pop(qid, None)
        self.resend.discard(qid)
        self.sending.add(qid)
        self.voice.send(self.voice.reply(q, text, by))

    def sent(self, message: protocol.Envelope, now: float) -> None:
        """Mark the question an answer that reached its inbox answered delivered."""
        qid = "q-" + (message.correlation_id or "")
        f = self.open.pop(qid, None)
        self.sending.discard(qid)
        if f is not None:
            f.update(lambda r: r.model_copy(update={"status": "delivered", "answered_at": now}))

    def unsent(self, message: protocol.Envelope) -> None:
        """An answer could not be sent: it stays answered, and goes again at the next look."""
        qid = "q-" + (message.correlation_id or "")
        self.sending.discard(qid)
        self.resend.add(qid)

    def look(self) -> None:
        """Send the answers a person wrote into question files, and those not yet delivered."""
        for qid, f in list(self.open.items()):
            if qid in self.sending:
                continue
            if qid in self.resend or f.changed():
                q = f.read()
                if q.answer and q.status != "delivered":
                    self.answer(qid, q.answer, q.answered_by or "human")

    def tick(self, now: float) -> None:
        """Ask Opus the questions whose window for the person has passed."""
        for qid, deadline in list(self.window.items()):
            if now >= deadline and qid in self.open:
                q = self.open[qid].read()
                self.advisor.ask(qid, q.question, self.voice.context(q.worker, q.context))
                del self.window[qid]

    def advised(self, advice: Advice) -> None:
        """Take in Opus's answer to a question."""
        if advice.ok:
            self.answer(advice.key, advice.text, "opus")
            return
        self.voice.event("advisor-failed", f"could not answer {advice.key}: {advice.text}")
        self.voice.show(f"❓ {advice.key} needs your answer: multibot answer {advice.key} ...")
