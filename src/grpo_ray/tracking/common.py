"""What MLflow and W&B both get from a Tune trial: its params, its metrics by step, its final status."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from grpo_ray import storage
from grpo_ray.run_dir import BEST_JSON, MODEL_CARD
from grpo_ray.views.status import last_line

# Tune's own bookkeeping in every result: not what the trial measured (time_total_s is kept).
TUNE_KEYS = frozenset({
    "pid", "timestamp", "date", "hostname", "node_ip", "done", "training_iteration", "time_this_iter_s",
    "time_since_restore", "iterations_since_restore", "timesteps_since_restore", "timesteps_total",
    "episodes_total", "checkpoint_dir_name", "should_checkpoint", "experiment_tag", "trial_id", "config",
})
STEP = "step"  # what trial/run.py reports with every window: the GRPO step (early_stop.TIME_ATTR)
CAUSE_CHARS = 500  # of a failed trial's cause in a tag: the exception's last line, not the traceback

FINISHED, STOPPED_EARLY, FAILED = "finished", "stopped_early", "failed"


class TrackingError(RuntimeError):
    """A tracking backend that cannot be used as configured (missing package, unreachable store)."""


def metrics_of(result: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(GRPO step, every finite number the trial reported) of one Tune result.

    Bools (``stopped_early``) are left out: they become the final status instead. A result
    without ``step`` (none of ours, but a resumed trial's first) falls back to Tune's iteration.
    """
    step = result.get(STEP, result.get("training_iteration", 0))
    out = {k: float(v) for k, v in result.items()
           if k not in TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return int(step or 0), out


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """A trial's sampled config as flat string params (dotted spec paths as keys)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def final_status(last_result: dict[str, Any] | None, error: str | None) -> tuple[str, str | None]:
    """(finished | stopped_early | failed, the cause of a failure: its exception's last line)."""
    if error:
        return FAILED, last_line(error)[:CAUSE_CHARS]
    if (last_result or {}).get("stopped_early"):
        return STOPPED_EARLY, None
    return FINISHED, None


def best_files(best_dir: str, info: dict[str, Any]) -> dict[str, Any]:
    """What the winner's run gets: best.json's text, the model card's text (None without one) and
    the names of the GGUF files the export wrote, read from ``best_dir`` (local or URI)."""
    card = storage.join(best_dir, MODEL_CARD)
    return {
        BEST_JSON: json.dumps(info, indent=2, default=str),
        MODEL_CARD: storage.read_text(card) if storage.exists(card) else None,
        "gguf": [n for n in storage.list_dir(best_dir) if n.endswith(".gguf")],
        "best_dir": best_dir,
    }


def trial_error(trial: Any, run_dir: str) -> str:
    """Why a Tune trial failed: the cause it recorded itself (fault.txt: a hang that ended its
    process), else Tune's error.txt, else the exception Tune holds."""
    from grpo_ray.views.status import trial_cause

    rel = getattr(trial, "relative_logdir", None)
    cause = trial_cause(run_dir, rel) if rel else None
    if cause:
        return cause
    local = getattr(trial, "error_file", None)  # the driver's copy, before it reaches a bucket
    if local and os.path.isfile(local):
        with open(local) as f:
            return f.read()
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file still means the trial failed
        err = None
    return str(err) if err else "failed (Tune recorded no error)"
