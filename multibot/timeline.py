"""The append-only timeline of a run: every message and state change, one JSON line each."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Timeline:
    """Appends events to state/timeline.jsonl; never rewrites a line."""

    def __init__(self, path: Path, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def add(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        record = {"t": round(self.clock(), 6), "event": event, **fields}
        self._file.write(json.dumps(record, default=str) + "\n")
        return record

    def close(self) -> None:
        self._file.close()


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
