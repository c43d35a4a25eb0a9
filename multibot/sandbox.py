"""Claude Code's own sandbox around every agent: what its Bash commands may write and reach.

Claude Code runs each Bash command (and all it starts) in bubblewrap on Linux, with the network
behind a proxy (socat). What multibot gives it (``--settings``, above every settings file):

* **Writes**: the worktree (the agent's working directory), the git metadata its commits write
  (Claude Code allows the repository's ``.git`` of a worktree), its own inbox and its reply
  inbox (for `multibot report` and `ask`), its temp folder; and what the template adds.
* **Not written**, even inside ``.git``: ``HEAD``, ``config``, ``hooks``, ``info``,
  ``packed-refs``, tags, every branch but those beside the task's own (``multibot/…``), the
  integration branch, the other worktrees' metadata. A branch only in ``packed-refs`` gets
  a loose copy first, so that a new loose file cannot override it.
* **Not read**: the run key and the launch files (with them a command could sign anything).
* **Network**: only the domains the template allows (none by default). The API calls are
  Claude Code's own, outside the sandbox.
* **File tools**: Write and Edit are not confined by the sandbox; in ``acceptEdits`` mode they
  may write only inside the working directory unless an allow rule names them, so the bare
  file tools are taken out of ``--allowedTools`` and ``bypassPermissions`` is refused. A write
  elsewhere goes to the permission tool (mcp/tools.py), and the master denies it
  (``permissions.outside``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibot.config import WorkerTemplate
from multibot.errors import AgentError
from multibot.layout import Home
from multibot.protocol import TaskAssignment

TOOLS = ("bwrap", "socat")
INSTALL = (
    "install them (Debian/Ubuntu: sudo apt-get install bubblewrap socat), or turn the "
    'sandbox off with "sandbox": false in config/worker-template.json'
)
FILE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")  # allowed anywhere when named bare
UNCONFINED_MODES = ("bypassPermissions",)


class SandboxError(AgentError):
    """The sandbox cannot be set up: a missing tool, or settings that would undo it."""


def missing_tools(path: str | None = None) -> list[str]:
    """The tools the sandbox needs that are not on PATH (none off Linux: macOS has its own)."""
    if not sys.platform.startswith("linux"):
        return []
    return [t for t in TOOLS if shutil.which(t, path=path) is None]


def require(permission_mode: str, path: str | None = None) -> None:
    """Raise SandboxError saying what to do if the sandbox cannot confine an agent here."""
    missing = missing_tools(path)
    if missing:
        raise SandboxError(f"the agents' sandbox needs {' and '.join(missing)}: {INSTALL}")
    if permission_mode in UNCONFINED_MODES:
        raise SandboxError(
            f'permission_mode "{permission_mode}" lets the file tools write anywhere, past the '
            'sandbox: use "acceptEdits", or turn the sandbox off with "sandbox": false'
        )


def tools_for(allowed: Sequence[str]) -> tuple[str, ...]:
    """allowed without the bare file tools (they would allow writing anywhere)."""
    return tuple(t for t in allowed if t not in FILE_TOOLS)


# -- git ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitDirs:
    """A worktree's own metadata folder and the repository's common one."""

    own: Path
    common: Path


def git_dirs(worktree: Path) -> GitDirs | None:
    """Where a linked worktree's metadata lives (from its .git file), or None if it has none."""
    try:
        text = (worktree / ".git").read_text()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    own = Path(text.removeprefix("gitdir:").strip())
    own = own if own.is_absolute() else (worktree / own).resolve()
    try:
        common = (own / (own / "commondir").read_text().strip()).resolve()
    except OSError:
        return None
    return GitDirs(own, common)


def guard(dirs: GitDirs, branch: str, integration: str) -> list[Path]:
    """The paths in the repository's metadata an agent on branch must not write; made to
    exist first where a missing one could be created to override (see the module doc)."""
    common = dirs.common
    (common / "info").mkdir(exist_ok=True)
    (common / "hooks").mkdir(exist_ok=True)
    (common / "packed-refs").touch(exist_ok=True)
    deny = [common / n for n in ("HEAD", "config", "hooks", "info", "packed-refs", "reftable")]
    deny = [p for p in deny if p.exists()]
    refs = common / "refs"
    for folder in ("tags", "remotes", "notes", "stash"):
        if (refs / folder).exists():
            deny.append(refs / folder)
    heads, own_top = refs / "heads", branch.split("/")[0]
    for name, sha in _packed_heads(common):
        if name.split("/")[0] != own_top or name == integration:
            _loose_copy(heads / name, sha)
    with contextlib.suppress(OSError):
        deny += [e for e in heads.iterdir() if e.name != own_top]
    if integration.split("/")[0] == own_top and (heads / integration).exists():
        deny.append(heads / integration)
    worktrees = common / "worktrees"
    with contextlib.suppress(OSError):
        deny += [w for w in worktrees.iterdir() if w != dirs.own]
    return deny


def _packed_heads(common: Path) -> list[tuple[str, str]]:
    try:
        lines = (common / "packed-refs").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        sha, _, ref = line.partition(" ")
        if ref.startswith("refs/heads/") and len(sha) in (40, 64):
            out.append((ref.removeprefix("refs/heads/"), sha))
    return out


def _loose_copy(path: Path, sha: str) -> None:
    """Write a loose ref equal to the packed one (git reads the loose one first: the same)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.multibot")
    tmp.write_text(sha + "\n")
    os.replace(tmp, path)


# -- the settings -----------------------------------------------------------------------------


def _abs(path: Path | str) -> str:
    return "/" + str(Path(path).resolve())  # "//…": an absolute path, in Claude Code's settings


def settings(
    home: Home,
    worker_id: str,
    *,
    deny_write: Sequence[Path] = (),
    allow_write: Sequence[str] = (),
    network: Sequence[str] = (),
) -> dict[str, Any]:
    """Claude Code settings that sandbox an agent of worker_id (see the module doc)."""
    writable = [home.inbox(worker_id).root, home.inbox(reply_inbox(worker_id)).root]
    writable += [Path(os.path.expanduser(p)) for p in allow_write]
    secret = [home.run_key, home.launches_dir, home.handed_secrets]
    return {
        "sandbox": {
            "enabled": True,
            "autoAllowBashIfSandboxed": True,
            "allowUnsandboxedCommands": False,
            "filesystem": {
                "allowWrite": [_abs(p) for p in writable],
                "denyWrite": [_abs(p) for p in deny_write],
                "denyRead": [_abs(p) for p in secret],
            },
            "network": {"allowedDomains": list(network)},
        }
    }


def settings_arg(value: dict[str, Any]) -> tuple[str, str]:
    return ("--settings", json.dumps(value, separators=(",", ":")))


def reply_inbox(worker_id: str) -> str:
    """The inbox its agent's `multibot ask` waits in: made by the worker, so the sandbox can
    let the agent write it (a folder made later could not be)."""
    return f"ask-{worker_id}"


def confinement(
    cfg: WorkerTemplate, backend: str, home: Home, worker_id: str, a: TaskAssignment
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The allowed tools and extra arguments that put a claude agent in its sandbox, or the
    template's own when it is off or the backend is not claude."""
    if backend != "claude" or not cfg.sandbox:
        return cfg.allowed_tools, cfg.extra_args
    require(cfg.permission_mode, os.environ.get("PATH"))
    deny: list[Path] = []
    dirs = git_dirs(Path(a.working_directory))
    if dirs is not None:
        try:
            deny = guard(dirs, a.branch, a.base_branch)
        except OSError as exc:
            raise SandboxError(f"cannot guard {dirs.common}: {exc}") from exc
    rules = settings(
        home, worker_id, deny_write=deny, allow_write=cfg.sandbox_write, network=cfg.sandbox_network
    )
    return tools_for(cfg.allowed_tools), (*cfg.extra_args, *settings_arg(rules))
