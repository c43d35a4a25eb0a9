"""The merge queue's decisions, pure: which batch is built next, on what, and what a result means.

Verified tasks whose dependencies are merged wait in plan order. They go in *groups* (batches
of at most ``batch_max``) into *candidates*: a candidate is the integration tip with a group's
branches merged into it, and the project check runs once on it. The integration branch moves
to a candidate only after its check passed, and only from the commit the candidate was built
on, so no tip ever holds a breakage and the branch only moves forward.

With ``concurrency`` above 1, up to that many candidates are checked side by side. A batch is
built on top of the candidate before it (Zuul's speculative gating): it lands right after that
one, or is built again if that one fails. A batch that fails on the real tip is split in two
halves, Bors-style, and the second half is built beside the first, on the same base, not on
it: whichever passes lands at once, and a half that failed on a tip that has moved since (its
sibling landed) is split again, as a failure on its own is still one. A group of one that fails
is the culprit and goes back to its worker. A half that passed on a tip that has moved since is
checked again on the new one (the two halves were never checked together). A failed batch
of n tasks with one culprit costs at most 1 + 2*ceil(log2(n)) checks, and a flaky failure
clears itself: both halves pass and land.

A batch that is not full waits, while more tasks are being verified, up to ``batch_wait``
seconds after its first task came: a burst of tasks finishing together goes in one batch
instead of the first of them alone. The tasks waiting are shared evenly over the free check
lanes (two batches of four rather than one of eight and nothing beside it): a culprit is
found sooner, and passing batches take no longer side by side.

No I/O here: the pipeline (pipeline.py) builds, checks and lands, and tells the queue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

GroupState = Literal["waiting", "building", "checking", "passed", "failed"]
IN_FLIGHT: tuple[GroupState, ...] = ("building", "checking", "passed", "failed")


@dataclass(eq=False)  # a group is itself: two alike are still two
class Group:
    """Tasks checked together: one candidate, one project check."""

    ids: tuple[str, ...]
    suspect: bool = False  # a half of a batch that failed: never joined by new tasks
    state: GroupState = "waiting"
    slot: int = 0  # the scratch worktree its candidate is in (1..concurrency), once built
    base: str | None = None  # the commit its candidate was built on (None: the tip, to be read)
    commit: str | None = None  # its candidate
    merges: dict[str, str | None] = field(default_factory=dict)  # task -> its merge commit
    output: str = ""  # what its failed check printed
    token: int = 0  # which build of the group: results of an earlier one are stale
    since: float = 0.0  # when its first task came (for batch_wait)
    split: int = 0  # the two halves of one failed batch share a number (0: not a half)

    def reset(self) -> None:
        """Forget the candidate: the group waits to be built again."""
        self.state, self.slot, self.base, self.commit = "waiting", 0, None, None
        self.merges, self.output = {}, ""


@dataclass(frozen=True)
class Culprit:
    """A task found to break the project check on its own: it goes back to its worker."""

    task_id: str
    output: str


@dataclass(frozen=True)
class Split:
    """A failed batch, split into halves to be checked apart."""

    ids: tuple[str, ...]
    halves: tuple[tuple[str, ...], tuple[str, ...]]
    output: str


Verdict = Culprit | Split


class MergeQueue:
    """The groups waiting and in flight, in order; every change goes through its methods."""

    def __init__(self, batch_max: int = 8, concurrency: int = 1, batch_wait: float = 0.0) -> None:
        if batch_max < 1 or concurrency < 1:
            raise ValueError("batch_max and concurrency must be at least 1")
        self.batch_max, self.concurrency, self.batch_wait = batch_max, concurrency, batch_wait
        self.groups: list[Group] = []
        self.tip: str | None = None  # the integration tip as last seen (None: not known)
        self._builds = 0

    def restore(self, groups: Iterable[Group]) -> None:
        """Take the groups written down before a restart: a build or check that was under way
        is lost, and a failure is judged again on the tip as it is now, so those groups and
        every one built on them wait to be built again; a pass lands if the tip allows."""
        self.groups = [g for g in groups if g.ids]
        self._builds = max([self._builds, *(g.token for g in self.groups)])
        for g in self.groups:
            if g.state in ("building", "checking", "failed"):
                self._void(g)

    # -- what is there ---------------------------------------------------------------------
    def queued(self) -> set[str]:
        """Return every task in the queue."""
        return {tid for g in self.groups for tid in g.ids}

    def in_flight(self) -> list[Group]:
        """Return the groups whose candidate is being built, checked or waits to land."""
        return [g for g in self.groups if g.state in IN_FLIGHT]

    def bisecting(self) -> bool:
        """Return whether a failed batch is being split to find what broke it."""
        return any(g.suspect for g in self.groups)

    def front(self) -> Group | None:
        """Return a group whose candidate passed and can land now (built on the tip)."""
        passed = [g for g in self.groups if g.state == "passed"]
        if self.tip is None:  # not known (after a restart): the landing tells
            return passed[0] if passed else None
        return next((g for g in passed if g.base == self.tip), None)

    # -- changes ---------------------------------------------------------------------------
    def admit(self, ready: Iterable[str], now: float = 0.0) -> list[str]:
        """Queue the ready tasks not queued yet (in the order given); return them.

        A task joins the last group while that one waits, is not a half of a failed batch,
        and has room; otherwise it starts a new group.
        """
        known = self.queued()
        added = [tid for tid in ready if tid not in known]
        for tid in added:
            last = self.groups[-1] if self.groups else None
            if (
                last is None
                or last.state != "waiting"
                or last.suspect
                or len(last.ids) >= self.batch_max
            ):
                last = Group((), since=now)
                self.groups.append(last)
            last.ids = (*last.ids, tid)
        return added

    def drop(self, ids: Iterable[str]) -> list[Group]:
        """Take tasks out (cancelled, or no longer verified); return the groups discarded.

        A group in flight that loses a task is void, and so is everything built on it.
        """
        gone = set(ids)
        discarded: list[Group] = []
        for g in self.groups:
            if gone.isdisjoint(g.ids):
                continue
            g.ids = tuple(t for t in g.ids if t not in gone)
            discarded += self._void(g)
        self.groups = [g for g in self.groups if g.ids]
        return discarded

    def next_build(
        self,
        now: float = 0.0,
        more_coming: bool = False,
        lanes: int | None = None,
        batch_max: int | None = None,
    ) -> Group | None:
        """Return the next group to build, marked building, or None.

        One build at a time, and no more groups in flight than lanes (default: concurrency;
        1 when there is no check, as a batch then lands as it is built) allow; batch_max
        (default: the queue's) may be raised when there is no check to split a batch for.
        A group
        is built on the last candidate in flight before it (so it lands right after that
        one), else on the tip; the second half of a failed batch on the base of the first.
        A batch that is not full waits while more_coming, up to batch_wait after its first
        task.
        """
        lanes = self.concurrency if lanes is None else lanes
        flying = self.in_flight()
        if any(g.state == "building" for g in flying) or len(flying) >= lanes:
            return None
        n, group = next(
            ((n, g) for n, g in enumerate(self.groups) if g.state == "waiting"), (0, None)
        )
        if group is None:
            return None
        full = len(group.ids) >= self.batch_max
        if not (group.suspect or full) and more_coming and now - group.since < self.batch_wait:
            return None
        if not group.suspect:
            self._share(n, lanes - len(flying), batch_max or self.batch_max)
        before = [g for g in self.groups[:n] if g.state in IN_FLIGHT and g.commit]
        sibling = next((g for g in before if group.split and g.split == group.split), None)
        self._builds += 1
        group.state, group.token = "building", self._builds
        if sibling is not None:
            group.base = sibling.base  # beside its other half, not on it
        else:
            group.base = before[-1].commit if before else None
        used = {g.slot for g in flying}
        group.slot = next(k for k in range(1, self.concurrency + 1) if k not in used)
        return group

    def _share(self, n: int, free: int, batch_max: int) -> None:
        """Give the group at n an even share of the tasks waiting from there over the free
        check lanes: two batches of four checked side by side find a culprit sooner than one
        of eight, and cost no more time when they pass."""
        waiting = []
        for g in self.groups[n:]:
            if g.state != "waiting" or g.suspect:
                break
            waiting.append(g)
        ids = [t for g in waiting for t in g.ids]
        share = min(batch_max, math.ceil(len(ids) / max(1, free)))
        if len(self.groups[n].ids) == share:
            return
        first, since = self.groups[n], self.groups[n].since
        first.ids, rest = tuple(ids[:share]), ids[share:]
        regrouped = [
            Group(tuple(rest[k : k + self.batch_max]), since=since)
            for k in range(0, len(rest), self.batch_max)
        ]
        self.groups[n + 1 : n + len(waiting)] = regrouped

    def built(
        self,
        group: Group,
        token: int,
        base: str,
        commit: str,
        merges: dict[str, str | None],
        conflicts: Sequence[str],
        checked: bool,
    ) -> None:
        """Take in a built candidate: conflicting tasks are out; it is checked, or passes at
        once when there is no project check or it holds nothing new."""
        if group not in self.groups or group.token != token or group.state != "building":
            return  # discarded while it was built
        if group.base is None:
            self.tip = base  # read under the lock just now: the latest word on the tip
        group.ids = tuple(t for t in group.ids if t not in set(conflicts))
        group.base, group.commit, group.merges = base, commit, dict(merges)
        if not group.ids:
            self.groups.remove(group)
            return
        group.state = "checking" if checked and commit != base else "passed"

    def checked(self, group: Group, token: int, ok: bool, output: str = "") -> list[Verdict]:
        """Take in a candidate's check; return what was decided about failed groups."""
        if group not in self.groups or group.token != token or group.state != "checking":
            return []  # discarded while it was checked
        group.state, group.output = ("passed", "") if ok else ("failed", output)
        return self.settle()

    def settle(self) -> list[Verdict]:
        """Decide on every result that can be decided now.

        A failure on the tip, or on an earlier tip (the branch moved forward since, with
        groups that passed on their own): its group is split, or, alone, its task is the
        culprit, and whatever was built on it is void. A pass on a tip that has moved since:
        checked again. A result on a candidate still in flight waits for it.
        """
        verdicts: list[Verdict] = []
        while (g := next((g for g in self.groups if self._decidable(g)), None)) is not None:
            if g.state == "passed":
                self._void(g)  # passed on a tip that moved since: built again on the tip
                continue
            output = g.output
            self._void(g)
            n = self.groups.index(g)
            if len(g.ids) == 1:
                self.groups.pop(n)
                verdicts.append(Culprit(g.ids[0], output))
                continue
            mid = (len(g.ids) + 1) // 2
            halves = g.ids[:mid], g.ids[mid:]
            self._builds += 1  # a number for the pair
            self.groups[n : n + 1] = [
                Group(h, suspect=True, since=g.since, split=self._builds) for h in halves
            ]
            verdicts.append(Split(g.ids, halves, output))
        return verdicts

    def landed(self, group: Group) -> list[Verdict]:
        """Take in a group's landing: its tasks are merged, the tip is its candidate."""
        if group in self.groups:
            self.groups.remove(group)
        self.tip = group.commit
        return self.settle()

    def moved(self) -> list[Group]:
        """The integration branch moved under the queue: every candidate is built again on
        the new tip (the groups stay as they are); return those discarded."""
        self.tip = None
        void = [g for g in self.groups if g.state != "waiting"]
        for g in void:
            g.reset()
        return void

    def _decidable(self, g: Group) -> bool:
        """Whether g's result can be acted on: failed on the tip, or on a moved tip."""
        if g.state not in ("passed", "failed") or self.tip is None:
            return False
        if g.base == self.tip:
            return g.state == "failed"
        return not any(f.commit == g.base for f in self.groups if f is not g and f.commit)

    def _void(self, g: Group) -> list[Group]:
        """Forget g's candidate and every candidate built on it; return them."""
        void = [g] if g.state != "waiting" else []
        commit = g.commit
        g.reset()
        if commit is not None:
            for other in self.groups:
                if other.state != "waiting" and other.base == commit:
                    void += self._void(other)
        return void
