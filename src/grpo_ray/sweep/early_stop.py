"""Early stopping: Ray Tune's ASHAScheduler, the ``stopped_early`` mark, and Optuna's PRUNED state.

Three pieces, because Tune keeps them apart:

* the scheduler (ASHA on ``search.early_stopping.metric``, time = the reported GRPO ``step``)
  decides; Tune then marks that result ``done`` and stops the trial, as it does for a trial
  that reached ASHA's ``max_t``;
* :class:`MarkStoppedEarly`, a Tune callback, sees each result after the decision and adds
  ``stopped_early: True`` when a trial was stopped before its own last step. The mark lives
  in Tune's own result (result.json, experiment snapshots), so ``status``, ``report``,
  ``trials.json`` and the searcher all read the same fact;
* :class:`PruningOptunaSearch`: Ray's OptunaSearch tells Optuna every trial Tune stops as
  COMPLETE with its last values (it cannot tell a scheduler's stop from a finished run, and
  for several objectives it reports no intermediate values). This subclass tells a trial
  marked ``stopped_early`` as PRUNED instead, so the samplers do not learn from an
  undertrained trial's numbers as if it had finished (NSGA-II and GP ignore pruned trials;
  TPE ranks them after every finished trial).
"""

from __future__ import annotations

from typing import Any

from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from grpo_ray.config.spec import SweepSpec

STOPPED_EARLY = "stopped_early"
TIME_ATTR = "step"  # what trial/run.py reports: the GRPO step of the window


def make_scheduler(spec: SweepSpec) -> ASHAScheduler | None:
    """ASHA from ``search.early_stopping``, or None when early stopping is off."""
    es = spec.search.early_stopping
    if es is None:
        return None
    assert es.grace_period is not None and es.max_t is not None  # filled in by the spec
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=es.metric,
        mode=es.mode,
        grace_period=es.grace_period,
        reduction_factor=es.reduction_factor,
        max_t=es.max_t,
    )


def trial_max_steps(default: int, config: dict[str, Any]) -> int:
    """The GRPO steps a trial runs: its sampled ``grpo.max_steps``, else the spec's."""
    return int(config.get("grpo.max_steps", default))


class MarkStoppedEarly(Callback):
    """Adds ``stopped_early`` to every result: True on the one where the scheduler stopped the trial early."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        # Tune sets ``done`` on this result when the scheduler decided STOP, before callbacks run,
        # and keeps what callbacks write into it (it becomes the trial's last result).
        step = result.get(TIME_ATTR)
        result[STOPPED_EARLY] = bool(
            result.get("done") and step is not None and step < trial_max_steps(self.max_steps, trial.config)
        )


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial stopped early as PRUNED, not COMPLETE.

    ``warm_start``: (params, objective values, source) of trials a previous sweep finished
    (sweep/search.py, ``search.warm_start``), added to the study as COMPLETE when it is created.
    Ray's own ``evaluated_rewards`` cannot carry them: it passes one ``value`` to Optuna
    (a TypeError with several objectives) and turns every ``points_to_evaluate`` entry into an
    evaluated trial, so the baseline could no longer be queued beside them.
    """

    WARM_START_ATTR = "warm_start"  # user attr naming the previous run and trial

    def __init__(self, *args: Any, warm_start: list[tuple[dict[str, Any], list[float], str]] | None = None,
                 **kwargs: Any) -> None:
        self._warm_start = warm_start or []  # set first: the base class creates the study when given a space
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list[str]) -> None:
        import optuna

        super()._setup_study(mode)  # Tune calls this once it passed the space (set_search_properties)
        # A study loaded from storage (a rerun into the same journal or database) has them already.
        have = {t.user_attrs.get(self.WARM_START_ATTR) for t in self._ot_study.get_trials(deepcopy=False)}
        for params, values, source in self._warm_start:
            if source in have:
                continue
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: self._space[k] for k in params},
                values=values,
                user_attrs={self.WARM_START_ATTR: source},
            ))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or not result.get(STOPPED_EARLY) or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        # Values must be None for PRUNED; Optuna keeps the last intermediate value, which
        # OptunaSearch only reports for a single objective.
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
