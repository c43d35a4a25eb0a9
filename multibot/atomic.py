"""Atomic, durable file writes: the one helper every writer uses."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from multibot.errors import UnsafePath

FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count()


def unique_name(prefix: str = "") -> str:
    """Return a name unique across processes and hosts: time, pid, counter, host."""
    return f"{prefix}{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname()}"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside directory path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_folder(path: Path | str, *, dir_fd: int | None = None, shown: Path | None = None) -> int:
    """Open the folder at path (relative to dir_fd if given) as a descriptor for the *at()
    calls, without following a symlink: UnsafePath, naming it as shown, if it is a link or
    not a folder."""
    try:
        return os.open(path, FOLDER, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        where = shown or Path(path)
        try:
            link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
        except OSError:
            link = False
        raise UnsafePath(where, "is a symbolic link" if link else "is not a folder") from exc


@contextlib.contextmanager
def no_links(path: Path) -> Iterator[None]:
    """Turn the ELOOP of an O_NOFOLLOW open of path inside the block into UnsafePath."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePath(path, "is a symbolic link") from exc


def open_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symlink at path (UnsafePath) instead of following it: for
    every runtime file multibot rewrites or appends to."""
    with no_links(path):
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def open_log(path: Path) -> TextIO:
    """Open the text log at path for appending, line-buffered (UnsafePath if it is a link)."""
    fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def write_durable(
    path: Path | str, data: bytes, *, fsync: bool = True, dir_fd: int | None = None
) -> None:
    """Write data to a new file at path (which must not exist, not even as a symlink),
    relative to the folder dir_fd if given; flushed to disk if fsync."""
    os.close(_write_new(path, data, fsync, dir_fd))


def _write_new(path: Path | str, data: bytes, fsync: bool, dir_fd: int | None = None) -> int:
    """Write data to a new file at path; return its descriptor, open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=dir_fd)
        raise
    return fd


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace path with data atomically: temp file in the same folder, sync, rename, sync dir.

    A reader sees either the old content or the new, never a half-written file; on any error
    (disk full, failed fsync) the temp file is removed and path is untouched.
    """
    os.close(atomic_replace(path, data, fsync=fsync))


def atomic_replace(path: Path, data: bytes, *, fsync: bool = True) -> int:
    """Replace path with data as atomic_write does; return a descriptor of the new file, open
    for writing, for its writer to rewrite it in place later (the caller closes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_name()}.tmp")
    fd = _write_new(tmp, data, fsync)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)
    return fd


_closing: queue.SimpleQueue[int] = queue.SimpleQueue()
_closer: threading.Thread | None = None
_closer_lock = threading.Lock()


def close_later(fd: int) -> None:
    """Close fd soon, from a background thread, not the caller's.

    Closing the last handle of a file that was replaced or deleted frees its blocks; on a file
    system mounted with `discard` (common on cloud disks) that waits for the device, a
    millisecond or more, which a writer on a latency path should not pay.
    """
    global _closer
    if sys.is_finalizing():  # no thread can start now
        os.close(fd)
        return
    with _closer_lock:
        if _closer is None or not _closer.is_alive():  # (none yet, or this is a forked child)
            _closer = threading.Thread(target=_close_forever, name="fd-closer", daemon=True)
            _closer.start()
    _closing.put(fd)


def _close_forever() -> None:
    while True:
        fd = _closing.get()
        with contextlib.suppress(OSError):
            os.close(fd)
