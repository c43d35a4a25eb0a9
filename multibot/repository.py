"""Under GitRepo: locks, refs, the worktree list, resets and merges in a worktree; and what
touches more than multibot's own branches: cleanup, and landing in the user's branch.

Everything here is internal to the git layer (``worktrees.GitRepo`` is its face). The locks
are always taken in one order: the integration worktree's, then a scratch worktree's, then
the worktree list's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import filelock

from multibot.atomic import no_links
from multibot.checkout import clear_stale_lock, identity_env, uncommitted
from multibot.commands import run_shell, tail
from multibot.errors import GitError, LockTimeout
from multibot.gitcmd import Views, git_out, open_top, read_blob, run_git
from multibot.ids import check_branch

TASK_PREFIX = "multibot/"
DEFAULT_INTEGRATION = "multibot/integration"


class Conflict(NamedTuple):
    """One conflicting file: both sides' content (None where that side deleted the file)."""

    path: str
    ours: str | None  # the integration branch
    theirs: str | None  # the task branch


@dataclass(frozen=True)
class _Worktree:
    path: Path
    head: str | None
    branch: str | None  # short name; None when detached


@dataclass(frozen=True)
class Refusal:
    """A worktree cleanup kept, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Landing:
    """How merge_into moved the user's branch, and where it points now."""

    target: str
    how: Literal["up-to-date", "fast-forward", "merge"]
    commit: str

    def __str__(self) -> str:
        return f"{self.target}: {self.how} at {self.commit[:12]}"


class Repository:
    """One target repository's plumbing (see the module's docstring)."""

    def __init__(
        self,
        repo: Path,
        integration_worktree: Path,
        *,
        integration_branch: str = DEFAULT_INTEGRATION,
        setup_hook: str | None = None,
        hook_env: Mapping[str, str] | None = None,
        command_timeout: float | None = 3600.0,
        lock_timeout: float = 600.0,
    ) -> None:
        self.integration = check_branch(integration_branch)
        self.root = open_top(Path(repo))
        self.integration_worktree = Path(integration_worktree).expanduser().resolve()
        self.setup_hook = setup_hook or None
        self.hook_env = dict(hook_env or {})  # marks the hook's processes as whose they are
        self.command_timeout = command_timeout
        folder = self.integration_worktree.parent
        self._lock_timeout = lock_timeout
        # Guards the integration worktree: merges, recovery, landing, cleanup.
        self._lock = filelock.FileLock(folder / f".{self.integration_worktree.name}.lock")
        # Guards the repository's worktree list: concurrent `git worktree add` runs read each
        # other's half-written entries ("failed to read .git/worktrees/w0/commondir").
        self._admin = filelock.FileLock(folder / ".git-worktrees.lock")
        self._worktree_locks: dict[Path, filelock.FileLock] = {}
        self._views = Views(self.root)  # refs and HEADs read without running git
        self._hooks: set[subprocess.Popen[bytes]] = set()  # setup hooks running (stop_hooks)
        # Scratch worktree -> the commit it is known to be clean at (builds skip a reset).
        self._clean_at: dict[Path, str] = {}
        self._slots: set[Path] = set()  # scratch worktrees known to exist

    @contextmanager
    def _locked(self, lock: filelock.FileLock | None = None) -> Iterator[None]:
        """Hold the integration lock (or the given one); always taken in that order."""
        lock = lock or self._lock
        path = Path(lock.lock_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Held for a git command or a few: poll often (the default waits 50 ms a look).
            with no_links(path):  # filelock opens it without following links
                lock.acquire(timeout=self._lock_timeout, poll_interval=0.002)
        except filelock.Timeout as e:
            raise LockTimeout(path, None, self._lock_timeout) from e
        try:
            yield
        finally:
            lock.release()

    def _worktree_lock(self, path: Path) -> filelock.FileLock:
        """Return the lock of changes to one worktree's HEAD made by others than its worker."""
        lock = self._worktree_locks.get(path)
        if lock is None:
            lock = self._worktree_locks[path] = filelock.FileLock(
                path.parent / f".{path.name}.lock"
            )
        return lock

    def _admin_git(self, cwd: Path, *args: str, check: bool = True) -> tuple[int, str, str]:
        """Run a git command that reads or changes the worktree list, one at a time."""
        with self._locked(self._admin):
            return run_git(cwd, *args, check=check)

    def _abs(self, path: Path) -> Path:
        path = Path(path).expanduser().resolve()
        if path == self.root or path.is_relative_to(self.root / ".git"):
            raise GitError(f"{path} cannot be a worker worktree of {self.root}")
        return path

    def _rev(self, rev: str) -> str:
        code, out, _ = run_git(
            self.root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False
        )
        if code != 0:
            raise GitError(f"{rev!r} is not a commit in {self.root}")
        return out.strip()

    def _integration_tip(self) -> str:
        if not self._branch_exists(self.integration):
            raise GitError(f"{self.root} has no branch {self.integration}; run ensure_integration")
        return self._rev(f"refs/heads/{self.integration}")

    def _branch_exists(self, branch: str) -> bool:
        ref = f"refs/heads/{branch}"
        return run_git(self.root, "show-ref", "--verify", "--quiet", ref, check=False)[0] == 0

    def _require_branch(self, branch: str) -> None:
        if not self._branch_exists(branch):
            raise GitError(f"{self.root} has no branch {branch}")

    def _unmerged(self, cwd: Path, rev: str, into: str | None = None) -> int:
        """Count commits reachable from rev but not from `into` (default: integration)."""
        into = into or f"refs/heads/{self.integration}"
        return int(git_out(cwd, "rev-list", "--count", rev, "--not", into))

    def _worktrees(self) -> list[_Worktree]:
        """List live worktrees, after pruning entries whose folder is gone."""
        with self._locked(self._admin):
            listing = git_out(self.root, "worktree", "list", "--porcelain")
            paths = [ln[9:] for ln in listing.splitlines() if ln.startswith("worktree ")]
            if not all(Path(p).is_dir() for p in paths):  # prune only when there is a stale one
                run_git(self.root, "worktree", "prune")
                listing = git_out(self.root, "worktree", "list", "--porcelain")
        result = []
        for block in listing.split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, _, value = line.partition(" ")
                fields[key] = value
            if "worktree" in fields and Path(fields["worktree"]).is_dir():
                branch = fields.get("branch")
                result.append(
                    _Worktree(
                        Path(fields["worktree"]).resolve(),
                        fields.get("HEAD"),
                        branch.removeprefix("refs/heads/") if branch else None,
                    )
                )
        return result

    def _find(self, path: Path) -> _Worktree | None:
        return next((w for w in self._worktrees() if w.path == path), None)

    def _holder(self, branch: str) -> Path | None:
        return next((w.path for w in self._worktrees() if w.branch == branch), None)

    def _branches_at(self, sha: str) -> list[str]:
        """Return the task branches that contain commit sha (none if sha is not a commit)."""
        fmt, where = "--format=%(refname:short)", "refs/heads/multibot/"
        code, out, _ = run_git(
            self.root, "for-each-ref", fmt, "--contains", sha, where, check=False
        )
        return [b for b in out.splitlines() if b and b != self.integration] if code == 0 else []

    def _add_worktree(self, path: Path, commit: str) -> None:
        if path.exists() and any(path.iterdir()):
            raise GitError(f"{path} exists and is not a worktree of {self.root}; move it away")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._admin_git(self.root, "worktree", "add", "--quiet", "--detach", str(path), commit)
        if self.setup_hook:
            code, output = run_shell(
                self.setup_hook, path, self.command_timeout, self._hooks, self.hook_env
            )
            if code != 0:
                # Remove the new worktree so the next attempt runs the hook again.
                remove = ("worktree", "remove", "--force", str(path))
                if self._admin_git(self.root, *remove, check=False)[0]:
                    shutil.rmtree(path, ignore_errors=True)
                    self._admin_git(self.root, "worktree", "prune", check=False)
                raise GitError(
                    f"setup hook {self.setup_hook!r} failed in {path} (exit {code}):\n{output}"
                )

    def _ensure_integration_worktree(self) -> None:
        if self._find(self.integration_worktree) is None:
            self._add_worktree(self.integration_worktree, self._integration_tip())

    def _slot_lock(self, path: Path) -> filelock.FileLock:
        """The lock of a scratch worktree: the integration lock for the integration worktree
        (one file, so one object: a second lock object on it would wait for the first)."""
        return self._lock if path == self.integration_worktree else self._worktree_lock(path)

    def _put_slot(self, path: Path, commit: str) -> None:
        """Put a scratch worktree at commit: a checkout when it is known clean, else a reset."""
        clean = self._clean_at.get(path)
        if clean == commit:
            return
        if clean is not None:
            run_git(path, "checkout", "--quiet", "--detach", commit)
        else:
            self._reset_worktree(path, commit)
        self._clean_at[path] = commit

    def _clear_stale_lock(self, path: Path) -> tuple[str, ...]:
        """Remove an index.lock in a scratch worktree that no live git holds; say so."""
        note = clear_stale_lock(path)
        if note is None:
            return ()
        self._clean_at.pop(path, None)
        return (note,)

    def _reset_integration(self, commit: str) -> None:
        self._reset_worktree(self.integration_worktree, commit)
        self._clean_at[self.integration_worktree] = commit

    def _reset_worktree(self, wt: Path, commit: str) -> None:
        """Put a scratch worktree, detached, exactly at commit, dropping any merge state."""
        run_git(wt, "merge", "--abort", check=False)
        run_git(wt, "reset", "--quiet", "--hard")  # HEAD only: never moves a branch
        run_git(wt, "checkout", "--quiet", "--detach", commit)
        run_git(wt, "clean", "--quiet", "-fd")

    def _try_merge(
        self, cwd: Path, rev: str, message: str, ff: str = "--no-ff"
    ) -> tuple[str, tuple[Conflict, ...]]:
        """Merge rev in cwd; on a conflict abort it and return the conflicts with the output."""
        code, out, err = run_git(
            cwd,
            "merge",
            ff,
            "--no-edit",
            "-m",
            message,
            rev,
            env=identity_env(self.root),
            check=False,
        )
        output = tail((out + err).strip())
        if code == 0:
            return output, ()
        conflicts = self._conflicts(cwd)
        run_git(cwd, "merge", "--abort", check=False)
        if not conflicts:
            raise GitError(f"git merge {rev} failed in {cwd}: {output[-2000:]}")
        return output, conflicts

    def _conflicts(self, cwd: Path) -> tuple[Conflict, ...]:
        """Return the unmerged files of an in-progress merge with ours and theirs content."""
        sides: dict[str, dict[str, str]] = {}
        for entry in run_git(cwd, "ls-files", "--unmerged", "-z")[1].split("\0"):
            if not entry:
                continue
            info, _, path = entry.partition("\t")
            mode, sha, stage = info.split()
            content = f"Subproject commit {sha}\n" if mode == "160000" else read_blob(cwd, sha)
            sides.setdefault(path, {})[stage] = content
        return tuple(Conflict(p, s.get("2"), s.get("3")) for p, s in sorted(sides.items()))

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self, worktree_paths: Iterable[Path], force: bool = False) -> list[Refusal]:
        """Remove worktrees that are clean and fully merged (any with force); return the kept."""
        refused: list[Refusal] = []
        with self._locked():  # never pull the integration worktree from under a merge
            for path in map(self._abs, worktree_paths):
                reason = self._why_keep(path, force)
                if reason:
                    refused.append(Refusal(path, reason))
                elif self._find(path) is not None:
                    flags = ["--force"] if force else []
                    self._admin_git(self.root, "worktree", "remove", *flags, str(path))
        return refused

    def _why_keep(self, path: Path, force: bool) -> str | None:
        """Return why the worktree at path must not be removed, or None."""
        wt = self._find(path)
        if wt is None:
            return f"not a worktree of {self.root}" if path.exists() else None
        if force:
            return None
        reasons = []
        dirty = uncommitted(path)
        if dirty:
            reasons.append(f"uncommitted changes: {some_paths(dirty)}")
        ahead = self._unmerged(path, "HEAD")
        if ahead:
            on = wt.branch or "a detached HEAD"
            reasons.append(f"{ahead} commit(s) on {on} not merged into {self.integration}")
        return "; ".join(reasons) or None

    def delete_branch(self, branch: str, force: bool = False) -> None:
        """Delete a branch whose work is merged into integration (any branch with force)."""
        branch = check_branch(branch)
        if branch == self.integration and not force:
            raise GitError(f"refusing to delete the integration branch {branch} without force")
        self._require_branch(branch)
        ahead = self._unmerged(self.root, f"refs/heads/{branch}")
        if ahead and not force:
            raise GitError(f"{branch} has {ahead} commit(s) not merged into {self.integration}")
        holder = self._holder(branch)
        if holder is not None:
            raise GitError(f"{branch} is checked out in {holder}; remove that worktree first")
        self._admin_git(self.root, "branch", "--quiet", "-D", branch)

    # -- landing in the user's branch -------------------------------------------------------
    def merge_into(self, target: str) -> Landing:
        """Bring the integration branch into the user's branch (fast-forward, else a merge)."""
        target = check_branch(target)
        if target == self.integration:
            raise GitError(f"{target} is the integration branch itself")
        self._require_branch(target)
        message = f"multibot: merge {self.integration} into {target}"
        ref = f"refs/heads/{target}"
        with self._locked():
            tip, old = self._integration_tip(), self._rev(ref)
            if not self._unmerged(self.root, tip, ref):
                return Landing(target, "up-to-date", old)
            holder = self._holder(target)
            if holder is not None:
                # Checked out: update it there, but only if no tracked file is modified.
                dirty = run_git(holder, "status", "--porcelain", "--untracked-files=no")[1]
                if dirty.strip():
                    raise GitError(
                        f"{target} is checked out in {holder} with uncommitted changes; "
                        "commit or stash them, then ask again"
                    )
                integration = f"refs/heads/{self.integration}"
                _, conflicts = self._try_merge(holder, integration, message, "--ff")
                if conflicts:
                    raise GitError(_landing_failed(target, conflicts))
                new = self._rev(ref)
                return Landing(target, "fast-forward" if new == tip else "merge", new)
            if not self._unmerged(self.root, old, tip):
                run_git(self.root, "update-ref", "-m", message, ref, tip, old)
                return Landing(target, "fast-forward", tip)
            # Diverged and not checked out: merge on the detached integration worktree, then
            # move the target by compare-and-swap, so no checkout of the user's is involved.
            wt = self.integration_worktree
            self._ensure_integration_worktree()
            self._reset_integration(old)
            try:
                _, conflicts = self._try_merge(wt, f"refs/heads/{self.integration}", message)
                if conflicts:
                    raise GitError(_landing_failed(target, conflicts))
                new = git_out(wt, "rev-parse", "HEAD")
                run_git(self.root, "update-ref", "-m", message, ref, new, old)
            finally:
                self._reset_integration(tip)
            return Landing(target, "merge", new)


def some_paths(paths: list[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _landing_failed(target: str, conflicts: tuple[Conflict, ...]) -> str:
    files = ", ".join(c.path for c in conflicts)
    return f"could not merge into {target} (conflicts in {files}); {target} was left as it was"
