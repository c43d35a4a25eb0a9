"""Atomic, durable file writes: the one helper every writer uses."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

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


def write_durable(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write data to a new file at path (which must not exist), flushed to disk if fsync."""
    os.close(_write_new(path, data, fsync))


def _write_new(path: Path, data: bytes, fsync: bool) -> int:
    """Write data to a new file at path; return its descriptor, open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
            os.unlink(path)
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
