"""Plans: load one from a file, and check a task graph (ids, dependencies, cycles)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from multibot.errors import PlanError
from multibot.state import Plan, PlanTask


def graph_problems(tasks: Iterable[PlanTask], known_done: Iterable[str] = ()) -> list[str]:
    """Return every problem of a task graph: duplicate ids, unknown dependencies, cycles."""
    tasks = list(tasks)
    problems: list[str] = []
    ids = [t.id for t in tasks]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            problems.append(f"task id {i!r} is used twice")
        seen.add(i)
    known = seen | set(known_done)
    for t in tasks:
        for d in t.dependencies:
            if d not in known:
                problems.append(f"task {t.id!r} depends on unknown task {d!r}")
            if d == t.id:
                problems.append(f"task {t.id!r} depends on itself")
    edges: dict[str, list[str]] = {}
    for t in tasks:
        edges.setdefault(t.id, []).extend(d for d in t.dependencies if d in seen)
    cycle = find_cycle(edges)
    if cycle:
        problems.append("dependency cycle: " + " -> ".join(cycle))
    return problems


def capability_problems(tasks: Iterable[PlanTask], offered: Iterable[str]) -> list[str]:
    """Name the tasks that need a capability no worker offers (they could never start)."""
    have = set(offered)
    problems = []
    for t in tasks:
        missing = sorted(set(t.capabilities) - have)
        if missing:
            problems.append(
                f"task {t.id!r} needs {', '.join(missing)}, which no worker offers "
                f"(worker-template.json capabilities: {sorted(have) or 'none'})"
            )
    return problems


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """Return one cycle in a dependency graph (as a path), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in edges.get(node, []):
            if color.get(nxt, black) == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if color.get(nxt) == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in edges:
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def topological_order(tasks: Iterable[PlanTask]) -> list[str]:
    """Return task ids with every dependency before its dependents (stable on input order)."""
    tasks = list(tasks)
    order: list[str] = []
    done: set[str] = set()
    by_id = {t.id: t for t in tasks}

    def place(t: PlanTask) -> None:
        if t.id in done:
            return
        done.add(t.id)
        for d in t.dependencies:
            if d in by_id:
                place(by_id[d])
        order.append(t.id)

    for t in tasks:
        place(t)
    return order


def validate_plan(data: object, source: str = "plan") -> Plan:
    """Return a Plan from parsed JSON, or raise PlanError listing every problem."""
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(
            [
                f"{source}: {'.'.join(str(x) for x in e['loc']) or '(plan)'}: {e['msg']}"
                for e in exc.errors()
            ]
        ) from exc
    problems = graph_problems(plan.tasks)
    if not plan.tasks:
        problems.append("the plan has no tasks")
    if problems:
        raise PlanError(problems)
    return plan


def load_plan_file(path: Path) -> Plan:
    """Read and validate a plan file (JSON)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PlanError([f"{path}: no such file"]) from exc
    except json.JSONDecodeError as exc:
        raise PlanError([f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}"]) from exc
    plan = validate_plan(data, str(path))
    return plan.model_copy(update={"source": "file"})
