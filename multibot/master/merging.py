"""The merge queue's decisions, pure: which batch is built next, on what, and what a result means.

Verified tasks whose dependencies are merged wait in plan order. They go in *groups* (batches
of at most ``batch_max``) into *candidates*: a candidate is the integration tip with a group's
branches merged into it, and the project check runs once on it. The integration branch moves
to a candidate only after its check passed, so no tip ever holds a breakage.

With ``concurrency`` above 1 the next group's candidate is built on top of the one being
checked and checked beside it (Zuul's speculative gating); the groups in flight are always a
prefix of the queue, each built on the one before it, the first on the tip. Results are taken
in queue order: a group that passed lands once everything before it landed; one that failed
at the front (so on the real tip) is split in two halves checked apart, Bors-style, or, alone,
is the culprit and goes back to its worker. Everything built on a failed or discarded group is
built again. A failed batch of n tasks with one culprit costs at most 1 + 2*ceil(log2(n))
checks, and a flaky failure clears itself: both halves pass and land.

No I/O here: the pipeline (pipeline.py) builds, checks and lands, and tells the queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

GroupState = Literal["waiting", "building", "checking", "passed", "failed"]
IN_FLIGHT: tuple[GroupState, ...] = ("building", "checking", "passed", "failed")


@dataclass(eq=False)  # a group is itself: two alike are still two
class Group:
    """Tasks checked together: one candidate, one project check."""

    ids: tuple[str, ...]
    suspect: bool = False  # a half of a batch that failed: checked apart, never joined
    state: GroupState = "waiting"
    slot: int = 0  # the scratch worktree its candidate is in (1..concurrency), once built
    base: str | None = None  # the commit its candidate was built on
    commit: str | None = None  # its candidate
    merges: dict[str, str | None] = field(default_factory=dict)  # task -> its merge commit
    output: str = ""  # what its failed check printed
    token: int = 0  # which build of the group: results of an earlier one are stale

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

    def __init__(self, batch_max: int = 8, concurrency: int = 1) -> None:
        if batch_max < 1 or concurrency < 1:
            raise ValueError("batch_max and concurrency must be at least 1")
        self.batch_max, self.concurrency = batch_max, concurrency
        self.groups: list[Group] = []
        self._builds = 0

    def restore(self, groups: Iterable[Group]) -> None:
        """Take the groups written down before a restart: a build or check that was under way
        is lost, so its group and every one built on it wait to be built again."""
        self.groups = [g for g in groups if g.ids]
        self._builds = max([self._builds, *(g.token for g in self.groups)])
        for n, g in enumerate(self.groups):
            if g.state in ("building", "checking"):
                self._void_from(n)
                break

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
        """Return the group whose candidate lands next, if it passed its check."""
        return self.groups[0] if self.groups and self.groups[0].state == "passed" else None

    # -- changes ---------------------------------------------------------------------------
    def admit(self, ready: Iterable[str]) -> list[str]:
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
                last = Group(())
                self.groups.append(last)
            last.ids = (*last.ids, tid)
        return added

    def drop(self, ids: Iterable[str]) -> list[Group]:
        """Take tasks out (cancelled, or no longer verified); return the groups discarded.

        A group in flight that loses a task is void, and so is everything built on it.
        """
        gone = set(ids)
        discarded: list[Group] = []
        for n, g in enumerate(self.groups):
            if gone.isdisjoint(g.ids):
                continue
            g.ids = tuple(t for t in g.ids if t not in gone)
            if g.state != "waiting":
                discarded += self._void_from(n)
        self.groups = [g for g in self.groups if g.ids]
        return discarded

    def next_build(self) -> Group | None:
        """Return the next group to build, marked building, or None.

        One build at a time (each candidate is built on the one before), and no more groups
        in flight than concurrency allows. Its base is the commit of the group before it, or
        None: the integration tip, as the builder reads it.
        """
        flying = self.in_flight()
        if any(g.state == "building" for g in flying) or len(flying) >= self.concurrency:
            return None
        if len(flying) == len(self.groups):
            return None
        group = self.groups[len(flying)]
        self._builds += 1
        group.state, group.token = "building", self._builds
        group.base = flying[-1].commit if flying else None
        used = {g.slot for g in flying}
        group.slot = next(n for n in range(1, self.concurrency + 1) if n not in used)
        return group

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
        """Decide on a failed group at the front: split it, or name its one task the culprit.

        A failed group behind the front waits: it may have failed for what is in front of it.
        """
        verdicts: list[Verdict] = []
        while self.groups and self.groups[0].state == "failed":
            failed = self.groups[0]
            self._void_from(1)
            self.groups.pop(0)
            if len(failed.ids) == 1:
                verdicts.append(Culprit(failed.ids[0], failed.output))
                continue
            mid = (len(failed.ids) + 1) // 2
            halves = failed.ids[:mid], failed.ids[mid:]
            self.groups[0:0] = [Group(halves[0], suspect=True), Group(halves[1], suspect=True)]
            verdicts.append(Split(failed.ids, halves, failed.output))
        return verdicts

    def landed(self, group: Group) -> None:
        """Take in the front group's landing: its tasks are merged."""
        if self.groups and self.groups[0] is group:
            self.groups.pop(0)

    def moved(self) -> list[Group]:
        """The integration branch moved under the queue: every candidate is built again on
        the new tip (the groups stay as they are); return those discarded."""
        return self._void_from(0)

    def _void_from(self, n: int) -> list[Group]:
        void = [g for g in self.groups[n:] if g.state != "waiting"]
        for g in void:
            g.reset()
        return void
