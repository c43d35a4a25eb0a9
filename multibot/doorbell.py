"""The doorbell of an inbox: watchdog rings it when a file arrives in new/.

Only a wake-up: the folder is the truth, and a receiver lists it at least every rescan.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch

try:  # Linux: inotify, subscribed to arrivals only (see _ArrivalEmitter)
    from watchdog.observers.inotify import InotifyEmitter
    from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, Mask
except ImportError:  # pragma: no cover - other platforms use watchdog's default observer
    InotifyEmitter = None  # type: ignore[assignment,misc]

Bell = threading.Event
Watcher = BaseObserver  # what watch() returns: stop() and join() it


if InotifyEmitter is not None:

    class _ArrivalEmitter(InotifyEmitter):
        """Ring the bell on arrivals, straight from the emitter thread.

        Only arrivals (create, move-to) and the folder's own deletion are subscribed: watchdog
        holds each IN_MOVED_FROM back 0.5 s to pair it with a move-to, which would delay every
        later event, and our own claims move files out of new/. Ringing here rather than in a
        handler saves the observer thread's hop and dispatch work on every message.
        """

        def __init__(
            self, event_queue: EventQueue, watch: ObservedWatch, *, bell: Bell, **kw: Any
        ) -> None:
            super().__init__(event_queue, watch, **kw)
            self._bell = bell

        def get_event_mask_from_filter(self) -> Mask:
            c = InotifyConstants
            return Mask(c.IN_CREATE | c.IN_MOVED_TO | c.IN_DELETE_SELF)

        def queue_event(self, event: FileSystemEvent) -> None:
            self._bell.set()

    class _InboxObserver(BaseObserver):
        def __init__(self, bell: Bell) -> None:
            self._fd = InotifyFD()  # private, so stopping it never affects another Receiver
            self._fd.start()
            super().__init__(_ArrivalEmitter, inotify_fd=self._fd, bell=bell)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self._fd.stop()
            if self._fd.is_alive():
                self._fd.join()


class _Doorbell(FileSystemEventHandler):
    def __init__(self, bell: Bell) -> None:
        self._bell = bell

    def dispatch(self, event: FileSystemEvent) -> None:
        self._bell.set()


def watch(folder: Path, bell: Bell) -> BaseObserver:
    """Start an observer that rings bell when a file arrives in folder (OSError if it cannot)."""
    if InotifyEmitter is not None:
        obs: BaseObserver = _InboxObserver(bell)
        obs.schedule(FileSystemEventHandler(), str(folder))
    else:  # pragma: no cover - other platforms
        from watchdog.observers import Observer

        obs = Observer()
        obs.schedule(_Doorbell(bell), str(folder))
    try:
        obs.start()
    except BaseException:
        obs.stop()
        raise
    return obs
