"""The lock of a state file: held only around one read-modify-write, naming its holder.

``X.json.lock`` is a flock (the kernel drops it when its holder dies, so it is never
stale); ``X.json.lock.holder`` names who took it last, for a LockTimeout to say.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import filelock

from multibot.atomic import atomic_write, no_links
from multibot.errors import LockTimeout
from multibot.layout import lock_of


class StateLock:
    """The lock of the state file at path (see the module's docstring)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.file = lock_of(path)
        self.holder = self.file.with_name(self.file.name + ".holder")
        self._lock = filelock.FileLock(str(self.file))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock; LockTimeout, naming the holder, if it takes longer than timeout."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Held for one read-modify-write (a few ms): look often, not every 50 ms.
            with no_links(self.file):  # filelock opens it without following links
                self._lock.acquire(timeout=self.timeout, poll_interval=0.002)
        except filelock.Timeout as e:
            try:
                who: str | None = self.holder.read_text(errors="replace").strip() or None
            except OSError:
                who = None
            raise LockTimeout(self.file, who, self.timeout) from e
        try:
            _note_holder(self.holder)
            yield
        finally:
            self._lock.release()


def _note_holder(holder: Path) -> None:
    """Write who holds the lock (this process) into holder, for those who time out waiting."""
    # The kernel drops a flock when its holder dies, so this note names a live holder (or, for
    # an instant after a release, the previous one): never a stale lock. Only read to name a
    # holder, so it is rewritten in place, and only when it names someone else: no new file,
    # rename and freed inode on every update.
    line = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}"
    note = line.encode(errors="replace") + b"\n"
    try:
        fd = os.open(holder, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            if os.pread(fd, len(note) + 1, 0) != note:
                os.pwrite(fd, note, 0)
                os.ftruncate(fd, len(note))
        finally:
            os.close(fd)
    except OSError:  # another user's note, or not a plain file: replace it, as the folder lets us
        atomic_write(holder, note, fsync=False)
