"""What `multibot status` and the dashboard show: a snapshot of the files, and its rendering."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from pydantic import BaseModel

from multibot.config import load_worker
from multibot.errors import MultibotError
from multibot.heartbeat import read_heartbeat
from multibot.layout import Home
from multibot.lifecycle import worker_status
from multibot.scheduler import blocked
from multibot.state import QuestionRecord, SystemState, TaskRecord, WorkerState
from multibot.store import StateFile

M = TypeVar("M", bound=BaseModel)


def _sandbox(home: Home, backend: str, problems: list[str]) -> str:
    """Whether the agents run sandboxed: on, off (the template says so), or no agents."""
    if backend != "claude":
        return f"none ({backend} backend: no agents)"
    try:
        on = load_worker(home).sandbox
    except MultibotError as exc:
        problems.append(str(exc))
        return "unknown"
    return "on" if on else 'OFF ("sandbox": false in config/worker-template.json)'


def snapshot(home: Home, now: float | None = None) -> dict[str, Any]:
    """Read every state file into one plain dict (what `status --json` prints)."""
    now = time.time() if now is None else now
    problems: list[str] = []
    # A broken hand edit with no good copy to fall back on must not break the view (the status
    # pane would die): it is listed under PROBLEMS and the rest is shown.
    system = _read(StateFile(home.system_state, SystemState, default=SystemState), problems)
    if system is None:
        system = SystemState()
    workers = []
    for wid, info in sorted(system.workers.items(), key=lambda kv: _natural(kv[0])):
        ws = None
        if home.worker_state(wid).exists():
            ws = _read(StateFile(home.worker_state(wid), WorkerState, default=None), problems)
        hb = read_heartbeat(home.heartbeat(wid))
        beat = hb.status if hb is not None and hb.generation == info.generation else None
        status = worker_status(info.status, beat, bool(ws and ws.paused) or system.paused)
        workers.append(
            {
                "id": wid,
                "status": status,
                "task": info.current_task,
                "branch": info.branch,
                "model": info.model,
                "heartbeat_age_s": round(now - hb.time, 1) if hb else None,
                "generation": info.generation,
                "restarts": info.restarts,
                "cost_usd": round(info.cost_usd, 6),
                "tool": ws.current_tool if ws else None,
                "reason": info.failure_reason if status in ("failed", "error") else "",
            }
        )
    records: dict[str, TaskRecord] = {}
    for path in sorted(home.tasks_dir.glob("*.json")) if home.tasks_dir.exists() else []:
        t = _read(StateFile(path, TaskRecord, default=None), problems)
        if t is not None:
            records[t.id] = t
    stuck = blocked(records, records)
    tasks = []
    for t in records.values():
        tasks.append(
            {
                "id": t.id,
                "title": t.task.title,
                "status": _task_status(t, t.id in stuck),
                "worker": t.worker,
                "dependencies": t.task.dependencies,
                "priority": t.task.priority,
                "model": t.task.model,
                "attempts": t.attempts,
                "runs": t.runs,
                "limits": t.limits,
                "cost_usd": round(t.cost_usd, 6),
                "tokens": t.tokens.model_dump(),
                "error": (
                    t.last_error[:200]
                    if t.status == "failed"
                    else f"blocked: {stuck[t.id]}"
                    if t.id in stuck
                    else ""
                ),
            }
        )
    questions = []
    if home.questions_dir.exists():
        for path in sorted(home.questions_dir.glob("*.json")):
            q = _read(StateFile(path, QuestionRecord, default=None), problems)
            if q is not None and q.status == "pending":
                questions.append(
                    {
                        "id": q.id,
                        "worker": q.worker,
                        "question": q.question,
                        "permission": q.permission is not None,
                    }
                )
    m = system.metrics
    return {
        "run_id": system.run_id,
        "phase": system.phase,
        "paused": system.paused,
        "goal": system.goal,
        "message": system.message,
        "limits": system.limits.model_dump(),
        "workers": workers,
        "tasks": tasks,
        "questions": questions,
        "totals": {
            "cost_usd": round(m.totals.cost_usd, 6),
            "input_tokens": m.totals.input_tokens,
            "output_tokens": m.totals.output_tokens,
            "tasks": m.tasks_total,
            "merged": m.tasks_merged,
            "failed": m.tasks_failed,
            "restarts": m.restarts,
            "elapsed_s": round((m.finished_at or now) - m.started_at, 1),
        },
        "security": {
            "messages_refused": m.messages_refused,
            "sandbox": _sandbox(home, system.backend, problems),
        },
        "integration_branch": system.git.integration_branch,
        "pipeline": {**system.git.queue.model_dump(), "queued": queued(system)},
        "problems": problems,
    }


def _read(f: StateFile[M], problems: list[str]) -> M | None:
    """Return the state in force (None if there is none); note what is wrong in problems."""
    try:
        state = f.read()
    except MultibotError as exc:  # broken, and no last good copy to show instead
        problems.append(str(exc))
        return None
    if f.problem():
        problems.append(str(f.problem()))
    return state


def _natural(s: str) -> tuple[str, int]:
    head = s.rstrip("0123456789")
    tail = s[len(head) :]
    return (head, int(tail) if tail else 0)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), *[fmt.format(*map(str, r)) for r in rows]]


def queued(system: SystemState) -> list[str]:
    """The verified tasks not in a batch being checked, in plan order."""
    checking = {t for batch in system.git.queue.checking for t in batch}
    return [t for t in system.git.merge_queue if t not in checking]


def _pipeline(q: dict[str, Any]) -> list[str]:
    """The verify and merge pipeline, in a few lines (nothing when it is idle)."""
    if not (q["verifying"] or q["checking"] or q["queued"] or q["paused"] or q["checks"]):
        return []
    batches = " then ".join("[" + ", ".join(b) + "]" for b in q["checking"]) or "-"
    last = "-" if q["last_check_s"] is None else f"{q['last_check_s']:.1f}s"
    lines = [
        "",
        "PIPELINE"
        + ("  [BISECTING]" if q["bisecting"] else "")
        + (f"  [WAITING: {q['paused']}]" if q["paused"] else ""),
        f"  verifying  {', '.join(q['verifying']) or '-'}",
        f"  checking   {batches}",
        f"  queued     {', '.join(q['queued']) or '-'}",
        f"  checks     {q['checks']} run, last took {last}",
    ]
    return lines


def _task_status(t: TaskRecord, stuck: bool) -> str:
    """A task's status as shown: held and blocked are pending ones that will not start."""
    if t.status != "pending":
        return t.status
    return "blocked" if stuck else "held" if t.hold else "pending"


def _tries(t: dict[str, Any]) -> str:
    """A task's attempts, and the runs beyond them (its worker died and it began again)."""
    limited = t.get("limits", 0)
    again = t["runs"] - t["attempts"] - limited
    return (
        f"{t['attempts']}"
        + (f" (+{again} rerun{'s' * (again > 1)})" if again > 0 else "")
        + (f" ({limited} limited)" if limited else "")
    )


def render(s: dict[str, Any]) -> str:
    """Render a snapshot as the text table `multibot status` prints."""
    lines = [
        f"run {s['run_id'] or '-'}  phase {s['phase']}"
        + ("  [PAUSED]" if s["paused"] else "")
        + (f"  — {s['message']}" if s["message"] else "")
    ]
    if s["limits"]["line"]:
        lines.append(
            f"API LIMITS  {s['limits']['line']}  ({s['limits']['hits']} met, "
            f"{s['limits']['waited_s']:.0f}s waited)"
        )
    if s["workers"]:
        rows = [
            [
                w["id"],
                w["status"],
                w["task"] or "-",
                w["branch"] or "-",
                w["model"] or "-",
                "-" if w["heartbeat_age_s"] is None else f"{w['heartbeat_age_s']:.1f}s",
                f"${w['cost_usd']:.4f}",
                w["reason"][:40] or (w["tool"] or ""),
            ]
            for w in s["workers"]
        ]
        lines += ["", "WORKERS"]
        lines += _table(rows, ["id", "status", "task", "branch", "model", "beat", "cost", "note"])
    if s["tasks"]:
        rows = [
            [
                t["id"],
                t["status"],
                _tries(t),
                t["worker"] or "-",
                ",".join(t["dependencies"]) or "-",
                t["priority"],
                t["model"],
                f"${t['cost_usd']:.4f}",
                (t["error"] or t["title"])[:50],
            ]
            for t in s["tasks"]
        ]
        lines += ["", "TASKS"]
        head = ["id", "status", "tries", "worker", "deps", "prio", "model", "cost", "title"]
        lines += _table(rows, head)
    lines += _pipeline(s["pipeline"])
    if s["questions"]:
        lines += ["", "QUESTIONS WAITING FOR YOU (multibot answer ID TEXT)"]
        lines += [
            f"  {q['id']}  {'🔐 ' if q.get('permission') else ''}{q['worker']}: {q['question']}"
            for q in s["questions"]
        ]
    t = s["totals"]
    lines += [
        "",
        f"TOTAL  {t['merged']}/{t['tasks']} merged, {t['failed']} failed, "
        f"{t['restarts']} restarts, ${t['cost_usd']:.4f}, "
        f"{t['input_tokens']} in / {t['output_tokens']} out tokens, {t['elapsed_s']:.0f}s",
    ]
    sec = s["security"]
    if sec["sandbox"].startswith("OFF"):
        lines += ["", f"SANDBOX  {sec['sandbox']}: agents' commands can write anywhere"]
    refused = sec["messages_refused"]
    if refused:
        lines += [
            "",
            f"REFUSED  {refused} messages that did not prove their sender "
            "(multibot inbox master: the reasons)",
        ]
    if s["problems"]:
        lines += ["", "PROBLEMS (the last good state stays in force until fixed)"]
        lines += [f"  {p}" for p in s["problems"]]
    return "\n".join(lines)
