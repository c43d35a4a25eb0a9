"""Starting worker processes: in tmux panes (the normal way) or as plain child processes.

The master only sees this small interface, so supervision logic is the same for both and
tests or benchmarks can run many workers without a terminal.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from multibot import procs
from multibot.errors import TmuxError
from multibot.layout import Home


def worker_argv(home: Home, worker_id: str, backend: str, generation: int) -> list[str]:
    """Return the command line of a worker process (under cProfile if MULTIBOT_PROFILE_DIR)."""
    profile = os.environ.get("MULTIBOT_PROFILE_DIR")  # for bench/scale.py --profile
    out = f"{profile}/{worker_id}-g{generation}.prof"
    return [
        sys.executable,
        *(["-m", "cProfile", "-o", out] if profile else []),
        "-m",
        "multibot",
        "--home",
        str(home.root),
        "worker",
        "--id",
        worker_id,
        "--backend",
        backend,
        "--generation",
        str(generation),
    ]


class Launcher(Protocol):
    """Where worker processes run. A handle is a pane id or a pid, as a string."""

    def start(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str], title: str) -> str:
        """Start a worker; return its handle."""

    def restart(self, handle: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        """Kill whatever runs at handle and start argv in its place; return the new handle."""

    def alive(self, handle: str) -> bool:
        """Return whether the process at handle still runs."""

    def pid(self, handle: str) -> int | None:
        """Return the process id at handle, if known."""

    def find(self, pid: int) -> str | None:
        """Return the handle of the worker process pid (one this master did not start), if
        it runs where this launcher starts workers; TmuxError if tmux did not answer."""

    def dead(self, handles: Sequence[str]) -> set[str]:
        """Return which of handles no longer run a process (one look for all of them)."""

    def stop(self, handle: str) -> None:
        """Kill the process at handle (and remove its pane)."""

    def set_titles(self, titles: Mapping[str, str]) -> None:
        """Show each worker's title (keyed by handle)."""

    def where(self) -> str:
        """Name what handles belong to (a tmux server's pid): a handle recorded under another
        name means nothing here; TmuxError if tmux does not answer."""


class ProcessLauncher:
    """Workers as child processes of the master, output to their log (no terminal needed)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str], title: str) -> str:
        self.home.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.home.logs_dir / f"{worker_id}.out", "ab") as out:
            child = subprocess.Popen(
                list(argv),
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        handle = str(child.pid)
        self.children[handle] = child
        return handle

    def where(self) -> str:
        return "processes"  # a pid stays meaningful to the next master (it adopts them)

    def restart(self, handle: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        self.stop(handle)
        worker_id = argv[argv.index("--id") + 1] if "--id" in argv else "worker"
        return self.start(worker_id, argv, env, "")

    def alive(self, handle: str) -> bool:
        child = self.children.get(handle)
        if child is not None:
            return child.poll() is None
        # Started by an earlier master of this home (it was restarted): not our child, so
        # look it up; a zombie has an empty command line.
        return handle.isdigit() and procs.runs(int(handle), "worker", str(self.home.root))

    def dead(self, handles: Sequence[str]) -> set[str]:
        return {h for h in handles if not self.alive(h)}

    def pid(self, handle: str) -> int | None:
        child = self.children.get(handle)
        return child.pid if child else None

    def find(self, pid: int) -> str | None:
        return str(pid) if procs.runs(pid, "worker", str(self.home.root)) else None

    def stop(self, handle: str) -> None:
        child = self.children.pop(handle, None)
        if child is None:
            return
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # not reaped yet: the group is ours
            except ProcessLookupError:
                pass
        child.wait()

    def set_titles(self, titles: Mapping[str, str]) -> None:
        return None

    def stop_all(self) -> None:
        for handle in list(self.children):
            self.stop(handle)

    def wind_down(self, grace: float) -> None:
        """SIGTERM every worker started here (each commits its work and reports), SIGKILL
        those still running after grace seconds."""
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        self.wait_all(grace)
        self.stop_all()

    def wait_all(self, timeout: float) -> None:
        """Wait up to timeout seconds for every worker started here to exit."""
        deadline = time.monotonic() + timeout
        while any(c.poll() is None for c in self.children.values()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


class TmuxLauncher:
    """Workers in panes of the run's tmux session; crash output stays in a dead pane."""

    def __init__(self, home: Home, socket: str | None, session: str, per_window: int = 6) -> None:
        from multibot.panes import Tmux

        self.home = home
        self.tmux = Tmux(socket, session, max_panes_per_window=per_window)

    def start(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str], title: str) -> str:
        return self.tmux.add_pane(title, shlex.join(argv), cwd=Path(self.home.root), env=env)

    def where(self) -> str:
        return f"tmux server {self.tmux.server_pid()}"

    def restart(self, handle: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        try:
            self.tmux.respawn(handle, shlex.join(argv), cwd=Path(self.home.root), env=env)
        except TmuxError:
            if self.tmux.has_pane(handle):
                raise
            # The pane is gone (closed by hand, or the tmux server was started anew): a new one.
            worker_id = argv[argv.index("--id") + 1] if "--id" in argv else "worker"
            return self.start(worker_id, argv, env, worker_id)
        return handle

    def alive(self, handle: str) -> bool:
        try:
            return not self.tmux.is_dead(handle)
        except TmuxError:
            return False

    def dead(self, handles: Sequence[str]) -> set[str]:
        try:
            panes = {p.pane_id: p for p in self.tmux.list_panes()}
        except TmuxError:
            return set()  # tmux did not answer: judge by heartbeats alone this time
        return {h for h in handles if h not in panes or panes[h].dead}

    def pid(self, handle: str) -> int | None:
        try:
            return self.tmux.pane_pid(handle)
        except TmuxError:
            return None

    def find(self, pid: int) -> str | None:
        # The pane's own process is the worker, or the shell tmux started it with.
        around = {pid, procs.parent(pid)}
        panes = self.tmux.list_panes()
        return next((p.pane_id for p in panes if p.pid is not None and p.pid in around), None)

    def stop(self, handle: str) -> None:
        try:
            self.tmux.kill_pane(handle)
        except TmuxError:
            pass

    def set_titles(self, titles: Mapping[str, str]) -> None:
        # A worker adopted after a master restart has no known pane (handle "").
        with contextlib.suppress(TmuxError):
            self.tmux.set_titles({h: t for h, t in titles.items() if h})
