"""The MCP servers a worker's agent gets: multibot's own, and those of config/mcp-configs/.

Each ``config/mcp-configs/*.json`` holds servers in Claude Code's own shape, with two keys of
multibot's beside them::

    {
      "mcpServers": {
        "github": {"command": "github-mcp-server", "args": ["stdio"],
                   "env": {"GITHUB_TOKEN": "${GITHUB_TOKEN}",
                           "GITHUB_BRANCH": "{branch}"}}
      },
      "workers": ["w1", "w2"],        # optional: only these workers (default: every one)
      "capabilities": ["github"]      # optional: only tasks that need one of these
    }

In every string, ``{worktree}``, ``{branch}``, ``{task_id}``, ``{worker_id}`` and ``{home}``
are filled in for the task. ``${NAME}`` (or ``${NAME:-default}``) is left for Claude Code to
fill from the agent's environment, so a secret is named, never written: not in the file, not
on the command line. A server whose command is not there, or whose ``${NAME}`` is not set,
stops the task before the agent starts, with the server and its file named; one that starts
and fails is named from the agent's first output line (see agents/claude.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibot.errors import AgentError, ConfigError
from multibot.layout import Home

OURS = "multibot"  # multibot's own server: its tools reach the model as mcp__multibot__<tool>
PERMISSION_TOOL = f"mcp__{OURS}__permission"
_PLACEHOLDER = re.compile(r"\{(worktree|branch|task_id|worker_id|home)\}")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
_KEYS = {"mcpServers", "workers", "capabilities"}


@dataclass(frozen=True)
class Configured:
    """One server from a file of config/mcp-configs/."""

    name: str
    source: Path
    spec: Mapping[str, Any]
    workers: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()

    def wanted(self, worker_id: str, needs: Sequence[str]) -> bool:
        """Whether a task that needs these capabilities, on this worker, gets the server."""
        if self.workers and worker_id not in self.workers:
            return False
        return not self.capabilities or bool(set(self.capabilities) & set(needs))

    @property
    def where(self) -> str:
        return f"MCP server {self.name!r} ({self.source})"


def load(folder: Path) -> list[Configured]:
    """Every server configured in folder's *.json; ConfigError naming the file and the fault."""
    if not folder.is_dir():
        return []
    out: list[Configured] = []
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.json")):
        for server in _read(path):
            if server.name in seen:
                raise ConfigError(
                    f"{path}: MCP server {server.name!r} is configured in {seen[server.name]} too"
                )
            seen[server.name] = path
            out.append(server)
    return out


def _read(path: Path) -> list[Configured]:
    try:
        data = json.loads(path.read_text() or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise ConfigError(f'{path}: expected {{"mcpServers": {{"<name>": {{...}}}}}}')
    unknown = sorted(k for k in data if k not in _KEYS and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}: known are {sorted(_KEYS)}")
    workers = _names(path, data, "workers")
    capabilities = _names(path, data, "capabilities")
    out = []
    for name, spec in data["mcpServers"].items():
        where = f"{path}: MCP server {name!r}"
        if name == OURS:
            raise ConfigError(f"{where}: the name {OURS!r} is multibot's own server")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ConfigError(f"{where}: a name is 1-64 letters, digits, '-' or '_'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected an object with command or url")
        if not isinstance(spec.get("command"), str) and not isinstance(spec.get("url"), str):
            raise ConfigError(f"{where}: needs a command (stdio) or a url (http, sse)")
        if "args" in spec and not (
            isinstance(spec["args"], list) and all(isinstance(a, str) for a in spec["args"])
        ):
            raise ConfigError(f"{where}: args must be a list of strings")
        if "env" in spec and not (
            isinstance(spec["env"], dict) and all(isinstance(v, str) for v in spec["env"].values())
        ):
            raise ConfigError(f"{where}: env must map names to strings")
        out.append(Configured(name, path, spec, workers, capabilities))
    return out


def _names(path: Path, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {key} must be a list of strings")
    return tuple(value)


def fill(value: Any, values: Mapping[str, str]) -> Any:
    """value with the task's placeholders filled in every string (${NAME} left as it is)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: values[m[1]], value)
    if isinstance(value, list):
        return [fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, values) for k, v in value.items()}
    return value


def env_refs(value: Any) -> set[str]:
    """The ${NAME}s, without a default, that value needs from the environment."""
    if isinstance(value, str):
        return {m[1] for m in _ENV_REF.finditer(value) if m[2] is None}
    if isinstance(value, list):
        return set().union(*(env_refs(v) for v in value))
    if isinstance(value, dict):
        return set().union(*(env_refs(v) for v in value.values()))
    return set()


def check(server: Configured, spec: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Raise AgentError naming the server if it cannot start with this environment."""
    missing = sorted(n for n in env_refs(spec) if n not in env)
    if missing:
        raise AgentError(f"{server.where} needs {', '.join(missing)} in the environment")
    command = spec.get("command")
    if not isinstance(command, str):
        return
    if _ENV_REF.search(command):
        return  # filled by Claude Code: checked when it starts
    found = (
        command
        if os.sep in command and os.access(command, os.X_OK)
        else shutil.which(command, path=env.get("PATH"))
    )
    if not found:
        raise AgentError(f"{server.where}: command {command!r} not found (is it installed?)")


# Claude Code's limit on one call of our tools (ms): past the longest `ask` or permission wait.
OUR_TIMEOUT_MS = (3600 + 60) * 1000


def ours(home: Home) -> dict[str, Any]:
    """multibot's own server: the agent's tools, speaking through its environment."""
    return {
        "type": "stdio",
        "command": sys.executable,
        "args": ["-m", "multibot", "--home", str(home.root), "mcp"],
        "timeout": OUR_TIMEOUT_MS,
    }


@dataclass(frozen=True)
class AgentServers:
    """What the agent is started with: the --mcp-config JSON, and where each server is from."""

    config: str
    sources: Mapping[str, str]

    @property
    def allowed_tools(self) -> tuple[str, ...]:
        """Every tool of these servers (the configured ones were chosen by the person)."""
        return tuple(f"mcp__{name}" for name in self.sources)

    @property
    def args(self) -> tuple[str, ...]:
        """claude's arguments: these servers only, and the permission prompt on ours."""
        return (
            "--mcp-config",
            self.config,
            "--strict-mcp-config",
            "--permission-prompt-tool",
            PERMISSION_TOOL,
        )


def for_agent(
    home: Home,
    worker_id: str,
    task_id: str,
    *,
    worktree: str,
    branch: str,
    capabilities: Sequence[str],
    env: Mapping[str, str],
) -> AgentServers:
    """The servers of one task on one worker; AgentError naming what is wrong (a broken file,
    a server that cannot start), which stops the task before its agent starts."""
    values = {
        "worktree": worktree,
        "branch": branch,
        "task_id": task_id,
        "worker_id": worker_id,
        "home": str(home.root),
    }
    servers: dict[str, Any] = {OURS: ours(home)}
    sources = {OURS: "multibot's own"}
    try:
        configured = load(home.mcp_configs_dir)
    except ConfigError as exc:
        raise AgentError(str(exc)) from exc
    for server in configured:
        if not server.wanted(worker_id, capabilities):
            continue
        spec = fill(dict(server.spec), values)
        check(server, spec, env)
        servers[server.name] = spec
        sources[server.name] = str(server.source)
    return AgentServers(json.dumps({"mcpServers": servers}, separators=(",", ":")), sources)
