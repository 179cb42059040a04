"""Choosing the best trial: the Pareto front of the objectives, then a documented tie-break.

The rule (README, "Which trial wins"):
1. only trials that finished and reported every objective (no NaN) compete;
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
    extra: dict[str, Any] = field(default_factory=dict)


def _value(t: TrialRecord, metric: str, mode: str) -> float:
    """The metric oriented so that larger is better."""
    v = float(t.metrics[metric])
    return v if mode == "max" else -v


def _complete(t: TrialRecord, objectives: list[tuple[str, str]]) -> bool:
    if t.error is not None:
        return False
    for metric, _ in objectives:
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
    order = [(m, mode) for m, mode in objectives if m == "eval_accuracy"]
    order += [(m, mode) for m, mode in objectives if m != "eval_accuracy"]
    return sorted(front, key=lambda t: ([-_value(t, m, mode) for m, mode in order], t.trial_id))[0]
