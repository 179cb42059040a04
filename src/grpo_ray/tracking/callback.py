"""The Tune events both trackers turn into runs: one run per trial, its results by step, its end.

MLflow's and W&B's callbacks (mlflow.py, wandb.py) differ in how they reach their store, not in
which events they follow: each implements ``_guarded`` (a store that fails stops tracking, never
the sweep), ``_run_of`` (the trial's run, made on first use), ``_log`` and ``_end``.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from grpo_ray.tracking.common import trial_error


class TrialRunCallback(Callback):
    run_dir: str

    def _guarded(self, fn: Any, *args: Any) -> None:
        raise NotImplementedError

    def _run_of(self, trial: Any) -> Any:
        raise NotImplementedError

    def _log(self, trial: Any, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def _end(self, trial: Any, cause: str | None) -> None:
        raise NotImplementedError

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(self._run_of, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._guarded(self._log, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(self._end, trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guarded(lambda: self._end(trial, trial_error(trial, self.run_dir)))
