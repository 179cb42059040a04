"""The seed recipe is queued once per run, not once per driver start (issue #26).

``Tuner.restore`` sets up the searcher that was pickled when the run began, which queued its
``points_to_evaluate`` into the (persistent) study again: every ``--resume`` ran the baseline
once more. Here the same sequence on a real journal study: start, the baseline taken, then a
second driver's set-up of the same pickled searcher.
"""

from __future__ import annotations

import pickle

import optuna
from conftest import REPO

from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.sweep import search


def _waiting(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))]


def test_a_resumed_searcher_does_not_queue_the_baseline_again(tmp_path):
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"name": "once"})
    baseline = spec.baseline_point()
    assert baseline is not None
    searcher = search.make_searcher(spec, str(tmp_path))
    pickled = pickle.dumps(searcher)  # what Tune keeps in tuner.pkl before the run starts
    searcher.set_search_properties(None, None, search.param_space(spec))  # the first driver's start
    first = searcher.suggest("t1")
    assert first == baseline  # the seed recipe goes first
    assert _waiting(searcher._ot_study) == []

    again = pickle.loads(pickled)  # the second driver: Tuner.restore's searcher, set up once more
    again.set_search_properties(None, None, search.param_space(spec))
    assert _waiting(again._ot_study) == []  # the baseline is in the study already (RUNNING): not queued
    assert again.suggest("t2") != baseline
