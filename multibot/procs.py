"""Finding a run's processes through /proc: by command line, or by the environment they inherit.

Everything multibot starts for a home carries MULTIBOT_HOME (agents also their worker's id and
generation), so a run's processes are found by that, never by a name pattern that could match
another run or anything else of the user's.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from multibot.layout import Home


def command_line(pid: int) -> list[str] | None:
    """Return a process's arguments; None if it is gone or not ours; [] for a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def environment(pid: int) -> dict[str, str] | None:
    """Return the environment a process started with; None if it is gone or not ours."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def runs(pid: int | None, role: str, *also: str) -> bool:
    """Return whether pid is a live `multibot ... ROLE` process whose arguments hold also."""
    if not pid or pid == os.getpid():
        return False
    cmd = command_line(pid) or []
    return role in cmd and any("multibot" in c for c in cmd) and all(a in cmd for a in also)


def pids() -> list[int]:
    """Return the pids of every process visible now."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def working_in(folder: Path, name: str) -> list[int]:
    """Return the pids of processes called name whose working directory is inside folder."""
    found = []
    for pid in pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                continue
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if cwd == folder or cwd.is_relative_to(folder):
            found.append(pid)
    return found


def parent(pid: int) -> int | None:
    """Return the parent of process pid, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces and ')'


def ancestors() -> set[int]:
    """Return this process and its ancestors (never to be stopped by cleanup)."""
    found: set[int] = set()
    pid: int | None = os.getpid()
    while pid is not None and pid > 1 and pid not in found:
        found.add(pid)
        pid = parent(pid)
    return found


def home_processes(home: Home) -> dict[int, dict[str, str]]:
    """Return the live processes of this home's run (pid -> initial environment).

    A process belongs to the run if its command line is `multibot --home HOME master|worker|
    dashboard`, or if it inherited MULTIBOT_HOME=HOME together with a worker's identity or the
    run's tmux session (agents and all they started, shells in the session's panes).
    """
    root, mine = str(home.root), ancestors()
    found: dict[int, dict[str, str]] = {}
    for pid in pids():
        if pid in mine:
            continue
        cmd, env = command_line(pid), environment(pid)
        if not cmd or env is None:  # gone, another user's, or a zombie
            continue
        ours = env.get("MULTIBOT_HOME") == root and (
            "MULTIBOT_WORKER_ID" in env or "MULTIBOT_TMUX_SESSION" in env
        )
        for i in range(len(cmd) - 2):
            if cmd[i] == "--home" and cmd[i + 1] == root and any("multibot" in c for c in cmd[:i]):
                ours = ours or cmd[i + 2] in ("master", "worker", "dashboard")
        if ours:
            found[pid] = env
    return found


def stray_agents(home: Home, wid: str, generation: int) -> list[int]:
    """Return the pids of processes that agents of wid's generations before this one run."""
    found: list[int] = []
    for pid in pids():
        env = environment(pid)
        if (
            env is None
            or env.get("MULTIBOT_HOME") != str(home.root)
            or env.get("MULTIBOT_WORKER_ID") != wid
        ):
            continue
        gen = env.get("MULTIBOT_GENERATION", "")
        if gen.isdigit() and int(gen) < generation:
            found.append(pid)
    return found


def kill(pid: int) -> None:
    """SIGKILL a process, or its whole group if it leads one; quiet if it is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
