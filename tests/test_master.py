"""The master in memory: no worker processes, no tmux, a fake clock.

A ``FakeLauncher`` records what the master starts, restarts and stops, and the test says
which panes are dead; the test plays each worker, reading its assignments from its inbox and
answering with commits on the task's branch. The repository is a real one in a temp folder
(git takes milliseconds); everything else the master does runs as in a real run. These tests
cover the supervision policy, the scheduling of a plan, retries and the journal's ordering in
a second or two; the end-to-end tests (test_master_e2e.py) stay the safety net.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from multibot import auth, mailbox, protocol
from multibot.config import MasterConfig
from multibot.layout import MASTER_ID, Home
from multibot.master import EXIT_DONE, EXIT_FAILED, Master
from multibot.master.intake import Intake
from multibot.state import Plan, PlanTask, SystemState, TaskRecord, WorkerState
from multibot.status import render, snapshot
from multibot.store import StateFile
from multibot.timeline import read_timeline
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


class FakeLauncher:
    """Where no process runs: starts and restarts are recorded, dead panes are set."""

    def __init__(self) -> None:
        self.started: list[str] = []  # worker ids, in order
        self.restarted: list[str] = []  # handles
        self.stopped: list[str] = []
        self.gone: set[str] = set()  # handles whose process the test says is dead
        self.titles: dict[str, str] = {}
        self.count = 0

    def _handle(self) -> str:
        self.count += 1
        return f"%{self.count}"

    def start(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str], title: str) -> str:
        self.started.append(worker_id)
        return self._handle()

    def restart(self, handle: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
        self.restarted.append(handle)
        return self._handle()

    def alive(self, handle: str) -> bool:
        return handle not in self.gone

    def pid(self, handle: str) -> int | None:
        return None

    def find(self, pid: int) -> str | None:
        return None

    def dead(self, handles: Sequence[str]) -> set[str]:
        return {h for h in handles if h in self.gone}

    def stop(self, handle: str) -> None:
        self.stopped.append(handle)

    def set_titles(self, titles: Mapping[str, str]) -> None:
        self.titles.update(titles)

    def where(self) -> str:
        return "fake"


class Clock:
    """Wall and monotonic time that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


class World:
    """A master in memory over a real repository, and the workers the test plays."""

    def __init__(
        self, tmp: Path, tasks: list[PlanTask], home: Path | None = None, **config: Any
    ) -> None:
        self.repo = tmp / "project"
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        git(self.repo, "config", "user.email", "t@example.com")
        git(self.repo, "config", "user.name", "t")
        (self.repo / "app.txt").write_text("one\n")
        git(self.repo, "add", ".")
        git(self.repo, "commit", "-q", "-m", "initial")
        self.home = Home.at(home or tmp / "home")
        self.launcher = FakeLauncher()
        self.clock = Clock()
        settings = {"max_workers": 2, "heartbeat_interval": 1.0, "heartbeat_misses": 3, **config}
        self.config = MasterConfig(**settings)
        self.master = self.new_master()
        try:
            self.master.start_new(Plan(goal="test", tasks=tasks), "test", "run-1")
        except BaseException:
            self.master.close()
            raise
        self.inboxes: dict[str, mailbox.Receiver] = {}

    def new_master(self) -> Master:
        return Master(
            self.home,
            self.config,
            repo=self.repo,
            backend="shell",
            launcher=self.launcher,
            out=io.StringIO(),
            clock=self.clock,
            monotonic=self.clock,
        )

    def restart(self) -> None:
        """The master stops and a new one resumes the run from the files."""
        self.master.close()
        self.master = self.new_master()
        self.master.resume()

    def tick(self) -> None:
        self.master.tick()
        assert self.master.ctx.inbox is not None
        self.master.ctx.inbox.wait(0.01)  # a job done in a lane rings it

    def until(
        self, pred: Callable[[], object], what: str, timeout: float = 20.0, step: float = 0.05
    ) -> None:
        """Tick until pred holds, the clock moving by step before each tick (background jobs,
        such as merges, run in real time)."""

        def ticked() -> object:
            self.clock.advance(step)
            self.tick()
            return pred()

        wait_until(ticked, timeout, interval=0)

    def take(self, wid: str, kind: type) -> list[protocol.Envelope]:
        """Take every message waiting in a worker's inbox (as the worker does); return
        those whose payload is of kind."""
        if wid not in self.inboxes:  # checked as the worker checks them
            self.inboxes[wid] = mailbox.Receiver(
                self.home, wid, verify=lambda m: self.key(wid).check(m, m.task_id)
            )
        got = self.inboxes[wid].fetch()
        self.inboxes[wid].done(*got)
        return [m for m in got if isinstance(m.payload, kind)]

    def assignments(self, wid: str) -> list[protocol.Envelope]:
        return self.take(wid, protocol.TaskAssignment)

    def finish(
        self,
        wid: str,
        m: protocol.Envelope,
        text: str | None = None,
        reported_branch: str | None = None,
    ) -> None:
        """Do the assigned task: a commit on its branch, then TASK_COMPLETE to the master."""
        p = m.payload
        assert isinstance(p, protocol.TaskAssignment) and m.task_id
        git(self.repo, "branch", "-f", p.branch, p.base_branch)
        path = self.home.root / "scratch" / m.task_id
        git(self.repo, "worktree", "add", "-q", str(path), p.branch)
        (path / f"{m.task_id}.txt").write_text(text or f"{m.task_id}\n")
        git(path, "add", ".")
        git(path, "commit", "-q", "-m", f"do {m.task_id}")
        commit = git(path, "rev-parse", "HEAD")
        git(self.repo, "worktree", "remove", "--force", str(path))
        done = protocol.TaskComplete(
            summary="done", branch=reported_branch or p.branch, commit=commit
        )
        self.report(wid, m, done)

    def key(self, wid: str) -> auth.WorkerKey:
        """The worker's key at its current generation, as its process has it."""
        gen = self.master.sys.workers[wid].generation
        return auth.WorkerKey(wid, gen, auth.load_keys(self.home).worker(wid, gen))

    def say(self, message: protocol.Envelope) -> None:
        """Send message to the master as its sender's worker process does: signed."""
        mailbox.send(self.home, self.key(message.sender).sign(message))

    def report(self, wid: str, m: protocol.Envelope, payload: protocol.Payload) -> None:
        info = self.master.sys.workers[wid]
        self.say(
            protocol.make(
                payload,
                sender=wid,
                recipient=MASTER_ID,
                generation=info.generation,
                task_id=m.task_id,
            ),
        )

    def task(self, tid: str) -> TaskRecord:
        return StateFile(self.home.task(tid), TaskRecord, default=None).read()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in read_timeline(self.home.timeline) if e.get("event") == kind]

    def merged(self) -> list[str]:
        log = git(self.repo, "log", "--format=%s", "multibot/integration")
        prefix = "multibot: merge task "
        return [s.split()[3] for s in log.splitlines() if s.startswith(prefix)]

    def close(self) -> None:
        self.master.close()
        for r in self.inboxes.values():
            r.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(tasks: list[PlanTask], home: Path | None = None, **config: Any) -> World:
        made.append(World(tmp_path, tasks, home, **config))
        return made[-1]

    yield make
    for w in made:
        w.close()


def tasks(*ids: str, after: Mapping[str, list[str]] | None = None, **extra: Any) -> list[PlanTask]:
    return [
        PlanTask(id=t, title=t, description=t, dependencies=(after or {}).get(t, []), **extra)
        for t in ids
    ]


def test_a_plan_runs_in_dependency_order_to_merged(world: Callable[..., World]) -> None:
    w = world(tasks("a", "b", "c", after={"c": ["a", "b"]}))
    w.tick()
    assert w.launcher.started == ["w1", "w2"]  # two ready tasks, two workers at most
    got = {wid: w.assignments(wid) for wid in ("w1", "w2")}
    assert sorted(m.task_id or "" for ms in got.values() for m in ms) == ["a", "b"]
    for wid, ms in got.items():
        assert w.task(ms[0].task_id or "").status == "assigned"  # on disk before it was sent
        w.finish(wid, ms[0])
    w.until(lambda: w.master.tasks["c"].status == "assigned", "c starts once a and b merged")
    assert sorted(w.merged()) == ["a", "b"]
    wid = w.master.tasks["c"].worker or ""
    (m,) = w.assignments(wid)
    assert any("a (a) is merged" in line for line in m.payload.context)  # type: ignore[union-attr]
    w.finish(wid, m)
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_DONE
    assert sorted(w.merged()) == ["a", "b", "c"]
    assert w.launcher.started == ["w1", "w2"]


def test_a_silent_worker_is_restarted_with_backoff_then_failed(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a"), max_workers=1, max_restarts=2, restart_backoff=5, restart_backoff_max=8)
    w.tick()
    (m,) = w.assignments("w1")
    grace = 20.0  # no heartbeat at all: judged after the start-up grace
    w.clock.advance(grace + 1)
    w.until(lambda: w.master.sys.workers["w1"].status == "error", "judged dead")
    info = w.master.sys.workers["w1"]
    assert info.next_restart_at == pytest.approx(w.clock.now + 5)  # first backoff
    w.clock.advance(4)
    for _ in range(5):
        w.tick()
    assert w.launcher.restarted == []  # not before its backoff
    w.clock.advance(1.5)
    w.until(lambda: w.launcher.restarted == ["%1"], "restarted in its pane")
    assert info.generation == 2
    assert w.assignments("w1")[-1].task_id == "a"  # the assignment is sent again
    w.clock.advance(grace + 1)
    w.until(lambda: info.status == "error", "dead again")
    assert info.next_restart_at == pytest.approx(w.clock.now + 8)  # doubled, capped at 8
    w.clock.advance(9)
    w.until(lambda: len(w.launcher.restarted) == 2, "restarted again")
    w.clock.advance(grace + 1)
    w.until(lambda: info.status == "failed", "failed past max_restarts")
    rec = w.master.tasks["a"]
    assert rec.status in ("pending", "assigned")  # back for another worker, attempt spent
    assert "failed after 2 restarts" in (rec.last_error or "")
    assert m.task_id == "a"


def test_a_dead_pane_counts_as_a_death_before_any_heartbeat_is_missed(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a"), max_workers=1)
    w.tick()
    w.launcher.gone.add(w.master.sys.workers["w1"].pane_id or "")
    w.until(lambda: w.master.sys.workers["w1"].status == "error", "judged dead")
    assert "process exited" in (w.master.sys.workers["w1"].failure_reason or "")


def test_a_failing_verify_sends_the_task_back_then_fails_the_run(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a", verify="echo nope; false"), max_workers=1, max_attempts=2)
    for attempt in (1, 2):
        w.until(lambda: w.master.tasks["a"].status == "assigned", f"attempt {attempt}")
        (m,) = w.assignments("w1")
        assert m.payload.attempt == attempt  # type: ignore[union-attr]
        if attempt == 2:
            assert any("nope" in c for c in m.payload.context)  # type: ignore[union-attr]
        w.finish("w1", m, text=f"try {attempt}\n")
        w.until(lambda: w.master.tasks["a"].status != "verifying", "verified or not")
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_FAILED
    assert w.task("a").status == "failed"
    assert w.merged() == []
    assert len(w.events("task-retry")) == 1 and len(w.events("task-failed")) == 1


def test_a_completion_from_another_worker_is_ignored(world: Callable[..., World]) -> None:
    w = world(tasks("a", "b"))
    w.tick()
    m1, m2 = w.assignments("w1")[0], w.assignments("w2")[0]
    w.report("w2", m1, protocol.TaskComplete(summary="not mine", branch="x"))
    w.until(lambda: w.events("duplicate-ignored"), "refused")
    assert w.master.tasks[m1.task_id or ""].status == "assigned"
    assert m2.task_id != m1.task_id


def test_a_cancelled_failed_task_ends_the_run(world: Callable[..., World]) -> None:
    w = world(tasks("a", verify="false"), max_workers=1, max_attempts=1)
    w.tick()
    (m,) = w.assignments("w1")
    w.finish("w1", m)
    w.until(lambda: w.master.finished, "the run ends failed")
    rec = w.master.tasks["a"]
    w.master.take_edit(rec, rec.model_copy(update={"cancel": True}))
    assert w.master.tasks["a"].status == "cancelled"


def test_a_message_that_breaks_its_handler_is_set_aside_for_good(
    world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 15: an exception out of a handler stopped the master, and the message,
    claimed but not handled, stopped it again at every restart."""
    w = world(tasks("a"), max_workers=1)
    w.tick()
    (m,) = w.assignments("w1")
    handle = Intake.on_status

    def poisoned(self: Intake, m: protocol.Envelope, p: protocol.StatusUpdate) -> None:
        if p.progress == "poison":
            raise ValueError("a handler bug")
        handle(self, m, p)

    monkeypatch.setattr(Intake, "on_status", poisoned)
    w.report("w1", m, protocol.StatusUpdate(status="working", kind="progress", progress="poison"))
    w.until(lambda: w.events("message-set-aside"), "set aside")
    (entry,) = mailbox.inbox_report(w.home, MASTER_ID).rejected
    assert "ValueError: a handler bug" in entry.reason
    w.restart()
    for _ in range(5):
        w.tick()
    assert len(w.events("message-set-aside")) == 1  # not delivered again
    w.finish("w1", m)
    w.until(lambda: w.master.finished, "the run goes on to its end")
    assert w.merged() == ["a"]


def test_a_completion_on_another_branch_merges_the_tasks_own(world: Callable[..., World]) -> None:
    """The task's branch is the master's to name: a completion reporting another (a typo, a
    forgery) does not make the master merge that one."""
    w = world(tasks("a"), max_workers=1)
    w.tick()
    (m,) = w.assignments("w1")
    git(w.repo, "branch", "elsewhere", "main")
    w.finish("w1", m, reported_branch="elsewhere")
    w.until(lambda: w.master.finished, "the run ends")
    assert w.merged() == ["a"]
    assert git(w.repo, "show", "multibot/integration:a.txt") == "a"
    assert w.master.tasks["a"].branch == m.payload.branch  # type: ignore[union-attr]
    assert w.events("branch-ignored")


def context_updates(w: World, wid: str) -> list[str]:
    return [m.payload.text for m in w.take(wid, protocol.ContextUpdate)]  # type: ignore[union-attr]


def test_a_discovery_reaches_a_paused_worker_and_is_recorded_once(
    world: Callable[..., World],
) -> None:
    """Issue 20 items 5 and 10: a worker paused (or restarting) when a discovery was made
    never heard of it; a task run again recorded its discovery again."""
    w = world(tasks("a", "b"))
    w.tick()
    (ma,), (mb,) = w.assignments("w1"), w.assignments("w2")
    context_updates(w, "w2")
    w.master.sys.workers["w2"].status = "paused"
    found = protocol.StatusUpdate(status="working", kind="discovery", progress="port is 8080")
    w.report("w1", ma, found)
    w.until(lambda: w.events("discovery"), "recorded")
    w.until(lambda: context_updates(w, "w2") == ["port is 8080"], "w2 told, paused or not")
    w.report("w1", ma, found)  # the task again, after its worker died
    for _ in range(10):
        w.tick()
    assert context_updates(w, "w2") == []
    assert len(w.events("discovery")) == 1
    shared = w.master.ctx.discoveries.all()
    assert [(d.task_id, d.text) for d in shared] == [("a", "port is 8080")]
    assert mb.task_id == "b"


def test_a_task_run_again_after_its_worker_died_shows_the_rerun(
    world: Callable[..., World],
) -> None:
    from multibot.status import render, snapshot

    w = world(tasks("a"), max_workers=1, restart_backoff=0.1)
    w.tick()
    w.launcher.gone.add(w.master.sys.workers["w1"].pane_id or "")
    w.until(lambda: w.master.sys.workers["w1"].status == "error", "judged dead")
    w.until(lambda: w.task("a").runs == 2, "the rerun written down")
    rec = w.task("a")
    assert rec.attempts == 1
    w.master.flush(force=True)
    assert "1 (+1 rerun)" in render(snapshot(w.home))


def test_a_task_behind_a_failed_dependency_is_blocked_and_the_run_ends(
    world: Callable[..., World],
) -> None:
    """Issue 20 item 7: the run stayed running for ever, with no reason in status."""
    from multibot.status import render, snapshot

    plan = [*tasks("a", verify="false"), *tasks("b", "c", after={"b": ["a"], "c": ["b"]})]
    w = world(plan, max_workers=1, max_attempts=1)
    w.tick()
    (m,) = w.assignments("w1")
    w.finish("w1", m)
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_FAILED
    assert w.master.sys.phase == "failed"
    w.master.flush(force=True)
    shown = {t["id"]: t for t in snapshot(w.home)["tasks"]}
    assert shown["b"]["status"] == "blocked" and "dependency a failed" in shown["b"]["error"]
    assert shown["c"]["status"] == "blocked" and "dependency b is blocked" in shown["c"]["error"]
    assert "blocked" in render(snapshot(w.home))
    assert "1 failed, 2 blocked" in w.events("run-finished")[0]["text"]


def test_cancelling_a_task_others_depend_on_ends_the_run(world: Callable[..., World]) -> None:
    """Issue 20 item 18 (and 7): its dependents waited for ever."""
    w = world(tasks("a", "b", after={"b": ["a"]}), max_workers=1)
    w.tick()
    rec = w.master.tasks["a"]
    w.master.take_edit(rec, rec.model_copy(update={"cancel": True}))
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_FAILED
    assert w.task("b").last_error == "blocked: its dependency a cancelled"


def test_a_capability_no_worker_offers_is_refused_at_the_start(tmp_path: Path) -> None:
    from multibot.errors import PlanError

    plan = [PlanTask(id="a", title="a", description="a", capabilities=["gpu"])]
    with pytest.raises(PlanError, match="'a' needs gpu, which no worker offers"):
        World(tmp_path, plan)


def test_a_cancel_that_comes_as_the_merge_lands_leaves_the_task_merged(
    world: Callable[..., World],
) -> None:
    """Issue 20 item 18: the record said cancelled while the merge was in git, and its
    dependent waited for ever."""
    from multibot.master.pipeline import Merged

    w = world(tasks("a", "b", after={"b": ["a"]}), max_workers=1)
    w.tick()
    rec = w.master.tasks["a"]
    w.master.sys.workers["w1"].current_task = None  # as when its completion came
    w.master.sys.workers["w1"].status = "idle"
    w.master.ctx.book.move(rec, "verifying")
    w.master.ctx.book.move(rec, "verified")
    w.master.take_edit(rec, rec.model_copy(update={"cancel": True}))
    assert rec.status == "cancelled"
    w.master.results.take_outcome(Merged(task_id="a", merge_commit=None))  # the land was in flight
    assert rec.status == "merged" and w.events("cancel-too-late")
    w.until(lambda: w.master.tasks["b"].status == "assigned", "its dependent goes on")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB file system of its own (tmpfs), unmounted at the end."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs to mount a tmpfs: {done.stderr!r}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr!r}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill disk to the last byte; return the file to remove to free it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_does_not_stop_the_master(
    world: Callable[..., World], small_disk: Path
) -> None:
    """Issue 20 item 3: an unhandled OSError (ENOSPC) in a state file's write ended the
    master. It now keeps its state in memory, says so, retries, and goes on."""
    w = world(tasks("a", "b", "c", after={"c": ["a"]}), home=small_disk / "home")
    w.tick()
    got = {wid: w.assignments(wid) for wid in ("w1", "w2")}
    for wid, (m,) in got.items():
        w.finish(wid, m)
    filler = fill(small_disk)
    for _ in range(40):  # the completions come in, and nothing can be written
        w.clock.advance(0.05)
        w.tick()
    assert w.events("write-failed") or w.master.ctx.write_failing is not None
    assert not w.master.finished
    filler.unlink()
    w.until(lambda: w.master.tasks["c"].status == "assigned", "goes on once space is back")
    (m,) = w.assignments(w.master.tasks["c"].worker or "")
    w.finish(w.master.tasks["c"].worker or "", m)
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_DONE
    assert sorted(w.merged()) == ["a", "b", "c"]  # each once
    assert w.events("write-failed") and w.events("write-recovered")


def hand_edit(path: Path, **fields: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in fields.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data, indent=2))


def test_edits_made_while_the_master_was_down_follow_the_running_rules(
    world: Callable[..., World],
) -> None:
    """Issue 20 items 17 and 19: at a restart, a pending task set to merged by hand was
    counted as merged (never run), edited commands ran, a stray tasks/ghost.json was run and
    merged, a file named unlike its task wedged the run, and a broken pending task file (no
    .bak yet) stopped the master from starting at all."""
    plan = tasks("a", "b", "c", "d", commands=["echo planned > out.txt"])
    w = world(plan, max_workers=1)
    w.master.close()
    home = w.home
    hand_edit(home.task("a"), status="merged")
    hand_edit(home.task("b"), **{"task.commands": ["echo evil > out.txt"], "hold": False})
    ghost = json.loads(home.task("c").read_text())
    ghost["task"]["id"] = "ghost"
    home.task("ghost").write_text(json.dumps(ghost))
    home.task("d").write_text("{ broken")
    home.task("zz").write_text(home.task("c").read_text())  # holds task c
    w.master = w.new_master()
    w.master.resume()  # it starts at all (item 19)
    refused = " ".join(e["text"] for e in w.events("task-file-refused"))
    assert "a.json: a field only multibot writes" in refused
    assert "b.json: a field only multibot writes" in refused
    assert "ghost.json: it is no task of the plan" in refused
    assert "zz.json: it holds task 'c', not 'zz'" in refused
    assert "d.json:1:3: Expecting property name" in refused
    assert "ghost" not in w.master.tasks
    assert w.master.tasks["a"].status == "pending"
    assert w.master.tasks["b"].task.commands == ["echo planned > out.txt"]
    seen: set[str] = set()
    while len(seen) < 4:
        w.until(lambda: w.master.tasks and any(
            r.status == "assigned" and r.id not in seen for r in w.master.tasks.values()
        ), "the next task is assigned")  # fmt: skip
        (m,) = w.assignments("w1")
        assert m.payload.commands == ["echo planned > out.txt"]  # type: ignore[union-attr]
        seen.add(m.task_id or "")
        w.finish("w1", m)
    w.until(lambda: w.master.finished, "the run ends")
    assert sorted(w.merged()) == ["a", "b", "c", "d"]
    assert w.task("a").status == "merged" and not w.task("a").forged()


def test_a_forged_field_while_the_master_runs_is_reported_and_put_back(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a", "b"), max_workers=1)
    w.tick()
    hand_edit(w.home.task("b"), **{"task.title": "renamed by hand"})
    w.until(lambda: w.events("bad-edit"), "reported")
    assert "b.json: a field only multibot writes" in w.events("bad-edit")[0]["text"]
    w.master.ctx.book.move(w.master.tasks["b"], "cancelled")
    w.until(lambda: w.task("b").status == "cancelled", "written")
    assert w.task("b").task.title == "b" and not w.task("b").forged()


def test_restarts_are_counted_in_a_window(world: Callable[..., World]) -> None:
    """Issue 20 item 21: restart counts never went down, so 64 kills spread over a long run
    failed 11 of 14 workers. A worker that lived restart_window since its last death starts
    a fresh count."""
    w = world(tasks("a"), max_workers=1, max_restarts=1, restart_backoff=0.1,
              restart_window=60)  # fmt: skip
    w.tick()
    info = w.master.sys.workers["w1"]
    for death in range(3):  # each after more than the window: never failed
        w.launcher.gone.add(info.pane_id or "")
        w.until(lambda: info.status == "error", f"death {death + 1}")
        assert info.restarts == 1
        w.clock.advance(0.5)
        w.until(lambda: info.status == "starting", "restarted")
        w.clock.advance(61)
    w.launcher.gone.add(info.pane_id or "")  # and two deaths within it: failed
    w.until(lambda: info.status == "error", "a death")
    w.clock.advance(0.5)
    w.until(lambda: info.status == "starting", "restarted")
    w.launcher.gone.add(info.pane_id or "")
    w.until(lambda: info.status == "failed", "failed within the window")


def answers(w: World, wid: str) -> list[str]:
    return [m.payload.answer for m in w.take(wid, protocol.Answer)]  # type: ignore[union-attr]


def test_an_answer_is_delivered_only_once_it_is_in_the_inbox(
    world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 14: a failed send was swallowed and the question marked delivered, so
    the worker waited for an answer that never came. And an answer for a `multibot ask`
    that gave up (its reply inbox gone) goes to the worker's own inbox."""
    from multibot.errors import SendError
    from multibot.master import journal
    from multibot.state import FaqEntry, QuestionRecord

    w = world(tasks("a"), max_workers=1)
    w.master.ctx.plan = w.master.ctx.plan.model_copy(
        update={"faq": [FaqEntry(match="port", answer="8080")]}
    )
    w.tick()
    (m,) = w.assignments("w1")
    real, full = mailbox.stage, {"on": True}

    def stage(home: Home, message: protocol.Envelope, **kw: Any) -> Any:
        if isinstance(message.payload, protocol.Answer) and full["on"]:
            raise SendError("cannot deliver: [Errno 28] No space left on device")
        return real(home, message, **kw)

    monkeypatch.setattr(journal.mailbox, "stage", stage)
    asked = protocol.make(
        protocol.Question(question="which port?"),
        sender="w1",
        recipient=MASTER_ID,
        generation=1,
        task_id="a",
        reply_to="ask-0123456789abcdef",  # gone: that `multibot ask` gave up
    )
    w.say(asked)
    qfile = w.home.question("q-" + asked.id)
    w.until(qfile.exists, "recorded")
    for _ in range(5):
        w.tick()
    q = StateFile(qfile, QuestionRecord, default=None).read()
    assert q.status == "answered" and q.answer == "8080"  # not delivered: the send failed
    assert w.events("write-failed")
    full["on"] = False
    w.until(lambda: answers(w, "w1") == ["8080"], "sent again, to the worker's inbox")
    w.until(
        lambda: StateFile(qfile, QuestionRecord, default=None).read().status == "delivered",
        "delivered once in the inbox",
    )
    assert m.task_id == "a"


def test_a_busy_worker_sends_its_task_back_to_wait(world: Callable[..., World]) -> None:
    """A worker already on another task (an assignment sent again after a restart) says so
    with an error of kind busy (the master matched the text "busy" in the message before)."""
    w = world(tasks("a"), max_workers=1)
    w.tick()
    (m,) = w.assignments("w1")
    busy = protocol.ErrorReport(kind="busy", message="busy with b", recoverable=True)
    w.report("w1", m, busy)
    w.until(lambda: w.master.tasks["a"].status in ("pending", "assigned") and
            w.master.tasks["a"].attempts == 2, "assigned again")  # fmt: skip
    assert not w.events("task-failed") and not w.events("task-retry")


def test_messages_that_do_not_prove_their_sender_are_refused_and_counted(
    world: Callable[..., World],
) -> None:
    """Issue 21: a discovery sent as w1 by another process was recorded as w1's and broadcast;
    a TASK_COMPLETE forged for w1's task was merged while w1's agent was still working."""
    w = world(tasks("a", "b"))
    w.tick()
    (ma,), (mb,) = w.assignments("w1"), w.assignments("w2")
    keys = auth.load_keys(w.home)
    found = protocol.StatusUpdate(status="working", kind="discovery", progress="forged news")
    as_w1 = protocol.make(found, sender="w1", recipient=MASTER_ID, generation=1, task_id="a")
    commit = git(w.repo, "rev-parse", "main")
    done = protocol.make(
        protocol.TaskComplete(summary="forged", branch="multibot/a", commit=commit),
        sender="w1",
        recipient=MASTER_ID,
        generation=1,
        task_id="a",
    )
    forgeries = [
        as_w1,  # unsigned
        auth.sign(as_w1, keys.worker("w2", 1), 1),  # w2's key, claiming to be w1
        auth.sign(done, keys.agent("w1", 1, "a"), 1, auth.AGENT),  # w1's agent's key
        auth.sign(done, keys.worker("w1", 2), 2),  # a generation the master never launched
        as_w1.model_copy(update={"mac": "worker.1." + "0" * 64}),
    ]
    for forged in forgeries:
        mailbox.send(w.home, forged)
    w.until(lambda: w.master.sys.metrics.messages_refused == len(forgeries), "all refused")
    for _ in range(5):
        w.tick()
    assert w.master.ctx.discoveries.all() == [] and context_updates(w, "w2") == []
    assert w.master.tasks["a"].status in ("assigned", "running")  # not verifying, not merged
    rejected = mailbox.inbox_report(w.home, MASTER_ID).rejected
    assert len(rejected) == len(forgeries)
    assert any("not signed" in r.reason for r in rejected)
    w.master.flush(force=True)
    assert "REFUSED  5 messages" in render(snapshot(w.home, now=w.clock.now))
    # The genuine ones still count.
    w.finish("w1", ma)
    w.finish("w2", mb)
    w.until(lambda: w.master.sys.phase == "done", "merged")
    assert w.master.sys.metrics.messages_refused == len(forgeries)


def test_an_impossible_worker_generation_is_reported_and_set_back(
    world: Callable[..., World],
) -> None:
    """Issue 21: `"generation": 999` written into a worker's state file disabled the worker
    for good (every next incarnation found a newer one and would not start)."""
    w = world(tasks("a"), max_workers=1)
    w.tick()
    w.assignments("w1")
    state = StateFile(w.home.worker_state("w1"), WorkerState, default=None)
    state.update(lambda s: s.model_copy(update={"generation": 999}))
    w.clock.advance(21)  # no heartbeat: judged dead, restarted as generation 2
    w.until(lambda: w.launcher.restarted, "restarted")
    assert w.master.sys.workers["w1"].generation == 2
    assert state.read().generation == 2
    (event,) = w.events("worker-generation-impossible")
    assert "999" in event["text"]
    launch = json.loads(w.home.launch_file("w1").read_text())
    assert launch["generation"] == 2
    assert launch["key"] == auth.load_keys(w.home).worker("w1", 2).hex()


# -- the API's limits (issue 16) ----------------------------------------------------------------
def limit(status: int = 429, detail: str = "rate_limit") -> protocol.ErrorReport:
    return protocol.ErrorReport(
        kind="limit", message=f"API Error: Request rejected ({status})", detail=detail,
        api_status=status,
    )  # fmt: skip


def test_a_limit_spends_no_attempt_throttles_the_run_and_halves_concurrency(
    world: Callable[..., World],
) -> None:
    """Issue 16: three workers met 25 s of 429s and the run ended "0 merged, 3 failed"; a
    limit was taken as a failed attempt, and max_attempts of them failed the task."""
    w = world(
        tasks("a", "b", "c", "d"), max_workers=4, max_attempts=1, limit_backoff=10,
        limit_backoff_max=10,
    )  # fmt: skip
    w.tick()
    sent = {wid: w.assignments(wid) for wid in ("w1", "w2", "w3", "w4")}
    assert all(len(got) == 1 for got in sent.values())
    for wid in ("w1", "w2", "w3"):
        w.report(wid, sent[wid][0], limit())
    w.until(lambda: w.master.ctx.throttle.hits == 3, "every limit taken in")
    tasks_ = w.master.tasks
    limited = [sent[wid][0].task_id for wid in ("w1", "w2", "w3")]
    for tid in limited:  # back, attempt given back, and nothing failed with max_attempts 1
        assert tasks_[tid].status == "pending" and tasks_[tid].attempts == 0, tid
        assert tasks_[tid].limits == 1
    assert not w.events("task-failed") and not w.events("task-retry")
    assert w.master.ctx.throttle.allowed == 1  # halved of those running: 4 -> 2, 3 -> 1, 2 -> 1
    view = w.master.sys.limits
    assert view.throttled and view.hits == 3 and "429 from w3" in view.line
    assert "1 of 4 workers allowed" in view.line
    assert len(w.events("throttled")) == 3
    # While throttled no agent starts, though three workers are idle and three tasks ready.
    for _ in range(20):
        w.tick()
    assert all(not w.assignments(wid) for wid in ("w1", "w2", "w3"))
    # The worker still running finishes: its task goes on, and one more agent may run.
    w.finish("w4", sent["w4"][0])
    w.until(lambda: tasks_[sent["w4"][0].task_id].status == "merged", "merged meanwhile")
    assert w.master.ctx.throttle.allowed == 2
    # After the backoff the limited tasks go back to their own workers, the same attempt,
    # two at a time (allowed 2), and then one more for each that succeeds.
    w.clock.advance(11)
    w.until(lambda: w.events("throttle-ended"), "the throttle ends")
    again: dict[str, protocol.Envelope] = {}

    def collect() -> bool:
        for wid in ("w1", "w2", "w3"):
            for m in w.assignments(wid):
                again[wid] = m
        return len(again) >= 2

    w.until(collect, "two assigned again")
    assert len(again) == 2  # concurrency: 2 allowed
    for wid, m in again.items():
        assert m.task_id == sent[wid][0].task_id, "to the worker whose session holds it"
        assert isinstance(m.payload, protocol.TaskAssignment) and m.payload.attempt == 1
    for wid, m in list(again.items()):
        w.finish(wid, m)
    w.until(collect, "the third assigned after the successes")
    assert len(again) == 3
    w.finish(*next((wid, m) for wid, m in again.items() if wid not in ("w1", "w2")))
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_DONE
    assert sorted(w.merged()) == ["a", "b", "c", "d"]
    assert all(w.task(t).attempts == 1 for t in "abcd")
    assert w.master.ctx.throttle.allowed == 4  # grown back one at a time


def test_the_run_pauses_itself_once_it_has_waited_too_long_for_the_api(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a"), max_workers=1, limit_backoff=30, limit_backoff_max=30,
              limit_wait_max=60)  # fmt: skip
    w.master.limits.draw = lambda: 1.0  # the longest wait each time: 30 s
    w.tick()
    (m,) = w.assignments("w1")
    for spell in range(1, 4):
        w.report("w1", m, limit(529, "overloaded"))
        w.until(lambda: w.master.ctx.throttle.hits == spell, "taken in")  # noqa: B023
        if spell == 3:
            break
        assert not w.master.sys.paused
        w.clock.advance(30)
        got: list[protocol.Envelope] = []
        w.until(lambda: got.extend(w.assignments("w1")) or got, "resumed after the wait")  # noqa: B023
        (m,) = got
    w.until(lambda: w.master.sys.paused, "paused itself")
    [paused] = w.events("paused")
    assert "paused itself" in paused["text"] and "multibot resume all" in paused["text"]
    assert w.master.tasks["a"].status == "pending" and w.master.tasks["a"].attempts == 0
    assert not w.events("task-failed")
    on_disk = json.loads(w.home.system_state.read_text())
    assert on_disk["paused"] is True  # in the file, where a person (or the CLI) resumes it
    # The person resumes: the wait counts afresh, and the task goes to its worker again.
    StateFile(w.home.system_state, SystemState, default=None).update(
        lambda st: st.model_copy(update={"paused": False})
    )
    w.clock.advance(31)
    got = []
    w.until(lambda: got.extend(w.assignments("w1")) or got, "assigned after the resume")
    assert w.master.ctx.throttle.total_wait(w.clock()) == 0
    w.finish("w1", got[0])
    w.until(lambda: w.master.finished, "the run ends")
    assert w.master.exit_code == EXIT_DONE and w.task("a").attempts == 1


def test_a_refused_key_stops_the_run_at_once_and_a_restart_continues_it(
    world: Callable[..., World], tmp_path: Path
) -> None:
    """Issue 16: a bad key (401) cost every task its three attempts before the run gave up."""
    w = world(tasks("a", "b", "c"), max_workers=2, home=tmp_path / "h")
    w.tick()
    (ma,), (mb,) = w.assignments("w1"), w.assignments("w2")
    refused = protocol.ErrorReport(
        kind="auth", message="Invalid API key · Fix external API key", detail="auth",
        api_status=401,
    )  # fmt: skip
    w.report("w1", ma, refused)
    w.until(lambda: w.master.finished, "stopped within the one call")
    assert w.master.exit_code == 3
    [stopped] = w.events("run-stopped")
    assert "401 from w1" in stopped["text"] and "ANTHROPIC_API_KEY" in stopped["text"]
    for tid in ("a", "b", "c"):  # nothing failed, no attempt spent, b's too
        rec = w.master.tasks[tid]
        assert rec.status == "pending" and rec.attempts == 0, tid
    assert w.master.sys.phase == "running"  # unfinished: a restart resumes it
    assert w.take("w2", protocol.Terminate)  # its agent would be refused the same way
    # The key fixed, the master started again: the run continues to its end.
    w.restart()
    w.take("w1", protocol.Terminate)
    w.report("w2", mb, protocol.ErrorReport(kind="terminated", message="terminated"))
    done: set[str] = set()

    def step() -> bool:
        for wid in list(w.master.sys.workers):
            for m in w.assignments(wid):
                w.finish(wid, m)
                done.add(m.task_id or "")
        return w.master.finished

    w.until(step, "the run ends after the restart")
    assert w.master.exit_code == EXIT_DONE and sorted(w.merged()) == ["a", "b", "c"]
    assert all(w.task(t).attempts == 1 for t in "abc")


def test_a_context_too_long_starts_a_fresh_session_told_of_its_progress(
    world: Callable[..., World],
) -> None:
    w = world(tasks("a"), max_workers=1)
    w.tick()
    (m,) = w.assignments("w1")
    full = protocol.ErrorReport(
        kind="context", message="Prompt is too long", detail="too_long", api_status=400
    )
    w.report("w1", m, full)
    got: list[protocol.Envelope] = []
    w.until(lambda: got.extend(w.assignments("w1")) or got, "sent again")
    p = got[0].payload
    assert isinstance(p, protocol.TaskAssignment) and p.attempt == 2  # the task's own problem
    assert any("context was too long" in line and "multibot/a" in line for line in p.context)


def ask_permission(w: World, command: str) -> protocol.Envelope:
    asked = protocol.make(
        protocol.Question(
            question=f"May w1 use Bash: {command} ?",
            permission=protocol.ToolUse(tool="Bash", input={"command": command}),
        ),
        sender="w1",
        recipient=MASTER_ID,
        generation=1,
        task_id="a",
    )
    w.say(asked)
    return asked


def test_a_permission_request_is_decided_by_the_rules_then_the_policy(
    world: Callable[..., World],
) -> None:
    from multibot.state import QuestionRecord

    w = world(
        tasks("a"), max_workers=1, permission_allow=["Bash(npm test*)"], permission_policy="deny"
    )
    w.tick()
    assert w.assignments("w1")
    ask_permission(w, "npm test -k x")
    w.until(lambda: answers(w, "w1") == ["allow: allowed by the rule Bash(npm test*)"], "ruled")
    later = ask_permission(w, "curl https://example.com")
    w.until(lambda: w.home.question("q-" + later.id).exists(), "recorded")
    w.until(
        lambda: (
            StateFile(w.home.question("q-" + later.id), QuestionRecord, default=None).read().answer
            == "deny: no rule allows it (permission_policy is deny)"
        ),
        "denied by the policy",
    )
    decided = w.events("permission-allowed") + w.events("permission-denied")
    assert [e["answered_by"] for e in decided] == ["policy", "policy"]
    assert len(w.events("permission")) == 2 and not w.events("question")


def test_a_permission_request_no_rule_names_waits_for_the_person(
    world: Callable[..., World],
) -> None:
    from multibot.state import QuestionRecord

    w = world(tasks("a"), max_workers=1, permission_policy="auto")  # no Opus here: the person
    w.tick()
    assert w.assignments("w1")
    asked = ask_permission(w, "make deploy")
    qfile = w.home.question("q-" + asked.id)
    w.until(qfile.exists, "recorded")
    for _ in range(5):
        w.tick()
    q = StateFile(qfile, QuestionRecord, default=None).read()
    assert q.escalated and q.answer is None and q.permission is not None
    assert answers(w, "w1") == []
    StateFile(qfile, QuestionRecord, default=None).update(
        lambda r: r.model_copy(update={"answer": "deny: not from a worker"})
    )
    w.until(lambda: answers(w, "w1") == ["deny: not from a worker"], "the person's answer")
    (denied,) = w.events("permission-denied")
    assert denied["answered_by"] == "human"
