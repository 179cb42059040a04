"""Wall time of the smoke sweep with tracking off and on (MLflow, a local file store).

    python bench/tracking_overhead.py [--repeats 2]   # writes bench/results/tracking_overhead_cpu.json

Runs `grpo-ray sweep sweeps/smoke.yaml` in a subprocess (cold Ray start included), alternating
off / on so a slow minute of a shared machine lands on both; the on runs add `--mlflow DIR`.
Issue #25 asks for tracking to cost at most 10% of the sweep: `overhead` is the ratio of the
medians, for the whole command and for the search alone (best.json's sweep_seconds, which
leaves the export out: the export is the same with and without tracking). On a shared 2-core
machine sweeps vary by 20 s from run to run, so `callback` also times the callback alone: the
mlflow import (done in a thread while the trials start) and its events for 3 trials replayed
against a file store (what blocks Tune's event loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def one(tracking: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpo_ray.cli", "sweep", "sweeps/smoke.yaml", "--storage", f"{tmp}/runs"]
        if tracking:
            cmd += ["--mlflow", f"{tmp}/mlruns"]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        wall = time.time() - t0
        best = json.loads(Path(tmp, "runs", "smoke", "best", "best.json").read_text())
        runs = 0
        if tracking:  # the store really got the trials (a silent no-op would measure nothing)
            import mlflow

            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads a directory store only when asked
            mlflow.set_tracking_uri(f"file://{tmp}/mlruns")
            runs = len(mlflow.search_runs(experiment_names=["smoke"], output_format="list",
                                          filter_string="tags.`grpo_ray.role` = 'trial'"))
    return {"wall_s": round(wall, 1), "search_s": best["sweep_seconds"], "mlflow_trial_runs": runs}


def callback_cost(results_per_trial: int = 2, trials: int = 3) -> dict[str, float]:
    """The driver's own time in the MLflow callback, without Ray's noise: ``import mlflow`` in a
    fresh process (the callback does it in a thread, beside the trials' start-up), then the
    callback's events for a smoke-sized sweep replayed against a file store (what blocks Tune's loop)."""
    imp = subprocess.run([sys.executable, "-c", "import time; t = time.time(); "
                          "from mlflow.tracking import MlflowClient; print(time.time() - t)"],
                         capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        from types import SimpleNamespace

        from grpo_ray.tracking.mlflow import MLflowCallback

        cb = MLflowCallback(f"{tmp}/mlruns", "replay", "replay", f"{tmp}/runs/replay")
        t0 = time.time()
        cb.setup()
        cb._ensure()  # the connection thread, joined: its cost counted here in full
        t1 = time.time()
        config = {"lora.rank": 8, "grpo.num_generations": 4, "grpo.temperature": 0.9, "grpo.learning_rate": 1e-4,
                  "rewards.check_answer.weight": 1.2}
        metrics = {f"m{i}": float(i) for i in range(60)}  # a report carries about 60 numbers
        for k in range(trials):
            trial = SimpleNamespace(trial_id=f"t{k}", config=config, last_result={}, status="TERMINATED")
            cb.on_trial_start(0, [], trial)
            for step in range(1, results_per_trial + 1):
                cb.on_trial_result(0, [], trial, metrics | {"step": step})
            cb.on_trial_complete(0, [], trial)
        cb.on_experiment_end([trial] * trials)
        t2 = time.time()
        assert cb._broken is None, cb._broken
    # connect_s: with mlflow already imported in this process (import_s is the cold import).
    return {"import_s": round(float(imp.stdout.strip()), 2), "connect_s": round(t1 - t0, 2),
            "events_s": round(t2 - t1, 3), "events": trials * (results_per_trial + 2) + 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="Sweeps of each kind (alternating).")
    args = ap.parse_args()
    off, on = [], []
    for i in range(args.repeats):
        off.append(one(False))
        on.append(one(True))
        print(f"round {i + 1}: off {off[-1]}, on {on[-1]}", flush=True)

    def med(xs: list[dict[str, float]], k: str) -> float:
        return statistics.median(x[k] for x in xs)

    numbers = {
        "callback": callback_cost(),
        "off": off, "on": on,
        "wall_median_s": {"off": med(off, "wall_s"), "on": med(on, "wall_s")},
        "search_median_s": {"off": med(off, "search_s"), "on": med(on, "search_s")},
        "overhead_wall": round(med(on, "wall_s") / med(off, "wall_s") - 1, 3),
        "overhead_search": round(med(on, "search_s") / med(off, "search_s") - 1, 3),
    }
    result = {
        "bench": "tracking_overhead",
        "command": f"python bench/tracking_overhead.py --repeats {args.repeats}",
        "device": device_info(),
        "commit": commit("src", "sweeps/smoke.yaml", "bench/tracking_overhead.py"),
        "config": "sweeps/smoke.yaml (3 trials, 2 at a time); on: --mlflow <tmp>/mlruns (file store)",
        "numbers": numbers,
    }
    out = REPO / "bench" / "results" / "tracking_overhead_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in numbers.items() if k not in ("off", "on")}, indent=2))


if __name__ == "__main__":
    main()
