"""Private by default: runtime files only the user can read, and secrets kept out of tmux.

Every multibot command runs under umask 077, so what it creates under the home is 0700
(folders) and 0600 (files). The tmux server keeps the environment it was started with for
its whole life and gives it to every pane, so `multibot session` starts it without the
launching shell's secrets: they are handed to the master through a private file it reads
and deletes at once, and the master passes them to each worker's process (and so its agent)
alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping

from multibot.atomic import atomic_write
from multibot.layout import Home

UMASK = 0o077
# What an agent (or Opus) needs from the launching shell and nobody else should see.
SECRET = re.compile(
    r"^(ANTHROPIC|CLAUDE|AWS|OPENAI|GOOGLE|AZURE)_|API_?KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL",
    re.IGNORECASE,
)


def go_private(home: Home | None = None) -> None:
    """Set the umask for this process (and all it starts), and close the home's runtime
    folders made before it was set."""
    os.umask(UMASK)
    if home is None:
        return
    for folder in (home.state_dir, home.communication_dir, home.worktrees_dir):
        # OSError: not ours, gone, or read-only (an agent's command in its sandbox)
        with contextlib.suppress(OSError):
            if not folder.is_symlink():
                os.chmod(folder, 0o700)


def secrets_of(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of environ that look like secrets (or an agent's own settings)."""
    return {k: v for k, v in environ.items() if SECRET.search(k) and not k.startswith("MULTIBOT")}


def hand_over(home: Home) -> None:
    """Move this process's secrets into a private file for the master, out of os.environ
    (so a tmux server started next does not keep them)."""
    secrets = secrets_of(os.environ)
    if not secrets:
        return
    home.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(home.handed_secrets, json.dumps(secrets).encode())
    os.chmod(home.handed_secrets, 0o600)
    for name in secrets:
        del os.environ[name]


def take_over(home: Home) -> dict[str, str]:
    """Read and delete the secrets handed over, put them in os.environ, and return every
    secret of this process's environment (for the workers' agents)."""
    try:
        data = json.loads(home.handed_secrets.read_bytes())
    except (OSError, ValueError):
        data = {}
    with contextlib.suppress(FileNotFoundError):
        home.handed_secrets.unlink()
    if isinstance(data, dict):
        os.environ.update({str(k): str(v) for k, v in data.items()})
    return secrets_of(os.environ)


# -- a worker's launch ------------------------------------------------------------------------


def write_launch(
    home: Home, worker_id: str, generation: int, key: bytes, env: Mapping[str, str]
) -> None:
    """Leave a worker's key and secrets for its process, which reads and deletes the file at
    start (a tmux pane's environment would put them on tmux's command line)."""
    home.launches_dir.mkdir(parents=True, exist_ok=True)
    data = {"worker": worker_id, "generation": generation, "key": key.hex(), "env": dict(env)}
    atomic_write(home.launch_file(worker_id), json.dumps(data).encode())


def take_launch(home: Home, worker_id: str, generation: int) -> tuple[bytes, dict[str, str]] | None:
    """Read and delete the worker's launch file; return its key and secrets, or None if there
    is none for this generation (a worker started by hand)."""
    path = home.launch_file(worker_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        raw = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
        key = bytes.fromhex(data["key"])
        mine = data["worker"] == worker_id and data["generation"] == generation
        env = {str(k): str(v) for k, v in data["env"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not mine:
        return None  # the next incarnation's: it is not ours to take
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return key, env
