"""Fault injection: a sweep that survives the night.

One real sweep (local Ray cluster, Optuna, the tiny model) in which each trial meets a
different fault through a user reward function (``tests/faults.py:chaos``): an exception, an
infinite reward, a hang in Python, a hang in native code, a CUDA out-of-memory (simulated:
no GPU here; the real vLLM refusal is in test_gpu.py), its own process SIGKILLed, a
transient failure; one trial behaves. Every fault must end its trial with a recorded cause
(trials.json, ``status``), reach Optuna as FAIL, and leave the sweep running to a best
trial; retries come from ``search.max_failures``. Secrets planted in the environment must
appear in no artifact. Around the sweep: a storage that cannot be written.

The suite's summary line is printed at the end of the pytest run (see conftest.py).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

# plan slot -> (fault, what its recorded cause must say; None: the trial must finish)
PLAN = [
    ("none", None),  # trial 0 is the seed recipe
    ("boom", r"reward exploded \(injected\)"),
    ("inf", "reward function 'chaos' returned inf"),
    ("hang", "no progress for"),
    ("hang_native", "no progress for"),
    ("oom", "raise|lower model.gpu_memory_utilization"),
    ("sigkill", None),  # retried, then finishes
    ("flaky", None),  # retried, then finishes
    ("config", r"answers.jsonl: no such file"),  # deterministic: failed at once, not retried
]
SECRETS = {"HF_TOKEN": "hf_PLANTEDsecret0123456789abcdef", "AWS_SECRET_ACCESS_KEY": "PLANTEDawsSecretKey0123456789/+abcdefgh"}
SUMMARY: dict[str, int] = {}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_ray.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("chaos")
    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "chaos"
    spec["rewards"] = [{"name": "check_answer"}, {"name": "faults:chaos", "weight": 1.0}]
    spec["sft"]["max_steps"] = 2
    spec["grpo"].update(max_steps=2, report_every=2)
    spec["data"]["eval"]["size"] = 4
    spec["trial"] = {"step_timeout_s": 20}  # start-up on 2 busy cores must fit inside it
    spec["search"].update(num_samples=len(PLAN), max_concurrent_trials=2, max_failures=1,
                          space={"grpo.temperature": {"uniform": [0.7, 1.2]}})
    spec["export"] = {"gguf": ["q8_0"], "agreement_prompts": 0}
    (root / "chaos.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "faults").mkdir()
    env = {**os.environ, **SECRETS, "GRPO_RAY_FAULT_PLAN": ",".join(f for f, _ in PLAN),
           "GRPO_RAY_FAULT_DIR": str(root / "faults"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    # Tracked into MLflow (a file store) as a user's overnight sweep would be: faults must reach it too.
    r = _cli("sweep", str(root / "chaos.yaml"), "--storage", str(root / "runs"), "--mlflow", str(root / "mlruns"),
             env=env, timeout=900)
    return root / "runs" / "chaos", r, env


def _trials(run_dir: Path) -> dict[int, dict]:
    """trials.json by plan slot (``tests/faults.py`` records which trial took which slot)."""
    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    slots = {int(p.name.split("-")[1]): p.read_text() for p in (run_dir.parents[1] / "faults").glob("slot-*")}
    assert sorted(trials) == sorted(slots.values())  # every trial scored and took exactly one slot
    return {k: trials[tid] for k, tid in slots.items()}


def test_every_fault_ends_its_trial_with_its_cause_and_the_sweep_finishes(chaos_run):
    run_dir, r, _ = chaos_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = _trials(run_dir)
    assert sorted(trials) == list(range(len(PLAN)))  # none lost, none duplicated
    import re

    for i, (fault, cause) in enumerate(PLAN):
        t = trials[i]
        if cause is None:
            assert not t["error"], (fault, t["error"])
            assert t["metrics"]["step"] == 2, fault
        else:
            assert t["error"] and re.search(cause, t["error"]), (fault, t["error"])
    for t in trials.values():  # one line each, the whole story in the log it names
        if t["error"]:
            assert "\n" not in t["error"] and "\x1b" not in t["error"] and len(t["error"]) < 600, t["error"]
            assert t["log"] and Path(t["log"]).is_file(), t
    from grpo_ray.views.status import read_status

    failures = {s.trial_id: s.failures for s in read_status(str(run_dir))}
    config_trial = trials[[f for f, _ in PLAN].index("config")]["trial_id"]
    assert failures[config_trial] == 1, failures  # max_failures is 1: a retry would make it 2
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["trial_id"] in {trials[i]["trial_id"] for i, (_, c) in enumerate(PLAN) if c is None}
    SUMMARY.update(injected=len(PLAN) - 1, finished_sweeps=int(r.returncode == 0),
                   trials_with_cause=sum(1 for i, (_, c) in enumerate(PLAN) if c and trials[i]["error"]),
                   recovered=sum(1 for i, (f, _) in enumerate(PLAN) if f in ("sigkill", "flaky") and not trials[i]["error"]),
                   config_not_retried=int(failures[config_trial] == 1),
                   lost=len(PLAN) - len(trials))


def test_status_shows_each_failed_trials_cause(chaos_run):
    run_dir, _, env = chaos_run
    r = _cli("status", str(run_dir), env={**env, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr[-2000:]
    for text in ["reward exploded (injected)", "returned inf", "no progress for", "gpu_memory_utilization"]:
        assert text in r.stdout.replace("\n", " ") or text in r.stdout, (text, r.stdout[-4000:])


def test_failed_trials_are_told_to_optuna_as_failed(chaos_run):
    from optuna.trial import TrialState

    run_dir, _, _ = chaos_run
    trials = _trials(run_dir)
    with open(max(glob.glob(str(run_dir / "searcher-state-*.pkl"))), "rb") as f:
        state = pickle.load(f)
    study, by_tune_id = state["_ot_study"], state["_ot_trials"]
    for i, (_, cause) in enumerate(PLAN):
        ot = study.trials[by_tune_id[trials[i]["trial_id"]].number]
        assert ot.state == (TrialState.COMPLETE if cause is None else TrialState.FAIL), (i, ot.state)


def test_no_secret_reaches_any_artifact(chaos_run):
    """Every file of the run (trials, best.json, model card, GGUF, the HTML report), the CLI's
    output and the Ray session's logs (trial stdout/stderr) are searched for the planted values."""
    run_dir, r, env = chaos_run
    rep = _cli("report", str(run_dir), env=env)
    assert rep.returncode == 0 and (run_dir / "report.html").exists(), rep.stderr[-2000:]
    ray_logs = Path("/tmp/ray/session_latest/logs")  # the chaos sweep's session: no Ray started since
    leaks = []
    mlruns = Path(run_dir).parents[1] / "mlruns"
    for path in [*Path(run_dir).rglob("*"), *mlruns.rglob("*"), *(ray_logs.rglob("*") if ray_logs.exists() else [])]:
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"{path}: {k}" for k, v in SECRETS.items() if v.encode() in data]
    leaks += [f"CLI output: {k}" for k, v in SECRETS.items() if v in r.stdout + r.stderr + rep.stdout + rep.stderr]
    assert not leaks
    SUMMARY["secrets_leaked"] = len(leaks)


def test_mlflow_records_every_fault_and_recovery(chaos_run):
    """The tracked run of the night: one MLflow run per trial, each failed one FAILED with its
    cause, the retried ones (SIGKILL, transient) finished, the winner tagged."""
    mlflow = pytest.importorskip("mlflow")
    run_dir, _, _ = chaos_run
    trials = _trials(run_dir)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(f"file://{run_dir.parents[1] / 'mlruns'}")
    runs = mlflow.search_runs(experiment_names=["chaos"], output_format="list")
    tagged = [r for r in runs if "grpo_ray.trial_id" in r.data.tags]
    by_trial = {r.data.tags["grpo_ray.trial_id"]: r for r in tagged}
    # One run per trial: a retried trial (SIGKILL, transient) logs on into its run, not a second one.
    assert len(tagged) == len(by_trial) and sorted(by_trial) == sorted(t["trial_id"] for t in trials.values())
    best = json.loads((run_dir / "best" / "best.json").read_text())["trial_id"]
    for i, (fault, cause) in enumerate(PLAN):
        run = by_trial[trials[i]["trial_id"]]
        if cause is None:
            assert run.data.tags["grpo_ray.status"] == "finished" and run.info.status == "FINISHED", fault
        else:
            assert run.data.tags["grpo_ray.status"] == "failed" and run.info.status == "FAILED", fault
            assert run.data.tags["grpo_ray.error"] in trials[i]["error"], (fault, run.data.tags["grpo_ray.error"])
        assert (run.data.tags.get("grpo_ray.best") == "true") == (trials[i]["trial_id"] == best), fault


def test_unwritable_storage_fails_before_any_trial(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = _cli("sweep", "sweeps/smoke.yaml", "--storage", str(blocker / "runs"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot write the run there" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("**/trials.json"))
    SUMMARY["storage_faults"] = 1
