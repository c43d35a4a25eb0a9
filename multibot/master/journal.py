"""The turn journal: what a turn of the master changed, made durable and let out together.

The master's loop changes tasks and queues messages and jobs during a turn; ``commit`` ends
the turn. This is the only part of the master with io threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibot import mailbox, protocol
from multibot.errors import LockTimeout, MultibotError, StateError
from multibot.layout import Home, backup_of
from multibot.master.edits import keep_persons_task
from multibot.master.jobs import Held, Jobs
from multibot.state import TaskRecord
from multibot.store import StateFile, parse, validate_bytes

TURN_WAIT_S = 0.5  # how long the loop waits for a turn's writes and messages (see commit)
LAZY_WRITE_S = 0.5  # how long a lazy task change waits for company (see changed)
REFUSED_RETRY_S = 0.5  # a task file whose write was refused is tried again after this
IO_THREADS = 8

Written = TaskRecord | StateError | LockTimeout  # what writing a task's file came to
Sent = tuple[list[protocol.Envelope], list[tuple[protocol.Envelope, MultibotError]]]


@dataclass
class Turn:
    """A committed turn whose task files are not all written yet (see TurnJournal.commit)."""

    needs: dict[str, int]  # task id -> the change count its written file must reach
    taken: list[protocol.Envelope]  # messages handled in the turn, marked so once it is written
    jobs: list[Held]  # verify commands and the merge queue's jobs, started then

    def written(self, done: dict[str, int]) -> bool:
        return all(done.get(tid, -1) >= n for tid, n in self.needs.items())


@dataclass(frozen=True)
class Hooks:
    """What the journal tells the loop (always in the loop's thread, from take_writes)."""

    edited: Callable[[str, TaskRecord], None]  # a task file as written: the person's fields
    refused: Callable[[str, StateError | LockTimeout], None]  # a task file was not written
    sent: Callable[[protocol.Envelope], None]  # a message is in its recipient's inbox
    unsent: Callable[[protocol.Envelope, MultibotError], None]  # a message could not be sent


class TurnJournal:
    """Task files, the outbox and the messages taken in, written and sent at each turn's end."""

    def __init__(
        self,
        home: Home,
        jobs: Jobs,
        tasks: Mapping[str, TaskRecord],
        hooks: Hooks,
        monotonic: Callable[[], float],
    ) -> None:
        self.home, self.jobs, self.tasks, self.hooks, self.mono = (
            home,
            jobs,
            tasks,
            hooks,
            monotonic,
        )
        self.inbox: mailbox.Receiver | None = None  # the master's, once opened
        self.files: dict[str, StateFile[TaskRecord]] = {}
        self.unwritten: dict[str, float] = {}  # task id -> earliest retry (mono) of its file
        self.changes: dict[str, int] = {}  # task id -> changes made to it
        self.touched: set[str] = set()  # tasks changed in this turn
        # task id -> (the changes it holds, the write, resolved once the file is in place)
        self.writing: dict[str, tuple[int, Future[Written], Future[None]]] = {}
        self.written: dict[str, int] = {}  # task id -> changes its last finished write held
        self.turns: list[Turn] = []  # committed, their files still being written
        self.outbox: list[protocol.Envelope] = []
        self.taken: list[protocol.Envelope] = []  # messages handled, not yet marked so
        self.delivered: list[Sent] = []  # (io threads) what deliveries came to
        # commit() writes files and sends in parallel: each waits on its disk sync, and the
        # file system commits many syncs together, so a turn's writes take about as long as one.
        self.io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="master-io")

    # -- what a turn does -----------------------------------------------------------------------
    def create(self, rec: TaskRecord) -> None:
        """Write a new task's file now (the plan is its record until then)."""
        f = StateFile(self.home.task(rec.id), TaskRecord, default=lambda: rec)
        self.files[rec.id] = f
        f.update(lambda _: rec.sealed())

    def open(self, path: Path) -> TaskRecord:
        """Read a task's file back after a restart (recovering a cut write)."""
        f = StateFile(path, TaskRecord, default=None)
        f.recover()
        rec = f.read()
        self.files[path.stem] = f  # a file named unlike its task is refused (by the caller)
        return rec

    def adopt(self, path: Path, rec: TaskRecord) -> None:
        """Take rec as the task whose file at path is broken: its writes are refused until
        the person fixes the file (or deletes it), then rec is written."""
        self.files[rec.id] = StateFile(path, TaskRecord, default=lambda: rec)

    def last_good(self, path: Path) -> TaskRecord | None:
        """The task file's backup (the version the system wrote before), if it is valid."""
        try:
            raw = backup_of(path).read_bytes()
        except OSError:
            return None
        return None if validate_bytes(path, raw, TaskRecord) else parse(path, raw, TaskRecord)

    def changed(self, rec: TaskRecord, lazy: bool) -> None:
        """Note a change of a task, to be written at the end of the turn.

        A lazy change is one nothing waits on (a task's start): it is written with the task's
        next change if that comes within LAZY_WRITE_S (a short task's end), else on its own
        then, and the turn that made it does not wait for it.
        """
        self.changes[rec.id] = self.changes.get(rec.id, 0) + 1
        if lazy:
            self.unwritten.setdefault(rec.id, self.mono() + LAZY_WRITE_S)
            return
        self.unwritten[rec.id] = 0.0
        self.touched.add(rec.id)

    def send(self, message: protocol.Envelope) -> None:
        """Queue a message, sent by commit() after the turn's task files."""
        self.outbox.append(message)

    def took(self, message: protocol.Envelope) -> None:
        """Note a message handled, marked so by commit() once its effects are written."""
        self.taken.append(message)

    def busy(self, tid: str) -> bool:
        """Whether an io thread has the task's file now."""
        return tid in self.writing

    # -- the end of a turn ----------------------------------------------------------------------
    def commit(self) -> None:
        """End a turn: write the changed task files, send the messages, and once the files are
        written, mark the messages taken in and start the checks and merges.

        In this order a crash loses nothing: a message is marked handled only once what it
        changed is on disk (else it is handled again after a restart, which is harmless), no
        worker hears of a task before that task's file says so, and no check or merge starts
        before the task file says it is verifying or verified. Batching the turn's writes and
        marks also spares a file write per transition and a sync per message.

        The loop waits for that a moment (TURN_WAIT_S) and goes on if a write takes longer (a
        file locked by another process holds its write for seconds). A turn is finished once
        the files of the tasks it changed are written, whatever became of earlier turns; each
        recipient's messages go (in order) as soon as the files of the tasks they name are in
        place. One write at a time per task file: a change made while its file is being
        written is written next, and the messages naming it wait for that.
        """
        self.take_writes()
        mono = self.mono()
        outbox, self.outbox = self.outbox, []
        held: set[str] = set()  # recipients whose messages wait for a later turn
        sending: list[protocol.Envelope] = []
        for message in outbox:
            tid = message.task_id or ""
            behind = tid in self.writing and self.writing[tid][0] != self.changes.get(tid, 0)
            if behind or message.recipient in held:
                held.add(message.recipient)
                self.outbox.append(message)
            else:
                sending.append(message)
        due = [t for t, at in self.unwritten.items() if at <= mono and t not in self.writing]
        named = {m.task_id for m in sending if m.task_id is not None}
        # The files messages wait for first in the queue; the rest right behind, not after:
        # a second round of disk syncs would slow every turn.
        waits: list[Future[Any]] = []
        for tid in sorted(due, key=lambda tid: tid not in named):
            # A copy: the loop changes the record while the io thread writes it. Shallow is
            # enough, as the loop replaces the record's lists and models, never edits them.
            shown: Future[None] = Future()
            write = self.io.submit(self.write_task, tid, self.tasks[tid].model_copy(), shown)
            self.writing[tid] = (self.changes.get(tid, 0), write, shown)
            waits.append(write)
        by_recipient: dict[str, list[protocol.Envelope]] = {}
        for message in sending:
            by_recipient.setdefault(message.recipient, []).append(message)
        # Queued behind every write, so a delivery never holds a thread a write waits for.
        for messages in by_recipient.values():
            after = [self.writing[t][2] for m in messages if (t := m.task_id or "") in self.writing]
            waits.append(self.io.submit(self.deliver, messages, after))
            waits[-1].add_done_callback(self.took_delivery)
        needs = {tid: self.changes[tid] for tid in self.touched}
        taken, self.taken, self.touched = self.taken, [], set()
        turn = Turn(needs, taken, self.jobs.seal())
        if needs or turn.taken or turn.jobs:
            self.turns.append(turn)
        # The loop waits for the turn's writes and messages as long as they take a moment:
        # its own work would slow the io threads (they share one GIL), and an assignment is on
        # the way of a worker's start. What takes longer (a locked file) goes on without the
        # loop, whose next turns (every tick at least) take it in.
        wait(waits, TURN_WAIT_S)
        self.take_writes()

    def take_writes(self) -> None:
        """Take in the task files written and the messages sent since the last look; finish
        the turns now written."""
        for tid, (count, write, _shown) in list(self.writing.items()):
            if write.done():
                del self.writing[tid]
                self.took_write(tid, count, write.result())
        while self.delivered:
            sent, failed = self.delivered.pop(0)
            for message in sent:
                self.hooks.sent(message)
            for message, exc in failed:
                self.hooks.unsent(message, exc)
        for turn in [turn for turn in self.turns if turn.written(self.written)]:
            if turn.taken and self.inbox is not None:
                try:
                    self.inbox.done(*turn.taken)
                except OSError:  # a full disk: the turn stays, marked at a later look
                    continue
            self.turns.remove(turn)
            self.jobs.release(turn.jobs)

    def settle(self) -> None:
        """Commit, and wait until every task file due is written and every turn finished.

        The lazy changes are due now."""
        self.unwritten = {tid: min(at, 0.0) for tid, at in self.unwritten.items()}
        self.commit()
        while self.writing:
            wait([write for _count, write, _shown in self.writing.values()])
            self.commit()

    def close(self) -> None:
        self.settle()
        self.io.shutdown()

    # -- the io threads -------------------------------------------------------------------------
    def took_delivery(self, sent: Future[Sent]) -> None:
        """(io thread) Note what a delivery came to; the loop takes it in (take_writes)."""
        self.delivered.append(sent.result())

    def deliver(self, messages: list[protocol.Envelope], after: Sequence[Future[Any]]) -> Sent:
        """Send messages in order once the task files in after are in place (an io thread);
        return those sent, and those that failed and why. Each is written meanwhile: only its
        link into the inbox waits, and not for the sync of the task files' directory.

        An assignment is not synced to disk at all (two disk syncs on the way of every task's
        start): its task file, synced, is the record. A machine crash may lose the file's new
        name and the assignment (the task is assigned again), or the assignment only, or leave
        it empty (the worker sets it aside as malformed): then the task file says it was
        assigned, and the assignment is sent again at start (resend_assignments).
        """
        sent: list[protocol.Envelope] = []
        failed: list[tuple[protocol.Envelope, MultibotError]] = []
        staged = []
        for message in messages:
            sync = not isinstance(message.payload, protocol.TaskAssignment)
            try:
                staged.append((message, mailbox.stage(self.home, message, fsync=sync)))
            except MultibotError as exc:
                failed.append((message, exc))
        wait(after)
        for message, ready in staged:
            try:
                ready.publish()
                sent.append(message)
            except MultibotError as exc:
                failed.append((message, exc))
        return sent, failed

    def took_write(self, tid: str, count: int, written: Written) -> None:
        """Take in the outcome of writing a task's file, which held count changes (loop)."""
        self.written[tid] = count  # a refused write too: the turns waiting on it go on
        if isinstance(written, TaskRecord):
            if self.changes.get(tid, 0) == count:
                del self.unwritten[tid]
            self.tasks[tid].version = written.version
            self.hooks.edited(tid, written)
            return
        # A broken hand edit of the file: kept as the person left it; the system's change
        # stays in memory and is written once the file is valid again (its messages still go:
        # the worker's work must not wait on a person's typo).
        self.unwritten[tid] = self.mono() + REFUSED_RETRY_S
        self.hooks.refused(tid, written)

    def write_task(self, tid: str, mine: TaskRecord, shown: Future[None]) -> Written:
        """Write one task's file as mine (an io thread); return what was written or the error.

        shown is resolved once the new file is in place, before its directory is synced (see
        StateFile.update), or once the write failed: the messages naming the task wait for it.
        """

        try:
            return self.files[tid].update(
                lambda disk: keep_persons_task(mine, disk), shown=lambda: shown.set_result(None)
            )
        except (StateError, LockTimeout) as exc:
            return exc
        finally:
            if not shown.done():
                shown.set_result(None)
