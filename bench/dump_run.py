"""Dump a sweep's trials (Tune's newest snapshot) and its utilization as JSON, while it runs or after.

For a benchmark sweep cut short by the end of a device lease:  python bench/dump_run.py RUN_DIR OUT.json
(bench/warm_sweep.py also writes this snapshot into its own JSON after every trial).
"""

from __future__ import annotations

import json
import sys

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

KEEP = ["trial_started_at", "first_step_at", "reported_at", "startup_s", "load_s", "model_reused", "worker_pid",
        "gpus", "first_step_reward", "sft_loss", "sft_lora_norm", "reward", "eval_accuracy", "sft_eval_accuracy",
        "step", "sft_seconds", "gpu_max_allocated_gib", "elapsed_s", "sft_setup_s", "eval_seconds", "grpo_setup_s",
        "grpo_step_s", "compile_s", "sft_compile_s", "compiled_graphs", "engine_wait_s",
        # the trial's NVML samples (trial/gpu_sampler.py): what status's packing advice reads
        "gpu_util_mean", "gpu_util_steps_mean", "gpu_mem_used_max_gib", "gpu_mem_total_gib", "gpu_samples",
        "gpu_steps_samples"]


# Of every report window (a line of the trial's result.json): enough to time the window's GRPO
# steps and place them in time (bench/warm_summary.py, steps beside a neighbour's start or not).
WINDOW_KEEP = ["step", "reported_at", "eval_seconds", "grpo_step_s"]


def snapshot(run_dir: str) -> dict:
    """The sweep so far, from Tune's newest experiment snapshot (what `grpo-ray status` reads), with
    each trial's report windows."""
    from grpo_ray.views.html_report import trial_history
    from grpo_ray.views.status import read_status
    from grpo_ray.views.utilization import utilization

    trials = sorted(read_status(run_dir), key=lambda t: t.last.get("trial_started_at") or float("inf"))
    return {"utilization": utilization((t.last, t.status == "TERMINATED") for t in trials),
            "trials": [{"trial_id": t.trial_id, "status": t.status, "config": t.config,
                        **{k: t.last.get(k) for k in KEEP},
                        "windows": [{k: row.get(k) for k in WINDOW_KEEP} for row in trial_history(run_dir, t)]}
                       for t in trials]}


def main(run_dir: str, out: str) -> None:
    result = {"run_dir": run_dir, "device": device_info(), "commit": commit("src", "bench"),
              "command": f"python bench/dump_run.py {run_dir} {out}", **snapshot(run_dir)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps(result["utilization"]))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
