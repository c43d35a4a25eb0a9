"""Putting a run together: config, plan, launcher and advisor around a Master; and cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from multibot import procs
from multibot.advisor import Advisor
from multibot.atomic import open_log
from multibot.config import load_master, load_worker
from multibot.errors import MultibotError
from multibot.launcher import Launcher, ProcessLauncher, TmuxLauncher
from multibot.layout import Home
from multibot.master import Master
from multibot.plan import load_plan_file
from multibot.privacy import hand_over, take_over
from multibot.state import SystemState
from multibot.store import StateFile

if TYPE_CHECKING:
    from multibot.worktrees import GitRepo

UNFINISHED = ("starting", "planning", "awaiting_approval", "running")
CHILD_GRACE_S = 10.0  # how long --no-tmux workers get to exit before they are killed


def pid_is_master(pid: int | None) -> bool:
    """Return whether pid is a live multibot master (checked by its command line)."""
    return procs.runs(pid, "master")


def archive_run(home: Home, run_id: str) -> Path:
    """Move an earlier run's state and inboxes aside (nothing is deleted)."""
    dest = home.archive_dir / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    dest.mkdir(parents=True, exist_ok=True)
    for item in home.state_dir.iterdir():
        if item.name in (".gitkeep", "archive"):
            continue
        shutil.move(str(item), dest / item.name)
    if home.inboxes_dir.exists():
        shutil.move(str(home.inboxes_dir), dest / "inbox")
    return dest


def make_launcher(home: Home, use_tmux: bool, per_window: int) -> Launcher:
    session = os.environ.get("MULTIBOT_TMUX_SESSION")
    if use_tmux and session:
        return TmuxLauncher(
            home, os.environ.get("MULTIBOT_TMUX_SOCKET") or None, session, per_window
        )
    return ProcessLauncher(home)


def make_advisor(home: Home, backend: str) -> Advisor:
    if backend != "claude":
        return Advisor()
    from multibot.opus_advisor import OpusAdvisor

    return OpusAdvisor(home, load_master(home), load_worker(home))


def run_master(home: Home, **kwargs: object) -> int:
    """Run the master; a fatal error is also written to the master's log for `follow`."""
    try:
        return _run_master(home, **kwargs)  # type: ignore[arg-type]
    except MultibotError as exc:
        from multibot.layout import MASTER_ID

        home.logs_dir.mkdir(parents=True, exist_ok=True)
        with open_log(home.log(MASTER_ID)) as f:
            f.write(f"FATAL: {exc}\n")
        raise


def _run_master(
    home: Home,
    *,
    repo: Path | None,
    goal: str | None,
    plan_file: Path | None,
    backend: str | None,
    max_workers: int | None,
    approve: bool,
    fresh: bool,
    use_tmux: bool,
) -> int:
    """Start or resume a run and drive it to the end; return the exit code."""
    config = load_master(home)
    overrides: dict[str, object] = {}
    if max_workers is not None:
        overrides["max_workers"] = max_workers
    if approve:
        overrides["approve_plan"] = True
    config = config.model_copy(update=overrides)
    template = load_worker(home)
    home.state_dir.mkdir(parents=True, exist_ok=True)
    sys_file = StateFile(home.system_state, SystemState, default=SystemState)
    if home.system_state.exists():
        sys_file.recover()
    existing = sys_file.read() if home.system_state.exists() else None
    if existing is not None and pid_is_master(existing.master_pid):
        raise MultibotError(f"a master is already running this home (pid {existing.master_pid})")
    resuming = existing is not None and existing.phase in UNFINISHED and not fresh
    backend = backend or (existing.backend if resuming and existing else template.backend)
    if backend == "claude" and template.sandbox:  # before anything starts, not at every task
        from multibot import sandbox

        sandbox.require(template.permission_mode)
    launcher = make_launcher(home, use_tmux, config.max_panes_per_window)
    agent_env = take_over(home)
    master = Master(
        home,
        config,
        repo=repo or Path("."),
        backend=backend,
        launcher=launcher,
        worker_template=template,
        advisor=make_advisor(home, backend),
        agent_env=agent_env,
    )
    if resuming:
        assert existing is not None
        master.ctx.show(f"resuming run {existing.run_id} from {home.state_dir}")
        master.resume()
    else:
        if repo is None:
            raise MultibotError("--repo is required to start a run")
        if existing is not None:
            dest = archive_run(home, existing.run_id)
            master.ctx.show(f"earlier run archived in {dest}")
        opus_session, opus_cost = None, 0.0
        if plan_file is not None:
            plan = load_plan_file(plan_file)
        elif goal:
            from multibot.opus import plan_with_opus

            plan, opus_session, opus_cost = plan_with_opus(
                home, config, repo, goal, out=master.ctx.out
            )
        else:
            raise MultibotError("give --goal TEXT (Opus plans it) or --plan FILE")
        run_id = time.strftime("%Y%m%d-%H%M%S")
        master.start_new(
            plan, goal or plan.goal, run_id, opus_session=opus_session, opus_cost_usd=opus_cost
        )
    stop = _stop_on_sigterm()
    try:
        return master.run()
    finally:
        if isinstance(launcher, ProcessLauncher):
            _end_children(master, launcher, stop.is_set())


class Terminated(KeyboardInterrupt):
    """SIGTERM: the master stops as on Ctrl-C, and then stops its workers too."""


def _stop_on_sigterm() -> threading.Event:
    """Make SIGTERM (systemd, timeout, kill) end the master's loop; return what tells."""
    got = threading.Event()

    def on_term(signum: int, frame: object) -> None:
        if not got.is_set():
            got.set()
            raise Terminated

    signal.signal(signal.SIGTERM, on_term)
    return got


def _end_children(master: Master, launcher: ProcessLauncher, terminated: bool) -> None:
    """What becomes of --no-tmux workers when the master ends.

    Its run finished: they were told to stop; the rest is killed after a grace. SIGTERM:
    they are stopped (each commits its work), as supervisord and systemd stop a service's
    processes; the run resumes later. Ctrl-C or a crash: they keep running and wait for the
    master to start again, which adopts them.
    """
    if master.finished:
        launcher.wait_all(CHILD_GRACE_S)
        launcher.stop_all()
    elif terminated:
        master.ctx.show("SIGTERM: stopping the workers (start the master again to resume)")
        launcher.wind_down(CHILD_GRACE_S)
    elif launcher.children:
        master.ctx.show("the workers keep running: start the master again to resume the run")


def run_repo(home: Home) -> GitRepo:
    """Open the repository of the run recorded in this home's system-state.json."""
    from multibot.worktrees import GitRepo

    s = StateFile(home.system_state, SystemState, default=SystemState).read()
    if not s.git.repo:
        raise MultibotError(f"no run recorded in {home.system_state}: which repository?")
    return GitRepo(
        Path(s.git.repo), home.integration_worktree, integration_branch=s.git.integration_branch
    )


def cleanup(home: Home, force: bool = False, stop: bool = False) -> int:
    """Remove merged worktrees and prune stale ones; unmerged work stays unless force.

    stop: first end the run's tmux sessions and every process of this home (master, workers,
    their agents, the status pane). Without it, a live master makes cleanup refuse.
    """
    if stop:
        stopped = stop_processes(home)
        if stopped:
            print(f"stopped {len(stopped)} process(es) of {home.root}")
    s = StateFile(home.system_state, SystemState, default=SystemState).read()
    if not stop and pid_is_master(s.master_pid):
        print(
            f"a master still runs this home (pid {s.master_pid}): stop it first "
            "(scripts/cleanup.sh, or multibot cleanup --stop)"
        )
        return 1
    if not s.git.repo:
        print("no run recorded: nothing to clean")
        return 0
    repo = run_repo(home)
    paths = sorted(p for p in home.worktrees_dir.glob("*") if p.is_dir() and p.name[0] != "_")
    refusals = repo.cleanup(paths, force=force)
    for r in refusals:
        print(f"kept: {r}")
    print(
        f"cleaned {len(paths) - len(refusals)} worktree(s); {len(refusals)} kept"
        + ("" if force or not refusals else " (use --force to delete unmerged work)")
    )
    return 0


def stop_processes(home: Home, grace: float = 5.0) -> list[int]:
    """End this home's run: close its tmux sessions, then end every process left; return pids."""
    import contextlib
    import signal

    from multibot.errors import TmuxError
    from multibot.panes import Tmux

    found = procs.home_processes(home)
    sessions = {
        (env.get("MULTIBOT_TMUX_SOCKET") or None, env["MULTIBOT_TMUX_SESSION"])
        for env in found.values()
        if env.get("MULTIBOT_TMUX_SESSION")
    }
    for socket, session in sorted(sessions, key=str):
        try:
            Tmux(socket, session).kill_session()  # SIGHUP to every pane
        except (TmuxError, ValueError) as exc:
            print(f"could not close tmux session {session!r}: {exc}")
        else:
            print(f"closed tmux session {session!r} (socket {socket or 'default'})")
    # What outlives its pane: agents in their own process groups, workers run with --no-tmux.
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        left = procs.home_processes(home)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a paused (stopped) process acts on it only now
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)  # other processes' exits: nothing to block on but polling
            left = procs.home_processes(home)
        if not left:
            break
    return sorted(found)


def open_session(home: Home, socket: str, session: str, master_args: list[str]) -> int:
    """Open (or find) the tmux session: the master pane and the live status pane beside it.

    If the session is there but its master (or status) pane has exited, it is started again
    in the same pane: the master resumes the unfinished run recorded in state/ (or starts the
    one master_args describe).
    """
    import shlex
    import sys

    from multibot.layout import MASTER_ID
    from multibot.panes import Tmux

    args = [a for a in master_args if a != "--"]
    hand_over(home)  # before any tmux call: a server started now must not keep them
    tmux = Tmux(socket, session)
    home.logs_dir.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    base = f"{py} -m multibot --home {shlex.quote(str(home.root))}"
    env = {
        "MULTIBOT_HOME": str(home.root),
        "MULTIBOT_TMUX_SOCKET": socket,
        "MULTIBOT_TMUX_SESSION": session,
    }
    master_cmd = f"{base} master {shlex.join(args)}"
    status_cmd = f"{base} dashboard"
    attach = f"tmux -L {socket} attach -t {session}"
    if not tmux.has_session():
        tmux.ensure_session(session, master_cmd, cwd=home.root, env=env, title=MASTER_ID)
        tmux.add_pane("status", status_cmd, cwd=home.root, env=env, window_name="master")
        print(f"tmux session {session!r} on socket {socket!r}: {attach}")
        return 0
    panes = {p.title: p for p in tmux.list_panes()}
    master, status = panes.get(MASTER_ID), panes.get("status")
    if status is not None and status.dead:
        tmux.respawn(status.pane_id, status_cmd, cwd=home.root, env=env)
    if master is None:
        print(f"session {session!r} has no master pane; close it (scripts/cleanup.sh) and retry")
        return 1
    if not master.dead:
        if args:
            print(f"the master already runs in session {session!r}; not starting {args}")
        print(f"session {session!r} already runs on tmux socket {socket!r}: {attach}")
        return 0
    s = StateFile(home.system_state, SystemState, default=SystemState).read()
    if not args and s.phase not in UNFINISHED:
        print(
            f"session {session!r}: the master has ended (run {s.run_id or '-'} is "
            f"{s.phase}); nothing to resume: {attach}"
        )
        return 0
    tmux.respawn(master.pane_id, master_cmd, cwd=home.root, env=env)
    print(f"restarted the master in session {session!r} on socket {socket!r}: {attach}")
    return 0


def follow(
    home: Home,
    timeout: float | None = None,
    socket: str | None = None,
    session: str | None = None,
    from_byte: int = 0,
) -> int:
    """Print the master's log as it grows until the run ends; 0 only if it succeeded.

    from_byte is where this attempt's lines begin (the log's size before the master was
    started): earlier attempts' lines, their FATAL among them, are not this run's story. A
    log shorter than that was started anew, and is read from its start.

    With the tmux session named, a master that exits before writing any state (a bad argument,
    a crash at start-up) or a session closed under us ends the wait at once, and the master
    pane's last lines are shown: they hold the reason.
    """
    import sys

    from multibot.layout import MASTER_ID

    log = home.log(MASTER_ID)
    deadline = None if timeout is None else time.monotonic() + timeout
    pos = from_byte
    sys_file = StateFile(home.system_state, SystemState, default=SystemState)
    seen_master = False
    gone: str | None = None  # why the master pane is over; one more pass reads its last words
    next_look = time.monotonic()  # at the master pane: a few tmux calls, so once a second
    while True:
        if log.exists():
            with open(log, encoding="utf-8", errors="replace") as f:
                if os.fstat(f.fileno()).st_size < pos:
                    pos = 0  # a new log (the old one was moved aside)
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
                if "FATAL:" in chunk:
                    return 1
        s = sys_file.read() if home.system_state.exists() else None
        alive = s is not None and pid_is_master(s.master_pid)
        seen_master = seen_master or alive
        if s is not None and s.phase not in UNFINISHED and not alive:
            print(f"\nrun {s.run_id} ended: {s.phase}")
            return 0 if s.phase == "done" else 1
        if gone is not None:
            print(f"\n{gone}", file=sys.stderr)
            return 1
        if s is not None and seen_master and not alive and s.phase in UNFINISHED:
            print(f"\nthe master (pid {s.master_pid}) ended while the run was {s.phase}")
            return 1
        if session is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + 1.0
            gone = _master_pane_over(socket, session)
            if gone is not None:
                continue
        if deadline is not None and time.monotonic() > deadline:
            print(f"\ngave up following after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.2)  # polling period for a log follower


def _master_pane_over(socket: str | None, session: str) -> str | None:
    """Say why the session's master pane no longer runs (with its last lines), else None."""
    from multibot.errors import TmuxError
    from multibot.layout import MASTER_ID
    from multibot.panes import Tmux

    tmux = Tmux(socket, session)
    try:
        if not tmux.has_session():
            return f"the tmux session {session!r} was closed while the run went on"
        master = next((p for p in tmux.list_panes() if p.title == MASTER_ID), None)
        if master is None:
            return f"the tmux session {session!r} has no master pane any more"
        if not master.dead:
            return None
        status = tmux.exit_status(master.pane_id)
        screen = tmux.capture(master.pane_id, lines=200).splitlines()
    except TmuxError as exc:
        return f"the tmux session {session!r} cannot be read: {exc}"
    # tmux's own "Pane is dead" line and the empty screen below the output say nothing.
    said = [line for line in screen if line.strip() and not line.startswith("Pane is dead")]
    how = "was killed by a signal" if status is None else f"exited with status {status}"
    return f"the master {how} before the run ended; its pane showed:\n" + "\n".join(said[-20:])
