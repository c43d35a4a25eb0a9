"""Claude Code's stream-json output: parse each line into AgentEvents and render them for a pane.

Pure functions, no I/O. Line shapes are those of Claude Code 2.1.328 with ``--output-format
stream-json --verbose``: ``system`` (subtype ``init`` carries the session id), ``assistant``
(``text`` and ``tool_use`` blocks), ``user`` (``tool_result`` blocks, and with
``--replay-user-messages`` the echo of our own messages), ``result`` (one per turn), and
``command_lifecycle`` (bookkeeping of the user lines we wrote, used by the backend, not shown).
Key order is not fixed (a ``result`` line does not start with ``"type"``): always parse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multibot.agents.base import AgentEvent

RESULT_CUT = 200
LINE_CUT = 120

# Tools whose input names a file, and the key that holds it.
FILE_TOOLS = {
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "Read": "file_path",
    "NotebookEdit": "notebook_path",
}

# The input key worth showing after "Name: " for common tools.
_SHOWN_KEY = {
    "Bash": "command",
    "Grep": "pattern",
    "Glob": "pattern",
    "WebFetch": "url",
    "WebSearch": "query",
    "Task": "description",
    "Agent": "description",
    "Skill": "skill",
}

# Line types and system subtypes that only repeat what other lines say.
_QUIET_TYPES = {"command_lifecycle", "stream_event", "rate_limit_event", "keep_alive"}
_QUIET_SYSTEM = {"task_started", "task_notification", "task_progress", "status"}


def parse_line(line: str) -> dict[str, Any] | None:
    """Return the JSON object on a line, or None if it is not one (stderr noise, blank)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def cut(text: str, limit: int) -> str:
    """Return text cut to limit characters, marked with an ellipsis if cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_path(path: str, cwd: Path | None) -> str:
    """Return path relative to cwd when it lies inside it, else unchanged."""
    if cwd is not None and path.startswith("/"):
        try:
            return str(Path(path).relative_to(cwd)) or "."
        except ValueError:
            return path
    return path


def tool_summary(name: str, input: Mapping[str, Any], cwd: Path | None = None) -> str:
    """Return a short description of a tool call, e.g. ``Write hello.txt`` or ``Bash: ls``."""
    if name in FILE_TOOLS and isinstance(input.get(FILE_TOOLS[name]), str):
        return f"{name} {shown_path(str(input[FILE_TOOLS[name]]), cwd)}"
    key = _SHOWN_KEY.get(name)
    if key and isinstance(input.get(key), str):
        first = str(input[key]).strip().splitlines()[0] if str(input[key]).strip() else ""
        return f"{name}: {cut(first, LINE_CUT)}"
    if not input:
        return name
    return f"{name} {cut(json.dumps(input, ensure_ascii=False), LINE_CUT)}"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(b.get("text", ""))
            for b in content
            if isinstance(b, dict) and b.get("type") == "text"
        ]
        return "\n".join(parts)
    return "" if content is None else str(content)


def turn_cost(result: Mapping[str, Any]) -> float | None:
    """Return what one result's turn cost, from model_usage_since_last_result, if reported.

    ``total_cost_usd`` is cumulative over the whole session, including earlier processes
    when the session was resumed, so it cannot be summed.
    """
    per_model = result.get("model_usage_since_last_result")
    if not isinstance(per_model, dict):
        return None
    total = 0.0
    for usage in per_model.values():
        if isinstance(usage, dict) and isinstance(usage.get("costUSD"), int | float):
            total += float(usage["costUSD"])
    return total


def result_tokens(result: Mapping[str, Any]) -> tuple[int, int]:
    """Return (input, output) tokens of one result's turn; input counts cache tokens too."""
    usage = result.get("usage")
    if not isinstance(usage, dict):
        return 0, 0

    def n(key: str) -> int:
        value = usage.get(key)
        return int(value) if isinstance(value, int | float) else 0

    inp = n("input_tokens") + n("cache_creation_input_tokens") + n("cache_read_input_tokens")
    return inp, n("output_tokens")


def result_error(result: Mapping[str, Any]) -> str:
    """Return the error text of a failed result (its result text, else its errors list)."""
    text = result.get("result")
    errors = result.get("errors")
    if isinstance(text, str) and text.strip():
        return text.strip()
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(result.get("subtype") or "error")


def _assistant_events(msg: Mapping[str, Any], cwd: Path | None) -> list[AgentEvent]:
    events: list[AgentEvent] = []
    content = msg.get("content")
    if not isinstance(content, list):
        return events
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and str(block.get("text", "")).strip():
            events.append(AgentEvent("text", str(block["text"]).strip()))
        elif block.get("type") == "tool_use":
            name = str(block.get("name", "?"))
            raw = block.get("input")
            input = raw if isinstance(raw, dict) else {}
            data = {"name": name, "input": input, "id": block.get("id")}
            events.append(AgentEvent("tool", tool_summary(name, input, cwd), data))
            path = input.get(FILE_TOOLS.get(name, ""))
            if isinstance(path, str) and path:
                shown = shown_path(path, cwd)
                events.append(AgentEvent("file", shown, {"path": path, "tool": name}))
    return events


def _user_events(parsed: Mapping[str, Any]) -> list[AgentEvent]:
    msg = parsed.get("message")
    content = msg.get("content") if isinstance(msg, dict) else None
    if parsed.get("isReplay"):
        said = _text_of(content).strip()
        if not said:
            return []
        return [
            AgentEvent(
                "info", f"» {cut(' '.join(said.split()), LINE_CUT)}", {"uuid": parsed.get("uuid")}
            )
        ]
    events: list[AgentEvent] = []
    if not isinstance(content, list):
        return events
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            text = _text_of(block.get("content")).strip()
            data = {
                "tool_use_id": block.get("tool_use_id"),
                "is_error": bool(block.get("is_error")),
            }
            events.append(AgentEvent("tool_result", cut(text, RESULT_CUT), data))
    return events


def _result_events(parsed: Mapping[str, Any]) -> list[AgentEvent]:
    events: list[AgentEvent] = []
    sid = parsed.get("session_id")
    if isinstance(sid, str) and sid:
        events.append(AgentEvent("session", sid, {"session_id": sid}))
    total = parsed.get("total_cost_usd")
    if isinstance(total, int | float):
        data = {
            "cost_usd": float(total),
            "session_cost_usd": float(total),
            "turn_cost_usd": turn_cost(parsed),
        }
        events.append(AgentEvent("cost", f"${float(total):.4f}", data))
    if parsed.get("is_error"):
        kind = str(parsed.get("subtype") or "error")
        events.append(
            AgentEvent(
                "info", f"error ({kind}): {cut(result_error(parsed), LINE_CUT)}", {"subtype": kind}
            )
        )
    return events


def events_from(parsed: Mapping[str, Any], cwd: Path | None = None) -> list[AgentEvent]:
    """Return the AgentEvents one parsed stream-json line stands for (paths shown relative to cwd).

    The cost event's ``cost_usd`` is the session's running ``total_cost_usd``; the backend
    replaces it with the task's own spend.
    """
    kind = parsed.get("type")
    if kind == "assistant":
        msg = parsed.get("message")
        return _assistant_events(msg, cwd) if isinstance(msg, dict) else []
    if kind == "user":
        return _user_events(parsed)
    if kind == "result":
        return _result_events(parsed)
    if kind == "system":
        sub = parsed.get("subtype")
        sid = parsed.get("session_id")
        if sub == "init" and isinstance(sid, str):
            return [AgentEvent("session", sid, {"session_id": sid, "model": parsed.get("model")})]
        if sub in _QUIET_SYSTEM:
            return []
        if sub == "compact_boundary":
            return [AgentEvent("info", "context compacted")]
        if sub == "api_retry":  # the binary retries a refused call on its own, then gives up
            status, tries = parsed.get("error_status"), parsed.get("attempt")
            wait = float(parsed.get("retry_delay_ms") or 0) / 1000
            why = f"API {status} ({parsed.get('error')}): retry {tries}/"
            return [AgentEvent("info", f"{why}{parsed.get('max_retries')} in {wait:.1f}s")]
        return [AgentEvent("info", f"system {sub}")]
    if kind == "rate_limit_event":
        info = parsed.get("rate_limit_info")
        if isinstance(info, dict) and info.get("status") in ("rejected", "allowed_warning"):
            kind_ = info.get("rateLimitType") or "usage"
            return [
                AgentEvent(
                    "info", f"{kind_} limit {info.get('status')}: resets {info.get('resetsAt')}"
                )
            ]
        return []
    if kind in _QUIET_TYPES:
        return []
    return [AgentEvent("info", f"{kind}: {cut(json.dumps(parsed, ensure_ascii=False), LINE_CUT)}")]


def line_events(line: str, cwd: Path | None = None) -> list[AgentEvent]:
    """Return the events of one raw output line; a non-JSON line becomes an info event."""
    parsed = parse_line(line)
    if parsed is None:
        return [AgentEvent("info", cut(line.strip(), LINE_CUT))] if line.strip() else []
    return events_from(parsed, cwd)


def render(event: AgentEvent) -> str:
    """Return the pane line(s) for an event; empty when there is nothing to show."""
    if event.kind == "text":
        return "⏺ " + event.text.replace("\n", "\n  ")
    if event.kind == "tool":
        return f"⏺ {event.text}"
    if event.kind == "tool_result":
        lines = event.text.strip().splitlines()
        first = lines[0] if lines else "(no output)"
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        mark = "✗ " if event.data.get("is_error") else ""
        return f"  ⎿  {mark}{cut(first, LINE_CUT)}{more}"
    if event.kind == "cost":
        cost = event.data.get("cost_usd")
        return f"  ${float(cost):.4f}" if isinstance(cost, int | float) else f"  {event.text}"
    if event.kind == "session":
        return f"· session {event.text}"
    if event.kind == "file":
        return ""  # the tool line already names the file
    if event.kind == "info":
        return f"· {event.text}"
    return event.text
