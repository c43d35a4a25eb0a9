"""The `multibot` command line's arguments: every subcommand and its options."""

from __future__ import annotations

import argparse

from multibot import protocol
from multibot.voice import REPORT_KINDS

DESCRIPTION = (
    "The `multibot` command: one short function per subcommand, the work done by the modules."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multibot", description=DESCRIPTION)
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
    se.add_argument(
        "--generation",
        type=int,
        help="sign for this generation (default: the recipient worker's, or the message's)",
    )
    se.add_argument("--text")
    se.add_argument("--json", help="payload fields as a JSON object")

    r = sub.add_parser("report", help="(for agents) tell the master something")
    r.add_argument(
        "kind",
        choices=REPORT_KINDS,
        help="follow_up asks the master to add a task after this one",
    )
    r.add_argument("text", nargs="+")
    ak = sub.add_parser("ask", help="(for agents) ask the master and wait for the answer")
    ak.add_argument("text", nargs="+")
    ak.add_argument("--timeout", type=float, default=600.0)

    sub.add_parser(
        "mcp", help="(for agents) the MCP server of multibot's tools, on stdin and stdout"
    )

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
