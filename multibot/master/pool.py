"""The worker pool: starting, watching, restarting and stopping worker processes.

In rq's shape: ``check`` finds the workers that died and those whose restart is due, the
loop decides what becomes of their tasks, ``died`` applies the restart policy. Workers run
behind a ``Launcher`` (tmux panes, or plain processes); slow launcher calls (tmux) run in the
chores thread, never on the loop's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from multibot import checkout, mailbox, privacy, procs, protocol
from multibot.auth import Keys
from multibot.config import MasterConfig, WorkerTemplate
from multibot.errors import GitError, LockTimeout, StateError, TmuxError
from multibot.heartbeat import HeartbeatTracker, read_heartbeat
from multibot.launcher import Launcher, worker_argv
from multibot.layout import Home
from multibot.lifecycle import worker_status
from multibot.state import GONE_WORKER, LIVE_WORKER, SystemState, WorkerInfo, WorkerState
from multibot.store import StateFile
from multibot.worktrees import GitRepo

SUPERVISE_EVERY_S = 0.25


def backoff(restarts: int, base: float, cap: float) -> float:
    """Return the delay before restart number ``restarts`` (1-based): base, 2*base, ... <= cap."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


@dataclass
class Checked:
    """What a look at the workers found."""

    dead: list[tuple[str, str]] = field(default_factory=list)  # (worker, why)
    due: list[str] = field(default_factory=list)  # workers whose restart is due
    changed: bool = False  # a worker's status changed


class WorkerPool:
    """The run's workers (``system-state.json``'s ``workers``) and their processes."""

    def __init__(
        self,
        home: Home,
        config: MasterConfig,
        template: WorkerTemplate,
        launcher: Launcher,
        backend: str,
        *,
        state: Callable[[], SystemState],
        chores: ThreadPoolExecutor,
        send: Callable[[str, protocol.Payload], None],
        event: Callable[..., None],
        monotonic: Callable[[], float],
        agent_env: Mapping[str, str] | None = None,
    ) -> None:
        self.home, self.config, self.template = home, config, template
        self.agent_env = dict(agent_env or {})  # secrets for the agents (see privacy.py)
        self.keys = Keys(b"")  # the run's (set by the master): each launch gets its worker's
        self.launcher, self.backend = launcher, backend
        self.state, self.chores, self.send, self.event = state, chores, send, event
        self.mono = monotonic
        self.watches: dict[str, HeartbeatTracker] = {}
        self.titles: dict[str, str] = {}  # worker id -> the title its pane shows
        self.launched: dict[str, float] = {}  # worker id -> when (mono) its process was started
        self.sought: set[int] = set()  # pids of adopted workers whose pane was looked for
        self.last_check = 0.0
        self.pane_look: tuple[float, Future[set[str]]] | None = None  # (started, look)
        self.title_job: Future[None] | None = None

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return self.state().workers

    def live(self) -> dict[str, WorkerInfo]:
        return {w: i for w, i in self.workers.items() if i.status in LIVE_WORKER}

    def free(self) -> dict[str, WorkerInfo]:
        """The live workers that can take a task now."""
        return {
            w: i
            for w, i in self.live().items()
            if i.status in ("idle", "starting") and i.current_task is None
        }

    # -- starting -------------------------------------------------------------------------------
    def spawn(self) -> str:
        """Start a new worker; return its id."""
        n = 1
        while f"w{n}" in self.workers:
            n += 1
        wid = f"w{n}"
        info = WorkerInfo(id=wid, generation=1, capabilities=list(self.template.capabilities))
        self.workers[wid] = info
        mailbox.create_inbox(self.home, wid)
        self.launch(wid, info, restart=False)
        self.event("worker-started", f"{wid} started", worker=wid)
        return wid

    def launch(self, wid: str, info: WorkerInfo, *, restart: bool) -> None:
        argv = worker_argv(self.home, wid, self.backend, info.generation)
        env = {"MULTIBOT_HOME": str(self.home.root)}
        if restart:
            # First: a frozen incarnation may hold the lock of its state file.
            self.kill_old_incarnation(wid, info.generation)
        # The worker's state file must not let an older incarnation claim it back, and names
        # no generation but the one launched here (a higher one is nobody's: reported).
        sf = StateFile(
            self.home.worker_state(wid), WorkerState, default=lambda: WorkerState(id=wid)
        )

        def launched(s: WorkerState) -> WorkerState:
            if s.generation > info.generation:
                self.event(
                    "worker-generation-impossible",
                    f"{wid}'s state file named generation {s.generation}, but the master "
                    f"launched it up to {info.generation}: set back",
                    worker=wid,
                )
            return s.model_copy(update={"generation": info.generation})

        with contextlib.suppress(StateError, LockTimeout):
            sf.update(launched)
        # Its key and the agents' secrets, for its process alone (see privacy.py).
        try:
            key = self.keys.worker(wid, info.generation)
            privacy.write_launch(self.home, wid, info.generation, key, self.agent_env)
        except OSError as exc:  # it derives its key from the run key, but has no secrets
            self.event("launch-file-failed", f"{wid}: {exc}", worker=wid)
        if restart and info.pane_id:
            info.pane_id = self.launcher.restart(info.pane_id, argv, env)
        else:
            info.pane_id = self.launcher.start(wid, argv, env, title(info))
        self.titles.pop(wid, None)  # a new pane needs its title
        with contextlib.suppress(TmuxError):
            info.pane_server = self.launcher.where()
        info.status, info.pid = "starting", self.launcher.pid(info.pane_id)
        info.next_restart_at = None
        self.launched[wid] = self.mono()
        self.watch(wid, info.generation, self.launched[wid])

    def restart(self, wid: str) -> None:
        """Start a dead worker's next incarnation, in its pane if it still has one."""
        info = self.workers[wid]
        info.generation += 1
        self.event(
            "worker-restart",
            f"{wid} restarting as generation {info.generation} (restart {info.restarts})",
            worker=wid,
        )
        self.launch(wid, info, restart=True)

    def kill_old_incarnation(self, wid: str, generation: int) -> None:
        """SIGKILL a frozen or stuck worker process, and the agents its earlier lives left."""
        hb = read_heartbeat(self.home.heartbeat(wid))
        if hb is not None and procs.runs(hb.pid, "worker", wid):  # checked: pids get reused
            procs.kill(hb.pid)
        # An agent runs in a session of its own, so it outlives a killed worker and would go on
        # changing the worktree beside the new incarnation's agent.
        for pid in procs.stray_agents(self.home, wid, generation):
            procs.kill(pid)

    def stop(self, wid: str, reason: str = "no more work") -> None:
        """Tell a worker to exit (its work committed); it is not restarted."""
        info = self.workers[wid]
        self.send(wid, protocol.Terminate(reason=reason))
        if info.status != "failed":
            info.status = "stopped"

    def release_worktree(self, info: WorkerInfo, git: GitRepo) -> None:
        """Free the task branch a failed or stopped worker's worktree holds, keeping its work."""
        # git lets a branch be checked out in one worktree only: without this, a task whose
        # worker failed, or that went back after its worker stopped, could never start again.
        path = self.home.worktree(info.id)
        if not path.exists():
            return
        self.kill_old_incarnation(info.id, info.generation + 1)  # a frozen one may linger
        try:
            commit = checkout.commit_all(path, f"multibot: work left by {info.id}")
            git.cleanup([path], force=True)  # everything is on the branch now
        except GitError as exc:  # a detached HEAD holds no branch; else the assignment says why
            self.event("worktree-kept", f"{path}: {exc}", worker=info.id)
            return
        self.event(
            "worktree-released",
            f"{info.id}'s worktree removed; its work is on its "
            f"branch{' as ' + commit[:10] if commit else ''}",
            worker=info.id,
        )

    # -- after a restart of the master -------------------------------------------------------
    def adopt(self) -> None:
        """Catch up with workers started or restarted just before the crash, from their files."""
        # A launch writes the worker's state file first and system-state.json a moment later:
        # a worker missing here would be started a second time under the same id.
        suffix = "-state.json"
        for path in sorted(self.home.workers_dir.glob(f"*{suffix}")):
            wid = path.name[: -len(suffix)]
            try:
                ws = StateFile(path, WorkerState, default=None).read()
                known = self.workers.get(wid)
                info = known or WorkerInfo(
                    id=wid, generation=ws.generation, capabilities=list(self.template.capabilities)
                )
            except (StateError, ValueError):
                continue
            if known is None:
                self.workers[wid] = info
                self.event(
                    "worker-adopted",
                    f"{wid} (generation {ws.generation}) was started just before the restart",
                    worker=wid,
                )
            elif ws.generation > info.generation + 1:  # no launch of ours: not taken
                self.event(
                    "worker-generation-impossible",
                    f"{wid}'s state file names generation {ws.generation}, but the master "
                    f"launched it up to {info.generation}: not taken",
                    worker=wid,
                )
            elif info.status in LIVE_WORKER and ws.generation > info.generation:
                info.generation = ws.generation  # restarted just before: watch the new one

    def forget_lost_panes(self) -> None:
        """Drop the pane ids recorded under another tmux server (the old one died): they
        would name nothing, or another pane of the new one."""
        try:
            here = self.launcher.where()
        except TmuxError as exc:
            self.event("pane-look-failed", f"cannot tell which tmux server runs: {exc}")
            return
        for wid, info in self.workers.items():
            if info.pane_id and info.pane_server != here:
                self.event(
                    "pane-forgotten",
                    f"{wid}'s pane {info.pane_id} was in {info.pane_server or 'an unknown server'}"
                    f", not {here}: it gets a new pane",
                    worker=wid,
                )
                info.pane_id, info.pane_server = None, None

    def watch_all(self) -> None:
        now = self.mono()
        for wid, info in self.workers.items():
            if info.status in LIVE_WORKER:
                self.watch(wid, info.generation, now)

    # -- supervision ----------------------------------------------------------------------------
    def watch(self, wid: str, generation: int, now: float) -> HeartbeatTracker:
        """Start judging a worker incarnation by its heartbeats, from now."""
        c = self.config
        tracker = HeartbeatTracker(
            c.heartbeat_interval,
            c.heartbeat_misses,
            # Workers beat every third of an interval, so the last beat before a freeze is up
            # to a third old already: judging at (misses - 1/3) intervals of silence, checked
            # every SUPERVISE_EVERY_S, keeps detection within `misses` intervals.
            tolerance=-c.heartbeat_interval / 3,
            startup_grace=max(c.heartbeat_interval * c.heartbeat_misses, 20.0),
        )
        tracker.expect(generation, now)
        self.watches[wid] = tracker
        return tracker

    def check(self, now: float, mono: float) -> Checked | None:
        """Look at the workers' heartbeats and panes: which died, whose restart is due.
        None if it is not time to look yet (a few looks a second are plenty, and cost)."""
        if mono - self.last_check < min(SUPERVISE_EVERY_S, self.config.heartbeat_interval / 4):
            return None
        self.last_check = mono
        handles = [
            i.pane_id
            for i in self.workers.values()
            if i.pane_id and i.status not in (*GONE_WORKER, "error")
        ]
        gone = self.look_at_panes(handles, mono)
        checked = Checked()
        for wid, info in list(self.workers.items()):
            if info.status in GONE_WORKER:
                continue
            if info.status == "error":
                if info.next_restart_at is not None and now >= info.next_restart_at:
                    checked.due.append(wid)
                continue
            tracker = self.watches.get(wid) or self.watch(wid, info.generation, mono)
            hb = read_heartbeat(self.home.heartbeat(wid))
            liveness = tracker.observe(hb, mono)
            if hb is not None and hb.generation == info.generation:
                info.last_heartbeat = hb.time
                if info.pane_id is None and hb.pid not in self.sought:
                    self.find(wid, info, hb.pid)
                status = worker_status(info.status, hb.status)
                checked.changed |= status != info.status
                info.status = status
            reason = liveness.reason if liveness.dead else None
            if reason is None and wid in gone:
                reason = "process exited"
            if reason is not None:
                checked.dead.append((wid, reason))
        return checked

    def look_at_panes(self, handles: list[str], mono: float) -> set[str]:
        """Return the workers whose pane (or process) the last finished look found dead.

        The look runs in the chores thread and its answer is taken on a later tick; a worker
        started again since the look began is not judged by it.
        """
        gone: set[str] = set()
        if self.pane_look is not None and self.pane_look[1].done():
            started, look = self.pane_look
            self.pane_look = None
            try:
                dead = look.result()
            except Exception as exc:  # tmux gone mad: judge by heartbeats alone this time
                self.event("pane-look-failed", str(exc))
                dead = set()
            for wid, info in self.workers.items():
                if info.pane_id in dead and self.launched.get(wid, 0.0) < started:
                    gone.add(wid)
        if self.pane_look is None and handles:
            self.pane_look = (mono, self.chores.submit(self.launcher.dead, handles))
        return gone

    def find(self, wid: str, info: WorkerInfo, pid: int) -> None:
        """Find the pane of a worker adopted after a restart (started by the master that
        crashed before it wrote down where), so it is titled, watched and restarted in place."""
        try:
            handle = self.launcher.find(pid)
        except TmuxError:
            return  # tmux did not answer: look again next time
        self.sought.add(pid)
        if handle is not None:
            info.pane_id, info.pid = handle, pid
            with contextlib.suppress(TmuxError):
                info.pane_server = self.launcher.where()
            self.event("worker-found", f"{wid} runs in {handle} (pid {pid})", worker=wid)

    def died(self, wid: str, reason: str, now: float) -> bool:
        """Apply the restart policy to a dead worker: a restart after a backoff, or, past
        max_restarts, failed for good (returned True: its task must go back)."""
        info = self.workers[wid]
        if info.died_at is not None and now - info.died_at > self.config.restart_window:
            info.restarts = 0  # it lived long enough since its last death: a fresh count
        info.died_at = now
        info.restarts += 1
        self.state().metrics.restarts += 1
        info.failure_reason = reason
        if info.restarts > self.config.max_restarts:
            info.status = "failed"
            self.event(
                "worker-failed",
                f"{wid} failed after {info.restarts - 1} restarts: {reason}",
                worker=wid,
            )
            return True
        delay = backoff(info.restarts, self.config.restart_backoff, self.config.restart_backoff_max)
        info.status, info.next_restart_at = "error", now + delay
        self.event("worker-dead", f"{wid} is dead ({reason}); restart in {delay:.1f}s", worker=wid)
        return False

    # -- panes ----------------------------------------------------------------------------------
    def refresh_titles(self) -> None:
        """Show each worker's task, model and status in its pane title (one call for all)."""
        changed: dict[str, str] = {}
        for wid, info in self.workers.items():
            shown = title(info)
            if info.pane_id and self.titles.get(wid) != shown:
                self.titles[wid] = changed[info.pane_id] = shown
        if self.title_job is not None and self.title_job.done():
            if self.title_job.exception() is not None:
                self.event("titles-failed", str(self.title_job.exception()))
            self.title_job = None
        if changed:
            self.title_job = self.chores.submit(self.launcher.set_titles, changed)


def title(info: WorkerInfo) -> str:
    """A worker's pane title: its task, model and status."""
    return f"{info.id} · {info.current_task or '-'} · {info.model or '-'} · {info.status}"
