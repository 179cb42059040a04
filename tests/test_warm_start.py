"""search.warm_start: a sweep's Optuna study starts with a previous run's finished trials.

The previous runs here are synthetic directories holding a trials.json (and, where a test needs
it, a spec.resolved.yaml): the exact input the feature reads. The searcher is Ray's real
OptunaSearch subclass on a real journal-file study; one test runs a real (small) sweep.
"""

import json
import os
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import REPO
from optuna.trial import TrialState

from grpo_ray.sweep import search
from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import dump_spec, load_spec, parse_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.errors import SweepError
from grpo_ray.run_dir import STUDY_JOURNAL
from grpo_ray.sweep.driver import preflight

SMOKE = REPO / "sweeps" / "smoke.yaml"


def _row(tid, config, metrics=None, error=None, stopped_early=False):
    metrics = {"reward": 0.5, "eval_accuracy": 0.25} if metrics is None else metrics
    return {"trial_id": tid, "config": config, "metrics": metrics, "error": error, "stopped_early": stopped_early}


def _point(**changes):
    """A point of the smoke sweep's space (not the spec's own values unless asked)."""
    p = {"lora.rank": 4, "grpo.num_generations": 2, "grpo.temperature": 0.9, "grpo.learning_rate": 1e-4,
         "rewards.check_answer.weight": 1.5}
    return p | changes


def _previous_run(path, rows, spec=None):
    path.mkdir(parents=True)
    (path / "trials.json").write_text(json.dumps(rows))
    if spec is not None:
        (path / "spec.resolved.yaml").write_text(dump_spec(spec))
    return path


def _searcher(spec, root, notes):
    s = search.make_searcher(spec, str(root), lambda kind, data: notes.append(data["message"]))
    s.set_search_properties(None, None, search.param_space(spec))  # what Tune does when the sweep starts
    return s


def _journal_study(run_dir, name):
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run_dir / STUDY_JOURNAL)))
    return optuna.load_study(study_name=name, storage=storage)


def test_spec_field_and_its_checks():
    assert parse_spec("name: x\n").search.warm_start == []
    assert parse_spec("name: x\nsearch:\n  warm_start: [runs/a, s3://b/runs/a]\n").search.warm_start == [
        "runs/a", "s3://b/runs/a"]
    for value, needle in [("[runs/a, runs/a]", "run listed twice: runs/a"), ("['']", "empty entry"),
                          ("runs/a", "valid list")]:
        with pytest.raises(SpecError) as exc:
            parse_spec(f"name: x\nsearch:\n  num_samples: 2\n  warm_start: {value}\n", "w.yaml")
        e = exc.value
        assert (e.file, e.line, e.field) == ("w.yaml", 4, "search.warm_start") and needle in str(e), str(e)


def test_finished_trials_inside_the_space_enter_the_study_as_complete(tmp_path):
    base = load_spec(SMOKE)
    baseline = base.baseline_point()
    prev = _previous_run(tmp_path / "prev", [
        _row("a1", _point(), {"reward": 0.7, "eval_accuracy": 0.5}),
        _row("a2", dict(baseline), {"reward": 0.1, "eval_accuracy": 0.0, "step": 4}),
        _row("a3", _point(), error="Traceback ...\nValueError: boom"),
        _row("a4", _point(), {"reward": 0.9, "eval_accuracy": 0.75}, stopped_early=True),
        _row("a5", _point(), {"reward": 0.2, "eval_accuracy": None}),  # NaN, as trials.json writes it
        _row("a6", _point(**{"lora.rank": 16})),  # outside choice [4, 8]
        _row("a7", _point(**{"grpo.temperature": 2.0})),  # outside uniform [0.7, 1.2]
        _row("a8", _point(**{"lora.dropout": 0.1})),  # a path this sweep holds at 0.0
    ])
    spec = apply_overrides(base, {"name": "b", "search.warm_start": [str(prev)]})
    notes = []
    s = _searcher(spec, tmp_path / "runs", notes)
    assert notes == [
        "warm start: 2 trial(s) from 1 previous run(s) given to Optuna as COMPLETE; skipped 6 "
        "(3 outside the space, 1 failed, 1 stopped early, 1 without every objective)",
        "baseline_first: the spec's own values were already evaluated in a previous run; not run again",
    ]
    # In the journal file the sweep keeps beside the run (what --resume and optuna-dashboard read).
    study = _journal_study(tmp_path / "runs" / "b", "b")
    got = [(t.state, t.values, t.params, t.user_attrs["warm_start"]) for t in study.trials]
    assert got == [(TrialState.COMPLETE, [0.7, 0.5], _point(), f"{prev}#a1"),
                   (TrialState.COMPLETE, [0.1, 0.0], baseline, f"{prev}#a2")]
    # The baseline was measured already: the first suggestion is the sampler's, not the spec's values.
    first = s.suggest("t1")
    assert first != baseline and set(first) == set(baseline)

    # A searcher set up again on the same journal (a rerun of the same name) adds nothing twice.
    _searcher(spec, tmp_path / "runs", [])
    assert len(_journal_study(tmp_path / "runs" / "b", "b").trials) == 3  # the 2 warm ones + t1


def test_baseline_still_runs_first_when_no_previous_trial_measured_it(tmp_path):
    base = load_spec(SMOKE)
    prev = _previous_run(tmp_path / "prev", [_row("a1", _point())])
    spec = apply_overrides(base, {"name": "b", "search.warm_start": [str(prev)], "search.sampler": "nsga2",
                                  "search.objectives": [{"metric": "eval_accuracy", "mode": "max"}]})
    notes = []
    s = _searcher(spec, tmp_path / "runs", notes)
    assert notes == ["warm start: 1 trial(s) from 1 previous run(s) given to Optuna as COMPLETE"]
    # One objective: its value only; and the baseline queued (WAITING) for the first trial.
    assert [(t.state, t.values) for t in s._ot_study.trials] == [(TrialState.WAITING, None),
                                                                 (TrialState.COMPLETE, [0.25])]
    assert s.suggest("t1") == base.baseline_point()


def test_paths_the_previous_run_held_fixed_take_its_spec_values(tmp_path):
    """Sweep A searched fewer paths than B: A's trials ran B's extra path at A's fixed value."""
    base = load_spec(SMOKE)
    space_a = {k: v for k, v in base.search.space.items() if k != "grpo.temperature"}
    spec_a = apply_overrides(base, {"name": "a", "grpo.temperature": 0.8,
                                    "search.space": {k: v.model_dump(by_alias=True) for k, v in space_a.items()}})
    row = {k: v for k, v in _point().items() if k != "grpo.temperature"}
    with_spec = _previous_run(tmp_path / "a", [_row("a1", row)], spec_a)
    without_spec = _previous_run(tmp_path / "a2", [_row("a1", row)])  # unknown value: not a point of B's space
    spec = apply_overrides(base, {"name": "b", "search.warm_start": [str(with_spec), str(without_spec)]})
    notes = []
    s = _searcher(spec, tmp_path / "runs", notes)
    done = s._ot_study.get_trials(states=(TrialState.COMPLETE,))  # the baseline waits beside it
    assert [t.params for t in done] == [_point(**{"grpo.temperature": 0.8})]
    assert notes[0].endswith("1 trial(s) from 2 previous run(s) given to Optuna as COMPLETE; skipped 1 "
                             "(1 outside the space)"), notes


def test_a_missing_previous_run_fails_before_any_trial(tmp_path):
    base = load_spec(SMOKE)
    empty = tmp_path / "empty"
    empty.mkdir()
    for run, needle in [(tmp_path / "nope", "no such run directory"), (empty, "no trials.json")]:
        with pytest.raises(SweepError, match=f"^search.warm_start: {run}: {needle}"):
            preflight(apply_overrides(base, {"search.warm_start": [str(run)]}))
    # Through the CLI: exit code 2, one line naming the field and the path; no run was written.
    spec = yaml.safe_load(SMOKE.read_text()) | {"name": "w"}
    spec["search"]["warm_start"] = [str(tmp_path / "nope")]
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(tmp_path / "w.yaml"),
                        "--storage", str(tmp_path / "runs")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "COLUMNS": "300"}, timeout=300, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"search.warm_start: {tmp_path / 'nope'}: no such run directory" in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "w").exists()


def test_a_warm_started_sweep_runs_its_own_trials_after_the_previous_ones(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "warm"
    spec["search"].update(num_samples=2, max_concurrent_trials=2, max_failures=0)
    spec["export"] = {"enabled": False}
    baseline = load_spec(SMOKE).baseline_point()
    prev = _previous_run(tmp_path / "prev", [
        _row("p1", _point(), {"reward": 0.7, "eval_accuracy": 0.5}),
        _row("p2", dict(baseline), {"reward": -0.5, "eval_accuracy": 0.0}),
        _row("p3", _point(), error="ValueError: boom"),
    ])
    spec["search"]["warm_start"] = [str(prev)]
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(tmp_path / "warm.yaml"),
                        "--storage", str(tmp_path / "runs")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "COLUMNS": "300"}, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "warm start: 2 trial(s) from 1 previous run(s) given to Optuna as COMPLETE; skipped 1 (1 failed)" in out
    assert "baseline_first: the spec's own values were already evaluated" in out

    run_dir = tmp_path / "runs" / "warm"
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 2 and all(t["error"] is None for t in trials), trials
    study = _journal_study(run_dir, "warm")
    warm = [t for t in study.trials if "warm_start" in t.user_attrs]
    new = [t for t in study.trials if "warm_start" not in t.user_attrs]
    assert [(t.state, t.values, t.params) for t in warm] == [
        (TrialState.COMPLETE, [0.7, 0.5], _point()), (TrialState.COMPLETE, [-0.5, 0.0], baseline)]
    assert min(t.number for t in new) > max(t.number for t in warm)  # there before the sweep's first trial
    # The sweep's own trials ran and were told to the same study with what they reported.
    assert sorted(t.values for t in new) == sorted(
        [t["metrics"]["reward"], t["metrics"]["eval_accuracy"]] for t in trials)
    assert all(t.state == TrialState.COMPLETE for t in new) and baseline not in [t.params for t in new]
