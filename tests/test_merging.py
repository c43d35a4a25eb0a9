"""The merge queue's decisions, without git or processes: batches, speculation, bisection."""

from __future__ import annotations

import math
import random

import pytest

from multibot.master.merging import Culprit, Group, MergeQueue, Split


class World:
    """Drives a queue as the pipeline would, with a check that fails when a bad task is in.

    Commits are names for lists of tasks; the tip is one of them. Results come back in the
    order a seeded random draw picks among the candidates being checked.
    """

    def __init__(
        self, queue: MergeQueue, bad: set[str], flaky_once: bool = False, seed: int = 0
    ) -> None:
        self.queue, self.bad, self.flaky_once = queue, bad, flaky_once
        self.commits: dict[str, list[str]] = {"c0": []}
        self.tip = "c0"
        self.tips: list[list[str]] = []  # every tip the branch had, in order
        self.checks = 0
        self.culprits: list[str] = []
        self.splits: list[Split] = []
        self.random = random.Random(seed)

    @property
    def landed(self) -> list[str]:
        return self.commits[self.tip]

    def build_all(self) -> list[Group]:
        started = []
        while (g := self.queue.next_build()) is not None:
            base = g.base or self.tip
            commit = f"c{g.token}"
            self.commits[commit] = [*self.commits[base], *g.ids]
            self.queue.built(g, g.token, base, commit, {t: f"m-{t}" for t in g.ids}, [], True)
            started.append(g)
        return started

    def check(self, g: Group) -> None:
        self.checks += 1
        ok = not (self.bad & set(self.commits[g.commit or ""]))
        if self.flaky_once:
            ok, self.flaky_once = False, False
        self.take(self.queue.checked(g, g.token, ok, "boom"))
        self.land()

    def take(self, verdicts: list[Culprit | Split]) -> None:
        for verdict in verdicts:
            if isinstance(verdict, Culprit):
                self.culprits.append(verdict.task_id)
                self.bad.discard(verdict.task_id)  # its worker fixes it
            else:
                self.splits.append(verdict)

    def land(self) -> None:
        while (front := self.queue.front()) is not None:
            assert front.base == self.tip  # only forward, only from where it was built
            self.tip = front.commit or ""
            self.tips.append(self.landed)
            self.take(self.queue.landed(front))

    def run(self) -> None:
        """Check candidates, one result at a time, until the queue is empty."""
        for _ in range(1000):
            self.build_all()
            checking = [g for g in self.queue.groups if g.state == "checking"]
            if not checking:
                self.land()
                if not self.queue.groups:
                    return
                continue
            self.check(self.random.choice(checking))
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
    assert world.landed == [f"t{n}" for n in range(8)]


@pytest.mark.parametrize("size", [2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_culprit_is_found_within_the_bound_and_the_rest_lands(
    size: int, concurrency: int
) -> None:
    for bad, seed in ((bad, seed) for bad in range(size) for seed in range(3)):
        q = MergeQueue(batch_max=size, concurrency=concurrency)
        ids = [f"t{n}" for n in range(size)]
        q.admit(ids)
        world = World(q, bad={f"t{bad}"}, seed=seed)
        world.run()
        assert world.culprits == [f"t{bad}"]
        # Every other task landed (in plan order when checks run one at a time: the halves
        # of a batch side by side land as they pass), and no tip ever held the culprit.
        rest = [t for t in ids if t != f"t{bad}"]
        assert world.landed == rest if concurrency == 1 else sorted(world.landed) == sorted(rest)
        assert not any(f"t{bad}" in tip for tip in world.tips)
        if concurrency == 1:
            assert world.checks <= 1 + 2 * math.ceil(math.log2(size)), (bad, world.checks)


def test_no_tip_ever_holds_a_breakage() -> None:
    ids = [f"t{n}" for n in range(10)]
    for seed in range(20):
        world = World(MergeQueue(batch_max=4, concurrency=3), bad={"t2", "t7"}, seed=seed)
        world.queue.admit(ids)
        world.run()
        assert sorted(world.culprits) == ["t2", "t7"]
        assert world.tips and all(not ({"t2", "t7"} & set(tip)) for tip in world.tips)
        assert sorted(world.landed) == sorted(t for t in ids if t not in ("t2", "t7"))


def test_a_flaky_failure_blames_nobody() -> None:
    q = MergeQueue(batch_max=4)
    q.admit(["a", "b", "c", "d"])
    world = World(q, bad=set(), flaky_once=True)
    world.run()
    assert world.culprits == []
    assert world.landed == ["a", "b", "c", "d"]
    assert len(world.splits) == 1 and world.checks == 3  # the batch, then both halves


def test_speculation_builds_the_next_batch_on_the_one_being_checked() -> None:
    q = MergeQueue(batch_max=2, concurrency=2)
    q.admit(["a", "b", "c", "d", "e"])
    world = World(q, bad=set())
    first, second = world.build_all()
    assert first.base == "c0" and second.base == first.commit
    assert q.next_build() is None  # two in flight: no third
    world.check(second)  # the second passes first: it waits for the first
    assert q.front() is None and world.landed == []
    world.check(first)  # both land, in order
    assert world.landed == ["a", "b", "c", "d"]


def test_a_failure_at_the_front_discards_what_was_built_on_it() -> None:
    q = MergeQueue(batch_max=2, concurrency=2)
    q.admit(["a", "b", "c", "d"])
    world = World(q, bad={"a"})
    first, second = world.build_all()
    world.check(first)
    assert second.state == "waiting" and second.commit is None  # to be built again
    assert [g.ids for g in q.groups][:2] == [("a",), ("b",)]
    assert all(g.suspect for g in q.groups[:2])


def test_the_halves_of_a_failed_batch_are_checked_on_the_tip_side_by_side() -> None:
    q = MergeQueue(batch_max=8, concurrency=2)
    q.admit(list("abcdefgh"))
    world = World(q, bad={"a"})
    first, second = world.build_all()  # the eight shared over the two lanes
    assert first.ids == tuple("abcd") and second.ids == tuple("efgh")
    assert second.base == first.commit
    world.check(first)  # fails on the tip: split; what was built on it is void
    assert second.state == "waiting"
    left, right = world.build_all()
    assert left.ids == ("a", "b") and right.ids == ("c", "d")
    assert left.base == right.base == "c0"  # each on the tip, not one on the other
    world.check(right)  # the good half lands at once, before the half that came first
    assert world.landed == ["c", "d"]
    world.check(left)  # failed on a tip that moved forward since: split again
    assert world.culprits == [] and [g.ids for g in q.groups][:2] == [("a",), ("b",)]
    world.run()
    assert world.culprits == ["a"] and sorted(world.landed) == list("bcdefgh")


def test_waiting_tasks_are_shared_over_the_free_lanes() -> None:
    q = MergeQueue(batch_max=8, concurrency=2)
    q.admit([f"t{n}" for n in range(10)])
    first = q.next_build()
    assert first is not None and len(first.ids) == 5
    q.built(first, first.token, "c0", "c1", {}, [], True)
    second = q.next_build()
    assert second is not None and len(second.ids) == 5  # the rest: one lane left
    q1 = MergeQueue(batch_max=4, concurrency=1)
    q1.admit([f"t{n}" for n in range(10)])
    only = q1.next_build()
    assert only is not None and len(only.ids) == 4  # one lane: a whole batch


def test_a_batch_not_full_waits_a_moment_while_more_tasks_are_verified() -> None:
    q = MergeQueue(batch_max=4, concurrency=1, batch_wait=2.0)
    q.admit(["a"], now=10.0)
    assert q.next_build(now=10.5, more_coming=True) is None  # others finish their verify
    assert q.next_build(now=10.5, more_coming=False) is not None  # none coming: go
    q2 = MergeQueue(batch_max=4, concurrency=1, batch_wait=2.0)
    q2.admit(["a"], now=10.0)
    assert q2.next_build(now=12.0, more_coming=True) is not None  # waited long enough
    q3 = MergeQueue(batch_max=2, concurrency=1, batch_wait=2.0)
    q3.admit(["a", "b"], now=10.0)
    assert q3.next_build(now=10.1, more_coming=True) is not None  # full: no wait


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
    assert [g.state for g in q.groups] == ["passed", "waiting", "waiting"]  # failed: again
    g = q.next_build()
    assert g is lost and g.base == "c1" and g.token > 6


def test_without_a_check_every_waiting_task_goes_in_one_batch() -> None:
    q = MergeQueue(batch_max=4, concurrency=2)
    q.admit([f"t{n}" for n in range(10)])
    assert len(q.groups) == 3
    g = q.next_build(lanes=1, batch_max=100)  # nothing to split a batch for: one, whole
    assert g is not None and len(g.ids) == 10 and len(q.groups) == 1
    assert q.next_build(lanes=1, batch_max=100) is None  # one in flight at a time
