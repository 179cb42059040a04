"""Where ML engineers already look: a sweep in MLflow and Weights & Biases, its winner on the Hub.

* :func:`callbacks`: Ray Tune callbacks from ``spec.tracking`` (sweep/search.py adds them to the
  Tuner's RunConfig): one MLflow run / W&B run per trial, with its sampled config, every
  reported metric by GRPO step and its final status; the sweep is the MLflow parent run and
  the W&B group.
* :func:`log_winner`: after best.json is written (sweep/driver.py), the best trial's run is tagged
  and gets best.json, the model card and the GGUF file names.
* ``hub.push_run``: ``grpo-ray push`` (cli.py).

Why our own callbacks and not Ray's ``MLflowLoggerCallback`` / ``WandbLoggerCallback`` (both
checked with ray 2.60): Ray's MLflow callback logs by ``training_iteration`` (not the GRPO
``step``), has no parent run and ends a run only FINISHED or FAILED, with no cause; overriding
it would replace every method it has. Ray's W&B callback starts one logging actor per trial
and hands it ``WANDB_API_KEY`` through the actor's runtime env, which Ray's runtime-env agent
writes to its logs in plain text (see search.keep_credentials_out_of_ray_logs); on 2 CPU
cores an extra process per trial is also not free. Ours run in the driver, beside Tune's
other callbacks, and read credentials only from the environment (never from the spec).

Nothing here imports mlflow or wandb until the spec asks for them: ``grpo-ray validate`` and
an untracked sweep pay nothing.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable

from grpo_ray import storage
from grpo_ray.tracking.common import TrackingError, best_files, final_status, metrics_of, params_of
from grpo_ray.run_dir import best_path

if TYPE_CHECKING:
    from ray.tune import Callback

    from grpo_ray.config.spec import SweepSpec

__all__ = ["TrackingError", "best_files", "callbacks", "final_status", "log_winner", "metrics_of", "params_of",
           "wandb_dir"]

log = logging.getLogger(__name__)


def wandb_dir(spec: SweepSpec, run_dir: str) -> str:
    """Where W&B writes its run files: ``tracking.wandb_dir``, else the run directory when it is
    local (the runs stay beside the sweep they describe), else ./wandb-runs (W&B needs a local disk)."""
    if spec.tracking.wandb_dir:
        return str(storage.normalize(spec.tracking.wandb_dir))
    return run_dir if not storage.is_uri(run_dir) else os.path.abspath("wandb-runs")


def callbacks(spec: SweepSpec, run_dir: str) -> list[Callback]:
    """The Tune callbacks ``spec.tracking`` asks for (none when it names no backend)."""
    import importlib.util

    from grpo_ray.config.errors import SpecError

    out: list[Callback] = []
    t = spec.tracking
    # Checked here, before any trial starts: a missing package is a one-line user error.
    for field, value, package in (("tracking.mlflow_uri", t.mlflow_uri, "mlflow"),
                                  ("tracking.wandb_project", t.wandb_project, "wandb")):
        if value and importlib.util.find_spec(package) is None:
            raise SpecError(f"{package} is not installed: pip install 'grpo-ray[tracking]'", field=field)
    if t.mlflow_uri:
        from grpo_ray.tracking.mlflow import MLflowCallback

        out.append(MLflowCallback(t.mlflow_uri, t.mlflow_experiment or spec.name, spec.name, run_dir))
    if t.wandb_project:
        from grpo_ray.tracking.wandb import WandbCallback

        out.append(WandbCallback(t.wandb_project, t.wandb_entity, t.wandb_mode, spec.name, wandb_dir(spec, run_dir),
                                 run_dir))
    return out


def log_winner(spec: SweepSpec, run_dir: str, info: dict[str, Any],
               progress: Callable[[str], None] = lambda s: None, previous: str | None = None) -> None:
    """Tag the best trial's run in every configured backend and attach best.json, the model card
    (best/README.md) and the GGUF file names. A tracking server that is down must not cost the
    sweep its export, so a failure here is reported through ``progress`` and logged, never raised.

    ``previous``: the trial id of the export this one replaces (``grpo-ray export``), whose run
    loses the tag when the winner changes (MLflow finds it from the sweep's run itself)."""
    t = spec.tracking
    if not (t.mlflow_uri or t.wandb_project):
        return
    best_dir = best_path(run_dir)
    files = best_files(best_dir, info)
    if t.mlflow_uri:
        try:
            from grpo_ray.tracking.mlflow import log_winner as mlflow_winner

            mlflow_winner(t.mlflow_uri, t.mlflow_experiment or spec.name, run_dir, info, files)
            progress(f"MLflow: tagged trial {info['trial_id']}'s run as the best, with best.json and the model card")
        except Exception as e:  # noqa: BLE001 - reported, the export already finished
            log.warning("MLflow: could not log the winner: %s", e, exc_info=True)
            progress(f"MLflow: could not log the winner: {e}")
    if t.wandb_project:
        try:
            from grpo_ray.tracking.wandb import log_winner as wandb_winner

            wandb_winner(t.wandb_project, t.wandb_entity, t.wandb_mode, spec.name, wandb_dir(spec, run_dir), info,
                         files, previous)
            progress(f"W&B: tagged trial {info['trial_id']}'s run as the best, with best.json and the model card")
        except Exception as e:  # noqa: BLE001
            log.warning("W&B: could not log the winner: %s", e, exc_info=True)
            progress(f"W&B: could not log the winner: {e}")
