"""What Opus is asked, and the shapes its answers must take: schemas and prompts (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multibot.state import PlanTask

MAX_DIFF_CHARS = 60_000  # a cut diff says so in the prompt (review_prompt)


# -- schemas --------------------------------------------------------------------------------

# The PlanTask fields Opus fills; the rest (commands, capabilities) belong to other backends.
PLAN_TASK_FIELDS = (
    "id",
    "title",
    "description",
    "dependencies",
    "priority",
    "owns",
    "model",
    "verify",
    "estimate_minutes",
)
_REQUIRED_TASK_FIELDS = ("id", "title", "description", "dependencies", "owns", "model")
_TASK_HINTS = {
    "id": "Unique id: lowercase letters, digits, '-' or '_', starting with a letter or digit.",
    "title": "A short title.",
    "description": "Everything the worker needs: what to do, where, and what done means.",
    "dependencies": "Ids of tasks of this plan that must be merged before this one starts.",
    "owns": "Files or globs, relative to the repository root, this task may create or change.",
    "verify": "Shell command run in the task's worktree when done (exit 0 = good), or null.",
    "estimate_minutes": "How long a capable engineer would take, in minutes.",
    "priority": "Among ready tasks, higher runs first.",
}
ID_PATTERN = "^[a-z0-9][a-z0-9_-]{0,62}$"

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "description": "The answer for the worker."}},
    "required": ["answer"],
    "additionalProperties": False,
}
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean", "description": "True when the change may be merged."},
        "feedback": {"type": "string", "description": "What is good, or what must change."},
    },
    "required": ["approved", "feedback"],
    "additionalProperties": False,
}


def _clean(prop: Mapping[str, Any]) -> dict[str, Any]:
    """Return a pydantic property schema without titles/defaults, `X | None` as a type list."""
    out = {k: v for k, v in prop.items() if k not in ("title", "default")}
    options = out.pop("anyOf", None)
    if options is not None:
        types = [o.get("type") for o in options]
        if len(options) != 2 or "null" not in types or not all(isinstance(t, str) for t in types):
            raise TypeError(f"cannot simplify schema {prop!r}")  # a model change to look at
        out["type"] = [t for t in types if t != "null"] + ["null"]
    return out


def plan_schema() -> dict[str, Any]:
    """Return the JSON Schema Opus fills with a plan: PlanTask's own fields, nothing internal."""
    props = PlanTask.model_json_schema()["properties"]
    task: dict[str, Any] = {}
    for name in PLAN_TASK_FIELDS:
        task[name] = _clean(props[name])
        if name in _TASK_HINTS:
            task[name]["description"] = _TASK_HINTS[name]
    task["id"]["pattern"] = ID_PATTERN
    task["dependencies"]["items"]["pattern"] = ID_PATTERN
    return {
        "type": "object",
        "properties": {
            "goal": {"type": "string", "description": "The goal, restated in one sentence."},
            "tasks": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": task,
                    "required": list(_REQUIRED_TASK_FIELDS),
                    "additionalProperties": False,
                },
            },
            "verify": {
                "type": ["string", "null"],
                "description": "Command that checks the whole project after every merge, or null.",
            },
        },
        "required": ["goal", "tasks"],
        "additionalProperties": False,
    }


# -- prompts --------------------------------------------------------------------------------

ROLE = (
    "You are the master of multibot: you run a team of Claude Code workers that work in "
    "parallel, each in its own git worktree of one repository, and you merge their branches. "
    "Your working directory is that repository: read it with Read, Glob and Grep when it "
    "helps; you cannot change anything."
)


def plan_prompt(goal: str, repo: Path) -> str:
    """Return the first planning prompt: the goal, the repository and the rules of a plan."""
    return f"""{ROLE}

Goal: {goal}
Repository: {repo}

Split the goal into tasks that workers can do independently and in parallel, and return the
plan by calling the StructuredOutput tool. Rules:
- id: unique, lowercase letters, digits, '-' and '_' (1-63 characters, starting with a letter
  or digit).
- dependencies: ids of tasks that must be finished and merged before this task starts. Every
  dependency must be a task of this plan, and there must be no cycle.
- owns: the files or globs (relative to the repository root, e.g. "src/parser.py",
  "tests/test_parser.py", "docs/*.md") the task may create or change. Tasks whose files overlap
  cannot run in parallel: tasks that touch the same files must depend on each other (better,
  give each file to one task).
- model: "haiku" for simple mechanical tasks, "sonnet" for normal work, "opus" for hard
  design or debugging.
- verify: a shell command run in the task's worktree when it is done, exit status 0 when the
  work is right (e.g. "python -m pytest -q tests/test_parser.py"). Give one wherever possible,
  else null.
- estimate_minutes: how long a capable engineer would take.
- priority: among ready tasks, higher runs first (default 0).
- description: everything the worker needs to know; it sees only its own task.
- verify at the top level: a command that checks the whole project after every merge, or null.
Prefer a few well-sized tasks (10 to 60 minutes each) over many tiny ones."""


def correction_prompt(problems: list[str]) -> str:
    """Return the follow-up that sends a rejected plan's problems back to Opus."""
    listed = "\n".join(f"- {p}" for p in problems)
    return (
        f"The plan you returned is invalid:\n{listed}\n\nFix these problems and return the "
        "complete corrected plan (every task, not only the changed ones) by calling the "
        "StructuredOutput tool again."
    )


def question_prompt(key: str, question: str, context: str) -> str:
    """Return the prompt asking Opus to answer a worker's question."""
    return f"""[multibot question {key}]
{ROLE}

A worker asks you a question. Answer so that it can go on: concretely and briefly, saying what
to do.

Question: {question}

Context:
{context or "(none)"}

Reply by calling the StructuredOutput tool with {{"answer": "..."}}."""


def review_prompt(key: str, task: str, diff: str) -> str:
    """Return the prompt asking Opus to review a task's diff before it is merged."""
    if len(diff) > MAX_DIFF_CHARS:
        cut = len(diff) - MAX_DIFF_CHARS
        diff = diff[:MAX_DIFF_CHARS] + f"\n[... {cut} more characters of diff not shown]"
    return f"""[multibot review {key}]
{ROLE}

Review the change a worker made for this task before it is merged. Approve it when it does
what the task asks, is correct and breaks nothing else; otherwise say exactly what must change.

Task:
{task}

Diff:
{diff or "(empty diff)"}

Reply by calling the StructuredOutput tool with {{"approved": true or false, "feedback": "..."}}."""
