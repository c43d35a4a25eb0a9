"""The merge queue's decisions, without git or processes: batches, speculation, bisection."""

from __future__ import annotations

import math

import pytest

from multibot.master.merging import Culprit, Group, MergeQueue, Split


class World:
    """Drives a queue as the pipeline would, with a check that fails when a bad task is in."""

    def __init__(self, queue: MergeQueue, bad: set[str], flaky_once: bool = False) -> None:
        self.queue, self.bad, self.flaky_once = queue, bad, flaky_once
        self.tip: list[str] = []  # tasks on the integration branch, in order
        self.commits: dict[str, list[str]] = {"tip": []}
        self.checks = 0
        self.culprits: list[str] = []
        self.splits: list[Split] = []

    def build_all(self) -> list[Group]:
        started = []
        while (g := self.queue.next_build()) is not None:
            base = g.base or "tip"
            content = [*self.commits[base], *g.ids] if base != "tip" else [*self.tip, *g.ids]
            commit = f"c{g.token}"
            self.commits[commit] = content
            self.queue.built(g, g.token, base, commit, {t: f"m-{t}" for t in g.ids}, [], True)
            started.append(g)
        return started

    def check(self, g: Group) -> None:
        self.checks += 1
        content = self.commits[g.commit or ""]
        ok = not (self.bad & set(content))
        if self.flaky_once:
            ok, self.flaky_once = False, False
        for verdict in self.queue.checked(g, g.token, ok, "boom"):
            if isinstance(verdict, Culprit):
                self.culprits.append(verdict.task_id)
                self.bad.discard(verdict.task_id)  # its worker fixes it
            else:
                self.splits.append(verdict)
        self.land()

    def land(self) -> None:
        while (front := self.queue.front()) is not None:
            self.tip = list(self.commits[front.commit or ""])
            self.commits["tip"] = self.tip
            self.queue.landed(front)

    def run(self) -> None:
        """Check candidates one result at a time, front first, until the queue is empty."""
        for _ in range(1000):
            self.build_all()
            checking = [g for g in self.queue.groups if g.state == "checking"]
            if not checking:
                self.land()
                if not self.queue.groups:
                    return
                continue
            self.check(checking[0])
        raise AssertionError("the queue did not drain")


def test_ready_tasks_form_batches_in_order_up_to_the_limit() -> None:
    q = MergeQueue(batch_max=3)
    assert q.admit(["a", "b", "c", "d"]) == ["a", "b", "c", "d"]
    assert q.admit(["a", "e"]) == ["e"]  # queued already: not twice
    assert [g.ids for g in q.groups] == [("a", "b", "c"), ("d", "e")]


def test_one_batch_at_a_time_is_one_check_per_batch() -> None:
    q = MergeQueue(batch_max=8, concurrency=1)
    q.admit([f"t{n}" for n in range(8)])
    world = World(q, bad=set())
    world.run()
    assert world.checks == 1
    assert world.tip == [f"t{n}" for n in range(8)]


@pytest.mark.parametrize("size", [2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_culprit_is_found_within_the_bound_and_the_rest_lands(
    size: int, concurrency: int
) -> None:
    for bad in range(size):
        q = MergeQueue(batch_max=size, concurrency=concurrency)
        ids = [f"t{n}" for n in range(size)]
        q.admit(ids)
        world = World(q, bad={f"t{bad}"})
        world.run()
        assert world.culprits == [f"t{bad}"]
        # Every other task landed, in plan order, and no tip ever held the culprit.
        assert world.tip == [t for t in ids if t != f"t{bad}"]
        if concurrency == 1:
            assert world.checks <= 1 + 2 * math.ceil(math.log2(size)), (bad, world.checks)


def test_no_tip_ever_holds_a_breakage() -> None:
    q = MergeQueue(batch_max=4, concurrency=2)
    ids = [f"t{n}" for n in range(10)]
    q.admit(ids)
    world = World(q, bad={"t2", "t7"})
    tips = []
    original_land = world.land

    def land() -> None:
        original_land()
        tips.append(list(world.tip))

    world.land = land  # type: ignore[method-assign]
    world.run()
    assert sorted(world.culprits) == ["t2", "t7"]
    assert all(not ({"t2", "t7"} & set(tip)) for tip in tips)
    assert sorted(world.tip) == sorted(t for t in ids if t not in ("t2", "t7"))


def test_a_flaky_failure_blames_nobody() -> None:
    q = MergeQueue(batch_max=4)
    q.admit(["a", "b", "c", "d"])
    world = World(q, bad=set(), flaky_once=True)
    world.run()
    assert world.culprits == []
    assert world.tip == ["a", "b", "c", "d"]
    assert len(world.splits) == 1 and world.checks == 3  # the batch, then both halves


def test_speculation_builds_the_next_batch_on_the_one_being_checked() -> None:
    q = MergeQueue(batch_max=2, concurrency=2)
    q.admit(["a", "b", "c", "d", "e"])
    world = World(q, bad=set())
    first, second = world.build_all()
    assert first.base == "tip" and second.base == first.commit
    assert q.next_build() is None  # two in flight: no third
    world.check(second)  # the second passes first: it waits for the first
    assert q.front() is None and world.tip == []
    world.check(first)  # both land, in order
    assert world.tip == ["a", "b", "c", "d"]


def test_a_failure_at_the_front_discards_what_was_built_on_it() -> None:
    q = MergeQueue(batch_max=2, concurrency=2)
    q.admit(["a", "b", "c", "d"])
    world = World(q, bad={"a"})
    first, second = world.build_all()
    world.check(first)
    assert second.state == "waiting" and second.commit is None  # to be built again
    assert [g.ids for g in q.groups][:2] == [("a",), ("b",)]
    assert all(g.suspect for g in q.groups[:2])


def test_a_discarded_build_or_check_result_is_ignored() -> None:
    q = MergeQueue(batch_max=4)
    q.admit(["a", "b"])
    g = q.next_build()
    assert g is not None
    token = g.token
    q.moved()  # the branch moved while it was built
    q.built(g, token, "old", "c1", {}, [], True)
    assert g.state == "waiting"
    g2 = q.next_build()
    assert g2 is g and g.token != token
    q.built(g, g.token, "new", "c2", {"a": "m", "b": "m"}, [], True)
    assert q.checked(g, token, True) == [] and g.state == "checking"  # the old build's check


def test_a_conflicting_task_leaves_its_group_and_nothing_new_passes_at_once() -> None:
    q = MergeQueue()
    q.admit(["a", "b"])
    g = q.next_build()
    assert g is not None
    q.built(g, g.token, "base", "c1", {"a": "m1"}, ["b"], True)
    assert g.ids == ("a",) and g.state == "checking"
    q2 = MergeQueue()
    q2.admit(["x"])
    g2 = q2.next_build()
    assert g2 is not None
    q2.built(g2, g2.token, "base", "base", {"x": None}, [], True)  # already in: no check
    assert q2.front() is g2


def test_dropping_a_task_voids_its_candidate_and_those_built_on_it() -> None:
    q = MergeQueue(batch_max=1, concurrency=2)
    q.admit(["a", "b", "c"])
    world = World(q, bad=set())
    first, second = world.build_all()
    discarded = q.drop(["a"])
    assert discarded == [first, second] and [g.ids for g in q.groups] == [("b",), ("c",)]
    assert second.state == "waiting"


def test_after_a_restart_a_lost_check_is_built_again_and_passed_ones_kept() -> None:
    q = MergeQueue(batch_max=1, concurrency=3)
    passed = Group(("a",), state="passed", slot=1, base="t", commit="c1", token=4)
    lost = Group(("b",), state="checking", slot=2, base="c1", commit="c2", token=5)
    behind = Group(("c",), state="failed", slot=3, base="c2", commit="c3", token=6)
    q.restore([passed, lost, behind])
    assert [g.state for g in q.groups] == ["passed", "waiting", "waiting"]
    g = q.next_build()
    assert g is lost and g.base == "c1" and g.token > 6
