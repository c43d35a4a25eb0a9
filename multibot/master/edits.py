"""A person's hand edits of the state files: which fields they may change, how an edit is
merged with the master's own writes, and how the files are looked at in rotation.

The pure part says what a person's edit is; ``Edits`` looks at the files and reports what
it found (a broken edit is reported once, and the last good state stays in force).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from multibot.errors import LockTimeout, PlanError, StateError
from multibot.layout import Home
from multibot.plan import validate_plan
from multibot.state import OVER, Plan, SystemState, TaskRecord
from multibot.store import StateFile

EDITS_EVERY_S = 0.5  # each file a person may edit is looked at this often


# -- what a person may change ---------------------------------------------------------------
def keep_persons_task(mine: TaskRecord, disk: TaskRecord) -> TaskRecord:
    """The master's record of a task, with the fields a person edits (hold, cancel and
    priority) as the file on disk has them, and the file's version."""
    return (
        mine.model_copy(
            update={
                "version": disk.version,
                "hold": disk.hold,
                "cancel": disk.cancel or mine.cancel,
                "task": mine.task.model_copy(update={"priority": disk.task.priority}),
            }
        )
    ).sealed()


FORGED = (
    "a field only multibot writes was changed by hand (editable: hold, cancel, "
    "task.priority); the edit is refused"
)


def keep_persons_system(mine: SystemState, disk: SystemState) -> SystemState:
    """The master's system state, with the person's pause as the file on disk has it."""
    return mine.model_copy(update={"version": disk.version, "paused": disk.paused})


def task_edit(rec: TaskRecord, edited: TaskRecord) -> bool:
    """Take the person's fields of edited into rec; return whether any changed."""
    if (edited.hold, edited.cancel, edited.task.priority) == (
        rec.hold,
        rec.cancel,
        rec.task.priority,
    ):
        return False
    rec.hold, rec.cancel = edited.hold, edited.cancel
    rec.task = rec.task.model_copy(update={"priority": edited.task.priority})
    return True


@dataclass(frozen=True)
class Seen:
    """What the master is told of the person's edits."""

    task: Callable[[TaskRecord, TaskRecord], None]  # (the task, its edited file)
    paused: Callable[[bool], None]  # the person paused (True) or resumed the run
    event: Callable[..., None]  # (kind, text, **fields)


class Edits:
    """Looks at the files a person may edit: task files in rotation, system-state.json in
    the chores thread, the plan until it is approved."""

    def __init__(self, home: Home, chores: ThreadPoolExecutor, seen: Seen) -> None:
        self.home, self.chores, self.seen = home, chores, seen
        self.reported: set[str] = set()
        self.last_look = 0.0  # mono
        self.last_task_look, self.task_look_at = 0.0, 0  # see look
        self.sys_look: Future[tuple[SystemState, StateError | None] | None] | None = None

    def report(self, problem: StateError | LockTimeout | str, task: str | None = None) -> None:
        """Say once what is wrong with an edit (the last good state stays in force)."""
        key = str(problem)
        if key in self.reported:
            return
        self.reported.add(key)
        if isinstance(problem, LockTimeout):
            self.seen.event("state-write-refused", key, task=task)
        else:
            self.seen.event("bad-edit", f"{key} (last good state stays in force)")

    def due(self, mono: float) -> bool:
        """Whether the files looked at every EDITS_EVERY_S are due (then they are looked at)."""
        if mono - self.last_look < EDITS_EVERY_S:
            return False
        self.last_look = mono
        return True

    def look_at_tasks(
        self,
        ids: list[str],
        files: dict[str, StateFile[TaskRecord]],
        tasks: dict[str, TaskRecord],
        busy: Callable[[str], bool],
        mono: float,
    ) -> None:
        """Look at a share of the task files, in turn, as time passes: each is looked at
        every EDITS_EVERY_S (a look at a thousand at once held the turn up 20-30 ms)."""
        share = min(1.0, (mono - self.last_task_look) / EDITS_EVERY_S)
        self.last_task_look = mono
        count = min(len(ids), math.ceil(len(ids) * share))
        for k in range(count):
            tid = ids[(self.task_look_at + k) % len(ids)]
            f = files.get(tid)
            if f is None or busy(tid):  # the io thread has the file: look next time
                continue
            if tasks[tid].status in OVER:
                f.expire()  # over: hold, cancel and priority mean nothing now
                continue
            if not f.changed():
                continue
            try:
                edited = f.read()
            except StateError as exc:  # broken, and no good state yet (see TurnJournal.adopt)
                self.report(exc)
                continue
            problem = f.problem()
            if problem:
                self.report(problem)
                continue
            self.seen.task(tasks[tid], edited)
        self.task_look_at = (self.task_look_at + count) % max(1, len(ids))

    def look_at_system(self, file: StateFile[SystemState], paused: bool) -> None:
        """Take in the person's pause from the last look at system-state.json; look again."""
        if self.sys_look is not None and self.sys_look.done():
            seen = self.sys_look.result()
            self.sys_look = None
            if seen is not None:
                disk, problem = seen
                if problem:
                    self.report(problem)
                if disk.paused != paused:
                    self.seen.paused(disk.paused)
        if self.sys_look is None:
            self.sys_look = self.chores.submit(changed_system_state, file)

    def approved_plan(self, file: StateFile[Plan]) -> Plan | None:
        """Return the plan if the person approved it (and it is valid), else None."""
        if not file.changed():
            return None
        plan = file.read()
        problem = file.problem()
        if problem:
            self.report(problem)
            return None
        if not plan.approved:
            return None
        try:
            return validate_plan(plan.model_dump(), str(self.home.plan))
        except PlanError as exc:
            self.seen.event("plan-refused", str(exc))
            return None


def changed_system_state(
    file: StateFile[SystemState],
) -> tuple[SystemState, StateError | None] | None:
    """(chores thread) Return system-state.json and its problem if it changed, else None."""
    if not file.changed():
        return None
    return file.read(), file.problem()
