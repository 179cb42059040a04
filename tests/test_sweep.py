"""The main job end to end: `grpo-ray sweep sweeps/smoke.yaml` on a real local Ray cluster.

Real Optuna study, real TRL training steps in every trial, real export; the GGUF is read
back with `gguf` and loaded and run by llama.cpp.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    r = subprocess.run(
        [sys.executable, "-m", "grpo_ray.cli", "sweep", "sweeps/smoke.yaml", "--storage", str(storage)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return storage / "smoke", r


def test_sweep_runs_every_trial_and_shows_progress(smoke_run):
    run_dir, r = smoke_run
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    configs = [t["config"] for t in trials]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 3  # Optuna sampled three configs
    from grpo_ray.config.load import load_spec

    baseline = load_spec(REPO / "sweeps" / "smoke.yaml").baseline_point()
    assert baseline in configs  # the seed recipe ran as a trial of its own
    for t in trials:
        assert t["config"]["lora.rank"] in (4, 8) and 0.7 <= t["config"]["grpo.temperature"] <= 1.2
        assert t["metrics"]["step"] == 4 and t["metrics"]["eval_size"] == 16
    assert "trials" in r.stderr and "3/3" in r.stderr and "step 4: reward" in r.stderr  # a report line, not a phase line
    # piped, the display prints a line as a trial enters a phase (trial/phases.py; live lines on a terminal)
    assert re.search(r"^\S+ (loading the model|preparing the data|SFT|held-out evaluation|GRPO)", r.stderr, re.M)
    # smoke.yaml searches lora.rank with warm actors: what lora.pad_rank's default decided is said
    assert "lora.pad_rank: auto -> every trial's LoRA is built at rank 8" in " ".join(r.stderr.split())


def test_best_json_names_the_pareto_winner(smoke_run):
    run_dir, _ = smoke_run
    best = json.loads((run_dir / "best" / "best.json").read_text())
    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    assert best["trial_id"] in trials and best["trial_id"] in best["pareto_front"]
    assert best["hyperparameters"] == trials[best["trial_id"]]["config"]
    front_acc = [trials[t]["metrics"]["eval_accuracy"] for t in best["pareto_front"]]
    assert best["metrics"]["eval_accuracy"] == max(front_acc)
    assert {"reward", "eval_accuracy", "format_rate"} <= set(best["metrics"])


def test_export_has_adapter_merged_model_and_gguf_llama_cpp_runs(smoke_run):
    run_dir, _ = smoke_run
    best = run_dir / "best"
    assert (best / "lora" / "adapter_model.safetensors").exists()
    assert list((best / "merged16").glob("*.safetensors"))
    ggufs = sorted(best.glob("*.gguf"))
    assert {p.name.rsplit("-", 1)[-1] for p in ggufs} == {"f16.gguf", "q8_0.gguf"}
    import gguf

    reader = gguf.GGUFReader(str(ggufs[0]))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3"
    assert len(reader.tensors) > 0
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(ggufs[-1]), n_ctx=256, verbose=False)
    out = llm("What is 2 + 2?<think>", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    agreement = json.loads((best / "export.json").read_text())["quantized_agreement"]["q8_0"]
    assert agreement["prompts"] == 16 and 0 <= agreement["rate"] <= 1 and agreement["reference"].endswith("f16.gguf")
    card = (best / "README.md").read_text()
    assert "builtin:tiny-qwen3" in card and "builtin:math_mini" in card and "`check_answer`" in card
    assert json.loads((best / "best.json").read_text())["trial_id"] in card
    modelfile = (best / "Modelfile").read_text().splitlines()
    assert f"FROM ./{ggufs[-1].name}" in modelfile  # Ollama gets the quantized file


def test_export_and_pull_commands(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    trials = json.loads((run_dir / "trials.json").read_text())
    other = next(t["trial_id"] for t in trials
                 if t["trial_id"] != json.loads((run_dir / "best" / "best.json").read_text())["trial_id"])
    cli = [sys.executable, "-m", "grpo_ray.cli"]
    r = subprocess.run([*cli, "export", str(run_dir), "--trial", other], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run_dir / "best" / "best.json").read_text())["trial_id"] == other
    r = subprocess.run([*cli, "export", str(run_dir), "--trial", "nope"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "no trial 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cli, "export", str(run_dir), "--trial", other, "--gguf", "q9_z"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--gguf" in r.stderr and "q9_z" in r.stderr and "q8_0" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cli, "export", str(run_dir), "--trial", other, "--gguf", "f16"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "best").glob("*.gguf")] == ["f16.gguf"]
    dest = tmp_path / "pulled"
    r = subprocess.run([*cli, "pull", str(run_dir), str(dest)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dest / "best.json").exists() and list(dest.glob("*.gguf"))
    r = subprocess.run([*cli, "pull", str(tmp_path / "none"), str(dest)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "none: no sweep here (no such directory" in r.stderr  # a run that is not there


def test_status_lists_every_trial_from_storage(smoke_run):
    run_dir, _ = smoke_run
    from grpo_ray.views.status import read_status

    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    status = read_status(str(run_dir))
    assert {s.trial_id for s in status} == set(trials)
    for s in status:
        assert s.status == "TERMINATED" and s.last["step"] == 4
        assert s.config == trials[s.trial_id]["config"]
        assert s.last["eval_accuracy"] == trials[s.trial_id]["metrics"]["eval_accuracy"]
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "status", str(run_dir)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and all(tid in r.stdout for tid in trials) and "TERMINATED" in r.stdout
    assert "utilization: busy" in r.stdout and "trials per device-hour" in r.stdout
    # TensorBoard logs through Tune: one event file per trial beside its result.json.
    trial_dirs = list(run_dir.glob("tune_trainable_*"))
    assert len(trial_dirs) == 3 and all(list(d.glob("events.out.tfevents.*")) for d in trial_dirs)


def test_the_optuna_study_lives_in_the_run_directory(smoke_run):
    """A journal file any Optuna tool (optuna-dashboard, load_study) can open after the sweep."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    run_dir, _ = smoke_run
    trials = json.loads((run_dir / "trials.json").read_text())
    study = optuna.load_study(study_name="smoke", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(run_dir / "optuna-journal.log"))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(trials) == 3
    assert sorted(tuple(t.values) for t in done) == sorted(
        (t["metrics"]["reward"], t["metrics"]["eval_accuracy"]) for t in trials)


def test_utilization_is_recorded_and_reuse_is_consistent(smoke_run):
    """Whether Tune hands trial 3 a finished trial's actor here depends on timing (two trials run
    at once); tests/test_warm.py shows reuse deterministically. What must hold either way:"""
    run_dir, r = smoke_run
    trials = json.loads((run_dir / "trials.json").read_text())
    m = {t["trial_id"]: t["metrics"] for t in trials}
    for tid, x in m.items():
        if x["model_reused"] == 1.0:  # its actor ran an earlier trial, which ended before it started
            assert any(y["worker_pid"] == x["worker_pid"] and y["reported_at"] <= x["trial_started_at"]
                       for o, y in m.items() if o != tid)
    use = json.loads((run_dir / "utilization.json").read_text())
    assert use["trials"] == use["finished"] == 3 and use["devices"] == 1
    warm = sum(x["model_reused"] == 1.0 for x in m.values())
    assert (use["startup_s"]["warm"] or {"n": 0})["n"] == warm and use["startup_s"]["cold"]["n"] == 3 - warm
    assert 0 < use["busy_fraction"] <= 1
    assert json.loads((run_dir / "best" / "best.json").read_text())["utilization"] == use
    assert "utilization: busy" in r.stdout


def test_driver_doctests():
    import doctest

    from grpo_ray.sweep import driver

    assert doctest.testmod(driver).failed == 0
