"""`multibot state validate`: check every state file against its model."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from multibot.layout import Home
from multibot.state import (
    ContextMemory,
    Plan,
    QuestionRecord,
    SharedContext,
    SystemState,
    TaskRecord,
    WorkerState,
)
from multibot.store import validate_file


def state_files(home: Home) -> list[tuple[Path, type[BaseModel]]]:
    """Return every state file present, with the model it must match."""
    found: list[tuple[Path, type[BaseModel]]] = []
    for path, model in (
        (home.system_state, SystemState),
        (home.plan, Plan),
        (home.context, SharedContext),
    ):
        if path.exists():
            found.append((path, model))
    if home.tasks_dir.exists():
        found += [(p, TaskRecord) for p in sorted(home.tasks_dir.glob("*.json"))]
    if home.workers_dir.exists():
        found += [(p, WorkerState) for p in sorted(home.workers_dir.glob("*-state.json"))]
        found += [(p, ContextMemory) for p in sorted(home.workers_dir.glob("*-memory.json"))]
    if home.questions_dir.exists():
        found += [(p, QuestionRecord) for p in sorted(home.questions_dir.glob("*.json"))]
    return found


def validate_home(home: Home) -> tuple[list[str], int]:
    """Return the problems of every state file (as text naming file, line and field) and a count."""
    files = state_files(home)
    problems = [str(err) for path, model in files if (err := validate_file(path, model))]
    return problems, len(files)
