"""Which of an agent's tool uses the master allows: rules from config, and a person's or
Opus's word read as a verdict. Pure.

An agent in ``-p`` mode may use only what its allow-list names; anything else is sent by
Claude Code to the permission tool of the agent's MCP server (``--permission-prompt-tool``),
which asks the master. A rule is a tool name, ``Bash``, or a tool with a pattern on what it
works on, ``Bash(npm test*)``, ``Write(/tmp/*)``, ``WebFetch(https://pypi.org/*)``, matched
as a shell glob against the command, the file path or the URL (other tools: their arguments
as JSON). Deny rules are read first; before them, with the sandbox on, a file tool that would
write outside the worker's worktree is denied (``outside``), whatever the config says.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_RULE = re.compile(r"^(?P<tool>[A-Za-z0-9_.*-]+)(?:\((?P<pattern>.*)\))?$")
_SUBJECT_KEYS = ("command", "file_path", "notebook_path", "path", "url", "pattern")
WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
YES = ("allow", "allowed", "yes", "y", "ok", "approve", "approved", "grant")


@dataclass(frozen=True)
class Decision:
    allow: bool
    why: str


def check_rule(rule: str) -> str | None:
    """What is wrong with a rule, or None (for the config's check)."""
    return None if _RULE.match(rule.strip()) else f"{rule!r} is not Tool or Tool(pattern)"


def subject(tool_input: Mapping[str, Any]) -> str:
    """What a tool use works on: its command, file or URL; else its arguments as JSON."""
    for key in _SUBJECT_KEYS:
        value = tool_input.get(key)
        if isinstance(value, str):
            return value
    return json.dumps(tool_input, sort_keys=True, ensure_ascii=False)


def matches(rule: str, tool: str, tool_input: Mapping[str, Any]) -> bool:
    m = _RULE.match(rule.strip())
    if m is None or not fnmatch.fnmatchcase(tool, m["tool"]):
        return False
    pattern = m["pattern"]
    return pattern is None or fnmatch.fnmatchcase(subject(tool_input), pattern)


def decide(
    allow: Sequence[str], deny: Sequence[str], tool: str, tool_input: Mapping[str, Any]
) -> Decision | None:
    """The rules' decision on a tool use, or None when no rule names it."""
    for rule in deny:
        if matches(rule, tool, tool_input):
            return Decision(False, f"denied by the rule {rule}")
    for rule in allow:
        if matches(rule, tool, tool_input):
            return Decision(True, f"allowed by the rule {rule}")
    return None


def outside(tool: str, tool_input: Mapping[str, Any], worktree: Path) -> Decision | None:
    """The sandbox's rule, which no config overrides: a file tool may not write outside the
    worktree (the sandbox confines Bash; this confines Write and Edit asked for by name)."""
    if tool not in WRITE_TOOLS:
        return None
    target = tool_input.get("file_path") or tool_input.get("notebook_path")
    if not isinstance(target, str):
        return None
    path = Path(os.path.realpath(worktree / os.path.expanduser(target)))
    root = Path(os.path.realpath(worktree))
    if path == root or root in path.parents:
        return None
    return Decision(False, f"{path} is outside the worktree: the sandbox confines workers there")


def describe(tool: str, tool_input: Mapping[str, Any], width: int = 300) -> str:
    """A tool use as a person reads it: ``Bash: curl https://x``."""
    what = subject(tool_input)
    return f"{tool}: {what if len(what) <= width else what[: width - 1] + '…'}"


def verdict(answer: str) -> Decision:
    """A person's or Opus's answer read as allow (it starts with yes, allow, ok...) or deny,
    with the answer as the reason the agent is told."""
    words = re.findall(r"[a-z]+", answer.lower())
    allow = bool(words) and words[0] in YES
    return Decision(allow, answer.strip() or "denied")


def question(worker: str, tool: str, tool_input: Mapping[str, Any]) -> str:
    """The question a person (or Opus) is asked about a tool use."""
    return (
        f"May {worker} use {describe(tool, tool_input)} ? It is outside its allow-list. "
        "Start the answer with allow or deny, then give the reason."
    )
