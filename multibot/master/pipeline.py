"""The verify and merge pipeline: verify commands side by side, and the merge queue's
candidates built, checked and landed, all in the master's job lanes (jobs.py).

A task's verify command runs on the task's commit in a scratch worktree of its own
(``worktrees/_verify-N``), not in its worker's worktree: the worker takes its next task at
once, and what the command checks is exactly what was committed, whatever the agent left
behind. The merge queue (merging.py decides) builds candidates in ``worktrees/_integration``
(and ``_integration-N`` when checks run side by side), checks them, and moves the integration
branch to one only after its check passed, only forward, and only from the tip it was built
on: a commit a person put on the branch meanwhile makes the queue build again on top of it.

A held lock, a checkout of the integration branch or a ref that moved is the queue's problem,
not a task's: it waits with a visible reason and tries again with backoff. Only a conflict or
a failed check sends a task back. With a project check, each queue decision is written to
``state/merge-queue.json`` before it is acted on, so a restarted master goes on with the
bisection it was in; without one, a batch is built and landed in one job, and git itself says
after a crash what landed.
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from multibot.commands import run_shell
from multibot.config import MasterConfig
from multibot.errors import LockTimeout, MergeBlocked, MultibotError, StateError
from multibot.layout import Home
from multibot.master.jobs import Done, Jobs
from multibot.master.merging import Culprit, Group, MergeQueue, Split
from multibot.state import MergeQueueRecord, QueueGroup, QueueView
from multibot.store import StateFile
from multibot.worktrees import Candidate, GitRepo, MergeOutcome

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0

Item = tuple[str, str, str]  # (task id, title, branch)


@dataclass(frozen=True)
class Verified:
    """A task's verify command ended: passed, or failed with what it printed."""

    task_id: str
    ok: bool
    output: str


@dataclass(frozen=True)
class Merged:
    """A task is on the integration branch (merge_commit None: it was in already)."""

    task_id: str
    merge_commit: str | None


@dataclass(frozen=True)
class Conflicted:
    """A task's branch conflicts with the candidate it was to join: it goes back."""

    outcome: MergeOutcome


@dataclass(frozen=True)
class BrokeCheck:
    """A task breaks the project check on its own: it goes back with the check's output."""

    task_id: str
    output: str


Outcome = Verified | Merged | Conflicted | BrokeCheck
Event = Callable[..., None]  # (kind, text, **fields): the master's timeline and pane


@dataclass(frozen=True)
class _Built:
    candidate: Candidate
    landed: bool | None  # None: not tried (a check comes first)
    blocked: MergeBlocked | None = None


class Pipeline:
    """Runs the verify commands and the merge queue for the master's loop."""

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        jobs: Jobs,
        event: Event,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.home, self.config, self.jobs, self.event, self.mono = (
            home,
            config,
            jobs,
            event,
            monotonic,
        )
        self.git: GitRepo | None = None  # set once the repository is open
        self.queue = MergeQueue(
            config.merge_batch_max, config.check_concurrency, config.merge_batch_wait
        )
        self.file = StateFile(home.merge_queue, MergeQueueRecord, default=MergeQueueRecord)
        self.check_cmd: str | None = None
        self.items: dict[str, Item] = {}
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for n in range(verify_slots(config)):
            self.slots.put(n + 1)
        self.running: dict[
            tuple[str, Hashable], set[subprocess.Popen[bytes]]
        ] = {}  # to cancel checks
        self.landing: Group | None = None
        self.blocked: tuple[str, float] | None = None  # (why, retry at mono)
        self.failures = 0  # blocked tries in a row (the backoff)
        self.checks = 0
        self.last_check_s: float | None = None
        self.started: dict[int, float] = {}  # check token -> when it started (mono)
        self.verifying: set[str] = set()

    # -- verify commands ---------------------------------------------------------------------
    @staticmethod
    def lanes(config: MasterConfig) -> dict[str, int]:
        """The job lanes the pipeline needs, sized by the config."""
        return {"verify": verify_slots(config), "build": 1, "check": config.check_concurrency}

    def attach(self, git: GitRepo) -> None:
        """Use this repository; make the scratch worktrees now, in the background (a new
        worktree is a checkout, and its setup hook may install packages)."""
        self.git = git
        paths = [self.home.verify_worktree(n + 1) for n in range(verify_slots(self.config))]
        paths += [self.home.merge_worktree(n + 1) for n in range(self.config.check_concurrency)]

        def prepare() -> None:
            for path in paths:
                git.scratch(path)

        self.jobs.submit(("prepare", 0), prepare, "build")

    def verify(self, task_id: str, commit: str, command: str) -> None:
        """Run a task's verify command on its commit, beside the others (a job)."""
        self.verifying.add(task_id)
        key = ("verify", task_id)
        running = self.running.setdefault(key, set())
        timeout = self.config.verify_timeout_minutes * 60
        self.jobs.submit(key, lambda: self._verify(commit, command, timeout, running), "verify")

    def _verify(
        self, commit: str, command: str, timeout: float, running: set[subprocess.Popen[bytes]]
    ) -> tuple[int, str]:
        """(verify lane) Check out commit in a free verify worktree and run command there."""
        assert self.git is not None
        slot = self.slots.get()
        try:
            path = self.home.verify_worktree(slot)
            self.git.check_out(path, commit)
            return run_shell(command, path, timeout, running)
        finally:
            self.slots.put(slot)

    # -- the merge queue ---------------------------------------------------------------------
    def restore(self) -> None:
        """Take up the queue written before a restart (a lost build or check is done again)."""
        record = self.file.read()
        groups = [Group(tuple(g.ids), **g.model_dump(exclude={"ids"})) for g in record.groups]
        lost = [g for g in groups if g.state in ("building", "checking")]
        self.queue.restore(groups)
        self.checks = record.checks
        for g in lost:
            branches = ", ".join(self.items.get(t, (t, "", f"multibot/{t}"))[2] for t in g.ids)
            self.event("merge-recovered", f"the check of {branches} was cut: it runs again")

    def idle(self) -> bool:
        """Whether a step could start nothing now: a build or landing under way and every
        lane in use, or the queue waiting out a block (the master then skips the step)."""
        if self.blocked is not None and self.mono() < self.blocked[1]:
            return True
        flying = self.queue.in_flight()
        lanes = self.config.check_concurrency if self.check_cmd else 1
        busy = any(g.state == "building" for g in flying) or len(flying) >= lanes
        return busy and (self.landing is not None or self.queue.front() is None)

    def step(self, ready: Sequence[Item], check_cmd: str | None, verified: set[str]) -> None:
        """Queue the ready tasks, drop those no longer verified, and start what can start."""
        self.check_cmd = check_cmd
        gone = self.queue.queued() - verified
        if gone:
            self.queue.drop(gone)
            self._stop_void_checks()
            self.save()
        for item in ready:
            self.items[item[0]] = item
        self.queue.admit((item[0] for item in ready), self.mono())  # written when acted on
        if self.blocked is not None and self.mono() < self.blocked[1]:
            return
        front = self.queue.front()
        if front is not None and self.landing is None:
            self.land(front)
        more = bool(self.verifying)  # tasks about to join: a batch not full waits a moment
        # Without a check a batch lands as it is built, and nothing would split it: one, whole.
        lanes, most = (None, None) if check_cmd else (1, len(self.items) + 1)
        while (group := self.queue.next_build(self.mono(), more, lanes, most)) is not None:
            self.save()
            self.build(group)

    def build(self, group: Group) -> None:
        git = self.git
        assert git is not None
        items = [self.items[t] for t in group.ids]
        slot, base, check = self.home.merge_worktree(group.slot), group.base, self.check_cmd

        def job() -> _Built:
            candidate = git.build(slot, items, base)
            if check or candidate.commit == candidate.base:
                return _Built(candidate, None)
            try:  # no check: the candidate lands in the same job
                return _Built(candidate, git.land(candidate.commit, candidate.base, _what(group)))
            except MergeBlocked as exc:
                return _Built(candidate, None, exc)

        self.jobs.submit(("build", group.token), job, "build")

    def land(self, group: Group) -> None:
        git = self.git
        assert git is not None and group.commit is not None and group.base is not None
        self.landing = group
        commit, base, what = group.commit, group.base, _what(group)
        self.jobs.submit(("land", group.token), lambda: git.land(commit, base, what), "build")

    def check(self, group: Group) -> None:
        git, command = self.git, self.check_cmd
        assert git is not None and command is not None
        slot = self.home.merge_worktree(group.slot)
        timeout = self.config.check_timeout_minutes * 60
        running = self.running.setdefault(("check", group.token), set())
        self.started[group.token] = self.mono()
        self.event(
            "check-started",
            f"checking {_what(group)} ({len(group.ids)} task(s)"
            + (", bisecting" if group.suspect else "")
            + f") on {(group.base or '')[:10]}",
            tasks=list(group.ids),
        )
        self.jobs.submit(
            ("check", group.token), lambda: git.check(slot, command, timeout, running), "check"
        )

    # -- results -------------------------------------------------------------------------------
    def take(self, done: Done) -> list[Outcome]:
        """Take in a finished job of the pipeline; return what it means for tasks."""
        try:
            return self._take(done)
        finally:
            self._stop_void_checks()

    def _stop_void_checks(self) -> None:
        """Kill the checks of candidates the queue has let go of: their lane is wanted."""
        live = {g.token for g in self.queue.groups if g.state == "checking"}
        for key, procs in self.running.items():
            if key[0] == "check" and key[1] not in live:
                for proc in list(procs):
                    _kill_group(proc)

    def _take(self, done: Done) -> list[Outcome]:
        assert isinstance(done.key, tuple)
        kind, key = done.key[0], done.key[1]
        self.running.pop((str(done.key[0]), done.key[1]), None)
        if kind == "prepare":
            if done.error is not None:  # each is made again on first use, or says why then
                self.event("worktree-failed", f"scratch worktrees: {done.error}")
            return []
        if kind == "verify":
            self.verifying.discard(str(key))
            if done.error is not None:
                return [Verified(str(key), False, f"the check could not run: {done.error}")]
            code, output = done.value
            return [Verified(str(key), code == 0, output if code else "")]
        group = next((g for g in self.queue.groups if g.token == key), None)
        if kind == "build":
            return self._built(group, int(key), done)
        if kind == "check":
            return self._checked(group, int(key), done)
        return self._landed(group, done)

    def _built(self, group: Group | None, token: int, done: Done) -> list[Outcome]:
        if group is None or group.token != token:
            return []
        if done.error is not None:
            self._blocked(done.error)
            self.queue.moved()  # built again once the queue goes on
            self.save()
            return []
        built: _Built = done.value
        c = built.candidate
        for note in c.notes:
            self.event("lock-cleared", note)
        out: list[Outcome] = [Conflicted(o) for o in c.conflicts]
        merges = dict(c.merges)
        self.queue.built(
            group,
            token,
            c.base,
            c.commit,
            merges,
            [o.task_id for o in c.conflicts],
            checked=self.check_cmd is not None,
        )
        if built.blocked is not None:
            self._blocked(built.blocked)
            if built.blocked.kind == "moved":
                self.queue.moved()
        elif built.landed is not None or (group.state == "passed" and c.commit == c.base):
            out += self._merged(group)
        elif group.state == "checking":
            self.save()
            self.check(group)
        else:
            self.save()
        return out

    def _checked(self, group: Group | None, token: int, done: Done) -> list[Outcome]:
        started = self.started.pop(token, None)
        if group is None or group.token != token:
            return []
        self.checks += 1
        self.last_check_s = self.mono() - started if started is not None else None
        if done.error is not None:
            code, output = -1, f"the check could not run: {done.error}"
        else:
            code, output = done.value
        took = f" in {self.last_check_s:.1f}s" if self.last_check_s is not None else ""
        if code == 0:
            self.event("check-passed", f"{_what(group)} passed{took}", tasks=list(group.ids))
        else:
            self.event(
                "check-failed", f"{_what(group)} failed (exit {code}){took}", tasks=list(group.ids)
            )
        out: list[Outcome] = []
        report = f"the project check `{self.check_cmd}` exited {code}:\n{output}"
        for verdict in self.queue.checked(group, token, code == 0, report):
            out += self._verdict(verdict)
        self.save()
        return out

    def _verdict(self, verdict: Culprit | Split) -> list[Outcome]:
        if isinstance(verdict, Culprit):
            self.event(
                "culprit", f"{verdict.task_id} breaks the project check", task=verdict.task_id
            )
            return [BrokeCheck(verdict.task_id, verdict.output)]
        left, right = verdict.halves
        self.event(
            "bisect",
            f"batch {', '.join(verdict.ids)} failed: checking {', '.join(left)} "
            f"and {', '.join(right)} apart",
            tasks=list(verdict.ids),
        )
        return []

    def _landed(self, group: Group | None, done: Done) -> list[Outcome]:
        landing, self.landing = self.landing, None
        if group is None or group is not landing:
            return []
        if isinstance(done.error, MergeBlocked) and done.error.kind == "moved":
            self.event("queue-rebuilt", str(done.error))
            self.queue.moved()  # its checks are stopped as this result is taken
            self.save()
            return []
        if done.error is not None:
            self._blocked(done.error)
            return []
        return self._merged(group)

    def _merged(self, group: Group) -> list[Outcome]:
        out: list[Outcome] = [Merged(t, group.merges.get(t)) for t in group.ids]
        for t in group.ids:
            self.items.pop(t, None)  # merged: never queued again
        for verdict in self.queue.landed(group):
            out += self._verdict(verdict)
        self.failures = 0
        if self.blocked is not None:
            self.event("queue-resumed", "the merge queue goes on")
            self.blocked = None
        self.save()
        return out

    def _blocked(self, error: BaseException) -> None:
        """The queue waits (with backoff) for what blocks it; no task is charged for it."""
        if not isinstance(error, MultibotError | OSError):
            raise error
        self.failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        why = (
            str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        )
        if self.blocked is None or self.blocked[0] != why:
            self.event("queue-paused", f"merge queue waits: {why} (next try in {delay:.1f}s)")
        self.blocked = (why, self.mono() + delay)

    # -- the record and the view ---------------------------------------------------------------
    def save(self) -> None:
        """Write the queue down before acting on it (only when a check makes it last)."""
        if self.check_cmd is None:
            return
        record = MergeQueueRecord(
            groups=[
                QueueGroup(ids=list(g.ids), **{k: v for k, v in vars(g).items() if k != "ids"})
                for g in self.queue.groups
            ],
            checks=self.checks,
        )
        try:
            self.file.update(lambda disk: record.model_copy(update={"version": disk.version}))
        except (StateError, LockTimeout, OSError) as exc:
            self.event("state-write-refused", f"{self.home.merge_queue}: {exc}")

    def view(self) -> QueueView:
        """The pipeline as the status view shows it (what waits is git.merge_queue)."""
        flying = self.queue.in_flight()
        return QueueView(
            verifying=sorted(self.verifying),
            checking=[list(g.ids) for g in flying],
            bisecting=self.queue.bisecting(),
            paused=self.blocked[0] if self.blocked else None,
            checks=self.checks,
            last_check_s=self.last_check_s,
        )

    def merging(self) -> str | None:
        """The first task of the batch being merged now, if any."""
        flying = self.queue.in_flight()
        return flying[0].ids[0] if flying else None


def verify_slots(config: MasterConfig) -> int:
    """How many verify commands run at once."""
    return config.verify_concurrency or max(2, os.cpu_count() or 2)


def _what(group: Group) -> str:
    shown = ", ".join(group.ids[:6]) + (
        f" and {len(group.ids) - 6} more" if len(group.ids) > 6 else ""
    )
    return f"batch [{shown}]"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:  # not reaped: its pid (the group id) is still ours
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
