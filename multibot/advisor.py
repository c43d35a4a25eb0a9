"""The master's advisor: who answers questions and reviews diffs beyond the plan's FAQ.

The base class answers nothing (questions then go to the person);
``multibot.opus_advisor.OpusAdvisor`` asks Claude Opus. Work runs in the background: the
master starts requests and polls results.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Advice:
    """A finished request to the advisor (Opus): an answer to a question, or a review."""

    kind: str  # "answer" | "review"
    key: str  # question id or task id
    ok: bool
    text: str
    approved: bool = True
    cost_usd: float = 0.0
    tokens: tuple[int, int] = (0, 0)  # input, output


class Advisor:
    """Who answers questions and reviews diffs when the plan's FAQ does not: Opus, or nobody.

    The default advisor answers nothing, so questions go to the person.
    """

    available = False
    session_id: str | None = None  # the Opus session it speaks in, if any

    def ask(self, key: str, question: str, context: str) -> None:
        """Start answering a question in the background."""

    def review(self, key: str, task: str, diff: str) -> None:
        """Start reviewing a diff in the background."""

    def poll(self) -> list[Advice]:
        """Return the requests finished since the last poll."""
        return []

    def close(self) -> None:
        """Stop any background work."""
