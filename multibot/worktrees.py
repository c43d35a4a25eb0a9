"""The git layer: an integration branch, a worktree per worker, a branch per task, verified merges.

The only module that imports GitPython. Merges happen in a dedicated integration worktree whose
HEAD is kept *detached*: a task branch is merged there, the verify command runs, and only then is
the integration branch moved, by compare-and-swap (``git update-ref <new> <old>``). So the
integration branch only ever points at verified commits: a task started during a verify, or a
crash in the middle of one, never sees an unverified merge, and undoing a failed merge is a reset
of our own worktree. The user's checkout and branches are never touched unless merge_into is called.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import filelock
import git
from git import exc as git_exc

from multibot import procs
from multibot.atomic import no_links
from multibot.errors import GitError, InvalidId, LockTimeout, MergeBlocked
from multibot.ids import check_branch, check_id

TASK_PREFIX = "multibot/"
DEFAULT_INTEGRATION = "multibot/integration"
_IDENTITY = {"name": "multibot", "email": "multibot@localhost"}
_MAX_OUTPUT = 64 * 1024


class Conflict(NamedTuple):
    """One conflicting file: both sides' content (None where that side deleted the file)."""

    path: str
    ours: str | None  # the integration branch
    theirs: str | None  # the task branch


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


@dataclass(frozen=True)
class TaskStart:
    """The branch a task was given, and the commit it was made at (None if it existed already)."""

    branch: str
    start: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A worktree as one `git status` sees it."""

    head: str | None  # the commit HEAD points at; None before a first commit
    branch: str | None  # short name; None when detached
    dirty: tuple[str, ...]  # changed, staged or untracked (not ignored) paths


@dataclass(frozen=True)
class _Worktree:
    path: Path
    head: str | None
    branch: str | None  # short name; None when detached


def task_id_of(branch: str) -> str | None:
    """Return the task id a multibot task branch belongs to, or None."""
    if not branch.startswith(TASK_PREFIX):
        return None
    rest = branch[len(TASK_PREFIX) :]
    try:
        return check_id(rest)
    except InvalidId:
        return None


def _exe() -> str:
    return git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git"


def _git(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True
) -> tuple[int, str, str]:
    """Run git in cwd; return (exit code, stdout, stderr); raise GitError on failure if check."""
    try:
        code, out, err = git.Git(str(cwd)).execute(
            [_exe(), *args],
            with_extended_output=True,
            with_exceptions=False,
            env=env,
            strip_newline_in_stdout=False,
        )
    except (git_exc.GitError, OSError) as e:
        raise GitError(f"git {' '.join(args)} in {cwd}: {e}") from e
    if check and code != 0:
        said = (err.strip() or out.strip())[-2000:]
        raise GitError(f"git {' '.join(args)} failed in {cwd} (exit {code}): {said}")
    return code, out, err


def _out(cwd: Path, *args: str) -> str:
    """Run git in cwd and return its stdout stripped."""
    return _git(cwd, *args)[1].strip()


def _blob(cwd: Path, sha: str) -> str:
    """Return a blob's content as text (undecodable bytes replaced)."""
    try:
        data = git.Git(str(cwd)).execute(
            [_exe(), "cat-file", "blob", sha],
            stdout_as_string=False,
            strip_newline_in_stdout=False,
        )
    except git_exc.GitError as e:
        raise GitError(f"cannot read blob {sha} in {cwd}: {e}") from e
    return data.decode("utf-8", errors="replace")


def _tail(text: str) -> str:
    """Keep the end of a long output (where test runners print their summary)."""
    if len(text) <= _MAX_OUTPUT:
        return text
    return f"[... {len(text) - _MAX_OUTPUT} characters cut]\n" + text[-_MAX_OUTPUT:]


def run_shell(
    command: str,
    cwd: Path,
    timeout: float | None,
    running: set[subprocess.Popen[bytes]] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Run a shell command in cwd in its own process group; return (exit code, output).

    running, if given, holds the process while it runs (see GitRepo.stop_hooks); env is
    added to this process's environment.
    """
    proc = subprocess.Popen(
        command,
        shell=True,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if running is not None:
        running.add(proc)
    try:
        return _finish_shell(proc, timeout)
    finally:
        if running is not None:
            running.discard(proc)


def _finish_shell(proc: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Kill the whole group: children of a test runner would otherwise keep the pipe open.
        # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        text = out.decode("utf-8", errors="replace")
        return -signal.SIGKILL, _tail(text + f"\n[killed: timed out after {timeout:g}s]")
    return proc.returncode, _tail(out.decode("utf-8", errors="replace"))


# -- work inside one worktree: what a worker process calls, knowing only its folder ---------
def commit_all(worktree: Path, message: str) -> str | None:
    """Commit every change (untracked too, .gitignore respected); return the sha or None."""
    if not message.strip():
        raise GitError("a commit needs a message")
    if _git(worktree, "symbolic-ref", "--quiet", "HEAD", check=False)[0] != 0:
        raise GitError(f"{worktree} is not on a branch (detached HEAD); nothing was committed")
    _git(worktree, "add", "--all")
    code, _, err = _git(worktree, "diff", "--cached", "--quiet", check=False)
    if code not in (0, 1):
        raise GitError(f"git diff --cached failed in {worktree}: {err.strip()}")
    # A resolved merge whose result equals HEAD has no diff but must still be committed,
    # or the branch would conflict with the integration branch again.
    gitdir = Path(_out(worktree, "rev-parse", "--absolute-git-dir"))
    if code == 0 and not (gitdir / "MERGE_HEAD").exists():
        return None
    _git(worktree, "commit", "--quiet", "--no-edit", "-m", message, env=identity_env(worktree))
    return head_commit(worktree)


def head_commit(worktree: Path) -> str:
    """Return the sha HEAD points at in worktree."""
    return _out(worktree, "rev-parse", "--verify", "HEAD^{commit}")


def has_uncommitted(worktree: Path) -> bool:
    """Return True if worktree has changes or untracked files not ignored."""
    return bool(_uncommitted(worktree))


def changed_files(worktree: Path, base: str) -> list[str]:
    """Return the files HEAD in worktree changed since its merge-base with branch base."""
    span = f"refs/heads/{check_branch(base)}...HEAD"
    out = _git(worktree, "diff", "--name-only", "-z", span)[1]
    return [p for p in out.split("\0") if p]


# Fields before the path in `git status --porcelain=v2` records, by record kind.
_STATUS_FIELDS = {"1": 7, "2": 8, "u": 9, "?": 0}


_LOOK_ONLY = {"GIT_OPTIONAL_LOCKS": "0"}


def snapshot(worktree: Path) -> Snapshot:
    """Return HEAD, branch and uncommitted paths of worktree, from one `git status`."""
    # A look, not a change: without optional locks git does not rewrite the index to note
    # the file times it saw. That rewrite freed a file and cost a third of the call.
    out = _git(worktree, "status", "--porcelain=v2", "--branch", "-z", env=_LOOK_ONLY)[1]
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
        gitdir = _dirs(worktree)[0]
    except GitError:  # not the top of a worktree: let commit_all look at it
        return None
    # A resolved merge whose result equals HEAD shows no change but must still be committed.
    return None if (gitdir / "MERGE_HEAD").exists() else now.head


_DIRS: dict[tuple[Path, int, int], tuple[Path, Path]] = {}


def _dirs(worktree: Path) -> tuple[Path, Path]:
    """Return the git dir and common git dir of the worktree whose top is worktree (no git run)."""
    # Asked twice per task: remembered for as long as the worktree's .git stays the same file.
    try:
        st = os.stat(worktree / ".git")
    except OSError as e:
        raise GitError(f"{worktree} is not the top of a git worktree: {e.strerror}") from e
    key = (worktree, st.st_ino, st.st_mtime_ns)
    if key not in _DIRS:
        _DIRS[key] = _find_dirs(worktree)
    return _DIRS[key]


def _find_dirs(worktree: Path) -> tuple[Path, Path]:
    try:
        repo = git.Repo(worktree)
    except (git_exc.GitError, OSError) as e:
        raise GitError(f"{worktree} is not the top of a git worktree: {e}") from e
    try:
        return Path(repo.git_dir).resolve(), Path(repo.common_dir).resolve()
    finally:
        repo.close()


def clear_stale_lock(worktree: Path) -> str | None:
    """Remove the index.lock of a worktree that no live git process works in; say so.

    For a worktree that one process owns (a worker's, or one of the master's): a git killed
    mid-command (a SIGKILL during `git add` of a big tree) leaves the lock, and every later
    git command there fails on it. A git still running there keeps it.
    """
    try:
        lock = _dirs(worktree)[0] / "index.lock"
    except GitError:
        return None
    if not lock.exists() or procs.working_in(worktree.resolve(), "git"):
        return None
    lock.unlink(missing_ok=True)
    return f"removed a stale {lock} (no git process runs in {worktree})"


def _uncommitted(worktree: Path) -> list[str]:
    return list(snapshot(worktree).dirty)


def identity_env(cwd: Path) -> dict[str, str]:
    """Return env giving commits an identity when neither config nor env has one."""
    env: dict[str, str] = {}
    for key, default in _IDENTITY.items():
        if _git(cwd, "config", "--get", f"user.{key}", check=False)[1].strip():
            continue
        for who in ("AUTHOR", "COMMITTER"):
            var = f"GIT_{who}_{key.upper()}"
            if not os.environ.get(var):
                env[var] = default
    return env


def _open_repo(path: Path) -> Path:
    """Return the top folder of the repository at path, or raise a GitError saying what is wrong."""
    path = path.expanduser()
    if not path.is_dir():
        raise GitError(f"{path}: no such folder; give the path of a git repository")
    try:
        repo = git.Repo(path, search_parent_directories=True)
    except git_exc.InvalidGitRepositoryError as e:
        raise GitError(f"{path}: not a git repository (run `git init` there first)") from e
    except git_exc.NoSuchPathError as e:
        raise GitError(f"{path}: no such folder") from e
    try:
        if repo.bare or repo.working_tree_dir is None:
            raise GitError(f"{path}: a bare repository; multibot needs one with a checkout")
        top = Path(repo.working_tree_dir).resolve()
    finally:
        repo.close()
    if top != path.resolve():
        raise GitError(f"{path}: inside the git repository {top}; give its top folder")
    if _git(top, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)[0] != 0:
        raise GitError(f"{path}: the repository has no commit yet; make a first commit")
    return top


class GitRepo:
    """One target repository: its integration branch, worker worktrees and merge queue."""

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
        self.root = _open_repo(Path(repo))
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
        self._views: dict[tuple[Path, Path], git.Repo] = {}  # GitPython's view of worker worktrees
        self._hooks: set[subprocess.Popen[bytes]] = set()  # setup hooks running (stop_hooks)
        # Scratch worktree -> the commit it is known to be clean at (builds skip a reset).
        self._clean_at: dict[Path, str] = {}
        self._slots: set[Path] = set()  # scratch worktrees known to exist

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
        out = _out(self.root, "for-each-ref", "--format=%(refname:short)", "refs/heads/multibot/")
        return [b for b in out.splitlines() if b and b != self.integration]

    # -- integration branch and worktrees ------------------------------------------------
    def ensure_integration(self, base: str | None = None) -> str:
        """Create the integration branch from base (default HEAD) and its worktree; return tip."""
        start = "HEAD" if base is None else check_branch(base)
        with self._locked():
            if not self._branch_exists(self.integration):
                _git(self.root, "branch", "--no-track", self.integration, self._rev(start))
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
        dirty = _uncommitted(path)
        if dirty:
            raise GitError(
                f"{path} has uncommitted changes ({_some(dirty)}); commit or remove them "
                f"before starting task {task_id}"
            )
        if current is not None and current.branch is None and self._unmerged(path, "HEAD"):
            raise GitError(f"{path} has commits on a detached HEAD that no branch holds")
        if self._branch_exists(branch):
            holder = self._holder(branch)
            if (
                holder is not None
                and holder != self.integration_worktree
                and not _uncommitted(holder)
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
            if _dirs(path)[1] != self._common_dir:  # a worktree of this repository, at its top
                return None
            if self._quick_rev(f"refs/heads/{branch}") is not None:
                return None  # the task comes back: its branch exists
            tip = self._quick_rev(f"refs/heads/{self.integration}")
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
            if _git(path, *switch, check=False)[0] != 0:
                return None  # e.g. the branch exists: nothing was changed
        return TaskStart(branch, tip)

    def _head_of(self, path: Path) -> tuple[str | None, str | None]:
        """Return (commit, branch) of a worktree's HEAD, read without git; Nones if detached."""
        repo = self._worktree_repo(path)
        try:
            ref = git.SymbolicReference(repo, "HEAD").reference.path
        except TypeError:  # a detached HEAD
            return None, None
        except (ValueError, OSError, git_exc.GitError) as e:
            raise GitError(f"cannot read HEAD of {path}: {e}") from e
        return self._quick_rev(ref), ref.removeprefix("refs/heads/")

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
        return _git(self.root, "diff", "--stat", "--patch", span)[1]

    def changed_files(self, branch: str) -> list[str]:
        """Return the files a branch changed since its merge-base with the integration branch."""
        branch = check_branch(branch)
        self._require_branch(branch)
        span = f"refs/heads/{self.integration}...refs/heads/{branch}"
        out = _git(self.root, "diff", "--name-only", "-z", span)[1]
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
                    base = self._quick_rev(f"refs/heads/{self.integration}")
                    if base is None:
                        raise GitError(f"{self.root} has no branch {self.integration}")
            fmt, where = "--format=%(refname)", "refs/heads/multibot/"
            listed = _out(self.root, "for-each-ref", fmt, "--merged", base, where)
            merged = {ref.removeprefix("refs/heads/") for ref in listed.splitlines()}
            merges: list[tuple[str, str | None]] = []
            conflicts: list[MergeOutcome] = []
            commit, placed = base, False
            for task_id, title, branch in items:
                task_id, branch = check_id(task_id, "task id"), check_branch(branch)
                if branch in merged:  # in already (a task that changed nothing, or landed)
                    merges.append((task_id, None))
                    continue
                if self._quick_rev(f"refs/heads/{branch}") is None:
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
                    commit = _out(path, "rev-parse", "HEAD")
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
            tip = self._quick_rev(ref)
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
            if _git(self.root, "merge-base", "--is-ancestor", base, commit, check=False)[0]:
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
            code, _, err = _git(
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
            gitdir = Path(_out(wt, "rev-parse", "--absolute-git-dir"))
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
            elif _out(wt, "ls-files", "--unmerged"):
                actions.append("cleared unmerged index entries")
            head = _out(wt, "rev-parse", "HEAD")
            if head != tip and self._unmerged(wt, head):
                parents = _out(wt, "rev-list", "--parents", "-n", "1", head).split()[1:]
                names = [b for sha in parents[1:] for b in self._branches_at(sha)]
                interrupted += names
                what = f" of {', '.join(names)}" if names else ""
                actions.append(f"dropped unverified merge {head[:12]}{what}")
            if _uncommitted(wt) and not actions:
                actions.append(f"discarded stray changes in {wt}")
            self._reset_integration(tip)
        return Recovery(tuple(actions), tuple(dict.fromkeys(interrupted)))

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
        dirty = _uncommitted(path)
        if dirty:
            reasons.append(f"uncommitted changes: {_some(dirty)}")
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
                dirty = _git(holder, "status", "--porcelain", "--untracked-files=no")[1]
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
                _git(self.root, "update-ref", "-m", message, ref, tip, old)
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
                new = _out(wt, "rev-parse", "HEAD")
                _git(self.root, "update-ref", "-m", message, ref, new, old)
            finally:
                self._reset_integration(tip)
            return Landing(target, "merge", new)

    # -- internals -------------------------------------------------------------------------
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
            return _git(cwd, *args, check=check)

    def _abs(self, path: Path) -> Path:
        path = Path(path).expanduser().resolve()
        if path == self.root or path.is_relative_to(self.root / ".git"):
            raise GitError(f"{path} cannot be a worker worktree of {self.root}")
        return path

    def _rev(self, rev: str) -> str:
        code, out, _ = _git(
            self.root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False
        )
        if code != 0:
            raise GitError(f"{rev!r} is not a commit in {self.root}")
        return out.strip()

    @functools.cached_property
    def _refs(self) -> git.Repo:
        """GitPython's view of the repository, kept to read refs without running git."""
        return git.Repo(self.root)

    def _worktree_repo(self, path: Path) -> git.Repo:
        """GitPython's view of one worktree (its HEAD), kept while its .git file stays the same."""
        key = (path, _dirs(path)[0])  # a worktree made again at path may have another git dir
        repo = self._views.get(key)
        if repo is None:
            try:
                repo = self._views[key] = git.Repo(path)
            except (git_exc.GitError, OSError) as e:
                raise GitError(f"{path} is not a git worktree: {e}") from e
        return repo

    @functools.cached_property
    def _common_dir(self) -> Path:
        return Path(self._refs.common_dir).resolve()

    def _quick_rev(self, ref: str) -> str | None:
        """Read a ref from its file (loose or packed) without running git; None if it is not."""
        try:
            return git.SymbolicReference.dereference_recursive(self._refs, ref)
        except ValueError:  # no such ref
            return None
        except (OSError, git_exc.GitError) as e:
            raise GitError(f"cannot read {ref} in {self.root}: {e}") from e

    def _integration_tip(self) -> str:
        if not self._branch_exists(self.integration):
            raise GitError(f"{self.root} has no branch {self.integration}; run ensure_integration")
        return self._rev(f"refs/heads/{self.integration}")

    def _branch_exists(self, branch: str) -> bool:
        ref = f"refs/heads/{branch}"
        return _git(self.root, "show-ref", "--verify", "--quiet", ref, check=False)[0] == 0

    def _require_branch(self, branch: str) -> None:
        if not self._branch_exists(branch):
            raise GitError(f"{self.root} has no branch {branch}")

    def _unmerged(self, cwd: Path, rev: str, into: str | None = None) -> int:
        """Count commits reachable from rev but not from `into` (default: integration)."""
        into = into or f"refs/heads/{self.integration}"
        return int(_out(cwd, "rev-list", "--count", rev, "--not", into))

    def _worktrees(self) -> list[_Worktree]:
        """List live worktrees, after pruning entries whose folder is gone."""
        with self._locked(self._admin):
            listing = _out(self.root, "worktree", "list", "--porcelain")
            paths = [ln[9:] for ln in listing.splitlines() if ln.startswith("worktree ")]
            if not all(Path(p).is_dir() for p in paths):  # prune only when there is a stale one
                _git(self.root, "worktree", "prune")
                listing = _out(self.root, "worktree", "list", "--porcelain")
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
        code, out, _ = _git(self.root, "for-each-ref", fmt, "--contains", sha, where, check=False)
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
            _git(path, "checkout", "--quiet", "--detach", commit)
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
        _git(wt, "merge", "--abort", check=False)
        _git(wt, "reset", "--quiet", "--hard")  # HEAD only: never moves a branch
        _git(wt, "checkout", "--quiet", "--detach", commit)
        _git(wt, "clean", "--quiet", "-fd")

    def _try_merge(
        self, cwd: Path, rev: str, message: str, ff: str = "--no-ff"
    ) -> tuple[str, tuple[Conflict, ...]]:
        """Merge rev in cwd; on a conflict abort it and return the conflicts with the output."""
        code, out, err = _git(
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
        output = _tail((out + err).strip())
        if code == 0:
            return output, ()
        conflicts = self._conflicts(cwd)
        _git(cwd, "merge", "--abort", check=False)
        if not conflicts:
            raise GitError(f"git merge {rev} failed in {cwd}: {output[-2000:]}")
        return output, conflicts

    def _conflicts(self, cwd: Path) -> tuple[Conflict, ...]:
        """Return the unmerged files of an in-progress merge with ours and theirs content."""
        sides: dict[str, dict[str, str]] = {}
        for entry in _git(cwd, "ls-files", "--unmerged", "-z")[1].split("\0"):
            if not entry:
                continue
            info, _, path = entry.partition("\t")
            mode, sha, stage = info.split()
            content = f"Subproject commit {sha}\n" if mode == "160000" else _blob(cwd, sha)
            sides.setdefault(path, {})[stage] = content
        return tuple(Conflict(p, s.get("2"), s.get("3")) for p, s in sorted(sides.items()))


def _message(task_id: str, title: str) -> str:
    title = " ".join(title.split())
    return f"multibot: merge task {task_id}" + (f" ({title})" if title else "")


def _some(paths: list[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _landing_failed(target: str, conflicts: tuple[Conflict, ...]) -> str:
    files = ", ".join(c.path for c in conflicts)
    return f"could not merge into {target} (conflicts in {files}); {target} was left as it was"
