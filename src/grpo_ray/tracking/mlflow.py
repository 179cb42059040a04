"""MLflow: the sweep as a parent run, one nested run per trial, the winner tagged.

Everything goes through ``MlflowClient`` with explicit run ids, never mlflow's "active run":
Tune calls the callback for several trials at once (interleaved), and the driver process may
run other MLflow code of its own.

Tags (the ``grpo_ray.`` prefix keeps them apart from the user's):

* parent: ``grpo_ray.role=sweep``, ``grpo_ray.sweep``, ``grpo_ray.run_dir``; after the export
  ``grpo_ray.best_trial`` and ``grpo_ray.best_run_id``;
* trial: ``mlflow.parentRunId``, ``grpo_ray.role=trial``, ``grpo_ray.trial_id``,
  ``grpo_ray.status`` (finished / stopped_early / failed) and ``grpo_ray.error`` (the cause);
  the winner ``grpo_ray.best=true``, ``grpo_ray.gguf_files``, and artifacts ``best/best.json``
  and ``best/README.md``.

Credentials: MLflow itself reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN from the
environment; nothing here reads or stores them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from grpo_ray.run_dir import BEST_DIR, BEST_JSON, MODEL_CARD
from grpo_ray.tracking.callback import TrialRunCallback
from grpo_ray.tracking.common import FAILED, STOPPED_EARLY, TrackingError, final_status, metrics_of, params_of

log = logging.getLogger(__name__)

ROLE, SWEEP, RUN_DIR, TRIAL_ID = "grpo_ray.role", "grpo_ray.sweep", "grpo_ray.run_dir", "grpo_ray.trial_id"
STATUS, ERROR, BEST = "grpo_ray.status", "grpo_ray.error", "grpo_ray.best"
GGUF_FILES, BEST_DIR_TAG, BEST_RUN_ID = "grpo_ray.gguf_files", "grpo_ray.best_dir", "grpo_ray.best_run_id"
PARENT = "mlflow.parentRunId"
_RUN_STATUS = {FAILED: "FAILED", STOPPED_EARLY: "KILLED"}  # else FINISHED: MLflow's own run states


def tracking_uri(uri: str) -> str:
    """A local directory as MLflow's file store URI (absolute: Tune's trials run elsewhere); others unchanged."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri  # file://, http(s)://, sqlite://, databricks, ...
    return "file://" + os.path.abspath(os.path.expanduser(uri))


def _key(name: str) -> str:
    """A metric name MLflow accepts: reward names may hold characters its validator refuses."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("tracking.mlflow_uri is set but mlflow is not installed: pip install 'grpo-ray[tracking]'"
                            ) from None
    resolved = tracking_uri(uri)
    if resolved.startswith("file:"):
        # MLflow 3.x keeps its file store "in maintenance mode" and refuses it unless asked; a
        # directory is what the spec (and the issue) promise. Set for this process only.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=resolved)


def experiment_id(c: Any, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":  # a deleted experiment's name stays taken until purged
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it between the two calls
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_parent(c: Any, exp_id: str, run_dir: str) -> str | None:
    """The newest parent run of the sweep at ``run_dir`` (a resumed sweep logs into it again)."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`{ROLE}` = 'sweep' and tags.`{RUN_DIR}` = '{_q(run_dir)}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_trial_run(c: Any, exp_id: str, parent: str, trial_id: str) -> str | None:
    query = f"tags.`{PARENT}` = '{parent}' and tags.`{TRIAL_ID}` = '{_q(trial_id)}'"
    runs = c.search_runs([exp_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def _q(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


class MLflowCallback(TrialRunCallback):
    """One MLflow run per Tune trial, nested under the sweep's run.

    ``import mlflow`` takes seconds (5 s on a busy 2-core machine): :meth:`setup` starts it, the
    connection and the parent run in a thread, which the first trial's start-up (its actor
    loading torch) hides; the first event waits for it. A store that fails (a server down)
    stops this callback with one warning instead of failing the trials: tracking is a view of
    the sweep, not part of it.
    """

    def __init__(self, uri: str, experiment: str, sweep: str, run_dir: str) -> None:
        self.uri, self.experiment, self.sweep, self.run_dir = uri, experiment, sweep, run_dir
        self._reset()

    def _reset(self) -> None:
        self._client: Any = None
        self._exp: str | None = None
        self._parent: str | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._connecting: threading.Thread | None = None
        self._broken: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) into the run directory for --resume:
        # settings only; the client and the run ids are found again from the store.
        return {"uri": self.uri, "experiment": self.experiment, "sweep": self.sweep, "run_dir": self.run_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info: Any) -> None:
        self._connecting = threading.Thread(target=self._guarded, args=(self._connect,), daemon=True,
                                            name="grpo-ray-mlflow-connect")
        self._connecting.start()

    def _guarded(self, fn: Any, *args: Any) -> None:
        if self._broken is not None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            if self._broken is None:
                log.warning("MLflow tracking stopped for this sweep (%s: %s); the sweep goes on",
                            type(e).__name__, e)
            self._broken = self._broken or e

    def _connect(self) -> None:
        c = client(self.uri)
        self._exp = experiment_id(c, self.experiment)
        parent = find_parent(c, self._exp, self.run_dir)
        if parent is None:
            parent = c.create_run(self._exp, run_name=self.sweep, tags={
                ROLE: "sweep", SWEEP: self.sweep, RUN_DIR: self.run_dir}).info.run_id
        elif c.get_run(parent).info.status != "RUNNING":
            c.update_run(parent, status="RUNNING")  # --resume: the sweep runs again
        self._parent, self._client = parent, c

    def _ensure(self) -> Any:
        if self._connecting is not None:
            self._connecting.join()
            self._connecting = None
        if self._broken is not None:
            raise self._broken
        if self._client is None:
            self._connect()  # a restored callback, or events without setup
        return self._client

    def _run_of(self, trial: Any) -> str:
        c = self._ensure()
        tid = trial.trial_id
        if tid not in self._runs:
            found = find_trial_run(c, self._exp, self._parent, tid)  # a retry, or a resumed sweep's trial
            if found is None:
                found = c.create_run(self._exp, run_name=str(tid), tags={
                    PARENT: self._parent, ROLE: "trial", SWEEP: self.sweep, TRIAL_ID: str(tid)}).info.run_id
                from mlflow.entities import Param

                c.log_batch(found, params=[Param(k, v) for k, v in params_of(dict(trial.config)).items()])
            elif c.get_run(found).info.status != "RUNNING":
                c.update_run(found, status="RUNNING")
            self._runs[tid] = found
        return self._runs[tid]

    def _log(self, trial: Any, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, values = metrics_of(result)
        now = int(time.time() * 1000)
        self._ensure().log_batch(self._run_of(trial),
                                 metrics=[Metric(_key(k), v, now, step) for k, v in values.items()])

    def _end(self, trial: Any, error: str | None) -> None:
        status, cause = final_status(trial.last_result, error)
        c, run = self._ensure(), self._run_of(trial)
        c.set_tag(run, STATUS, status)
        if cause:
            c.set_tag(run, ERROR, cause)
        c.set_terminated(run, status=_RUN_STATUS.get(status, "FINISHED"))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._guarded(self._finish, trials)

    def _finish(self, trials: list) -> None:
        c = self._ensure()
        failed = sum(1 for t in trials if t.status == "ERROR")
        c.set_tag(self._parent, "grpo_ray.trials", f"{len(trials)} ({failed} failed)")
        c.set_terminated(self._parent, status="FINISHED")


def log_winner(uri: str, experiment: str, run_dir: str, info: dict[str, Any], files: dict[str, Any]) -> None:
    """Tag the best trial's run and its parent; attach best.json and the model card."""
    c = client(uri)
    exp = experiment_id(c, experiment)
    parent = find_parent(c, exp, run_dir)
    if parent is None:
        raise TrackingError(f"no MLflow run of the sweep {run_dir} in experiment {experiment!r}")
    tid = str(info["trial_id"])
    run = find_trial_run(c, exp, parent, tid)
    if run is None:
        raise TrackingError(f"no MLflow run of trial {tid} under the sweep's run {parent}")
    # A re-export (grpo-ray export) of another trial moves the winner: the earlier one's run loses
    # its tags, so a filter on grpo_ray.best = 'true' finds one run, the one best/ now holds.
    winner_tags = {BEST: "true", GGUF_FILES: ", ".join(files["gguf"]) or "none", BEST_DIR_TAG: files["best_dir"]}
    before = c.get_run(parent).data.tags.get(BEST_RUN_ID)
    if before and before != run:
        for key in winner_tags:
            try:
                c.delete_tag(before, key)
            except Exception:  # noqa: BLE001 - a tag already gone (deleted by hand) is what we want
                pass
    for key, value in winner_tags.items():
        c.set_tag(run, key, value)
    c.log_text(run, files[BEST_JSON], f"{BEST_DIR}/{BEST_JSON}")
    if files[MODEL_CARD] is not None:
        c.log_text(run, files[MODEL_CARD], f"{BEST_DIR}/{MODEL_CARD}")
    c.set_tag(parent, "grpo_ray.best_trial", tid)
    c.set_tag(parent, BEST_RUN_ID, run)
    c.log_text(parent, files[BEST_JSON], f"{BEST_DIR}/{BEST_JSON}")
