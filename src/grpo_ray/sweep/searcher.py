"""The sweep's searcher: OptunaSearch with early-stopping and warm-start support
(:class:`~grpo_ray.sweep.early_stop.PruningOptunaSearch`), plus the baseline queued once per run.

Ray's ``points_to_evaluate`` queues its points into the Optuna study each time the searcher
sets its study up, and ``Tuner.restore`` sets up again the searcher pickled when the run
began, so with a study that outlives the driver (the run's journal file, an RDB
``study_storage``) every ``--resume`` queued the baseline again and ran it a second time.
Here a point the stored study already holds (queued, running or done) is not queued again:
once per study, i.e. once per run, whatever the number of driver starts. A study in memory
is new at each set-up and replaced by the saved one on restore, so it queues as before.
"""

from __future__ import annotations

from typing import Any

from grpo_ray.sweep.early_stop import PruningOptunaSearch


class BaselineOnceSearch(PruningOptunaSearch):
    def _setup_study(self, mode: str | list[str]) -> None:
        if self._points_to_evaluate and self._storage is not None:
            held = self._stored_points()
            self._points_to_evaluate = [p for p in self._points_to_evaluate if p not in held]
        super()._setup_study(mode)

    def _stored_points(self) -> list[dict[str, Any]]:
        """The parameters of every trial the stored study holds; none when it does not exist yet."""
        import optuna

        try:
            study = optuna.load_study(study_name=self._study_name, storage=self._storage)
        except KeyError:  # no such study: the run's first start
            return []
        # A queued trial keeps its values as fixed_params until it runs (what enqueue_trial writes).
        return [t.params or t.system_attrs.get("fixed_params") or {} for t in study.get_trials(deepcopy=False)]
