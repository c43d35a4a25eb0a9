"""Plans and the scheduler: pure logic, no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multibot.errors import PlanError
from multibot.lifecycle import TASK_TRANSITIONS, BadTransition, task_transition
from multibot.master.pool import backoff
from multibot.plan import find_cycle, load_plan_file, topological_order, validate_plan
from multibot.scheduler import PlanOrder, TaskIndex, WorkerSlot, overlaps, ready_tasks, schedule
from multibot.state import PlanTask, TaskRecord


def task(
    tid: str, deps: list[str] | None = None, owns: list[str] | None = None, **kw
) -> TaskRecord:  # type: ignore[no-untyped-def]
    status = kw.pop("status", "pending")
    return TaskRecord(
        task=PlanTask(
            id=tid, title=tid, description=tid, dependencies=deps or [], owns=owns or [], **kw
        ),
        status=status,
    )


def test_cycles_unknown_and_duplicate_ids_are_all_reported() -> None:
    data = {
        "tasks": [
            {"id": "a", "title": "a", "description": "a", "dependencies": ["c"]},
            {"id": "b", "title": "b", "description": "b", "dependencies": ["a"]},
            {"id": "c", "title": "c", "description": "c", "dependencies": ["b", "zz"]},
            {"id": "c", "title": "c2", "description": "c2"},
        ]
    }
    with pytest.raises(PlanError) as err:
        validate_plan(data)
    text = str(err.value)
    assert "cycle" in text and "unknown task 'zz'" in text and "used twice" in text


def test_schema_errors_name_the_field() -> None:
    with pytest.raises(PlanError) as err:
        validate_plan({"tasks": [{"id": "a", "title": "a", "description": "a", "model": "gpt"}]})
    assert "tasks.0.model" in str(err.value)


def test_plan_file_errors_give_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "plan.json"
    f.write_text('{"tasks": [\n  {"id": "a",}\n]}')
    with pytest.raises(PlanError) as err:
        load_plan_file(f)
    assert f"{f}:2:" in str(err.value)


def test_demo_plan_is_valid() -> None:
    plan = load_plan_file(Path(__file__).parent.parent / "examples" / "demo" / "plan.json")
    assert len(plan.tasks) == 6
    order = topological_order(plan.tasks)
    assert order.index("package") > order.index("add")
    assert order.index("readme") > order.index("tests")


def test_find_cycle() -> None:
    assert find_cycle({"a": ["b"], "b": []}) is None
    assert find_cycle({"a": ["b"], "b": ["a"]}) in (["a", "b", "a"], ["b", "a", "b"])


def test_ready_needs_merged_dependencies_and_respects_hold_and_cancel() -> None:
    tasks = {
        "a": task("a", status="merged"),
        "b": task("b", ["a"]),
        "c": task("c", ["b"]),
        "d": task("d"),
        "e": task("e"),
    }
    tasks["d"].hold = True
    tasks["e"].cancel = True
    assert [t.id for t in ready_tasks(tasks)] == ["b"]


def test_overlapping_owners_never_run_together() -> None:
    tasks = {
        "a": task("a", owns=["src/api/"], status="running"),
        "b": task("b", owns=["src/api/routes.py"]),
        "c": task("c", owns=["src/*.py"]),
        "d": task("d", owns=["src/db.py"]),
        "e": task("e", owns=["docs/"]),
    }
    ids = [t.id for t in ready_tasks(tasks)]
    assert "b" not in ids  # inside a running task's folder
    assert "e" in ids
    assert not ("c" in ids and "d" in ids)  # the glob covers db.py


HAPPY_PATH = ["pending", "assigned", "running", "verifying", "verified", "merged"]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_task_index_agrees_with_looking_at_every_task(data: st.DataObject) -> None:
    """Tasks added in any order (a dependency may come later), moved along any allowed path:
    after each step the index names the same tasks as a look at all of them, and so the
    scheduler picks the same tasks with it as without it."""
    ids = [f"t{i}" for i in range(data.draw(st.integers(1, 8)))]
    deps = {t: data.draw(st.lists(st.sampled_from(ids), max_size=3, unique=True)) for t in ids}
    tasks: dict[str, TaskRecord] = {}
    index = TaskIndex()
    for _ in range(data.draw(st.integers(1, 60))):
        tid = data.draw(st.sampled_from(ids))
        if tid not in tasks:
            tasks[tid] = task(tid, [d for d in deps[tid] if d != tid])
        else:
            status = tasks[tid].status
            moves = sorted(TASK_TRANSITIONS[status])
            if not moves:  # merged, cancelled
                continue
            onward = HAPPY_PATH[HAPPY_PATH.index(status) + 1] if status in HAPPY_PATH else None
            if onward is None or data.draw(st.integers(0, 3)) == 0:  # mostly onward
                onward = data.draw(st.sampled_from(moves))
            tasks[tid].status = onward  # type: ignore[assignment]
        index.note(tasks[tid])
        for status in TASK_TRANSITIONS:
            assert set(index.ids(status)) == {t for t, r in tasks.items() if r.status == status}
        ready = {
            t
            for t, r in tasks.items()
            if r.status == "pending"
            and all(d in tasks and tasks[d].status == "merged" for d in r.task.dependencies)
        }
        assert set(index.ready()) == ready
        order = PlanOrder(ids)
        assert list(ready_tasks(tasks, order, index)) == list(ready_tasks(tasks, order))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (["x.py"], ["x.py"], True),
        (["src/"], ["src/a.py"], True),
        (["src/*.py"], ["src/a.py"], True),
        (["src/*.py"], ["docs/a.md"], False),
        (["a/b"], ["a/bc"], False),
        ([], ["anything"], False),
    ],
)
def test_overlaps(a: list[str], b: list[str], expected: bool) -> None:
    assert overlaps(a, b) is expected


def test_priority_capabilities_and_max_workers() -> None:
    tasks = {
        "low": task("low", priority=0),
        "high": task("high", priority=5),
        "gpu": task("gpu", priority=9, capabilities=["gpu"]),
        "mid": task("mid", priority=3),
    }
    plan = schedule(tasks, [WorkerSlot("w1")], running_workers=1, max_workers=2)
    # gpu needs a capability nobody has; high goes to the idle worker; mid gets a new worker.
    assert [(a.task_id, a.worker_id) for a in plan] == [("high", "w1"), ("mid", None)]
    plan = schedule(tasks, [WorkerSlot("w1"), WorkerSlot("w2", frozenset({"gpu"}))], 2, 2)
    assert ("gpu", "w2") in [(a.task_id, a.worker_id) for a in plan]


def test_a_task_goes_back_to_the_worker_that_had_it() -> None:
    tasks = {"t": task("t")}
    plan = schedule(tasks, [WorkerSlot("w1"), WorkerSlot("w2", last_task="t")], 2, 2)
    assert plan[0].worker_id == "w2"


def test_lifecycle_refuses_bad_moves() -> None:
    assert task_transition("pending", "assigned") == "assigned"
    with pytest.raises(BadTransition):
        task_transition("merged", "pending")
    with pytest.raises(BadTransition):
        task_transition("pending", "merged")


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 1.0, 5.0) for n in range(0, 6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_plan_order_breaks_ties_and_keeps_first_places() -> None:
    order = PlanOrder(["b", "a", "b"])
    order.add("c")
    order.add("a")
    assert list(order) == ["b", "a", "c"] and order.place("zz") == 3
    tasks = {t: task(t, []) for t in ("a", "b", "c")}
    assert [t.id for t in ready_tasks(tasks, order)] == ["b", "a", "c"]
    tasks["c"].task.priority = 1
    assert [t.id for t in ready_tasks(tasks, order)] == ["c", "b", "a"]
