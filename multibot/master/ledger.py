"""The ledger: the one place that adds up cost and tokens, and judges the run's budget. Pure."""

from __future__ import annotations

from multibot.state import SystemState


def charge(
    state: SystemState,
    usd: float,
    tokens: tuple[int, int] = (0, 0),
    turns: int = 0,
    worker: str | None = None,
) -> None:
    """Add spend to the run's totals (tokens are input, output), and to worker's own cost."""
    t = state.metrics.totals
    t.cost_usd += usd
    t.input_tokens += tokens[0]
    t.output_tokens += tokens[1]
    t.turns += turns
    if worker in state.workers:
        state.workers[worker].cost_usd += usd


def over_budget(state: SystemState, budget_usd: float | None) -> str | None:
    """Return why no new task may start if the run's budget is spent, else None."""
    spent = state.metrics.totals.cost_usd
    if budget_usd is not None and spent >= budget_usd:
        return f"spent ${spent:.4f} of ${budget_usd:.2f}: no new tasks"
    return None
