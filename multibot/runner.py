"""Putting a run together: config, plan, launcher and advisor around a Master; and cleanup."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from multibot.config import load_master, load_worker
from multibot.errors import MultibotError
from multibot.launcher import Launcher, ProcessLauncher, TmuxLauncher
from multibot.layout import Home
from multibot.master import Advisor, Master
from multibot.plan import load_plan_file
from multibot.state import SystemState
from multibot.store import StateFile

UNFINISHED = ("starting", "planning", "awaiting_approval", "running")


def pid_is_master(pid: int | None) -> bool:
    """Return whether pid is a live multibot master (checked by its command line)."""
    if not pid or pid == os.getpid():
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"master" in cmd and any(b"multibot" in part for part in cmd)


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
        return TmuxLauncher(home, os.environ.get("MULTIBOT_TMUX_SOCKET") or None, session, per_window)
    return ProcessLauncher(home)


def make_advisor(home: Home, backend: str) -> Advisor:
    if backend != "claude":
        return Advisor()
    from multibot.opus import OpusAdvisor

    return OpusAdvisor(home, load_master(home), load_worker(home))


def run_master(home: Home, **kwargs: object) -> int:
    """Run the master; a fatal error is also written to the master's log for `follow`."""
    try:
        return _run_master(home, **kwargs)  # type: ignore[arg-type]
    except MultibotError as exc:
        from multibot.layout import MASTER_ID

        home.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(home.log(MASTER_ID), "a", encoding="utf-8") as f:
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
    launcher = make_launcher(home, use_tmux, config.max_panes_per_window)
    master = Master(
        home, config, repo=repo or Path("."), backend=backend, launcher=launcher,
        worker_template=template, advisor=make_advisor(home, backend),
    )
    if resuming:
        assert existing is not None
        master.show(f"resuming run {existing.run_id} from {home.state_dir}")
        master.resume()
    else:
        if repo is None:
            raise MultibotError("--repo is required to start a run")
        if existing is not None:
            dest = archive_run(home, existing.run_id)
            master.show(f"earlier run archived in {dest}")
        opus_session, opus_cost = None, 0.0
        if plan_file is not None:
            plan = load_plan_file(plan_file)
        elif goal:
            from multibot.opus import plan_with_opus

            plan, opus_session, opus_cost = plan_with_opus(home, config, repo, goal, out=master.out)
        else:
            raise MultibotError("give --goal TEXT (Opus plans it) or --plan FILE")
        run_id = time.strftime("%Y%m%d-%H%M%S")
        master.start_new(
            plan, goal or plan.goal, run_id, opus_session=opus_session, opus_cost_usd=opus_cost
        )
    try:
        return master.run()
    finally:
        if isinstance(launcher, ProcessLauncher):
            deadline = time.monotonic() + 10
            while any(launcher.alive(h) for h in list(launcher.children)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            launcher.stop_all()


def cleanup(home: Home, force: bool = False) -> int:
    """Remove merged worktrees and prune stale ones; unmerged work stays unless force."""
    from multibot.worktrees import GitRepo

    s = StateFile(home.system_state, SystemState, default=SystemState).read()
    if not s.git.repo:
        print("no run recorded: nothing to clean")
        return 0
    repo = GitRepo(
        Path(s.git.repo),
        home.integration_worktree,
        integration_branch=s.git.integration_branch,
        setup_hook=None,
    )
    paths = sorted(p for p in home.worktrees_dir.glob("*") if p.is_dir() and p.name[0] != "_")
    refusals = repo.cleanup(paths, force=force)
    for r in refusals:
        print(f"kept: {r}")
    print(f"cleaned {len(paths) - len(refusals)} worktree(s); {len(refusals)} kept"
          + ("" if force or not refusals else " (use --force to delete unmerged work)"))
    return 0


def open_session(home: Home, socket: str, session: str, master_args: list[str]) -> int:
    """Open (or find) the tmux session: the master pane and the live status pane beside it."""
    import shlex
    import sys

    from multibot.layout import MASTER_ID
    from multibot.panes import Tmux

    args = [a for a in master_args if a != "--"]
    tmux = Tmux(socket, session)
    if tmux.has_session():
        print(f"session {session!r} already runs on tmux socket {socket!r}")
        return 0
    home.logs_dir.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    base = f"{py} -m multibot --home {shlex.quote(str(home.root))}"
    env = {
        "MULTIBOT_HOME": str(home.root),
        "MULTIBOT_TMUX_SOCKET": socket,
        "MULTIBOT_TMUX_SESSION": session,
    }
    master_cmd = f"{base} master {shlex.join(args)}"
    tmux.ensure_session(session, master_cmd, cwd=home.root, env=env, title=MASTER_ID)
    tmux.add_pane("status", f"{base} dashboard", cwd=home.root, env=env, window_name="master")
    print(f"tmux session {session!r} on socket {socket!r}: tmux -L {socket} attach -t {session}")
    return 0


def follow(home: Home, timeout: float | None = None) -> int:
    """Print the master's log as it grows until the run ends; 0 only if it succeeded."""
    import sys

    from multibot.layout import MASTER_ID

    log = home.log(MASTER_ID)
    deadline = None if timeout is None else time.monotonic() + timeout
    pos = 0
    sys_file = StateFile(home.system_state, SystemState, default=SystemState)
    seen_master = False
    while True:
        if log.exists():
            with open(log, encoding="utf-8", errors="replace") as f:
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
        if s is not None and seen_master and not alive and s.phase in UNFINISHED:
            print(f"\nthe master (pid {s.master_pid}) ended while the run was {s.phase}")
            return 1
        if deadline is not None and time.monotonic() > deadline:
            print(f"\ngave up following after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.2)  # polling period for a log follower
