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
    return problems + task_problems(home), len(files)


def task_problems(home: Home) -> list[str]:
    """What the master would refuse in the task files: a hand edit of a field only it writes,
    a file whose name is not its task's id, a file that is no task of the plan (nor a
    follow-up), and a planned task whose file is gone."""
    if not home.plan.exists() or validate_file(home.plan, Plan) is not None:
        return []
    plan = Plan.model_validate_json(home.plan.read_bytes())
    if not plan.approved:
        return []
    planned = {t.id for t in plan.tasks}
    problems, seen = [], set()
    for path in sorted(home.tasks_dir.glob("*.json")) if home.tasks_dir.exists() else []:
        if validate_file(path, TaskRecord) is not None:
            seen.add(path.stem)
            continue  # reported above
        rec = TaskRecord.model_validate_json(path.read_bytes())
        seen.add(rec.id)
        if rec.id != path.stem:
            problems.append(f"{path}: it holds task {rec.id!r}, not {path.stem!r}")
        elif rec.id not in planned and not rec.origin.startswith("follow-up of "):
            problems.append(f"{path}: no task of the plan (nor a follow-up); it is not run")
        elif rec.forged():
            problems.append(
                f"{path}: a field only multibot writes was changed by hand (editable: "
                "hold, cancel, task.priority)"
            )
    problems += [f"{home.task(t)}: missing (the task starts anew)" for t in planned - seen]
    return problems
