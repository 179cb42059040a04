"""Early stopping (ASHA): the spec's checks, and a real sweep in which ASHA stops a poor trial.

The sweep (conftest.asha_run) runs on a real local Ray cluster with real Optuna; the stopped
trial's state is read back from the Optuna study that Tune saved with the experiment.
"""

import glob
import json
import os
import pickle
import subprocess
import sys

import pytest
from conftest import REPO

from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import dump_spec, parse_spec


def test_early_stopping_is_off_by_default_and_fills_in_its_rungs():
    assert parse_spec("name: x\n").search.early_stopping is None
    spec = parse_spec("name: x\ngrpo: {max_steps: 40, report_every: 4}\nsearch:\n  early_stopping: {}\n")
    es = spec.search.early_stopping
    assert (es.type, es.metric, es.mode, es.grace_period, es.reduction_factor, es.max_t) == (
        "asha", "reward", "max", 4, 2.0, 40)
    # The horizon is the longest run a trial can sample.
    spec = parse_spec("name: x\ngrpo: {max_steps: 40}\nsearch:\n  space:\n    grpo.max_steps: {int: [20, 80]}\n"
                      "  early_stopping: {metric: eval_accuracy}\n")
    assert spec.search.early_stopping.max_t == 80 and spec.max_grpo_steps() == 80
    assert parse_spec(dump_spec(spec)) == spec  # spec.resolved.yaml (an `int` domain included) reads back


@pytest.mark.parametrize(
    "es, line, field, needle",
    [
        ("{grace_period: 50}", 5, "search.early_stopping.grace_period", "exceeds max_t (40"),
        ("{max_t: 10}", 5, "search.early_stopping.max_t", "below the largest grpo.max_steps"),
        ("{metric: loss}", 5, "search.early_stopping.metric", "'eval_accuracy'"),
        ("{reduction_factor: 1}", 5, "search.early_stopping.reduction_factor", "greater than 1"),
        ("{type: hyperband}", 5, "search.early_stopping.type", "'asha'"),
        ("{grace: 2}", 5, "search.early_stopping.grace", "unknown key"),
    ],
)
def test_bad_early_stopping_names_line_and_field(es, line, field, needle):
    text = f"name: x\ngrpo: {{max_steps: 40}}\nsearch:\n  num_samples: 4\n  early_stopping: {es}\n"
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "bad.yaml")
    e = exc.value
    assert (e.file, e.line, e.field) == ("bad.yaml", line, field) and needle in str(e), str(e)


def _trials(run_dir):
    return {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}


def test_asha_stops_the_poor_trial_before_its_last_step(asha_run):
    run_dir, _ = asha_run
    trials = _trials(run_dir)
    assert len(trials) == 4
    weight, prompt = "rewards.check_answer.weight", "grpo.max_prompt_length"
    failed = [t for t in trials.values() if t["config"][prompt] == 8]
    stopped = [t for t in trials.values() if t["stopped_early"]]
    finished = [t for t in trials.values() if t["error"] is None and not t["stopped_early"]]
    assert failed and all("no GRPO prompt fits" in t["error"] for t in failed)
    # ASHA stopped a trial at its first rung (step 2 of 6) ...
    assert stopped, {k: (t["config"], t["metrics"].get("step")) for k, t in trials.items()}
    for t in stopped:
        assert t["error"] is None and t["metrics"]["step"] == 2 and t["metrics"]["stopped_early"] is True
        assert t["config"][weight] == 3.0  # ... and only a trial that scores worse by construction
    # Trials that were never below a cutoff ran every step.
    assert len(finished) >= 2 and all(t["metrics"]["step"] == 6 for t in finished)
    assert all(t["config"][weight] == 1.0 for t in finished if t["config"][prompt] == 128)
    # The trial ASHA let through its last rung reaches max_t: Tune stops it there, not early.
    assert all(t["metrics"]["stopped_early"] is False for t in finished)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["trial_id"] in {t["trial_id"] for t in finished}  # a stopped trial never wins


def test_stopped_trials_are_pruned_in_the_optuna_study(asha_run):
    run_dir, _ = asha_run
    trials = _trials(run_dir)
    from optuna.trial import TrialState

    # The searcher's state that Tune saved with the experiment (what --resume restores).
    with open(max(glob.glob(str(run_dir / "searcher-state-*.pkl"))), "rb") as f:
        state = pickle.load(f)
    study, by_tune_id = state["_ot_study"], state["_ot_trials"]
    states = {tid: study.trials[t.number].state for tid, t in by_tune_id.items()}
    assert set(states) == set(trials)
    for tid, t in trials.items():
        if t["stopped_early"]:
            assert states[tid] == TrialState.PRUNED and study.trials[by_tune_id[tid].number].values is None
        elif t["error"]:
            assert states[tid] == TrialState.FAIL
        else:
            assert states[tid] == TrialState.COMPLETE
            values = study.trials[by_tune_id[tid].number].values
            assert values == [t["metrics"]["reward"], t["metrics"]["eval_accuracy"]]


def test_status_marks_stopped_trials(asha_run):
    run_dir, _ = asha_run
    from grpo_ray.views.status import read_status

    stopped = {tid for tid, t in _trials(run_dir).items() if t["stopped_early"]}
    status = read_status(str(run_dir))
    assert {s.trial_id for s in status if s.stopped_early} == stopped
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "status", str(run_dir)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "250"}, check=False)
    assert r.returncode == 0 and r.stdout.count("(stopped early)") == len(stopped), r.stdout
