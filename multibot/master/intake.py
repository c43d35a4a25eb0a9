"""The master's inbox: every message from a worker, checked, recorded and passed on.

A message must prove its sender (auth.py); one from an older generation is ignored; the
rest go by type: progress and discoveries here, questions to ``questions``, completions and
errors to ``results``. A message that breaks its handler is set aside, never fatal.
"""

from __future__ import annotations

import traceback

from multibot import auth, mailbox, protocol
from multibot.errors import LockTimeout, StateError, WriteFailed
from multibot.layout import MASTER_ID
from multibot.master.context import RunContext
from multibot.master.discoveries import recipients
from multibot.master.questions import Questions
from multibot.master.results import Results

PRUNE_EVERY_S = 300.0
AUDIT_MAX_AGE_S = 7 * 86400.0
AUDIT_MAX_COUNT = 20_000


class Intake:
    """Fetches the master's inbox each turn and hands every message to its handler."""

    def __init__(self, ctx: RunContext, questions: Questions, results: Results) -> None:
        self.ctx, self.questions, self.results = ctx, questions, results
        self.unhandled: list[protocol.Envelope] = []  # fetched, to be handled again (disk full)
        self.last_prune = 0.0

    def open(self) -> None:
        """Open the master's inbox (once the run's keys are known)."""
        ctx = self.ctx
        ctx.inbox = mailbox.Receiver(
            ctx.home,
            MASTER_ID,
            rescan_s=ctx.config.rescan_interval,
            verify=self.verify_sender,
        )
        ctx.journal.inbox = ctx.inbox

    def verify_sender(self, m: protocol.Envelope) -> auth.Refusal | None:
        """(inbox) A message counts only if its sender's key signed it (see auth.py)."""
        ctx = self.ctx
        refusal = auth.check_from_worker(ctx.keys, m)
        if refusal is not None and refusal.forged:
            ctx.sys.metrics.messages_refused += 1
            ctx.view.dirty = True
            ctx.event("message-refused", refusal.reason, sender=m.sender, message=m.id)
        return refusal

    def prune_inbox(self) -> None:
        """Now and then, drop handled messages kept for audit past their age or number."""
        ctx = self.ctx
        now = ctx.mono()
        if now - self.last_prune < PRUNE_EVERY_S or ctx.inbox is None:
            return
        self.last_prune = now
        removed = ctx.inbox.prune(max_age_s=AUDIT_MAX_AGE_S, max_count=AUDIT_MAX_COUNT)
        if removed:
            ctx.timeline.add("inbox-pruned", removed=removed)

    def handle_inbox(self) -> None:
        ctx = self.ctx
        assert ctx.inbox is not None
        waiting, self.unhandled = self.unhandled, []
        for m in [*waiting, *ctx.inbox.fetch()]:
            try:
                self.handle(m)
            except WriteFailed as exc:  # a full disk: handled again next turn
                ctx.refused(None, exc)
                self.unhandled.append(m)
                continue
            except (StateError, LockTimeout) as exc:
                ctx.event("state-write-refused", str(exc))
            except Exception:  # a poison message must not stop the master
                # Uncaught, it would stop the master again at every restart (it comes first).
                why = traceback.format_exc(limit=8)
                ctx.event("message-set-aside", f"{m.type} {m.id} from {m.sender}: {why}")
                ctx.inbox.set_aside(m, why)
                continue
            ctx.journal.took(m)  # marked handled once its effects are written

    def handle(self, m: protocol.Envelope) -> None:
        """Act on one message from a worker (or from the CLI speaking for one)."""
        ctx = self.ctx
        info = ctx.sys.workers.get(m.sender)
        if info is not None and m.generation < info.generation:
            ctx.event(
                "stale-message-ignored",
                f"{m.type} from {m.sender} generation {m.generation} < {info.generation}",
                message=m.id,
            )
            return
        ctx.timeline.add("message", type=m.type, sender=m.sender, task=m.task_id, id=m.id)
        p = m.payload
        if info is not None:
            info.last_heartbeat = ctx.clock()
        if isinstance(p, protocol.StatusUpdate):
            self.on_status(m, p)
        elif isinstance(p, protocol.Question):
            if self.questions.asked(m, p, ctx.plan.faq, ctx.clock()):
                ctx.sys.metrics.questions += 1
        elif isinstance(p, protocol.TaskComplete):
            self.results.on_complete(m, p)
        elif isinstance(p, protocol.ErrorReport):
            self.results.on_error(m, p)
        else:
            ctx.event("message-ignored", f"{m.type} from {m.sender} is not for the master")

    def on_status(self, m: protocol.Envelope, p: protocol.StatusUpdate) -> None:
        ctx = self.ctx
        wid, tid = m.sender, m.task_id
        info = ctx.sys.workers.get(wid)
        rec = ctx.book.get(tid)
        if p.kind == "started" and rec is not None:
            if rec.status == "assigned" and rec.worker == wid:
                rec.started_at = ctx.clock()
                # Lazy: a machine crash that loses it leaves the task assigned, and the
                # worker takes the assignment sent again at start for the one it runs.
                ctx.move(rec, "running", lazy=True)
        elif p.kind == "discovery":
            self.share_discovery(wid, tid, p.progress)
        elif p.kind == "follow_up" and rec is not None:
            self.results.add_follow_up(rec, p.progress)
        elif p.kind == "person":
            ctx.event("person-message", f"person → {wid}: {p.progress}", worker=wid, task=tid)
        elif p.kind == "blocked":
            ctx.event("worker-blocked", f"{wid} is blocked: {p.progress}", worker=wid, task=tid)
            if info:
                info.status = "blocked"
        elif p.progress:
            ctx.show(f"{wid} · {tid or '-'}: {p.progress}")
        if info is not None and p.kind in ("progress", "started") and info.status == "blocked":
            info.status = "working"
        ctx.view.dirty = True

    def share_discovery(self, wid: str, tid: str | None, text: str) -> None:
        """Record a discovery once, and pass it to the other workers that have a task."""
        ctx = self.ctx
        if not ctx.discoveries.record(wid, tid, text):
            return
        ctx.event("discovery", f"{wid}: {text}", worker=wid, task=tid)
        for other in recipients(wid, ctx.sys.workers):
            ctx.send(other, protocol.ContextUpdate(kind="discovery", text=text, source=wid))
