"""Discoveries: what a worker found that the others should know, recorded once per task and
text in state/context.json, and passed to every other worker that has a task."""

from __future__ import annotations

from collections.abc import Mapping

from multibot.state import LIVE_WORKER, Discovery, SharedContext, WorkerInfo
from multibot.store import StateFile


def recipients(source: str, workers: Mapping[str, WorkerInfo]) -> list[str]:
    """The workers a discovery goes to: every other live one with a task, paused, starting
    or restarting ones too (their inbox keeps it until they read it)."""
    return [
        wid
        for wid, info in workers.items()
        if wid != source and info.current_task and info.status in LIVE_WORKER
    ]


class Discoveries:
    """state/context.json's discoveries, read again only when the file changed."""

    def __init__(self, file: StateFile[SharedContext]) -> None:
        self.file = file
        self._seen: SharedContext | None = None

    def all(self) -> list[Discovery]:
        if self._seen is None or self.file.changed():
            self._seen = self.file.read()
        return self._seen.discoveries

    def record(self, worker: str, task_id: str | None, text: str) -> bool:
        """Record a discovery; False if this task recorded this text already (a task run
        again after its worker died reports the same findings again)."""
        new = Discovery(worker=worker, task_id=task_id, text=text)
        added = False

        def add(c: SharedContext) -> SharedContext:
            nonlocal added
            if any(d.task_id == task_id and d.text == text for d in c.discoveries):
                return c
            added = True
            return c.model_copy(update={"discoveries": [*c.discoveries, new]})

        self._seen = self.file.update(add)
        return added
