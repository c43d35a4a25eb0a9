"""The tmux adapter: one session of panes (master, status, workers); the only libtmux user.

Every tmux call goes through ``Tmux._run``, which turns tmux and libtmux failures into
``TmuxError``. Panes are always created with their command (typing into a fresh shell races),
and that command runs under ``/bin/sh -c`` so the user's ``default-shell`` (fish, zsh...) never
changes how it is parsed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from libtmux import exc as tmux_exc
from libtmux.server import Server

from multibot.errors import InvalidId, TmuxError

Command = str | Sequence[str]

MASTER_WINDOW = "master"
WORKERS_WINDOW = "workers"
# tmux 3.3 has no allow-set-title: programs (Claude Code does) overwrite #{pane_title} with
# escape sequences. The title the master sets is also kept in this user option, which only
# set-option can change; borders and list_panes read it first.
TITLE_OPTION = "@multibot_title"
SHOWN_TITLE = f"#{{?{TITLE_OPTION},#{{{TITLE_OPTION}}},#{{pane_title}}}}"
BORDER_FORMAT = f" #{{pane_index}}: {SHOWN_TITLE} "
MAX_TITLE = 120
# tmux marks a pane dead when its pty closes, which can come before it reaps the child;
# "dead" here also waits for the exit status or signal (as tmux itself does since PR 4841).
PANE_STATE = "#{pane_dead}\t#{pane_dead_status}\t#{pane_dead_signal}\t#{pane_pid}\t#{pid}"

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # sessions, sockets, windows: no ':', '.', '/'
_PANE_ID = re.compile(r"^%[0-9]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORKERS = re.compile(rf"^{WORKERS_WINDOW}(-[0-9]+)?$")


class _Window(NamedTuple):
    number: int  # window_index ("index" would shadow tuple.index)
    panes: int
    name: str


class _State(NamedTuple):
    dead: bool
    pid: int | None  # None once dead
    status: int | None  # exit status once dead, None if killed by a signal
    unreaped: int | None  # tmux server pid if the pty closed but tmux has not reaped the child


def _parse_state(fields: str) -> _State:
    pty_closed, status, sig, pid, server_pid = fields.split("\t")
    dead = pty_closed == "1" and bool(status or sig)
    unreaped = int(server_pid) if pty_closed == "1" and not dead else None
    alive_pid = None if dead or not pid else int(pid)
    return _State(dead, alive_pid, int(status) if status else None, unreaped)


class PaneInfo(NamedTuple):
    """One pane as listed: its id, the title the master gave it, whether it died, its pid."""

    pane_id: str
    title: str
    dead: bool
    pid: int | None


def check_name(value: str, kind: str = "tmux name") -> str:
    """Return value if it is a safe tmux session, socket or window name."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidId(kind, value, "use 1-64 letters, digits, '-' or '_'")
    return value


def check_pane_id(value: str) -> str:
    """Return value if it looks like a tmux pane id such as '%3'."""
    if not isinstance(value, str) or not _PANE_ID.match(value):
        raise InvalidId("pane id", value, "expected '%' followed by digits")
    return value


def clean_title(title: str) -> str:
    """Return title without control characters, whitespace collapsed, at most MAX_TITLE long."""
    kept = "".join(" " if unicodedata.category(c).startswith("C") else c for c in str(title))
    return " ".join(kept.split())[:MAX_TITLE]


def shell_command(command: Command) -> list[str]:
    """Return the argv tmux should exec for a shell string or an argv list."""
    if isinstance(command, str):
        script = command
    else:
        if not command:
            raise InvalidId("command", command, "argv must not be empty")
        # exec: the pane's pid is then the program itself, which the master can signal.
        script = "exec " + shlex.join(command)
    if not script.strip() or "\x00" in script:
        raise InvalidId("command", command, "must be non-empty and contain no NUL")
    # Several arguments make tmux execvp them directly instead of using default-shell.
    return ["/bin/sh", "-c", script]


def spawn_args(cwd: Path | str | None, env: Mapping[str, str] | None) -> list[str]:
    """Return the -c/-e options shared by new-session, new-window, split and respawn."""
    args: list[str] = []
    if cwd is not None:
        if not Path(cwd).is_dir():
            raise TmuxError(f"pane working directory {cwd} is not a directory")
        args += ["-c", str(cwd)]
    for key, value in (env or {}).items():
        if not _ENV_KEY.match(key) or "\x00" in value:
            raise InvalidId("environment variable", key, "bad name or NUL in value")
        args += ["-e", f"{key}={value}"]  # argv straight to tmux: no quoting needed
    return args


def next_workers_name(taken: set[str]) -> str:
    """Return the first free name of "workers", "workers-2", "workers-3", ..."""
    k = 1
    while (name := WORKERS_WINDOW if k == 1 else f"{WORKERS_WINDOW}-{k}") in taken:
        k += 1
    return name


def window_options(target: str) -> list[str]:
    """Return a tmux command sequence (leading ';') setting multibot's options on a window."""
    args: list[str] = []
    for name, value in (
        ("remain-on-exit", "on"),  # a crashed worker's last output stays readable
        ("allow-rename", "off"),
        ("automatic-rename", "off"),
        ("pane-border-status", "top"),
        ("pane-border-format", BORDER_FORMAT),
    ):
        args += [";", "set-option", "-w", "-t", target, name, value]
    return args


def _title_args(pane_id: str, title: str) -> list[str]:
    """Return the tmux command sequence that sets a pane's title (option and pane title)."""
    text = clean_title(title)
    check_pane_id(pane_id)
    # select-pane -T expands formats: double '#' so the title is taken literally.
    return [
        *("set-option", "-p", "-t", pane_id, TITLE_OPTION, text),
        *(";", "select-pane", "-t", pane_id, "-T", text.replace("#", "##")),
    ]


def _nudge(server_pid: int) -> bool:
    """Send SIGCHLD to the tmux server so it reaps a child whose exit signal it missed."""
    # Debian's tmux uses libutempter, which briefly installs its own SIGCHLD handler: a child
    # that exits then stays a zombie, its pane dead with no status (tmux issues 311, 2679).
    # Any SIGCHLD makes tmux run waitpid() over all its children.
    try:
        os.kill(server_pid, signal.SIGCHLD)
    except OSError:
        return False
    return True


class Tmux:
    """One tmux session on one server (socket None: the user's default or current server)."""

    def __init__(
        self,
        socket: str | None,
        session: str,
        *,
        max_panes_per_window: int = 6,
        config_file: str | None = None,
    ) -> None:
        self.session = check_name(session, "tmux session")
        self.socket = None if socket is None else check_name(socket, "tmux socket")
        if max_panes_per_window < 1:
            raise ValueError("max_panes_per_window must be at least 1")
        self.max_panes_per_window = max_panes_per_window
        self._server = Server(socket_name=self.socket, config_file=config_file)
        self._lock = threading.Lock()  # picking a window and splitting it must not interleave

    # -- the one way to talk to tmux --------------------------------------------------------

    def _run(self, *args: str) -> list[str]:
        """Run one tmux command (or ';'-joined sequence); return its stdout lines."""
        try:
            proc = self._server.cmd(*args)
        except (tmux_exc.LibTmuxException, OSError) as e:
            raise TmuxError(f"tmux {args[0]} failed: {e}") from e
        if proc.returncode != 0 or proc.stderr:
            detail = "; ".join(proc.stderr) or f"exit status {proc.returncode}"
            raise TmuxError(f"tmux {shlex.join(args)}: {detail}")
        return list(proc.stdout)

    def _pane_fields(self, pane_id: str, fmt: str) -> str:
        """Return fmt expanded for pane_id; TmuxError if there is no such pane."""
        # Not display-message: on a missing target it quietly uses another pane.
        lines = self._run("list-panes", "-t", check_pane_id(pane_id), "-F", "#{pane_id}\t" + fmt)
        for line in lines:
            found, _, fields = line.partition("\t")
            if found == pane_id:
                return fields
        raise TmuxError(f"tmux pane {pane_id} not found")

    # -- session ----------------------------------------------------------------------------

    def has_session(self) -> bool:
        """Return whether the session exists (False if the server is not running)."""
        return self._server.cmd("has-session", "-t", f"={self.session}").returncode == 0

    def ensure_session(
        self,
        name: str,
        command: Command,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        title: str = MASTER_WINDOW,
    ) -> str:
        """Create session name detached, first pane running command; return that pane's id."""
        if name != self.session:
            raise InvalidId("tmux session", name, f"this Tmux is bound to {self.session!r}")
        if not self.has_session():
            new = ["new-session", "-d", "-s", self.session, "-n", MASTER_WINDOW]
            new += ["-x", "200", "-y", "50", "-P", "-F", "#{pane_id}"]
            new += spawn_args(cwd, env) + shell_command(command)
            # One invocation: tmux runs the whole sequence before it notices the child exit,
            # so remain-on-exit is on even for a command that dies at once. '=': exact name,
            # never a prefix match on another session.
            try:
                pane_id = self._run(*new, *window_options(f"={self.session}:"))[0]
            except TmuxError:
                if not self.has_session():
                    raise
            else:
                self.set_title(pane_id, title)
                return pane_id
        # Session order: the first pane of the lowest window is the one it was created with.
        return self._run("list-panes", "-s", "-t", f"={self.session}", "-F", "#{pane_id}")[0]

    def kill_session(self) -> None:
        """Kill the session and every pane in it; do nothing if it is gone already."""
        if self.has_session():
            self._run("kill-session", "-t", f"={self.session}")

    def kill_server(self) -> None:
        """Kill the whole tmux server of this socket; refuse on the user's default server."""
        if self.socket is None:
            raise TmuxError("refusing to kill the default tmux server; use kill_session")
        try:
            self._server.kill()  # tolerates a server that is not running
        except tmux_exc.LibTmuxException as e:
            raise TmuxError(f"tmux kill-server failed: {e}") from e

    def attach_command(self) -> list[str]:
        """Return the argv a script can exec to attach a terminal to the session."""
        sock = ["-L", self.socket] if self.socket else []
        return ["tmux", *sock, "attach-session", "-t", f"={self.session}"]

    # -- panes ------------------------------------------------------------------------------

    def add_pane(
        self,
        title: str,
        command: Command,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        window_name: str | None = None,
    ) -> str:
        """Start command in a new titled pane; return its id.

        window_name None: the first workers window with room, or a new one ("workers",
        "workers-2", ...). A name: split that window (created if missing), with no limit.
        """
        spawn = spawn_args(cwd, env) + shell_command(command)
        if window_name is not None:
            check_name(window_name, "tmux window")
        with self._lock:
            windows = self._windows()
            if window_name is not None:
                target = next((w for w in windows if w.name == window_name), None)
            else:
                limit = self.max_panes_per_window
                room = [w for w in windows if _WORKERS.match(w.name) and w.panes < limit]
                target = room[0] if room else None
                window_name = next_workers_name({w.name for w in windows})
            if target is None:
                index = max((w.number for w in windows), default=0) + 1
                pane_id = self._new_window(window_name, index, spawn)
            else:
                where = f"={self.session}:{target.number}"
                split = ["split-window", "-d", "-t", where, "-P", "-F", "#{pane_id}", *spawn]
                pane_id = self._run(*split)[0]
                self._run("select-layout", "-t", where, "tiled")
        self.set_title(pane_id, title)
        return pane_id

    def _windows(self) -> list[_Window]:
        """Return every window of the session."""
        fmt = "#{window_index}\t#{window_panes}\t#{window_name}"
        rows = self._run("list-windows", "-t", f"={self.session}", "-F", fmt)
        return [_Window(int(i), int(n), name) for i, n, name in (r.split("\t", 2) for r in rows)]

    def _new_window(self, name: str, index: int, spawn: list[str]) -> str:
        """Open window name at index running spawn; return its pane id."""
        where = f"={self.session}:{index}"
        # The index is chosen here so the option commands in the same sequence can name the
        # window: with -d the sequence's "current window" stays the old one.
        new = ["new-window", "-d", "-t", where, "-n", name, "-P", "-F", "#{pane_id}", *spawn]
        return self._run(*new, *window_options(where))[0]

    def set_title(self, pane_id: str, title: str) -> None:
        """Set the pane's title as shown in its border and returned by list_panes."""
        self._run(*_title_args(pane_id, title))

    def set_titles(self, titles: Mapping[str, str]) -> None:
        """Set several panes' titles in one tmux call; one by one if a pane is gone."""
        args: list[str] = []
        for pane_id, title in titles.items():
            args += [";", *_title_args(pane_id, title)] if args else _title_args(pane_id, title)
        if not args:
            return
        try:
            self._run(*args)
        except TmuxError:  # a sequence stops at its first missing pane: do the others alone
            for pane_id, title in titles.items():
                with contextlib.suppress(TmuxError):
                    self.set_title(pane_id, title)

    def respawn(
        self,
        pane_id: str,
        command: Command,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Restart pane_id with command, killing whatever still runs there; title is kept."""
        spawn = spawn_args(cwd, env) + shell_command(command)
        self._run("respawn-pane", "-k", "-t", check_pane_id(pane_id), *spawn)

    def _state(self, pane_id: str) -> _State:
        state = _parse_state(self._pane_fields(pane_id, PANE_STATE))
        if state.unreaped is not None and _nudge(state.unreaped):
            state = _parse_state(self._pane_fields(pane_id, PANE_STATE))
        return state

    def is_dead(self, pane_id: str) -> bool:
        """Return whether the pane's process has exited (the pane stays, remain-on-exit)."""
        return self._state(pane_id).dead

    def pane_pid(self, pane_id: str) -> int | None:
        """Return the pid of the pane's process, None if it has exited."""
        return self._state(pane_id).pid

    def exit_status(self, pane_id: str) -> int | None:
        """Return a dead pane's exit status; None if alive or killed by a signal."""
        state = self._state(pane_id)
        return state.status if state.dead else None

    def kill_pane(self, pane_id: str) -> None:
        """Kill the pane and its process (its window closes with its last pane)."""
        self._run("kill-pane", "-t", check_pane_id(pane_id))

    def capture(self, pane_id: str, lines: int = 200) -> str:
        """Return the last lines of the pane's screen and history as text."""
        out = self._run("capture-pane", "-p", "-J", "-t", check_pane_id(pane_id), "-S", f"-{lines}")
        while out and not out[-1].strip():
            out.pop()
        return "\n".join(out[-lines:])

    def server_pid(self) -> int:
        """Return the pid of the tmux server that holds the session (TmuxError if none)."""
        line = self._run("display-message", "-p", "-t", f"={self.session}:", "#{pid}")
        return int(line[0])

    def has_pane(self, pane_id: str) -> bool:
        """Return whether pane_id is a pane of the session (dead or alive)."""
        return any(p.pane_id == pane_id for p in self.list_panes())

    def list_panes(self) -> list[PaneInfo]:
        """Return every pane of the session, window by window."""
        # The title goes last: a program-set pane_title may hold anything, even a tab.
        fmt = f"#{{pane_id}}\t{PANE_STATE}\t{SHOWN_TITLE}"
        rows = self._list_panes(fmt)
        lost = next((state.unreaped for _, state, _ in rows if state.unreaped is not None), None)
        if lost is not None and _nudge(lost):
            rows = self._list_panes(fmt)
        return [PaneInfo(pane_id, title, state.dead, state.pid) for pane_id, state, title in rows]

    def _list_panes(self, fmt: str) -> list[tuple[str, _State, str]]:
        rows = self._run("list-panes", "-s", "-t", f"={self.session}", "-F", fmt)
        parts = [row.split("\t", 6) for row in rows]
        return [(p[0], _parse_state("\t".join(p[1:6])), p[6]) for p in parts]
