"""The whole system with the real claude binary in every LLM role, against the fake API.

`multibot master --goal ... --backend claude --no-tmux` runs as a child process: Opus (the real
binary, scripted by the fake Messages API) plans two dependent tasks, workers (child processes)
run the real binary on them, one worker asks a question that the master hands to Opus in the
planner's own session, and both branches are merged in dependency order. No tmux needed.
With `review: true`, Opus (same session) rejects a task's first diff, the task goes back with
the review's feedback, and its second diff is approved and merged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakeapi import ApiRequest, FakeAPI, Reply, Rule, Script, claude_env, structured, text, tool

from multibot.layout import Home
from multibot.timeline import read_timeline
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

RUN_TIMEOUT = 150.0  # a planning call, two tasks, one answer: 20-40 s on an idle machine
GOAL = "GOAL-MARKER build two files"
MERGE = re.compile(r"^multibot: merge task (\S+)")
WORKDIR = re.compile(r"^Working directory: (\S+) \(git branch", re.M)

ALPHA = {
    "id": "alpha",
    "title": "Write alpha",
    "description": "Create alpha.txt holding ALPHA-CONTENT.",
    "dependencies": [],
    "owns": ["alpha.txt"],
    "model": "haiku",
    "verify": "test -f alpha.txt",
    "estimate_minutes": 5,
    "priority": 0,
}
PLAN = {
    "goal": "Build alpha.txt, then beta.txt from it.",
    "tasks": [
        ALPHA,
        {
            "id": "beta",
            "title": "Write beta",
            "description": "Read alpha.txt, ask the master which greeting to use, write beta.txt.",
            "dependencies": ["alpha"],
            "owns": ["beta.txt"],
            "model": "sonnet",
            "verify": "grep -q GREETING-HOLA beta.txt",
            "estimate_minutes": 5,
            "priority": 0,
        },
    ],
    "verify": None,
}


# -- the scripted model -------------------------------------------------------------------------
def workdir(r: ApiRequest) -> Path:
    """The task's worktree, as the latest task prompt names it (a resumed session holds every
    attempt's prompt)."""
    found = WORKDIR.findall(r.conversation_text())
    assert found, "no working directory in the task prompt"
    return Path(found[-1])


def alpha_write(r: ApiRequest) -> Reply:
    return tool("Write", {"file_path": str(workdir(r) / "alpha.txt"), "content": "ALPHA-CONTENT\n"})


def beta_read(r: ApiRequest) -> Reply:
    return tool("Read", {"file_path": str(workdir(r) / "alpha.txt")})


def beta_write(r: ApiRequest) -> Reply:
    read, answer = r.tool_results()[-2:]  # the Read of alpha.txt, then what `multibot ask` printed
    seen = "ALPHA-SEEN" if "ALPHA-CONTENT" in read else "ALPHA-MISSING"
    content = f"{seen}\n{answer.strip()}\n"
    return tool("Write", {"file_path": str(workdir(r) / "beta.txt"), "content": content})


def bash(command: str) -> Reply:
    return tool("Bash", {"command": command, "description": "talk to the master"})


OPUS = Script(
    [
        # The question prompt also holds the goal (in its context): at an equal position the
        # first rule wins, so the question comes first.
        Rule("[multibot question", [structured({"answer": "GREETING-HOLA"})]),
        Rule("GOAL-MARKER", [structured(PLAN)]),
    ]
)
WORKERS = Script(
    [
        Rule(
            "# Task alpha",
            [
                alpha_write,
                bash('multibot report discovery "ALPHA-DISCOVERY the greeting file is plain"'),
                text("Wrote alpha.txt with ALPHA-CONTENT."),
            ],
        ),
        Rule(
            "# Task beta",
            [
                beta_read,
                bash('multibot ask "which greeting?" --timeout 60'),
                beta_write,
                text("Wrote beta.txt with the greeting."),
            ],
        ),
    ]
)


def model(r: ApiRequest) -> Reply:
    """Opus when the structured-output tool is offered (planning, answers), else a worker."""
    if not r.is_side and r.has_tool("StructuredOutput"):
        return OPUS(r)
    return WORKERS(r)


# -- the run ------------------------------------------------------------------------------------
def processes_in(root: Path) -> list[int]:
    """Live processes (not zombies) whose cwd, or some environment value, lies inside root."""
    mine = {os.getpid(), os.getppid()}
    needle = str(root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cwd = os.readlink(entry / "cwd")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd == needle or cwd.startswith(needle + os.sep) or needle in environ:
            found.append(int(entry.name))
    return found


def kill_in(root: Path) -> None:
    """SIGKILL every process of root, with its process group when that is not ours."""
    ours = os.getpgrp()
    for pid in processes_in(root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != ours:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


@dataclass
class Run:
    tmp: Path
    home: Home
    repo: Path
    fake: FakeAPI
    master: subprocess.Popen[bytes] | None = None

    def run_to_success(self, env: dict[str, str]) -> None:
        """Run the master to its end; fail the test unless it ends in time with exit 0."""
        master = self.start(env)
        try:
            code = master.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end in {RUN_TIMEOUT:g}s\n{self.dump()}")
        assert code == 0, self.dump()

    def start(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "multibot", "--home", str(self.home.root), "master"]
        argv += ["--repo", str(self.repo), "--goal", GOAL, "--backend", "claude", "--no-tmux"]
        with open(self.tmp / "master.out", "wb") as out:
            self.master = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.master

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.home.system_state.read_text())
        return data

    def task(self, tid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.home.task(tid).read_text())
        return data

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=self.repo, capture_output=True, text=True, check=True
        )
        return done.stdout

    def dump(self) -> str:
        parts = []
        for path in [self.tmp / "master.out", *sorted(self.home.logs_dir.glob("*"))]:
            if path.is_file():
                parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-5000:]}")
        return "\n".join(parts)


def make_run(
    fake: FakeAPI,
    claude_bin: Path,
    tmp: Path,
    config: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
) -> Run:
    """A repository and a home configured for the claude backend (config, template: more
    settings of the master and of the workers)."""
    repo = tmp / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "README.md").write_text("files will live here\n")
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    home = Home(tmp / "home")
    home.config_dir.mkdir(parents=True)
    master_config = {
        "claude_bin": str(claude_bin),
        "heartbeat_interval": 0.5,
        "heartbeat_misses": 10,  # generous: claude processes load a 2-core machine
        "idle_worker_timeout": 1,
        "rescan_interval": 0.5,
        "question_policy": "auto",
        **(config or {}),
    }
    home.master_config.write_text(json.dumps(master_config, indent=2))
    worker = {
        "backend": "claude",
        "claude_bin": str(claude_bin),
        "allowed_tools": ["Bash", "Write", "Read"],
        "permission_mode": "acceptEdits",
        **(template or {}),
    }
    home.worker_template.write_text(json.dumps(worker, indent=2))
    return Run(tmp, home, repo, fake)


def end_run(r: Run) -> None:
    """Kill the master, its workers and their agents: nothing outlives the test."""
    if r.master is not None:
        if r.master.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.master.pid, signal.SIGKILL)
        r.master.wait()
    kill_in(r.tmp)  # workers and agents run in process groups of their own
    wait_until(lambda: not processes_in(r.tmp), timeout=10)


@pytest.fixture
def run(fake_api: FakeAPI, claude_bin: Path, tmp_path: Path) -> Iterator[Run]:
    fake_api.respond = model
    r = make_run(fake_api, claude_bin, tmp_path)
    try:
        yield r
    finally:
        end_run(r)


def master_env(run: Run) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MULTIBOT_", "ANTHROPIC_", "CLAUDE")) and k != "CLAUDECODE"
    }
    env.update(claude_env(run.fake, run.tmp / "claude"))
    return env


def test_goal_to_merged_branches_with_claude_everywhere(run: Run) -> None:
    run.run_to_success(master_env(run))

    # The integration branch: both files, merged once each, alpha before beta.
    assert run.git("show", "multibot/integration:alpha.txt") == "ALPHA-CONTENT\n"
    beta = run.git("show", "multibot/integration:beta.txt")
    assert "GREETING-HOLA" in beta and "ALPHA-SEEN" in beta, beta  # beta started from alpha
    log = run.git("log", "--format=%s", "--reverse", "multibot/integration").splitlines()
    merged = [m.group(1) for line in log if (m := MERGE.match(line))]
    assert merged == ["alpha", "beta"]

    # The state: done, the Opus session kept, the fake API's usage counted.
    state = run.state()
    assert state["phase"] == "done"
    session = state["opus_session"]
    assert session
    totals = state["metrics"]["totals"]
    assert totals["cost_usd"] > 0 and totals["input_tokens"] > 0 and totals["output_tokens"] > 0
    tasks = {t: run.task(t) for t in ("alpha", "beta")}
    for tid, rec in tasks.items():
        assert rec["status"] == "merged", tid
        assert rec["cost_usd"] > 0 and rec["tokens"]["input"] > 0, tid
        assert rec["files_changed"] == [f"{tid}.txt"], tid
    assert totals["cost_usd"] > sum(rec["cost_usd"] for rec in tasks.values())  # + Opus's share
    # Run totals are the tasks' tokens plus Opus's answer (the fake API reports its usage).
    assert totals["input_tokens"] > sum(rec["tokens"]["input"] for rec in tasks.values())

    # Opus planned and answered in one session: the planner's.
    opus = [r for r in run.fake.messages_requests() if r.has_tool("StructuredOutput")]
    planning = [r for r in opus if not r.contains("[multibot question")]
    answering = [r for r in opus if r.contains("[multibot question")]
    assert planning and answering
    assert {r.session_id for r in opus} == {session}
    assert answering[0].contains("which greeting?") and answering[0].contains("GOAL-MARKER")
    assert not {"Write", "Edit", "Bash"} & set(opus[0].tool_names())  # Opus only reads
    # Workers ran in sessions of their own, with the tools the template allows.
    workers = [r for r in run.fake.messages_requests() if not r.has_tool("StructuredOutput")]
    assert workers and session not in {r.session_id for r in workers}
    assert {"Bash", "Write", "Read"} <= set(workers[0].tool_names())
    # Each task ran on the model the plan gave it.
    assert all("haiku" in r.model for r in workers if r.contains("# Task alpha"))
    assert all("sonnet" in r.model for r in workers if r.contains("# Task beta"))
    # alpha's discovery reached beta through the master's context.
    beta_prompts = [r for r in workers if r.contains("# Task beta")]
    assert beta_prompts and beta_prompts[0].contains("ALPHA-DISCOVERY")

    # The timeline: the question, then the answer by Opus.
    events = list(read_timeline(run.home.timeline))
    [question] = [e for e in events if e.get("event") == "question"]
    [answer] = [e for e in events if e.get("event") == "answer"]
    assert "which greeting?" in question["text"] and answer["question"] == question["question"]
    assert answer.get("answered_by") == "opus" and "GREETING-HOLA" in answer["text"]
    assert events.index(question) < events.index(answer)
    record = json.loads(run.home.question(question["question"]).read_text())
    assert record["answered_by"] == "opus" and record["status"] == "delivered"
    assert state["metrics"]["questions"] == 1


# -- the Opus review path -----------------------------------------------------------------------
REVIEW_MARK = "[multibot review alpha]"  # opus.review_prompt opens with "[multibot review <task>]"
REVIEW_PLAN = {
    "goal": "Build alpha.txt.",
    "tasks": [{**ALPHA, "verify": "grep -q ALPHA alpha.txt"}],
    "verify": None,
}


def review(r: ApiRequest) -> Reply:
    """Reject alpha's first review, approve the later ones (the session holds every review)."""
    if r.conversation_text().count(REVIEW_MARK) == 1:
        return structured({"approved": False, "feedback": "REVIEW-FEEDBACK add a trailing newline"})
    return structured({"approved": True, "feedback": "looks good"})


REVIEW_OPUS = Script(
    [
        Rule(REVIEW_MARK, [review]),
        Rule("GOAL-MARKER", [structured(REVIEW_PLAN)]),
    ]
)
REVIEW_WORKERS = Script(
    [
        # Attempt 2's prompt holds both markers: at an equal position the first rule wins. The
        # file exists by then (on the kept branch), and Claude Code writes only files it read.
        Rule(
            "REVIEW-FEEDBACK",
            [
                lambda r: tool("Read", {"file_path": str(workdir(r) / "alpha.txt")}),
                lambda r: tool(
                    "Write",
                    {"file_path": str(workdir(r) / "alpha.txt"), "content": "ALPHA-V2\n"},
                ),
                text("Rewrote alpha.txt as the review asked."),
            ],
        ),
        Rule("# Task alpha", [alpha_write, text("Wrote alpha.txt with ALPHA-CONTENT.")]),
    ]
)


def review_model(r: ApiRequest) -> Reply:
    """Opus (plan, reviews) when the structured-output tool is offered, else the alpha worker."""
    if not r.is_side and r.has_tool("StructuredOutput"):
        return REVIEW_OPUS(r)
    return REVIEW_WORKERS(r)


def test_opus_review_sends_a_task_back_then_approves_it(run: Run) -> None:
    config = json.loads(run.home.master_config.read_text())
    run.home.master_config.write_text(json.dumps({**config, "review": True}, indent=2))
    run.fake.respond = review_model
    run.run_to_success(master_env(run))

    # The second attempt's work is what got merged.
    assert run.git("show", "multibot/integration:alpha.txt") == "ALPHA-V2\n"
    state = run.state()
    assert state["phase"] == "done"
    rec = run.task("alpha")
    assert rec["status"] == "merged" and rec["attempts"] == 2, rec
    assert any("REVIEW-FEEDBACK" in f for f in rec["feedback"]), rec["feedback"]

    # Opus reviewed twice, in the planner's session: the first diff, then the second.
    session = state["opus_session"]
    opus = [r for r in run.fake.messages_requests() if r.has_tool("StructuredOutput")]
    reviews = [r for r in opus if r.contains(REVIEW_MARK)]
    planning = [r for r in opus if not r.contains(REVIEW_MARK)]
    assert planning and reviews
    assert {r.session_id for r in opus} == {session}
    assert reviews[0].contains("ALPHA-CONTENT") and not reviews[0].contains("ALPHA-V2")
    assert reviews[-1].conversation_text().count(REVIEW_MARK) == 2
    assert reviews[-1].contains("ALPHA-V2")  # the second review saw the second diff

    # The worker's second attempt was told what the review asked for.
    workers = [r for r in run.fake.messages_requests() if not r.has_tool("StructuredOutput")]
    second = [r for r in workers if r.contains("# Task alpha") and r.contains("This is attempt 2")]
    assert second and second[0].contains("REVIEW-FEEDBACK add a trailing newline")
    assert not any(r.contains("REVIEW-FEEDBACK") for r in workers if r not in second)

    # The timeline: sent back by the review, then approved by it, then merged.
    events = list(read_timeline(run.home.timeline))
    retries = [e for e in events if e.get("event") == "task-retry" and e.get("task") == "alpha"]
    assert len(retries) == 1 and "review" in retries[0]["text"], retries
    assert "REVIEW-FEEDBACK" in retries[0]["text"]
    [approved] = [e for e in events if e.get("event") == "review-approved"]
    assert approved.get("task") == "alpha" and "looks good" in approved["text"]
    [merged] = [e for e in events if e.get("event") == "merged"]
    assert events.index(retries[0]) < events.index(approved) < events.index(merged)
