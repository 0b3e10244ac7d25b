"""How a tuning protocol chooses a learning rate: shared by the protocol that runs the trials
(bench/orchestrate/protocol.py) and the analysis that recomputes the choice from the records (analysis/tuned.py), so
the two can never disagree."""
from __future__ import annotations

import math
from typing import Any


def grid(default_lr: float, factors: list[float]) -> list[float]:
    """The learning rates of the grid, rounded to 4 significant digits (3e-4 x 0.3 is 9e-05, not 8.999999e-05)."""
    return [float(f"{default_lr * f:.4g}") for f in factors]


def choose(trials: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The trial ({lr, validation, ...}) with the best validation score, ties to the smaller lr; None when no trial
    has a finite score."""
    scored = [t for t in trials if t.get("validation") is not None and math.isfinite(t["validation"])]
    if not scored:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return min(scored, key=lambda t: (-sign * t["validation"], t["lr"]))


def at_edge(lr: float, lrs: list[float]) -> bool:
    """Whether the chosen lr is the grid's smallest or largest (the best may lie outside: widen the grid)."""
    return len(lrs) > 1 and lr in (min(lrs), max(lrs))
