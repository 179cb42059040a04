"""The Optuna samplers the spec builds (search.make_searcher)."""

import optuna
import pytest

from grpo_ray.sweep import search
from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from conftest import REPO


def _tpe_suggestions(startup: int | None, n: int = 6) -> list[float]:
    """Suggestions of the searcher's own sampler after n-1 told trials of a 1-D quadratic."""
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"),
                           {"search.startup_trials": startup, "search.objectives": [{"metric": "reward"}]})
    sampler = search.make_searcher(spec)._sampler
    study = optuna.create_study(sampler=sampler, direction="maximize")
    xs = []
    for _ in range(n):
        t = study.ask()
        x = t.suggest_float("x", 0.0, 1.0)
        study.tell(t, -(x - 0.8) ** 2)
        xs.append(x)
    return xs


def test_startup_trials_lets_tpe_model_a_short_sweep():
    default, short = _tpe_suggestions(None), _tpe_suggestions(2)
    # Both draw the same random start; with startup_trials 2, TPE takes over from the 3rd trial on.
    assert short[:2] == default[:2]
    assert short[2:] != default[2:]


def test_startup_trials_must_be_positive():
    with pytest.raises(SpecError, match="search.startup_trials"):
        apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"search.startup_trials": 0})
