"""The folders and files of a Maildir-style inbox: made, opened without following links,
listed, named and cleaned; and what an inbox holds, for people (``inbox_report``).

The delivery rules that use them are in ``mailbox.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from multibot import protocol
from multibot.atomic import open_folder
from multibot.errors import UnknownRecipient
from multibot.ids import check_id
from multibot.layout import Home, InboxPaths

EPHEMERAL_PREFIX = "ask-"
TMP_MAX_AGE_S = 600.0
FOLDERS = ("tmp", "new", "cur", "rejected")
_TMP_WRITER = re.compile(r"\.P(\d+)Q\d+\.(.+)$")  # pid and host inside atomic.unique_name()
_SENDER = re.compile(rb'"sender"\s*:\s*"([a-z0-9][a-z0-9_-]{0,62})"')
_HEAD = 65536


# -- inboxes --------------------------------------------------------------------------------


def create_inbox(home: Home, owner: str) -> InboxPaths:
    """Create (or repair) the inbox folders of owner; UnsafePath if one is a symlink."""
    paths = home.inbox(owner)
    for d in paths.dirs():
        d.mkdir(parents=True, exist_ok=True)
    for fd in open_folders(paths, *FOLDERS):
        os.close(fd)
    return paths


def remove_inbox(home: Home, owner: str) -> None:
    """Delete an inbox and everything in it (for ephemeral ask- inboxes)."""
    root = home.inbox(owner).root
    for _ in range(5):  # a late reply may land while the tree is being removed: try again
        try:
            shutil.rmtree(root)
            return
        except FileNotFoundError:
            return
        except OSError:
            continue
    shutil.rmtree(root, ignore_errors=True)


def list_inboxes(home: Home) -> list[str]:
    """Return the ids of every inbox under home, sorted."""
    try:
        names = os.listdir(home.inboxes_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if valid_id(n) and (home.inboxes_dir / n).is_dir())


def open_folders(inbox: InboxPaths, *names: str) -> list[int]:
    """Open the inbox's root and then each named folder in it, following no symlink on the
    way (UnsafePath): a planted link must not make a sender write, or an owner delete,
    anywhere else. Returns a descriptor per name; the caller closes them."""
    root = open_folder(inbox.root)
    fds: list[int] = []
    try:
        for name in names:
            fds.append(open_folder(name, dir_fd=root, shown=inbox.root / name))
    except BaseException:
        close_fds(*fds)
        raise
    finally:
        os.close(root)
    return fds


def close_fds(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


# -- files and names ------------------------------------------------------------------------


def read_claimed(name: str, dir_fd: int) -> tuple[bytes, str | None]:
    """Return a claimed file's bytes and what makes it unreadable, if anything."""
    try:
        # no symlink may make us read elsewhere; a FIFO must not block the loop
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        return b"", f"cannot open: {exc}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", "not a regular file"
        if st.st_size > protocol.MAX_MESSAGE_BYTES:
            why = f"message is {st.st_size} bytes (max {protocol.MAX_MESSAGE_BYTES})"
            return os.read(fd, _HEAD), why
        # one read: a regular file is read short only at its end; a writer still appending
        # (never ours: we link only finished files) gets a cut that fails to decode
        return os.read(fd, st.st_size + 1), None
    finally:
        os.close(fd)


def names(folder: Path | int) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def id_of(name: str) -> str:
    return name.split(".", 1)[0].split("_", 1)[0]


def sent_at(name: str, dir_fd: int) -> float:
    stamp = name[:20]
    if stamp.isdigit():
        return int(stamp) / 1e9
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime


def valid_id(value: str) -> bool:
    try:
        check_id(value)
    except ValueError:
        return False
    return True


def sender_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("sender")
    except (ValueError, AttributeError, RecursionError):
        found = _SENDER.search(raw[:_HEAD])
        value = found.group(1).decode() if found else None
    return value if isinstance(value, str) and valid_id(value) else None


def load_ledger(path: Path, *, repair: bool = False) -> set[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    if repair and data and not data.endswith(b"\n"):  # torn append: end it, keep the next whole
        with open(path, "ab") as f:
            f.write(b"\n")
    return {line for line in data.decode(errors="replace").split("\n") if line}


def clean_tmp(tmp_fd: int, max_age_s: float, now: float) -> int:
    removed, host = 0, socket.gethostname()
    for name in names(tmp_fd):
        writer = _TMP_WRITER.search(name)
        dead = writer is not None and writer.group(2) == host and not pid_alive(int(writer[1]))
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
            if dead or st.st_mtime < now - max_age_s:
                os.unlink(name, dir_fd=tmp_fd)
                removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# -- reports --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedEntry:
    """A message set aside, with the reason written beside it."""

    name: str
    reason: str
    time: float | None
    sender: str | None


@dataclass(frozen=True)
class InboxReport:
    """What an inbox holds, for ``multibot inbox ID``."""

    owner: str
    waiting: list[str]
    claimed_unhandled: list[str]
    handled: int
    rejected: list[RejectedEntry]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-ready data."""
        return asdict(self)


def inbox_report(home: Home, owner: str) -> InboxReport:
    """Describe owner's inbox: waiting, claimed but unhandled, handled, rejected with reasons."""
    paths = home.inbox(owner)
    if not paths.root.is_dir():
        raise UnknownRecipient(owner, paths.root)
    handled = load_ledger(paths.handled_log)
    rejected = []
    for name in names(paths.rejected):
        if name.endswith(".reason.json"):
            continue
        try:
            note = json.loads((paths.rejected / f"{name}.reason.json").read_bytes())
        except (OSError, ValueError):
            note = {"reason": "unknown (no readable reason file)"}
        reason, when, sender = note.get("reason"), note.get("time"), note.get("sender")
        rejected.append(RejectedEntry(name, str(reason), when, sender))
    return InboxReport(
        owner=owner,
        waiting=sorted(os.listdir(paths.new)) if paths.new.is_dir() else [],
        claimed_unhandled=[n for n in names(paths.cur) if id_of(n) not in handled],
        handled=len(handled),
        rejected=rejected,
    )
