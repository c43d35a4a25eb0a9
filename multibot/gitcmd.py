"""Git itself, through GitPython: the one module that imports it.

Commands run with ``run_git`` (exit code, output, and a GitError that says what failed and
where); refs and HEADs are read from their files with ``Views``, without running git.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import git
from git import exc as git_exc

from multibot.errors import GitError


def exe() -> str:
    """The git executable GitPython runs."""
    return git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git"


def run_git(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True
) -> tuple[int, str, str]:
    """Run git in cwd; return (exit code, stdout, stderr); raise GitError on failure if check."""
    try:
        code, out, err = git.Git(str(cwd)).execute(
            [exe(), *args],
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


def git_out(cwd: Path, *args: str) -> str:
    """Run git in cwd and return its stdout stripped."""
    return run_git(cwd, *args)[1].strip()


def read_blob(cwd: Path, sha: str) -> str:
    """Return a blob's content as text (undecodable bytes replaced)."""
    try:
        data = git.Git(str(cwd)).execute(
            [exe(), "cat-file", "blob", sha],
            stdout_as_string=False,
            strip_newline_in_stdout=False,
        )
    except git_exc.GitError as e:
        raise GitError(f"cannot read blob {sha} in {cwd}: {e}") from e
    return data.decode("utf-8", errors="replace")


def open_top(path: Path) -> Path:
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
    if run_git(top, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)[0] != 0:
        raise GitError(f"{path}: the repository has no commit yet; make a first commit")
    return top


def find_dirs(worktree: Path) -> tuple[Path, Path]:
    """Return the git dir and common git dir of the worktree whose top is worktree."""
    try:
        repo = git.Repo(worktree)
    except (git_exc.GitError, OSError) as e:
        raise GitError(f"{worktree} is not the top of a git worktree: {e}") from e
    try:
        return Path(repo.git_dir).resolve(), Path(repo.common_dir).resolve()
    finally:
        repo.close()


class Views:
    """GitPython's views of a repository and of its worktrees, kept to read refs and HEADs
    from their files (loose or packed) without running git."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._worktrees: dict[tuple[Path, Path], git.Repo] = {}  # (path, its git dir) -> view

    @functools.cached_property
    def _repo(self) -> git.Repo:
        return git.Repo(self.root)

    @functools.cached_property
    def common_dir(self) -> Path:
        return Path(self._repo.common_dir).resolve()

    def rev(self, ref: str) -> str | None:
        """The commit ref points at; None if there is no such ref."""
        try:
            return git.SymbolicReference.dereference_recursive(self._repo, ref)
        except ValueError:  # no such ref
            return None
        except (OSError, git_exc.GitError) as e:
            raise GitError(f"cannot read {ref} in {self.root}: {e}") from e

    def head_ref(self, path: Path, gitdir: Path) -> str | None:
        """The ref the HEAD of the worktree at path (with that git dir) names; None if it is
        detached. A view is kept while the worktree's git dir stays the same."""
        key = (path, gitdir)  # a worktree made again at path may have another git dir
        repo = self._worktrees.get(key)
        if repo is None:
            try:
                repo = self._worktrees[key] = git.Repo(path)
            except (git_exc.GitError, OSError) as e:
                raise GitError(f"{path} is not a git worktree: {e}") from e
        try:
            return str(git.SymbolicReference(repo, "HEAD").reference.path)
        except TypeError:  # a detached HEAD
            return None
        except (ValueError, OSError, git_exc.GitError) as e:
            raise GitError(f"cannot read HEAD of {path}: {e}") from e
