"""The file bus: one Maildir-style inbox per process (tmp/, new/, cur/, rejected/, handled.log).

Delivery guarantees
-------------------
* **Only whole messages are visible.** ``send`` writes the encoded message into ``tmp/`` under a
  unique name (time, pid, counter, host), syncs it, hard-links it into ``new/`` as
  ``<message id>.json`` (names sort in send order for one sender) and syncs ``new/``. ``link``
  refuses to overwrite, so two messages with the same name both arrive (the second gets a
  suffix). Any OSError (disk full, failed fsync) raises SendError and leaves nothing in ``new/``.
  A message to an id without an inbox raises UnknownRecipient; no folder is ever created for it.
* **At least once.** A Receiver claims a file by renaming it from ``new/`` into ``cur/``, then
  parses and validates it. Claimed files stay in ``cur/`` for audit. Claimed files whose id is
  not in ``handled.log`` are delivered again when a Receiver starts (after a crash).
* **Exactly once in effect.** ``done(message)`` appends the id to ``handled.log`` (synced) and
  ``fetch`` never returns an id recorded there. A handler whose effect must not repeat must
  record the message id *atomically with its effect* (for example inside the same state file
  written with ``atomic_write``) and check it first: a crash between the effect and ``done``
  would otherwise repeat the effect on restart. ``is_handled(id)`` serves handlers that keep
  no state of their own.
* **Nothing bad is fatal.** A file that does not parse or validate, is too big, has an unknown
  type or another recipient goes to ``rejected/`` with ``<name>.reason.json``; its sender, if
  readable, gets an ERROR message (kind "protocol"). Leftovers in ``tmp/`` from dead writers
  are removed when a Receiver starts and are never delivered.
* **Events are a doorbell; the directory is the truth.** watchdog only wakes ``wait``; every
  ``fetch`` lists ``new/`` in name order, and ``wait`` returns at least every ``rescan_s``
  seconds. A dead observer, a lost event or a deleted ``new/`` costs at most one rescan interval.

The folders and their files are handled in ``maildir.py`` (never through a symlink), the
doorbell in ``doorbell.py``; this module is the rules above, for senders and for receivers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibot import protocol
from multibot.atomic import atomic_write, open_file, unique_name, write_durable
from multibot.auth import Refusal
from multibot.doorbell import Watcher, watch
from multibot.errors import AskTimeout, DecodeError, MultibotError, SendError, UnknownRecipient
from multibot.ids import check_id
from multibot.layout import Home, InboxPaths
from multibot.maildir import (
    EPHEMERAL_PREFIX,
    FOLDERS,
    TMP_MAX_AGE_S,
    InboxReport,
    RejectedEntry,
    clean_tmp,
    close_fds,
    create_inbox,
    id_of,
    inbox_report,
    lexists,
    list_inboxes,
    load_ledger,
    names,
    open_folders,
    read_claimed,
    remove_inbox,
    sender_of,
    sent_at,
)
from multibot.protocol import BROADCAST, Envelope

__all__ = [  # the bus's whole surface, with the folders' helpers it re-exports
    "DEFAULT_RESCAN_S",
    "EPHEMERAL_PREFIX",
    "TMP_MAX_AGE_S",
    "InboxReport",
    "Receiver",
    "RejectedEntry",
    "Staged",
    "broadcast",
    "create_inbox",
    "inbox_report",
    "list_inboxes",
    "remove_inbox",
    "reply",
    "request",
    "send",
    "stage",
]

DEFAULT_RESCAN_S = 1.0

# -- sending --------------------------------------------------------------------------------


def send(home: Home, message: Envelope, *, fsync: bool = True) -> Path:
    """Deliver message to its recipient's inbox; return the file's path in new/."""
    return stage(home, message, fsync=fsync).publish()


def stage(home: Home, message: Envelope, *, fsync: bool = True) -> Staged:
    """Write message, durably if fsync, into its recipient's tmp/, to deliver with publish().

    For a sender whose message must wait for something else (its own state file): the
    writing and its disk sync are done meanwhile, and only the link into new/ waits. A staged
    message never published is a leftover in tmp/, cleaned up and never delivered.
    """
    if message.recipient == BROADCAST:
        raise ValueError("recipient '*' goes through broadcast(), which returns every copy")
    inbox = home.inbox(message.recipient)
    return _stage(inbox, f"{message.id}.json", protocol.encode(message), fsync)


@dataclass(frozen=True)
class Staged:
    """A message written into an inbox's tmp/, not delivered yet (see stage())."""

    inbox: InboxPaths
    name: str
    tmp_name: str  # in inbox.tmp
    fsync: bool

    def publish(self) -> Path:
        """Deliver: link into new/ (made durable if the message was staged so); return the
        path there."""
        tmp_fd = new_fd = -1
        try:
            tmp_fd, new_fd = open_folders(self.inbox, "tmp", "new")
            name = _link_unique(self.tmp_name, tmp_fd, new_fd, self.name)
            try:
                if self.fsync:
                    os.fsync(new_fd)
            except OSError:  # visible but not durable: take it back, the caller gets the error
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=new_fd)
                raise
        except OSError as exc:
            raise _failure(self.inbox, exc) from exc
        finally:
            if tmp_fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp_name, dir_fd=tmp_fd)
            close_fds(tmp_fd, new_fd)
        return self.inbox.new / name

    def discard(self) -> None:
        """Remove the staged file (it is never delivered)."""
        with contextlib.suppress(OSError):
            (tmp_fd,) = open_folders(self.inbox, "tmp")
            try:
                os.unlink(self.tmp_name, dir_fd=tmp_fd)
            finally:
                os.close(tmp_fd)


def broadcast(home: Home, message: Envelope, *, fsync: bool = True) -> list[Path]:
    """Deliver a copy of a '*' message to every inbox but the sender's and ephemeral ones."""
    if message.recipient != BROADCAST:
        raise ValueError(f"broadcast() needs recipient '*', not {message.recipient!r}")
    data, paths = protocol.encode(message), []
    # a SendError stops here; copies already delivered stay, and a resent id is dropped by
    # every receiver that handled it
    for owner in list_inboxes(home):
        if owner == message.sender or owner.startswith(EPHEMERAL_PREFIX):
            continue
        with contextlib.suppress(UnknownRecipient):  # inbox removed meanwhile
            paths.append(_stage(home.inbox(owner), f"{message.id}.json", data, fsync).publish())
    return paths


def reply(
    home: Home,
    request: Envelope,
    payload: Any,
    sender: str,
    *,
    generation: int = 0,
    fsync: bool = True,
) -> Path:
    """Answer request: to its reply_to inbox if set, else to its sender, correlated by its id."""
    answer = protocol.make(
        payload,
        sender=sender,
        recipient=request.reply_to or request.sender,
        generation=generation,
        task_id=request.task_id,
        correlation_id=request.id,
    )
    return send(home, answer, fsync=fsync)


def request(
    home: Home,
    message: Envelope,
    *,
    timeout: float,
    rescan_s: float = DEFAULT_RESCAN_S,
    fsync: bool = True,
    sign: Callable[[Envelope], Envelope] | None = None,
    verify: Callable[[Envelope], Refusal | None] | None = None,
    reply_inbox: str | None = None,
) -> Envelope:
    """Send message with a private reply inbox and return the reply; AskTimeout if none comes.
    sign seals the message once it names that inbox; verify checks each reply (see
    Receiver). reply_inbox: a lasting inbox to wait in (kept), instead of a new one."""
    ask = reply_inbox or f"{EPHEMERAL_PREFIX}{secrets.token_hex(8)}"
    try:
        with Receiver(home, ask, rescan_s=rescan_s, durable=False, verify=verify) as rx:
            asking = message.model_copy(update={"reply_to": ask})
            send(home, sign(asking) if sign else asking, fsync=fsync)
            deadline = time.monotonic() + timeout
            while True:
                for answer in rx.fetch():
                    rx.done(answer)
                    if answer.correlation_id == message.id:
                        return answer
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AskTimeout(message.id, timeout)
                rx.wait(left)
    finally:
        if reply_inbox is None:
            remove_inbox(home, ask)


def _stage(inbox: InboxPaths, name: str, data: bytes, fsync: bool) -> Staged:
    try:
        (tmp_fd,) = open_folders(inbox, "tmp")
    except FileNotFoundError:
        raise UnknownRecipient(inbox.root.name, inbox.root) from None
    except OSError as exc:
        raise _failure(inbox, exc) from exc
    try:
        return Staged(inbox, name, _write_tmp(tmp_fd, data, fsync), fsync)
    except OSError as exc:
        raise _failure(inbox, exc) from exc
    finally:
        os.close(tmp_fd)


def _write_tmp(tmp_fd: int, data: bytes, fsync: bool) -> str:
    for attempt in range(5):
        # O_EXCL: a clashing name (or a planted link) is refused, never written through
        name = unique_name(f"{secrets.token_hex(4)}-" if attempt else "")
        try:
            write_durable(name, data, fsync=fsync, dir_fd=tmp_fd)
            return name
        except FileExistsError:
            continue
    raise FileExistsError("no free temporary name in tmp/")


def _link_unique(tmp_name: str, tmp_fd: int, new_fd: int, name: str) -> str:
    # os.rename would silently replace a message with the same name; link() refuses to
    target = name
    for _ in range(5):
        try:
            os.link(tmp_name, target, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
            return target
        except FileExistsError:
            target = f"{name.removesuffix('.json')}_{secrets.token_hex(4)}.json"
    raise FileExistsError(f"no free name for {name} in new/")


def _failure(inbox: InboxPaths, exc: OSError) -> MultibotError:
    if not inbox.root.is_dir():
        return UnknownRecipient(inbox.root.name, inbox.root)
    return SendError(f"cannot deliver to {inbox.root}: {exc}")


# -- receiving ------------------------------------------------------------------------------


class Receiver:
    """The owner's side of an inbox: claim, validate, deliver, record as handled.

    Use: ``for m in rx.fetch(): handle(m); rx.done(m)`` then ``rx.wait()``, in a loop.
    One Receiver per inbox; not thread-safe.
    """

    def __init__(
        self,
        home: Home,
        owner: str,
        *,
        rescan_s: float = DEFAULT_RESCAN_S,
        tmp_max_age_s: float = TMP_MAX_AGE_S,
        durable: bool = True,
        watch: bool = True,
        clock: Callable[[], float] = time.time,
        verify: Callable[[Envelope], Refusal | None] | None = None,
    ) -> None:
        self.home, self.owner = home, check_id(owner, "inbox id")
        # Checks each message's signature: one refused goes to rejected/ with the reason.
        self.verify = verify
        self.paths = create_inbox(home, owner)
        # Every file operation goes through descriptors of the folders, opened without
        # following links: swapping a folder for a symlink later does not redirect them.
        self._tmp, self._new, self._cur, self._rejected = -1, -1, -1, -1
        self._folders_ino = -1
        self._reopen()
        self.rescan_s, self._durable, self._watch, self._clock = rescan_s, durable, watch, clock
        self._bell = threading.Event()
        self._observer: Watcher | None = None
        self._watched_ino = -1
        self._handled = load_ledger(self.paths.handled_log, repair=True)
        self._log_fd = open_file(self.paths.handled_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._tmp_max_age_s = tmp_max_age_s
        clean_tmp(self._tmp, tmp_max_age_s, clock())
        # claimed before a crash and never recorded as handled: deliver again, first
        self._backlog = [n for n in names(self._cur) if id_of(n) not in self._handled]
        self._claimed: dict[str, str] = {}  # id -> its file in cur/, until done (set_aside)
        self._check_watch()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching (joins the observer threads) and close the ledger."""
        self._stop_observer()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        close_fds(self._tmp, self._new, self._cur, self._rejected)
        self._tmp, self._new, self._cur, self._rejected = -1, -1, -1, -1

    def fetch(self) -> list[Envelope]:
        """Claim everything waiting, in order; return the valid messages not yet handled."""
        claimed, self._backlog = self._backlog, []
        for name in sorted(os.listdir(self._new)):
            as_name = self._claim(name)
            if as_name is not None:
                claimed.append(as_name)
        out = []
        for name in claimed:
            message = self._load(name)
            # The same message twice in one fetch (a copy under another name) is one message.
            if message is not None and message.id not in self._handled:
                if message.id not in self._claimed:
                    out.append(message)
                self._claimed.setdefault(message.id, name)
        return out

    def set_aside(self, message: Envelope, reason: str) -> None:
        """Move a fetched message that could not be handled to rejected/, with the reason
        beside it, and record it as handled: it is not delivered again (a message that
        stops its handler must not stop it again on every restart)."""
        name = self._claimed.get(message.id)
        if name is not None:
            raw = message.model_dump_json().encode()
            self._reject(name, reason, raw, tell_sender=False)
        self.done(message)

    def done(self, *messages: Envelope | str) -> None:
        """Record messages (or ids) as handled, durably, so they are never delivered again."""
        ids = [m if isinstance(m, str) else m.id for m in messages]
        ids = [i for i in dict.fromkeys(ids) if i not in self._handled]
        for i in ids:
            self._claimed.pop(i, None)
        if not ids:
            return
        data = memoryview("".join(f"{i}\n" for i in ids).encode())
        while data:
            data = data[os.write(self._log_fd, data) :]
        if self._durable:
            os.fdatasync(self._log_fd)
        self._handled.update(ids)

    def is_handled(self, message_id: str) -> bool:
        """Return whether message_id is recorded as handled."""
        return message_id in self._handled

    def ring(self) -> None:
        """Wake a wait() now (e.g. from another thread whose work the owner must take in)."""
        self._bell.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the doorbell rings or the rescan interval passes; True if it rang.

        First recreates a deleted new/ and restarts a dead or stale observer.
        """
        self._check_watch()
        limit = self.rescan_s if timeout is None else max(0.0, min(timeout, self.rescan_s))
        rung = self._bell.wait(limit)
        self._bell.clear()  # before the caller lists new/: a later arrival rings again
        return rung

    def prune(
        self,
        *,
        max_age_s: float | None = None,
        max_count: int | None = None,
        rejected_max_age_s: float | None = None,
        now: float | None = None,
    ) -> int:
        """Delete the oldest handled files in cur/ beyond the limits; return how many went.

        Unhandled files are never deleted. The ledger keeps only the ids whose files remain,
        so a resend of a pruned id would be handled again: prune well past any resend window.
        """
        now = self._clock() if now is None else now
        clean_tmp(self._tmp, self._tmp_max_age_s, now)
        handled = [n for n in names(self._cur) if id_of(n) in self._handled]
        drop = set(handled[: max(0, len(handled) - max_count)] if max_count is not None else [])
        if max_age_s is not None:
            drop.update(n for n in handled if sent_at(n, self._cur) < now - max_age_s)
        for name in drop:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._cur)
        if rejected_max_age_s is not None:
            for name in names(self._rejected):
                with contextlib.suppress(FileNotFoundError):
                    mtime = os.stat(name, dir_fd=self._rejected, follow_symlinks=False).st_mtime
                    if mtime < now - rejected_max_age_s:
                        os.unlink(name, dir_fd=self._rejected)
        if drop:  # compact the ledger to the ids whose files remain
            kept = {id_of(n) for n in names(self._cur)} & self._handled
            data = "".join(f"{i}\n" for i in sorted(kept)).encode()
            atomic_write(self.paths.handled_log, data, fsync=self._durable)
            os.close(self._log_fd)  # the old fd points at the replaced file
            self._log_fd = open_file(self.paths.handled_log, os.O_WRONLY | os.O_APPEND)
            self._handled = kept
        return len(drop)

    # -- internals --------------------------------------------------------------------

    def _claim(self, name: str) -> str | None:
        """Move new/name into cur/; return its name there, None if someone else took it."""
        as_name = name
        if lexists(name, self._cur):  # same name claimed earlier: keep both
            as_name = f"{name.removesuffix('.json')}_{secrets.token_hex(4)}.json"
        try:
            os.rename(name, as_name, src_dir_fd=self._new, dst_dir_fd=self._cur)
        except FileNotFoundError:
            return None
        return as_name

    def _load(self, name: str) -> Envelope | None:
        try:
            raw, problem = read_claimed(name, self._cur)
        except FileNotFoundError:
            return None
        if name.startswith("."):  # hidden from ls, and never made by a sender
            problem = problem or f"{name!r} is not a message name (it starts with a dot)"
        message = None
        if problem is None:
            try:
                message = protocol.decode(raw)
            except DecodeError as exc:
                problem = exc.cause
        if message is not None and message.recipient not in (self.owner, BROADCAST):
            problem = f"addressed to {message.recipient!r}, not {self.owner!r}"
        if problem is not None:
            self._reject(name, problem, raw)
            return None
        assert message is not None
        refusal = self.verify(message) if self.verify is not None else None
        if refusal is not None:
            # Not told: a forger learns nothing, and a stale message's sender is gone.
            self._reject(name, refusal.reason, raw, tell_sender=False)
            return None
        return message

    def _reject(self, name: str, reason: str, raw: bytes, tell_sender: bool = True) -> None:
        target = self.paths.rejected / (name.lstrip(".") or "dot-file")
        if lexists(target.name, self._rejected):
            target = target.with_name(f"{name}.{secrets.token_hex(4)}")
        try:
            os.rename(name, target.name, src_dir_fd=self._cur, dst_dir_fd=self._rejected)
        except FileNotFoundError:
            return None
        sender = sender_of(raw)
        note = {"file": target.name, "reason": reason, "time": self._clock(), "sender": sender}
        sidecar = target.with_name(target.name + ".reason.json")
        with contextlib.suppress(OSError):  # the file is set aside already; go on regardless
            atomic_write(sidecar, json.dumps(note, indent=2).encode(), fsync=self._durable)
        if sender is None or sender == self.owner or not tell_sender:
            return None
        error = protocol.ErrorReport(
            kind="protocol",
            message=f"message {name} rejected by {self.owner}",
            recoverable=False,
            detail=reason,
        )
        with contextlib.suppress(MultibotError, OSError):  # best effort, never fatal
            send(self.home, protocol.make(error, sender=self.owner, recipient=sender))
        return None

    def _check_watch(self) -> None:
        """Recreate deleted folders and restart a dead or stale observer."""
        try:
            ino = os.lstat(self.paths.new).st_ino
        except FileNotFoundError:
            ino = create_inbox(self.home, self.owner).new.lstat().st_ino
            self._bell.set()  # look at once: the folder was just recreated
        if ino != self._folders_ino:
            self._reopen()
        if not self._watch:
            return
        obs = self._observer
        alive = obs is not None and obs.is_alive() and all(e.is_alive() for e in obs.emitters)
        if alive and ino == self._watched_ino:
            return
        self._stop_observer()
        try:
            self._observer, self._watched_ino = watch(self.paths.new, self._bell), ino
        except OSError:  # folder vanished again: the rescan covers us, retry on the next wait
            return

    def _reopen(self) -> None:
        """(Re)open the descriptors of the inbox's folders (UnsafePath if one is a link)."""
        fds = open_folders(self.paths, *FOLDERS)
        close_fds(self._tmp, self._new, self._cur, self._rejected)
        self._tmp, self._new, self._cur, self._rejected = fds
        self._folders_ino = os.fstat(self._new).st_ino

    def _stop_observer(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            if obs.is_alive():
                obs.join()
