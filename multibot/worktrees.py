"""The git layer: an integration branch, a worktree per worker, a branch per task, verified merges.

Merges happen in a dedicated integration worktree whose
HEAD is kept *detached*: a task branch is merged there, the verify command runs, and only then is
the integration branch moved, by compare-and-swap (``git update-ref <new> <old>``). So the
integration branch only ever points at verified commits: a task started during a verify, or a
crash in the middle of one, never sees an unverified merge, and undoing a failed merge is a reset
of our own worktree. The user's checkout and branches are never touched unless merge_into is called.

Below it: ``repository.py`` (locks, refs, the worktree list), ``checkout.py`` (one worktree seen
from inside, for workers), ``gitcmd.py`` (git itself; the only module that imports GitPython)
and ``commands.py`` (shell commands).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from multibot.checkout import (
    commit_all,
    has_uncommitted,
    head_commit,
    snapshot,
    uncommitted,
    worktree_dirs,
)
from multibot.commands import run_shell
from multibot.errors import GitError, InvalidId, MergeBlocked
from multibot.gitcmd import git_out, run_git
from multibot.ids import check_branch, check_id
from multibot.repository import (
    DEFAULT_INTEGRATION,
    TASK_PREFIX,
    Conflict,
    Landing,
    Refusal,
    Repository,
    some_paths,
)

__all__ = [
    "DEFAULT_INTEGRATION",
    "TASK_PREFIX",
    "Conflict",
    "GitRepo",
    "Landing",
    "Refusal",
    "task_id_of",
]


@dataclass(frozen=True)
class MergeOutcome:
    """What happened to one task branch in the merge queue."""

    status: Literal["merged", "conflict", "verify_failed", "nothing", "missing"]
    task_id: str
    branch: str
    commit: str | None = None
    conflicts: tuple[Conflict, ...] = ()
    output: str = ""


@dataclass(frozen=True)
class Candidate:
    """A merge candidate: base with task branches merged into it, not landed yet."""

    base: str  # the commit it was built on
    commit: str  # base with every merged branch: what the project check runs on
    merges: tuple[tuple[str, str | None], ...]  # (task id, its merge commit; None: in already)
    conflicts: tuple[MergeOutcome, ...] = ()  # the branches left out, each with its conflict
    notes: tuple[str, ...] = ()  # what had to be mended first (a stale lock)


@dataclass(frozen=True)
class Recovery:
    """What recover() did; `interrupted` lists branches whose merge must be queued again."""

    actions: tuple[str, ...] = ()
    interrupted: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.actions)

    def __str__(self) -> str:
        return "; ".join(self.actions) or "nothing to recover"


@dataclass(frozen=True)
class TaskStart:
    """The branch a task was given, and the commit it was made at (None if it existed already)."""

    branch: str
    start: str | None = None


def task_id_of(branch: str) -> str | None:
    """Return the task id a multibot task branch belongs to, or None."""
    if not branch.startswith(TASK_PREFIX):
        return None
    rest = branch[len(TASK_PREFIX) :]
    try:
        return check_id(rest)
    except InvalidId:
        return None


class GitRepo(Repository):
    """One target repository: its integration branch, worker worktrees and merge queue."""

    def stop_hooks(self) -> None:
        """Kill the setup hooks running (from another thread): their worktrees are removed."""
        for proc in list(self._hooks):
            if proc.poll() is None:  # not reaped, so its pid (the group id) is still ours
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    # -- names ---------------------------------------------------------------------------
    def branch_for(self, task_id: str) -> str:
        """Return the branch of a task, refusing ids that are unsafe or clash."""
        branch = check_branch(TASK_PREFIX + check_id(task_id, "task id"))
        if branch == self.integration:
            raise InvalidId("task id", task_id, f"its branch would be {self.integration}")
        return branch

    def task_branches(self) -> list[str]:
        """Return every multibot task branch (not the integration branch)."""
        out = git_out(
            self.root, "for-each-ref", "--format=%(refname:short)", "refs/heads/multibot/"
        )
        return [b for b in out.splitlines() if b and b != self.integration]

    # -- integration branch and worktrees ------------------------------------------------
    def ensure_integration(self, base: str | None = None) -> str:
        """Create the integration branch from base (default HEAD) and its worktree; return tip."""
        start = "HEAD" if base is None else check_branch(base)
        with self._locked():
            if not self._branch_exists(self.integration):
                run_git(self.root, "branch", "--no-track", self.integration, self._rev(start))
            self._ensure_integration_worktree()
            return self._integration_tip()

    def ensure_worktree(self, path: Path) -> Path:
        """Create a worker worktree at path (detached at integration) unless it exists."""
        path = self._abs(path)
        if self._find(path) is None:
            self._add_worktree(path, self._integration_tip())
        return path

    def start_task(self, worktree: Path, task_id: str) -> str:
        """Check out the task's branch in worktree (new from integration, or as left); return it."""
        return self.begin_task(worktree, task_id).branch

    def begin_task(self, worktree: Path, task_id: str) -> TaskStart:
        """Check out the task's branch as start_task does; say where a new branch began.

        The careful way, for any state of the worktree; quick_start is the fast way for a
        worktree its worker left with everything committed.
        """
        branch = self.branch_for(task_id)
        path = self._abs(worktree)
        if path == self.integration_worktree:
            raise GitError(f"{path} is the integration worktree; tasks run in worker worktrees")
        self.ensure_worktree(path)
        current = self._find(path)
        if current is not None and current.branch == branch:
            return TaskStart(branch)  # resumed in place: keep commits and uncommitted work
        dirty = uncommitted(path)
        if dirty:
            raise GitError(
                f"{path} has uncommitted changes ({some_paths(dirty)}); commit or remove them "
                f"before starting task {task_id}"
            )
        if current is not None and current.branch is None and self._unmerged(path, "HEAD"):
            raise GitError(f"{path} has commits on a detached HEAD that no branch holds")
        if self._branch_exists(branch):
            holder = self._holder(branch)
            if (
                holder is not None
                and holder != self.integration_worktree
                and not uncommitted(holder)
            ):
                # The task comes back to a different worker (its last one is busy or gone):
                # the old worktree lets go of the branch; everything it did is committed on it.
                with self._locked(self._worktree_lock(holder)):
                    self._admin_git(holder, "switch", "--quiet", "--detach")
                holder = None
            if holder is not None:
                raise GitError(f"branch {branch} is already checked out in {holder}")
            self._admin_git(path, "switch", "--quiet", branch)
            return TaskStart(branch)
        tip = self._integration_tip()
        self._admin_git(path, "switch", "--quiet", "--no-track", "-c", branch, tip)
        return TaskStart(branch, tip)

    def quick_start(
        self, worktree: Path, task_id: str, clean_at: str | None = None
    ) -> TaskStart | None:
        """Make the task's branch at the integration tip with `git switch -c`, or return None.

        Only for a worktree on some branch with nothing uncommitted: one `git status` checks,
        unless the caller saw it clean at commit `clean_at` moments ago and vouches for it.
        Anything else (missing, dirty, detached, moved since `clean_at`, the branch exists or
        is checked out there) returns None, having changed nothing, for start_task to handle
        and explain.
        """
        branch = self.branch_for(task_id)
        path = self._abs(worktree)
        if path == self.integration_worktree:
            return None
        try:
            if (
                worktree_dirs(path)[1] != self._views.common_dir
            ):  # a worktree of this repository, at its top
                return None
            if self._views.rev(f"refs/heads/{branch}") is not None:
                return None  # the task comes back: its branch exists
            tip = self._views.rev(f"refs/heads/{self.integration}")
            if tip is None or (clean_at is None and snapshot(path).dirty):
                return None
        except GitError:
            return None
        # Creating a branch reads no other worktree's entry (unlike switching to an existing
        # one), so the repository-wide admin lock, which every worker would queue on, is not
        # needed; but another worker may be switching this worktree off a branch it wants:
        # this worktree's own lock keeps the two from racing for its index and HEAD.
        with self._locked(self._worktree_lock(path)):
            try:
                head, on = self._head_of(path)
            except GitError:
                return None
            if on is None or on == branch or (clean_at is not None and head != clean_at):
                return None  # detached, on the task's branch, or moved since seen clean
            # Already at the tip (nothing merged since this worktree's last task): the branch
            # starts here, and git leaves the index as it is instead of writing it again.
            at = () if head == tip else (tip,)
            switch = ("switch", "--quiet", "--no-track", "-c", branch, *at)
            if run_git(path, *switch, check=False)[0] != 0:
                return None  # e.g. the branch exists: nothing was changed
        return TaskStart(branch, tip)

    def _head_of(self, path: Path) -> tuple[str | None, str | None]:
        """Return (commit, branch) of a worktree's HEAD, read without git; Nones if detached."""
        ref = self._views.head_ref(path, worktree_dirs(path)[0])
        if ref is None:
            return None, None
        return self._views.rev(ref), ref.removeprefix("refs/heads/")

    # -- work in a worktree --------------------------------------------------------------
    def commit_all(self, worktree: Path, message: str) -> str | None:
        """Commit every change in a worker worktree; return the sha or None (see commit_all)."""
        return commit_all(self._abs(worktree), message)

    def head_commit(self, worktree: Path) -> str:
        """Return the sha HEAD points at in worktree."""
        return head_commit(self._abs(worktree))

    def has_uncommitted(self, worktree: Path) -> bool:
        """Return True if worktree has changes or untracked files not ignored."""
        return has_uncommitted(self._abs(worktree))

    def diff(self, branch: str) -> str:
        """Return the patch a branch adds since its merge-base with the integration branch."""
        branch = check_branch(branch)
        self._require_branch(branch)
        span = f"refs/heads/{self.integration}...refs/heads/{branch}"
        return run_git(self.root, "diff", "--stat", "--patch", span)[1]

    def changed_files(self, branch: str) -> list[str]:
        """Return the files a branch changed since its merge-base with the integration branch."""
        branch = check_branch(branch)
        self._require_branch(branch)
        span = f"refs/heads/{self.integration}...refs/heads/{branch}"
        out = run_git(self.root, "diff", "--name-only", "-z", span)[1]
        return [p for p in out.split("\0") if p]

    def is_merged(self, branch: str) -> bool:
        """Return True if the branch tip is contained in the integration branch."""
        branch = check_branch(branch)
        self._require_branch(branch)
        return not self._unmerged(self.root, f"refs/heads/{branch}")

    # -- merge queue -----------------------------------------------------------------------
    def build(
        self, slot: Path, items: Sequence[tuple[str, str, str]], base: str | None = None
    ) -> Candidate:
        """Build a merge candidate in a scratch worktree (slot): base, then every branch of the
        (task id, title, branch) items merged --no-ff in order, those that conflict left out.

        base None means the integration tip, read under the integration lock. The slot is
        made on first use, detached; nothing but HEAD there moves, no branch does.
        """
        path = self.scratch(slot)
        with self._locked(self._slot_lock(path)):
            notes = self._clear_stale_lock(path)
            if base is None:
                with self._locked():
                    base = self._views.rev(f"refs/heads/{self.integration}")
                    if base is None:
                        raise GitError(f"{self.root} has no branch {self.integration}")
            fmt, where = "--format=%(refname)", "refs/heads/multibot/"
            listed = git_out(self.root, "for-each-ref", fmt, "--merged", base, where)
            merged = {ref.removeprefix("refs/heads/") for ref in listed.splitlines()}
            merges: list[tuple[str, str | None]] = []
            conflicts: list[MergeOutcome] = []
            commit, placed = base, False
            for task_id, title, branch in items:
                task_id, branch = check_id(task_id, "task id"), check_branch(branch)
                if branch in merged:  # in already (a task that changed nothing, or landed)
                    merges.append((task_id, None))
                    continue
                if self._views.rev(f"refs/heads/{branch}") is None:
                    gone = f"branch {branch} does not exist (deleted by hand?)"
                    conflicts.append(MergeOutcome("missing", task_id, branch, None, (), gone))
                    continue
                if not placed:  # the first merge: the slot goes to the base first
                    self._put_slot(path, base)
                    self._clean_at.pop(path, None)  # until this build ends
                    placed = True
                message = _message(task_id, title)
                output, found = self._try_merge(path, f"refs/heads/{branch}", message)
                if found:
                    conflicts.append(MergeOutcome("conflict", task_id, branch, None, found, output))
                else:
                    commit = git_out(path, "rev-parse", "HEAD")
                    merges.append((task_id, commit))
            if placed:  # clean at the candidate (a conflict's merge was aborted)
                self._clean_at[path] = commit
        return Candidate(base, commit, tuple(merges), tuple(conflicts), notes)

    def scratch(self, slot: Path) -> Path:
        """Return the path of a scratch worktree (where candidates are built and tasks
        verified), made detached at the tip, with the setup hook, on first use."""
        path = self._abs(slot)
        if path in self._slots and (path / ".git").exists():
            return path  # seen as a worktree by this object, and still there
        with self._locked(self._slot_lock(path)):
            if self._find(path) is None:
                self._add_worktree(path, self._integration_tip())
        self._slots.add(path)
        return path

    def check(
        self,
        slot: Path,
        command: str,
        timeout: float | None,
        running: set[subprocess.Popen[bytes]] | None = None,
    ) -> tuple[int, str]:
        """Run a check command in a slot (its process group killed at timeout; running holds
        the process while it runs, for the caller to stop it)."""
        path = self.scratch(slot)
        self._clean_at.pop(path, None)  # the check may leave anything there
        return run_shell(command, path, timeout, running)

    def check_out(self, slot: Path, commit: str) -> tuple[str, ...]:
        """Put a scratch worktree (made on first use) exactly at commit, detached and clean;
        return notes on what had to be mended (a stale lock)."""
        path = self.scratch(slot)
        with self._locked(self._slot_lock(path)):
            notes = self._clear_stale_lock(path)
            self._put_slot(path, self._rev(commit))
            self._clean_at.pop(path, None)  # what runs there next may leave anything
        return notes

    def land(self, commit: str, base: str, what: str = "") -> bool:
        """Move the integration branch from base to commit, a candidate built on base; return
        False if it points at commit already (landed before a restart).

        Raises MergeBlocked, and changes nothing, when the branch moved from base (a commit
        a person added: the candidate is built again on it, so the commit stays), when it is
        checked out somewhere, or when its ref is locked.
        """
        ref = f"refs/heads/{self.integration}"
        with self._locked():
            tip = self._views.rev(ref)
            if tip is None:
                raise GitError(f"{self.root} has no branch {self.integration}")
            if tip == commit:
                return False
            if tip != base:
                raise MergeBlocked(
                    "moved",
                    f"{self.integration} moved to {tip[:12]} while a candidate was built on "
                    f"{base[:12]}; the queue builds it again on the new tip",
                )
            if run_git(self.root, "merge-base", "--is-ancestor", base, commit, check=False)[0]:
                raise GitError(f"candidate {commit[:12]} does not descend from {base[:12]}")
            holder = self._holder(self.integration)
            if holder is not None:
                # Moving a branch checked out somewhere would leave that checkout out of step.
                raise MergeBlocked(
                    "checked-out",
                    f"{self.integration} is checked out in {holder}; the queue waits until "
                    "that checkout switches to another branch",
                )
            message = f"multibot: land {what or commit[:12]}"
            code, _, err = run_git(
                self.root, "update-ref", "-m", message, ref, commit, base, check=False
            )
            if code != 0:
                kind = "locked" if "lock" in err else "moved"
                raise MergeBlocked(kind, f"{self.integration} could not be moved: {err.strip()}")
        return True

    def merge(
        self, task_id: str, title: str, branch: str | None = None, verify_cmd: str | None = None
    ) -> MergeOutcome:
        """Merge one task branch into integration (--no-ff) in the integration worktree,
        check it, and move the branch only if the check passed; say what happened."""
        task_id = check_id(task_id, "task id")
        branch = self.branch_for(task_id) if branch is None else check_branch(branch)
        self._require_branch(branch)
        if not self._unmerged(self.root, f"refs/heads/{branch}"):
            return MergeOutcome("nothing", task_id, branch, None, (), "already merged")
        wt = self.integration_worktree
        candidate = self.build(wt, [(task_id, title, branch)])
        if candidate.conflicts:
            return candidate.conflicts[0]
        output = ""
        if verify_cmd:
            vcode, output = self.check(wt, verify_cmd, self.command_timeout)
            if vcode != 0:
                with self._locked():
                    self._reset_integration(candidate.base)  # as it was: nothing merged
                report = f"verify command {verify_cmd!r} exited {vcode}:\n{output}"
                return MergeOutcome("verify_failed", task_id, branch, None, (), report)
        self.land(candidate.commit, candidate.base, task_id)
        return MergeOutcome("merged", task_id, branch, candidate.commit, (), output)

    def recover(self) -> Recovery:
        """Undo a merge a crash left in the integration worktree; say what was done."""
        actions: list[str] = []
        interrupted: list[str] = []
        with self._locked():
            pruned = "".join(self._admin_git(self.root, "worktree", "prune", "-v")[1:]).strip()
            if pruned:
                actions.append(f"pruned stale worktree entries: {pruned}")
            wt = self.integration_worktree
            if self._find(wt) is None or not self._branch_exists(self.integration):
                return Recovery(tuple(actions), ())
            gitdir = Path(git_out(wt, "rev-parse", "--absolute-git-dir"))
            # Only multibot works in this worktree and we hold its lock: an index.lock left
            # here belongs to a git killed mid-command, and would block every later command.
            stale = gitdir / "index.lock"
            if stale.exists():
                stale.unlink()
                actions.append(f"removed stale {stale}")
            tip = self._integration_tip()
            merge_head = gitdir / "MERGE_HEAD"
            if merge_head.exists():
                shas = merge_head.read_text().split()
                names = [b for sha in shas for b in self._branches_at(sha)]
                interrupted += names
                actions.append(f"aborted an interrupted merge of {', '.join(names or shas)}")
            elif git_out(wt, "ls-files", "--unmerged"):
                actions.append("cleared unmerged index entries")
            head = git_out(wt, "rev-parse", "HEAD")
            if head != tip and self._unmerged(wt, head):
                parents = git_out(wt, "rev-list", "--parents", "-n", "1", head).split()[1:]
                names = [b for sha in parents[1:] for b in self._branches_at(sha)]
                interrupted += names
                what = f" of {', '.join(names)}" if names else ""
                actions.append(f"dropped unverified merge {head[:12]}{what}")
            if uncommitted(wt) and not actions:
                actions.append(f"discarded stray changes in {wt}")
            self._reset_integration(tip)
        return Recovery(tuple(actions), tuple(dict.fromkeys(interrupted)))


def _message(task_id: str, title: str) -> str:
    title = " ".join(title.split())
    return f"multibot: merge task {task_id}" + (f" ({title})" if title else "")
