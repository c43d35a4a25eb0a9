"""How a worker's task gets its branch: the quick way in the loop, or the careful way in a thread.

The quick way is for a worktree this process left with everything committed (the usual
case, and the latency that counts): no `git status` if the check that found it clean was
moments ago, no git at all at the tip. The careful way may wait for the repository's lock,
add the worktree and run the setup hook: seconds, minutes for a hook that installs
packages. A loop that waited would stop beating and be judged dead, so a thread does it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from multibot import protocol
from multibot.errors import MultibotError
from multibot.layout import Home

if TYPE_CHECKING:  # imported when used: GitPython is slow to import, and workers start often
    from multibot.worktrees import GitRepo, TaskStart

# How long the worker's own check that a worktree has everything committed stands in for a
# new one when its next task starts there (GitRepo.quick_start's clean_at). Between one task's
# end and the next assignment no one is meant to touch a worker's worktree: its agent is gone
# and the master verifies and merges in worktrees of its own. A start this soon after the
# check skips a `git status`; later (a person may have looked in and edited), git looks again.
CLEAN_TRUST_S = 1.0


class Tidy(NamedTuple):
    """A worktree this process saw with everything committed, at commit `head`."""

    path: str
    head: str | None  # None: not known (the next start checks with git)
    at: float  # time.monotonic() of the check


Preparing = tuple[protocol.Envelope, protocol.TaskAssignment, "Future[TaskStart]"]


class Branches:
    """The repositories a worker has opened, its last tidy worktree, the branch being made."""

    def __init__(
        self,
        home: Home,
        worker_id: str,
        generation: int,
        setup_hook: str | None,
        ring: Callable[[], None],
    ) -> None:
        self.home, self.worker_id, self.generation = home, worker_id, generation
        self.setup_hook, self.ring = setup_hook, ring
        self.repos: dict[tuple[str, str], GitRepo] = {}
        # The worktree this process prepared for its last task, which ended with everything
        # committed: its next branch may start the quick way (see GitRepo.quick_start).
        self.tidy: Tidy | None = None
        self.preparing: Preparing | None = None  # a branch made the careful way, in a thread

    def quick(
        self, task_id: str, a: protocol.TaskAssignment, tidy: Tidy | None
    ) -> TaskStart | None:
        """The task's branch made here, if the worktree was left tidy; else None."""
        repo = self.repos.get((a.repo, a.base_branch))
        if not tidy or tidy.path != a.working_directory or repo is None:
            return None
        recent = time.monotonic() - tidy.at <= CLEAN_TRUST_S
        with contextlib.suppress(MultibotError):
            return repo.quick_start(
                Path(a.working_directory), task_id, clean_at=tidy.head if recent else None
            )
        return None

    def begin(self, m: protocol.Envelope, a: protocol.TaskAssignment, task_id: str) -> None:
        """Make the task's branch the careful way, in a thread; take() it once done."""
        job: Future[TaskStart] = Future()

        def prepare() -> None:
            try:
                job.set_result(self._prepare(task_id, a))
            except BaseException as exc:  # taken by take() in the loop
                job.set_exception(exc)
            self.ring()

        # A daemon: a worker told to stop does not wait for a hook still running.
        threading.Thread(target=prepare, name="worker-prep", daemon=True).start()
        self.preparing = (m, a, job)

    def take(self) -> Preparing | None:
        """The branch made the careful way, once it is done (its future holds the outcome)."""
        if self.preparing is None or not self.preparing[2].done():
            return None
        done, self.preparing = self.preparing, None
        return done

    def stop(self) -> protocol.Envelope | None:
        """Give up the branch being made (the worker stops): the assignment it was for."""
        self.tidy = None
        if self.preparing is None:
            return None
        m, self.preparing = self.preparing[0], None
        for repo in list(self.repos.values()):
            repo.stop_hooks()
        return m

    def _prepare(self, task_id: str, a: protocol.TaskAssignment) -> TaskStart:
        """(prep thread) Check out the task's branch in the worktree (made on first use)."""
        from multibot import worktrees

        key = (a.repo, a.base_branch)
        repo = self.repos.get(key)
        if repo is None:  # opening checks the repository: once per worker, not per task
            repo = self.repos[key] = worktrees.GitRepo(
                Path(a.repo),
                self.home.integration_worktree,
                integration_branch=a.base_branch,
                setup_hook=self.setup_hook,
                # A hook this incarnation leaves behind when killed is found by the next
                # one's master like a stray agent (procs.stray_agents), and killed.
                hook_env={
                    "MULTIBOT_HOME": str(self.home.root),
                    "MULTIBOT_WORKER_ID": self.worker_id,
                    "MULTIBOT_GENERATION": str(self.generation),
                },
            )
        return repo.begin_task(Path(a.working_directory), task_id)
