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

from multibot import mailbox, protocol
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
    paths = mailbox.send(home, message)
    print(f"sent {message.type} {message.id} to {a.to}: {paths}")
    return 0


# == agent-facing =============================================================================
def _agent_identity() -> tuple[str, str | None, int]:
    wid = os.environ.get("MULTIBOT_WORKER_ID")
    if not wid:
        raise MultibotError(
            "MULTIBOT_WORKER_ID is not set: `multibot report` and `multibot ask` are run by a "
            "worker's agent, which has it in its environment"
        )
    return wid, os.environ.get("MULTIBOT_TASK_ID"), int(os.environ.get("MULTIBOT_GENERATION", "0"))


@command("report")
def cmd_report(a: argparse.Namespace, home: Home) -> int:
    from multibot.state import ContextMemory, Decision
    from multibot.store import StateFile

    wid, task, gen = _agent_identity()
    text = " ".join(a.text)
    status = {"blocked": "blocked"}.get(a.kind, "working")
    payload = protocol.StatusUpdate(status=status, kind=a.kind, progress=text)
    mailbox.send(
        home, protocol.make(payload, sender=wid, recipient=MASTER_ID, generation=gen, task_id=task)
    )

    def remember(m: ContextMemory) -> ContextMemory:
        if a.kind == "discovery":
            return m.model_copy(update={"discoveries": [*m.discoveries, text]})
        if a.kind == "blocked":
            return m.model_copy(update={"blockers": [*m.blockers, text]})
        if a.kind == "decision":
            return m.model_copy(
                update={"decisions": [*m.decisions, Decision(text=text, task_id=task)]}
            )
        return m

    if a.kind in ("discovery", "blocked", "decision"):
        StateFile(home.worker_memory(wid), ContextMemory, default=ContextMemory).update(remember)
    print(f"reported {a.kind} to the master")
    return 0


@command("ask")
def cmd_ask(a: argparse.Namespace, home: Home) -> int:
    from multibot.errors import AskTimeout
    from multibot.state import ContextMemory
    from multibot.store import StateFile

    wid, task, gen = _agent_identity()
    question = " ".join(a.text)
    message = protocol.make(
        protocol.Question(question=question),
        sender=wid,
        recipient=MASTER_ID,
        generation=gen,
        task_id=task,
    )
    try:
        reply = mailbox.request(home, message, timeout=a.timeout)
    except AskTimeout:
        return fail(
            f"no answer to your question within {a.timeout:g}s; go on with your best judgement "
            "or ask again later",
            3,
        )
    payload = reply.payload
    text = payload.answer if isinstance(payload, protocol.Answer) else str(payload)
    StateFile(home.worker_memory(wid), ContextMemory, default=ContextMemory).update(
        lambda m: m.model_copy(update={"notes": [*m.notes, f"Q: {question} A: {text}"]})
    )
    print(text)
    return 0


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


# == the parser ===============================================================================
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multibot", description=__doc__)
    p.add_argument("--home", help="runtime home (default: $MULTIBOT_HOME or the project root)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("master", help="run the master (normally from scripts/spawn-master.sh)")
    m.add_argument("--repo", help="the git repository to work on")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--goal", help="what to build; Opus turns it into a plan")
    g.add_argument("--plan", help="a plan file (JSON) instead of asking Opus")
    m.add_argument("--backend", choices=["claude", "shell"], default=None)
    m.add_argument("--max-workers", type=int, default=None)
    m.add_argument("--approve", action="store_true", help="wait for the person to approve the plan")
    m.add_argument("--fresh", action="store_true", help="archive an unfinished run and start anew")
    m.add_argument("--no-tmux", action="store_true", help="run workers as plain child processes")

    w = sub.add_parser("worker", help="run one worker (normally in a pane the master made)")
    w.add_argument("--id", required=True)
    w.add_argument("--backend", choices=["claude", "shell"], default=None)
    w.add_argument("--generation", type=int, default=0)

    s = sub.add_parser("status", help="workers, tasks, questions and totals")
    s.add_argument("--json", action="store_true")
    d = sub.add_parser("dashboard", help="status, refreshed live")
    d.add_argument("--interval", type=float, default=1.0)
    d.add_argument("--once", action="store_true")
    lg = sub.add_parser("logs", help="a worker's log")
    lg.add_argument("id")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    tl = sub.add_parser("timeline", help="the run's event timeline")
    tl.add_argument("-n", "--lines", type=int, default=100)
    tl.add_argument("--json", action="store_true")
    ib = sub.add_parser(
        "inbox", help="what waits in, was handled by, or was rejected from an inbox"
    )
    ib.add_argument("id")
    ib.add_argument("--json", action="store_true")
    sc = sub.add_parser("schema", help="JSON Schema of every message and state file")
    sc.add_argument("--out", help="write one file per schema into this folder")
    st = sub.add_parser("state", help="check every state file")
    st.add_argument("action", choices=["validate"])

    for name, verb in (("pause", "pause"), ("resume", "resume")):
        x = sub.add_parser(name, help=f"{verb} a worker, or 'all'")
        x.add_argument("id")
    an = sub.add_parser("answer", help="answer a question escalated to you")
    an.add_argument("id")
    an.add_argument("text")
    sub.add_parser("approve", help="approve the plan in state/plan.json")
    se = sub.add_parser("send", help="send a message by hand")
    se.add_argument("--to", required=True)
    se.add_argument("--type", required=True, choices=list(protocol.MessageType.__args__))  # type: ignore[attr-defined]
    se.add_argument("--sender", default="human")
    se.add_argument("--task")
    se.add_argument("--correlation")
    se.add_argument("--text")
    se.add_argument("--json", help="payload fields as a JSON object")

    r = sub.add_parser("report", help="(for agents) tell the master something")
    r.add_argument(
        "kind",
        choices=["progress", "discovery", "blocked", "decision", "follow_up"],
        help="follow_up asks the master to add a task after this one",
    )
    r.add_argument("text", nargs="+")
    ak = sub.add_parser("ask", help="(for agents) ask the master and wait for the answer")
    ak.add_argument("text", nargs="+")
    ak.add_argument("--timeout", type=float, default=600.0)

    mg = sub.add_parser("merge", help="bring the integration branch into one of your branches")
    mg.add_argument("--into", required=True)
    cl = sub.add_parser("cleanup", help="remove merged worktrees, prune stale ones")
    cl.add_argument("--force", action="store_true", help="also delete unmerged work")
    cl.add_argument(
        "--stop", action="store_true", help="first stop the run: its tmux session and processes"
    )
    sw = sub.add_parser("setup-worktrees", help="create worktrees for N workers ahead of time")
    sw.add_argument("--repo", required=True)
    sw.add_argument("count", type=int)

    dp = sub.add_parser("demo-prepare", help="create the demo's sample repository in --home")
    dp.set_defaults()
    ss = sub.add_parser("session", help="open the tmux session: master, status, worker panes")
    ss.add_argument("--socket", default="multibot")
    ss.add_argument("--session", default="multibot")
    ss.add_argument("master_args", nargs=argparse.REMAINDER)
    fo = sub.add_parser("follow", help="print the master's log until the run ends")
    fo.add_argument("--timeout", type=float, default=None)
    fo.add_argument("--socket", help="tmux socket of the run's session (to see its master exit)")
    fo.add_argument("--session", help="tmux session of the run")
    fo.add_argument(
        "--from-byte",
        type=int,
        default=0,
        help="where this attempt's lines begin in the master's log (its size before the start)",
    )
    return p


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
