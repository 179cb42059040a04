"""Choosing the best trial: the Pareto front of the objectives, then a documented tie-break.

The rule (README, "Which trial wins"):
1. only trials that finished (not failed, not stopped early) and reported every objective and
   ``eval_accuracy`` (no NaN) compete;
2. keep the Pareto front: trials no other trial beats on one objective without losing on another;
3. on the front, the highest ``eval_accuracy`` wins (held-out accuracy is what a user ships);
   then the objectives in the order the spec lists them; then the lowest trial id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: str | None = None
    error: str | None = None
    stopped_early: bool = False  # early stopping ended it before its last GRPO step
    extra: dict[str, Any] = field(default_factory=dict)


def _value(t: TrialRecord, metric: str, mode: str) -> float:
    """The metric oriented so that larger is better."""
    v = float(t.metrics[metric])
    return v if mode == "max" else -v


def _complete(t: TrialRecord, objectives: list[tuple[str, str]]) -> bool:
    # A trial stopped early is judged on an undertrained checkpoint: it never competes; and held-out
    # accuracy, the tie-break and what a user ships, must be known even when it is not an objective.
    if t.error is not None or t.stopped_early:
        return False
    for metric in [m for m, _ in objectives] + ["eval_accuracy"]:
        v = t.metrics.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
    return True


def pareto_front(trials: list[TrialRecord], objectives: list[tuple[str, str]]) -> list[TrialRecord]:
    """Trials not dominated by any other on ``objectives`` ([(metric, 'max'|'min')])."""
    ok = [t for t in trials if _complete(t, objectives)]
    vecs = {t.trial_id: [_value(t, m, mode) for m, mode in objectives] for t in ok}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [t for t in ok if not any(dominates(vecs[o.trial_id], vecs[t.trial_id]) for o in ok if o is not t)]


def pick_best(trials: list[TrialRecord], objectives: list[tuple[str, str]]) -> TrialRecord | None:
    """The winning trial by the rule above, or None when no trial completed."""
    front = pareto_front(trials, objectives)
    if not front:
        return None
    # eval_accuracy ranks first even when it is not an objective (every competing trial has it).
    order = [(m, mode) for m, mode in objectives if m == "eval_accuracy"] or [("eval_accuracy", "max")]
    order += [(m, mode) for m, mode in objectives if m != "eval_accuracy"]
    return sorted(front, key=lambda t: ([-_value(t, m, mode) for m, mode in order], t.trial_id))[0]
