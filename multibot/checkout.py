"""One worktree seen from inside: what a worker process calls, knowing only its folder.

Commit everything, read HEAD and what is uncommitted in one `git status`, tell whether
there is anything to commit, clear a lock a killed git left, give commits an identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from multibot import procs
from multibot.errors import GitError
from multibot.gitcmd import find_dirs, git_out, run_git
from multibot.ids import check_branch

_IDENTITY = {"name": "multibot", "email": "multibot@localhost"}
# Fields before the path in `git status --porcelain=v2` records, by record kind.
_STATUS_FIELDS = {"1": 7, "2": 8, "u": 9, "?": 0}
_LOOK_ONLY = {"GIT_OPTIONAL_LOCKS": "0"}
_DIRS: dict[tuple[Path, int, int], tuple[Path, Path]] = {}


@dataclass(frozen=True)
class Snapshot:
    """A worktree as one `git status` sees it."""

    head: str | None  # the commit HEAD points at; None before a first commit
    branch: str | None  # short name; None when detached
    dirty: tuple[str, ...]  # changed, staged or untracked (not ignored) paths


def commit_all(worktree: Path, message: str) -> str | None:
    """Commit every change (untracked too, .gitignore respected); return the sha or None."""
    if not message.strip():
        raise GitError("a commit needs a message")
    if run_git(worktree, "symbolic-ref", "--quiet", "HEAD", check=False)[0] != 0:
        raise GitError(f"{worktree} is not on a branch (detached HEAD); nothing was committed")
    run_git(worktree, "add", "--all")
    code, _, err = run_git(worktree, "diff", "--cached", "--quiet", check=False)
    if code not in (0, 1):
        raise GitError(f"git diff --cached failed in {worktree}: {err.strip()}")
    # A resolved merge whose result equals HEAD has no diff but must still be committed,
    # or the branch would conflict with the integration branch again.
    gitdir = Path(git_out(worktree, "rev-parse", "--absolute-git-dir"))
    if code == 0 and not (gitdir / "MERGE_HEAD").exists():
        return None
    run_git(worktree, "commit", "--quiet", "--no-edit", "-m", message, env=identity_env(worktree))
    return head_commit(worktree)


def head_commit(worktree: Path) -> str:
    """Return the sha HEAD points at in worktree."""
    return git_out(worktree, "rev-parse", "--verify", "HEAD^{commit}")


def has_uncommitted(worktree: Path) -> bool:
    """Return True if worktree has changes or untracked files not ignored."""
    return bool(uncommitted(worktree))


def changed_files(worktree: Path, base: str) -> list[str]:
    """Return the files HEAD in worktree changed since its merge-base with branch base."""
    span = f"refs/heads/{check_branch(base)}...HEAD"
    out = run_git(worktree, "diff", "--name-only", "-z", span)[1]
    return [p for p in out.split("\0") if p]


def snapshot(worktree: Path) -> Snapshot:
    """Return HEAD, branch and uncommitted paths of worktree, from one `git status`."""
    # A look, not a change: without optional locks git does not rewrite the index to note
    # the file times it saw. That rewrite freed a file and cost a third of the call.
    out = run_git(worktree, "status", "--porcelain=v2", "--branch", "-z", env=_LOOK_ONLY)[1]
    head = branch = None
    dirty = []
    records = iter(out.split("\0"))
    for record in records:
        kind, _, rest = record.partition(" ")
        if kind == "#":
            key, _, value = rest.partition(" ")
            if key == "branch.oid" and value != "(initial)":
                head = value
            elif key == "branch.head" and value != "(detached)":
                branch = value
        elif kind in _STATUS_FIELDS:
            dirty.append(rest.split(" ", _STATUS_FIELDS[kind])[-1])
            if kind == "2":  # a rename or copy is followed by its source path
                next(records, None)
    return Snapshot(head, branch, tuple(dirty))


def settled(worktree: Path) -> str | None:
    """Return HEAD if worktree has nothing to commit (clean, on a branch, no merge), else None."""
    now = snapshot(worktree)
    if now.dirty or now.branch is None or now.head is None:
        return None
    try:
        gitdir = worktree_dirs(worktree)[0]
    except GitError:  # not the top of a worktree: let commit_all look at it
        return None
    # A resolved merge whose result equals HEAD shows no change but must still be committed.
    return None if (gitdir / "MERGE_HEAD").exists() else now.head


def worktree_dirs(worktree: Path) -> tuple[Path, Path]:
    """Return the git dir and common git dir of the worktree whose top is worktree (no git run)."""
    # Asked twice per task: remembered for as long as the worktree's .git stays the same file.
    try:
        st = os.stat(worktree / ".git")
    except OSError as e:
        raise GitError(f"{worktree} is not the top of a git worktree: {e.strerror}") from e
    key = (worktree, st.st_ino, st.st_mtime_ns)
    if key not in _DIRS:
        _DIRS[key] = find_dirs(worktree)
    return _DIRS[key]


def clear_stale_lock(worktree: Path) -> str | None:
    """Remove the index.lock of a worktree that no live git process works in; say so.

    For a worktree that one process owns (a worker's, or one of the master's): a git killed
    mid-command (a SIGKILL during `git add` of a big tree) leaves the lock, and every later
    git command there fails on it. A git still running there keeps it.
    """
    try:
        lock = worktree_dirs(worktree)[0] / "index.lock"
    except GitError:
        return None
    if not lock.exists() or procs.working_in(worktree.resolve(), "git"):
        return None
    lock.unlink(missing_ok=True)
    return f"removed a stale {lock} (no git process runs in {worktree})"


def uncommitted(worktree: Path) -> list[str]:
    return list(snapshot(worktree).dirty)


def identity_env(cwd: Path) -> dict[str, str]:
    """Return env giving commits an identity when neither config nor env has one."""
    env: dict[str, str] = {}
    for key, default in _IDENTITY.items():
        if run_git(cwd, "config", "--get", f"user.{key}", check=False)[1].strip():
            continue
        for who in ("AUTHOR", "COMMITTER"):
            var = f"GIT_{who}_{key.upper()}"
            if not os.environ.get(var):
                env[var] = default
    return env
