"""The sweep's searcher: OptunaSearch with early-stopping and warm-start support
(:class:`~grpo_ray.early_stop.PruningOptunaSearch`), plus the seed recipe queued once per run.

Ray's ``points_to_evaluate`` queues its points into the Optuna study each time the searcher
sets its study up, and ``Tuner.restore`` sets up the searcher pickled when the run began, so
with a study that outlives the driver (the run's journal file, an RDB ``study_storage``)
every ``--resume`` queued the baseline again and ran it a second time. Here it is queued with
``skip_if_exists``: once per study, i.e. once per run, whatever the number of driver starts.
"""

from __future__ import annotations

from typing import Any

from grpo_ray.early_stop import PruningOptunaSearch


class BaselineOnceSearch(PruningOptunaSearch):
    def __init__(self, *args: Any, baseline: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._baseline = baseline  # set first: the base class sets the study up when given a space
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list[str]) -> None:
        super()._setup_study(mode)
        if self._baseline:
            # Skipped when the study holds a trial with these values in any state (queued, running, done).
            self._ot_study.enqueue_trial(self._baseline, skip_if_exists=True)
