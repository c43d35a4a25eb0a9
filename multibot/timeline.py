"""The append-only timeline of a run: every message and state change, one JSON line each."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from multibot.atomic import open_file


class Timeline:
    """Appends events to state/timeline.jsonl; never rewrites a line.

    An event that cannot be written (a full disk) is kept, up to PENDING_MAX of them, and
    written before the next one once writes work again: the timeline loses nothing to a
    short outage, and its order stays the order of events.
    """

    PENDING_MAX = 100_000

    def __init__(self, path: Path, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.pending: list[bytes] = []
        self.dropped = 0  # events lost past PENDING_MAX

    def add(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        record = {"t": round(self.clock(), 6), "event": event, **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        if len(self.pending) < self.PENDING_MAX:
            self.pending.append(line)
        else:
            self.dropped += 1
        self.flush()
        return record

    def flush(self) -> bool:
        """Write the events kept; False if the disk still refuses them."""
        while self.pending:
            try:
                n = os.write(self._fd, self.pending[0])
            except OSError:
                return False
            if n < len(self.pending[0]):  # the disk filled mid-line: the rest comes next
                self.pending[0] = self.pending[0][n:]
                continue
            self.pending.pop(0)
        return True

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


def read_timeline(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the timeline's events; a damaged line is reported as an event, not a crash."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {"t": 0, "event": "damaged-line", "line": n, "text": line[:200]}
