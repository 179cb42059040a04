"""Weights & Biases: one run per trial in the driver, grouped by the sweep; the winner tagged.

Several trials run at once, so each gets its own ``wandb.Run`` (``reinit="create_new"``), never
the global ``wandb.run``. The run id is the Tune trial id (unique per sweep: Tune prefixes it
with a random experiment token), so a retried trial, a resumed sweep and :func:`log_winner`
find the same run again.

Metrics are logged with ``step`` (the GRPO step) as their x axis (``define_metric``), not
W&B's own counter: a trial retried from its checkpoint reports steps again from there.

Mode ``auto`` is online when WANDB_API_KEY is set and offline otherwise (run directories under
``<dir>/wandb/offline-run-*``, to upload later with ``wandb sync``). The key is read by wandb
from the environment; nothing here passes, logs or stores it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from grpo_ray.run_dir import BEST_JSON, MODEL_CARD
from grpo_ray.tracking.callback import TrialRunCallback
from grpo_ray.tracking.common import FAILED, STEP, TrackingError, final_status, metrics_of, params_of

log = logging.getLogger(__name__)

BEST_TAG = "best"


def _mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):  # the user's own switch wins
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run_id(trial_id: str) -> str:
    """A W&B run id from a Tune trial id (W&B allows letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", trial_id)


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise TrackingError("tracking.wandb_project is set but wandb is not installed: pip install "
                            "'grpo-ray[tracking]'") from None
    return wandb


def init_run(project: str, entity: str | None, mode: str, group: str, directory: str, trial_id: str,
             config: dict[str, Any] | None = None, job_type: str = "trial") -> Any:
    wandb = _wandb()
    os.makedirs(directory, exist_ok=True)
    return wandb.init(
        project=project, entity=entity, group=group, job_type=job_type, name=str(trial_id), id=run_id(str(trial_id)),
        config=config, dir=directory, mode=_mode(mode), reinit="create_new", resume="allow",
        # No console capture (the driver's console is the progress display) and no system-metrics
        # sampler per run: several runs live in one process, and the trials run elsewhere anyway.
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, x_save_requirements=False),
    )


class WandbCallback(TrialRunCallback):
    """One W&B run per Tune trial, in the group of the sweep.

    As for MLflow (tracking/mlflow.py): the import starts in a thread at :meth:`setup`, and a
    W&B failure stops this callback with one warning, never the trials.
    """

    def __init__(self, project: str, entity: str | None, mode: str, sweep: str, directory: str, run_dir: str) -> None:
        self.project, self.entity, self.mode, self.sweep, self.directory = project, entity, mode, sweep, directory
        self.run_dir = run_dir  # the sweep's: where a failed trial's cause is read from
        self._reset()

    def _reset(self) -> None:
        self._runs: dict[str, Any] = {}
        self._warming: threading.Thread | None = None
        self._broken: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with Tune's run config for --resume: settings only, no live run.
        return {k: self.__dict__[k] for k in ("project", "entity", "mode", "sweep", "directory", "run_dir")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info: Any) -> None:
        self._warming = threading.Thread(target=self._guarded, args=(_wandb,), daemon=True, name="grpo-ray-wandb")
        self._warming.start()

    def _guarded(self, fn: Any, *args: Any) -> None:
        if self._warming is not None and threading.current_thread() is not self._warming:
            self._warming.join()
            self._warming = None
        if self._broken is not None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            log.warning("W&B tracking stopped for this sweep (%s: %s); the sweep goes on", type(e).__name__, e)
            self._broken = e

    def _run_of(self, trial: Any) -> Any:
        tid = str(trial.trial_id)
        if tid not in self._runs:
            run = init_run(self.project, self.entity, self.mode, self.sweep, self.directory, tid,
                           config=params_of(dict(trial.config)) | {"trial_id": tid, "sweep": self.sweep})
            run.define_metric(STEP)
            run.define_metric("*", step_metric=STEP)
            self._runs[tid] = run
        return self._runs[tid]

    def _log(self, trial: Any, result: dict[str, Any]) -> None:
        step, values = metrics_of(result)
        self._run_of(trial).log(values | {STEP: step})

    def _end(self, trial: Any, error: str | None) -> None:
        status, cause = final_status(trial.last_result, error)
        run = self._run_of(trial)
        run.summary["status"] = status
        if cause:
            run.summary["error"] = cause
        run.tags = tuple(run.tags or ()) + (status,)
        run.finish(exit_code=1 if status == FAILED else 0)
        self._runs.pop(str(trial.trial_id), None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        def finish_all() -> None:
            for run in list(self._runs.values()):  # trials Tune never ended (an interrupted sweep)
                run.finish(exit_code=1)
            self._runs.clear()

        self._guarded(finish_all)


def log_winner(project: str, entity: str | None, mode: str, sweep: str, directory: str, info: dict[str, Any],
               files: dict[str, Any], previous: str | None = None) -> str:
    """Reopen the best trial's run: tag it, put best.json and the model card in its files and the
    GGUF names in its summary. ``previous``: the trial an earlier export made the winner; when it
    is another one (``grpo-ray export --trial``), its run loses the tag. Returns the run's local directory."""
    tid = str(info["trial_id"])
    if previous and str(previous) != tid:
        old = init_run(project, entity, mode, sweep, directory, str(previous))
        try:
            old.tags = tuple(t for t in (old.tags or ()) if t != BEST_TAG)
            old.summary["best"] = False
        finally:
            old.finish()
    run = init_run(project, entity, mode, sweep, directory, tid)
    try:
        run.tags = tuple(t for t in (run.tags or ()) if t != BEST_TAG) + (BEST_TAG,)
        run.summary["best"] = True
        run.summary["gguf_files"] = list(files["gguf"])
        run.summary["best_dir"] = files["best_dir"]
        # Written into the run's own files directory (uploaded by sync), not linked from best/:
        # a bucket's best/ is not a local file, and a link would break when best/ is re-exported.
        for name in (BEST_JSON, MODEL_CARD):
            if files[name] is not None:
                with open(os.path.join(run.dir, name), "w") as f:
                    f.write(files[name])
                run.save(os.path.join(run.dir, name), base_path=run.dir, policy="now")
        return run.dir
    finally:
        run.finish()

