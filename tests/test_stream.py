"""Parsing and rendering of Claude Code's stream-json lines (shapes taken from 2.1.328)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from multibot.agents.base import AgentEvent
from multibot.agents.stream import (
    events_from,
    line_events,
    parse_line,
    render,
    result_tokens,
    tool_summary,
    turn_cost,
)

CWD = Path("/w/repo")
SID = "607640fd-1be6-464c-9099-ecf14ab00e4c"


def assistant(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "assistant",
        "message": {"role": "assistant", "content": list(blocks)},
        "session_id": SID,
    }


RESULT = {
    "duration_api_ms": 116,
    "session_id": SID,
    "total_cost_usd": 0.2014,
    "usage": {
        "input_tokens": 200,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 5,
        "output_tokens": 40,
    },
    "model_usage_since_last_result": {"claude-sonnet-5-5": {"costUSD": 0.0008}},
    "is_error": False,
    "num_turns": 2,
    "subtype": "success",
    "result": "All done.",
    "type": "result",
}


def test_parse_line_takes_objects_only() -> None:
    assert parse_line('{"type":"result"}') == {"type": "result"}
    assert parse_line('  {"a": 1}\n') == {"a": 1}
    assert parse_line("") is None
    assert parse_line("Error: Session ID x is already in use.") is None
    assert parse_line("{broken") is None
    assert parse_line("[1, 2]") is None


@given(st.text())
def test_parse_line_never_raises(s: str) -> None:
    parsed = parse_line(s)
    assert parsed is None or isinstance(parsed, dict)
    for ev in line_events(s):
        assert isinstance(render(ev), str)


def test_init_gives_session() -> None:
    init = {"type": "system", "subtype": "init", "session_id": SID, "model": "claude-sonnet-5-5"}
    [ev] = events_from(init)
    assert ev.kind == "session" and ev.data["session_id"] == SID and ev.text == SID


def test_tool_use_gives_tool_and_file_events_relative_to_cwd() -> None:
    line = assistant(
        {"type": "text", "text": "Writing it."},
        {
            "type": "tool_use",
            "id": "t1",
            "name": "Write",
            "input": {"file_path": "/w/repo/hello.txt", "content": "hi"},
        },
    )
    text, tool, file = events_from(line, CWD)
    assert text == AgentEvent("text", "Writing it.")
    assert tool.kind == "tool" and tool.text == "Write hello.txt"
    assert tool.data["name"] == "Write" and tool.data["input"]["content"] == "hi"
    assert (
        file.kind == "file"
        and file.text == "hello.txt"
        and file.data["path"] == "/w/repo/hello.txt"
    )
    assert render(tool) == "⏺ Write hello.txt"
    assert render(file) == ""


def test_every_file_tool_reports_its_path() -> None:
    for name, key in [
        ("Edit", "file_path"),
        ("MultiEdit", "file_path"),
        ("Read", "file_path"),
        ("NotebookEdit", "notebook_path"),
    ]:
        evs = events_from(
            assistant({"type": "tool_use", "name": name, "input": {key: "/elsewhere/x"}}), CWD
        )
        assert [e.kind for e in evs] == ["tool", "file"]
        assert evs[1].text == "/elsewhere/x"  # outside cwd: kept absolute
    bash = events_from(
        assistant({"type": "tool_use", "name": "Bash", "input": {"command": "ls /w"}})
    )
    assert [e.kind for e in bash] == ["tool"]


def test_tool_summaries() -> None:
    assert tool_summary("Bash", {"command": "git status\ngit diff"}) == "Bash: git status"
    assert tool_summary("Grep", {"pattern": "TODO"}) == "Grep: TODO"
    assert tool_summary("TodoWrite", {}) == "TodoWrite"
    long = tool_summary("Mystery", {"x": "y" * 500})
    assert long.startswith("Mystery {") and len(long) < 140


def test_tool_result_cut_short_and_rendered_indented() -> None:
    line = {
        "type": "user",
        "message": {
            "role": "user",
            "content": [
                {
                    "tool_use_id": "t1",
                    "type": "tool_result",
                    "content": "x" * 1000,
                    "is_error": True,
                }
            ],
        },
    }
    [ev] = events_from(line)
    assert ev.kind == "tool_result" and len(ev.text) <= 200 and ev.data["is_error"] is True
    shown = render(ev)
    assert shown.startswith("  ⎿  ✗ ") and "\n" not in shown
    listed = {
        "type": "user",
        "message": {
            "content": [{"type": "tool_result", "content": [{"type": "text", "text": "a\nb\nc"}]}]
        },
    }
    [ev2] = events_from(listed)
    assert render(ev2) == "  ⎿  a (+2 lines)"


def test_replayed_user_message_is_info() -> None:
    line = {
        "type": "user",
        "message": {"role": "user", "content": "CONTEXT: the answer is 42"},
        "uuid": "u1",
        "isReplay": True,
    }
    [ev] = events_from(line)
    assert ev.kind == "info" and "the answer is 42" in ev.text


def test_result_gives_session_cost_and_no_error() -> None:
    session, cost = events_from(RESULT)
    assert session.kind == "session" and session.data["session_id"] == SID
    assert (
        cost.kind == "cost"
        and cost.data["cost_usd"] == 0.2014
        and cost.data["turn_cost_usd"] == 0.0008
    )
    assert render(cost) == "  $0.2014"
    assert turn_cost(RESULT) == 0.0008
    assert result_tokens(RESULT) == (215, 40)
    assert turn_cost({"type": "result"}) is None and result_tokens({}) == (0, 0)


def test_error_result_adds_info() -> None:
    failed = {
        **RESULT,
        "is_error": True,
        "subtype": "error_max_budget_usd",
        "result": "",
        "errors": ["Reached maximum budget ($0.5)"],
    }
    kinds = [e.kind for e in events_from(failed)]
    assert kinds == ["session", "cost", "info"]
    assert "Reached maximum budget" in events_from(failed)[-1].text


def test_quiet_and_unknown_lines() -> None:
    lifecycle = {"type": "command_lifecycle", "command_uuid": "u", "state": "queued"}
    assert events_from(lifecycle) == []
    assert events_from({"type": "system", "subtype": "task_started"}) == []
    [odd] = events_from({"type": "brand_new", "x": 1})
    assert odd.kind == "info" and odd.text.startswith("brand_new")
    [noise] = line_events("Warning: something on stderr")
    assert noise == AgentEvent("info", "Warning: something on stderr")
    assert line_events("   ") == []


def test_render_text_and_misc() -> None:
    assert render(AgentEvent("text", "one\ntwo")) == "⏺ one\n  two"
    assert render(AgentEvent("session", SID)) == f"· session {SID}"
    assert render(AgentEvent("info", "hello")) == "· hello"
    assert render(AgentEvent("output", "raw line")) == "raw line"
    assert (
        json.loads(json.dumps(render(AgentEvent("cost", "$1", {"cost_usd": 0.5})))) == "  $0.5000"
    )
