"""The `multibot` command: one short function per subcommand, the work done by the modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from multibot import auth, mailbox, protocol
from multibot.cli_args import parser
from multibot.config import load_master, load_worker
from multibot.errors import DecodeError, MultibotError
from multibot.layout import MASTER_ID, Home
from multibot.privacy import go_private

Handler = Callable[[argparse.Namespace, Home], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


def fail(message: str, code: int = 2) -> int:
    print(f"multibot: {message}", file=sys.stderr)
    return code


# == running ==================================================================================
@command("master")
def cmd_master(a: argparse.Namespace, home: Home) -> int:
    from multibot.runner import run_master

    return run_master(
        home,
        repo=Path(a.repo).resolve() if a.repo else None,
        goal=a.goal,
        plan_file=Path(a.plan) if a.plan else None,
        backend=a.backend,
        max_workers=a.max_workers,
        approve=a.approve,
        fresh=a.fresh,
        use_tmux=not a.no_tmux,
    )


@command("worker")
def cmd_worker(a: argparse.Namespace, home: Home) -> int:
    from multibot.worker import Worker

    template = load_worker(home)
    master = load_master(home)
    w = Worker(
        home,
        a.id,
        backend=a.backend or template.backend,
        generation=a.generation,
        config=template,
        heartbeat_interval=master.heartbeat_interval,
        setup_hook=master.worktree_setup,
    )
    return w.run()


# == seeing ===================================================================================
@command("status")
def cmd_status(a: argparse.Namespace, home: Home) -> int:
    from multibot.status import render, snapshot

    s = snapshot(home)
    print(json.dumps(s, indent=2) if a.json else render(s))
    return 0


@command("dashboard")
def cmd_dashboard(a: argparse.Namespace, home: Home) -> int:
    from multibot.status import render, snapshot

    try:
        while True:
            ok = True
            try:
                text = render(snapshot(home))
            except Exception as exc:  # the status pane must outlive any one bad read
                ok, text = False, f"status unavailable for now ({type(exc).__name__}: {exc})"
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            sys.stdout.flush()
            if a.once:
                return 0 if ok else 1
            time.sleep(a.interval)  # a refresh period, not synchronisation
    except KeyboardInterrupt:
        return 0


@command("logs")
def cmd_logs(a: argparse.Namespace, home: Home) -> int:
    path = home.log(a.id)
    if not path.exists():
        return fail(f"no log for {a.id} at {path}")
    lines = path.read_text(errors="replace").splitlines()
    for line in lines[-a.lines :]:
        print(line)
    if not a.follow:
        return 0
    with open(path, errors="replace") as f:
        f.seek(0, os.SEEK_END)
        try:
            while True:
                line = f.readline()
                if line:
                    print(line, end="", flush=True)
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return 0


@command("timeline")
def cmd_timeline(a: argparse.Namespace, home: Home) -> int:
    from multibot.timeline import read_timeline

    for e in list(read_timeline(home.timeline))[-a.lines :]:
        if a.json:
            print(json.dumps(e))
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(e.get("t", 0))))
            text = e.get("text") or " ".join(
                f"{k}={v}" for k, v in e.items() if k not in ("t", "event")
            )
            print(f"{stamp}  {e.get('event', '?'):<22} {text}")
    return 0


@command("inbox")
def cmd_inbox(a: argparse.Namespace, home: Home) -> int:
    data = mailbox.inbox_report(home, a.id).to_dict()
    if a.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            if isinstance(value, list):
                print(f"{key}: {len(value)}")
                for item in value[-20:]:
                    print(f"  {item}")
            else:
                print(f"{key}: {value}")
    return 0


@command("schema")
def cmd_schema(a: argparse.Namespace, home: Home) -> int:
    from multibot.state import state_models

    schemas: dict[str, Any] = {"message": protocol.json_schema()}
    schemas.update({name: m.model_json_schema() for name, m in state_models().items()})
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}")
    else:
        print(json.dumps(schemas, indent=2))
    return 0


@command("state")
def cmd_state(a: argparse.Namespace, home: Home) -> int:
    from multibot.validate import validate_home

    problems, checked = validate_home(home)
    for p in problems:
        print(p)
    print(f"{checked} state files checked, {len(problems)} problem(s)")
    return 1 if problems else 0


# == steering =================================================================================
def _set_paused(home: Home, target: str, paused: bool) -> int:
    from multibot.state import SystemState, WorkerState
    from multibot.store import StateFile

    if target == "all":
        StateFile(home.system_state, SystemState, default=SystemState).update(
            lambda s: s.model_copy(update={"paused": paused})
        )
        print(f"{'paused' if paused else 'resumed'} everything (state/system-state.json)")
        return 0
    path = home.worker_state(target)
    if not path.exists():
        return fail(f"no worker {target!r} ({path} does not exist)")
    StateFile(path, WorkerState, default=None).update(
        lambda s: s.model_copy(update={"paused": paused})
    )
    print(f"{'paused' if paused else 'resumed'} {target} ({path})")
    return 0


@command("pause")
def cmd_pause(a: argparse.Namespace, home: Home) -> int:
    return _set_paused(home, a.id, True)


@command("resume")
def cmd_resume(a: argparse.Namespace, home: Home) -> int:
    return _set_paused(home, a.id, False)


@command("answer")
def cmd_answer(a: argparse.Namespace, home: Home) -> int:
    from multibot.state import QuestionRecord
    from multibot.store import StateFile

    path = home.question(a.id)
    if not path.exists():
        return fail(f"no question {a.id!r} ({path} does not exist); see `multibot status`")
    StateFile(path, QuestionRecord, default=None).update(
        lambda q: q.model_copy(update={"answer": a.text})
    )
    print(f"answered {a.id}; the master delivers it to the worker")
    return 0


@command("approve")
def cmd_approve(a: argparse.Namespace, home: Home) -> int:
    from multibot.state import Plan
    from multibot.store import StateFile

    if not home.plan.exists():
        return fail(f"no plan to approve ({home.plan} does not exist)")
    StateFile(home.plan, Plan, default=None).update(
        lambda p: p.model_copy(update={"approved": True})
    )
    print(f"plan approved ({home.plan})")
    return 0


@command("send")
def cmd_send(a: argparse.Namespace, home: Home) -> int:
    try:
        fields: dict[str, Any] = json.loads(a.json) if a.json else {}
    except json.JSONDecodeError as exc:
        raise MultibotError(f"--json is not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise MultibotError("--json must be a JSON object of payload fields")
    fields["type"] = a.type
    if a.text is not None:
        key = {
            "QUESTION": "question",
            "ANSWER": "answer",
            "CONTEXT_UPDATE": "text",
            "BROADCAST": "text",
            "TERMINATE": "reason",
            "STATUS_UPDATE": "progress",
            "ERROR": "message",
            "TASK_COMPLETE": "summary",
            "TASK_ASSIGNMENT": "description",
        }.get(a.type, "text")
        fields[key] = a.text
    raw = {
        "sender": a.sender,
        "recipient": a.to,
        "task_id": a.task,
        "correlation_id": a.correlation,
        "payload": fields,
    }
    try:
        message = protocol.decode(json.dumps(raw).encode())
    except DecodeError as exc:
        raise MultibotError(f"not sent: {exc.cause}") from exc
    paths = mailbox.send(home, _signed(home, message, a.generation))
    print(f"sent {message.type} {message.id} to {a.to}: {paths}")
    return 0


def _signed(home: Home, message: protocol.Envelope, generation: int | None) -> protocol.Envelope:
    """message signed, from the run key, as its recipient's master (to a worker, at the
    generation its state file names) or as its sender (to the master)."""
    from multibot.state import WorkerState
    from multibot.store import StateFile

    keys = auth.load_keys(home)
    if message.recipient == MASTER_ID:
        gen = message.generation if generation is None else generation
        message = message.model_copy(update={"generation": gen})
        return auth.sign(message, keys.worker(message.sender, gen), gen)
    if generation is None:
        ws = StateFile(home.worker_state(message.recipient), WorkerState, default=None)
        try:
            generation = ws.read().generation
        except (MultibotError, ValueError):
            generation = 0
    return auth.sign(message, keys.worker(message.recipient, generation), generation)


# == agent-facing =============================================================================
@command("report")
def cmd_report(a: argparse.Namespace, home: Home) -> int:
    from multibot import voice

    voice.report(home, voice.agent_voice(), a.kind, " ".join(a.text))
    print(f"reported {a.kind} to the master")
    return 0


@command("ask")
def cmd_ask(a: argparse.Namespace, home: Home) -> int:
    from multibot import voice

    question = protocol.Question(question=" ".join(a.text))
    try:
        print(voice.ask(home, voice.agent_voice(), question, a.timeout))
    except voice.AskTimeout:
        return fail(
            f"no answer to your question within {a.timeout:g}s; go on with your best judgement "
            "or ask again later",
            3,
        )
    return 0


@command("mcp")
def cmd_mcp(a: argparse.Namespace, home: Home) -> int:
    from multibot.mcp.tools import serve

    return serve(home)


# == git ======================================================================================
@command("merge")
def cmd_merge(a: argparse.Namespace, home: Home) -> int:
    from multibot.runner import run_repo

    repo = run_repo(home)
    print(repo.merge_into(a.into))
    return 0


@command("cleanup")
def cmd_cleanup(a: argparse.Namespace, home: Home) -> int:
    from multibot.runner import cleanup

    return cleanup(home, force=a.force, stop=a.stop)


@command("setup-worktrees")
def cmd_setup_worktrees(a: argparse.Namespace, home: Home) -> int:
    from multibot.worktrees import GitRepo

    cfg = load_master(home)
    repo = GitRepo(
        Path(a.repo).resolve(),
        home.integration_worktree,
        integration_branch=cfg.integration_branch,
        setup_hook=cfg.worktree_setup,
    )
    repo.ensure_integration(cfg.base_branch)
    for n in range(1, a.count + 1):
        path = repo.ensure_worktree(home.worktree(f"w{n}"))
        print(f"w{n}: {path}")
    return 0


# == the terminal =============================================================================
@command("demo-prepare")
def cmd_demo_prepare(a: argparse.Namespace, home: Home) -> int:
    from multibot.demo import prepare

    repo, plan = prepare(home)
    print(repo)
    print(plan)
    return 0


@command("session")
def cmd_session(a: argparse.Namespace, home: Home) -> int:
    from multibot.runner import open_session

    return open_session(home, a.socket, a.session, a.master_args)


@command("follow")
def cmd_follow(a: argparse.Namespace, home: Home) -> int:
    from multibot.runner import follow

    try:
        return follow(
            home, timeout=a.timeout, socket=a.socket, session=a.session, from_byte=a.from_byte
        )
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the multibot command line."""
    args = parser().parse_args(argv)
    home = Home.at(args.home)
    go_private(home if args.command in ("master", "session") else None)
    try:
        return COMMANDS[args.command](args, home)
    except MultibotError as exc:
        return fail(str(exc))
    except BrokenPipeError:
        return 0
