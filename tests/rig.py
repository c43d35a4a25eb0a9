"""A test rig: a home, a real repository, a fake master inbox and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multibot import auth, mailbox, protocol
from multibot.layout import MASTER_ID, Home
from multibot.worktrees import GitRepo
from tests.helpers import wait_until


class Rig:
    """A home, a repository, a fake master inbox and one real worker process at a time."""

    def __init__(
        self, tmp: Path, *, backend: str = "shell", env: Mapping[str, str] | None = None
    ) -> None:
        self.tmp, self.backend, self.env = tmp, backend, dict(env or {})
        self.home = Home(tmp / "home")
        repo = tmp / "repo"
        repo.mkdir()
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
        (repo / "README.md").write_text("hi\n")
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
        self.git = GitRepo(repo, self.home.integration_worktree)
        self.git.ensure_integration()
        mailbox.create_inbox(self.home, MASTER_ID)
        mailbox.create_inbox(self.home, "w1")
        # As the master: the run's key, and only what a worker signed is taken.
        self.keys = auth.create_keys(self.home)
        self.generation = 1  # of the worker started last
        self.master = mailbox.Receiver(
            self.home,
            MASTER_ID,
            rescan_s=0.2,
            verify=lambda m: auth.check_from_worker(self.keys, m),
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []
        self.got: list[protocol.Envelope] = []

    def start_worker(self, generation: int = 1) -> subprocess.Popen[bytes]:
        """Start `multibot worker` for w1 in its own session (so a test can kill its group)."""
        self.generation = generation
        argv = [
            sys.executable,
            "-m",
            "multibot",
            "--home",
            str(self.home.root),
            "worker",
            "--id",
            "w1",
            "--backend",
            self.backend,
            "--generation",
            str(generation),
        ]
        # Output goes to a file: a pipe nobody reads would block a chatty worker.
        out = self.tmp / f"worker-{generation}-{len(self.procs)}.out"
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        self.procs.append(proc)
        self.outputs.append(out)
        return proc

    def assign(
        self, task_id: str, commands: list[str] | None = None, **kw: object
    ) -> protocol.Envelope:
        """Prepare w1's worktree on a task branch and send it the task, as the master does."""
        worktree = self.home.worktree("w1")
        self.git.ensure_worktree(worktree)
        branch = self.git.start_task(worktree, task_id)
        fields: dict[str, object] = {
            "title": task_id,
            "description": f"do {task_id}",
            "branch": branch,
            "working_directory": str(worktree),
            "commands": commands or [],
            **kw,
        }
        payload = protocol.TaskAssignment.model_validate(fields)
        return self.send(payload, task_id=task_id)

    def send(
        self,
        payload: protocol.Payload,
        task_id: str | None = None,
        correlation_id: str | None = None,
    ) -> protocol.Envelope:
        """Send w1 a message as the master does: signed with w1's key for its generation."""
        m = protocol.make(
            payload,
            sender=MASTER_ID,
            recipient="w1",
            task_id=task_id,
            correlation_id=correlation_id,
        )
        m = auth.sign(m, self.keys.worker("w1", self.generation), self.generation)
        mailbox.send(self.home, m)
        return m

    def expect(self, of: type, timeout: float = 20.0, **match: object) -> protocol.Envelope:
        """Wait for a message whose payload is of type `of` (and matches fields); return it."""

        def found() -> protocol.Envelope | None:
            for m in self.master.fetch():
                self.master.done(m)
                self.got.append(m)
            for m in self.got:
                if isinstance(m.payload, of) and all(
                    getattr(m.payload, k, getattr(m, k, None)) == v for k, v in match.items()
                ):
                    self.got.remove(m)
                    return m
            return None

        m = wait_until(found, timeout)
        assert m is not None
        return m

    def received(self, of: type) -> list[protocol.Envelope]:
        """Messages of type `of` that reached the master inbox so far (kept for expect)."""
        for m in self.master.fetch():
            self.master.done(m)
            self.got.append(m)
        return [m for m in self.got if isinstance(m.payload, of)]

    def output(self) -> str:
        """Everything the workers printed so far (for failure messages)."""
        return "".join(p.read_text("utf-8", "replace") for p in self.outputs if p.exists())

    def close(self) -> None:
        self.master.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def git_rev(rig: Rig, rev: str) -> str:
    """Return the commit rev names in the rig's repository."""
    return subprocess.run(
        ["git", "rev-parse", rev], cwd=rig.git.root, text=True, capture_output=True, check=True
    ).stdout.strip()


def git_show(rig: Rig, rev: str, path: str) -> str:
    """Return a file as committed at rev in the rig's repository."""
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"],
        cwd=rig.git.root,
        text=True,
        capture_output=True,
        check=True,
    ).stdout


def processes_under(root: Path) -> list[int]:
    """Live processes whose working directory lies inside root (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == str(root) or cwd.startswith(str(root) + os.sep):
            found.append(int(entry))
    return found


def kill_under(root: Path) -> None:
    """SIGKILL every process working inside root, with its process group if that is not ours."""
    ours = os.getpgrp()
    for pid in processes_under(root):
        try:
            pgid = os.getpgid(pid)
            if pgid != ours:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def write_template(rig: Rig, claude_bin: str, **settings: Any) -> None:
    """The claude worker template the rig's tests use (settings: more, or other, values)."""
    rig.home.worker_template.parent.mkdir(parents=True, exist_ok=True)
    template = {
        "backend": "claude",
        "claude_bin": claude_bin,
        "allowed_tools": ["Bash", "Write", "Read"],
        "permission_mode": "acceptEdits",
        **settings,
    }
    rig.home.worker_template.write_text(json.dumps(template, indent=2))


def expect(rig: Rig, of: type, timeout: float = 90.0, **match: object) -> protocol.Envelope:
    """rig.expect, with what the worker printed in the failure message."""
    try:
        return rig.expect(of, timeout, **match)
    except AssertionError as exc:
        got = [(m.type, getattr(m.payload, "message", "")) for m in rig.got]
        raise AssertionError(f"{exc}\nmaster got: {got}\nworker output:\n{rig.output()}") from None
