"""The search: Ray Tune's Tuner with OptunaSearch on the spec's objectives.

Ray is started locally unless a cluster is reachable (``RAY_ADDRESS``, or a head node
started by ``ray up`` / ``ray start`` on this machine). Trials run :func:`tune_trainable`
with the resources of ``spec.resources``. A sweep interrupted (Ctrl-C, lost head node)
resumes from its storage with ``--resume``: finished trials are kept, unfinished ones go on
from their last checkpoint (see trial/run.py).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from grpo_ray import storage
from grpo_ray.report import trial_cause
from grpo_ray.select import TrialRecord
from grpo_ray.spec import Choice, IntRange, LogUniform, SpecError, SweepSpec, Uniform, _in_domain, parse_spec

if TYPE_CHECKING:
    from grpo_ray.early_stop import PruningOptunaSearch

# Receives ("start" | "result" | "complete" | "error", event data) from Tune's callback (see
# tune_progress.py), and ("note", {"message": str}) for a line about the search itself.
ProgressFn = Callable[[str, dict[str, Any]], None]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune search space: one flat key per dotted spec path."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, dom in spec.search.space.items():
        if isinstance(dom, Choice):
            space[path] = tune.choice(dom.choice)
        elif isinstance(dom, Uniform):
            space[path] = tune.uniform(*dom.uniform)
        elif isinstance(dom, LogUniform):
            space[path] = tune.loguniform(*dom.loguniform)
        elif isinstance(dom, IntRange):
            space[path] = tune.randint(dom.int_[0], dom.int_[1] + 1)  # Tune's upper bound is exclusive
    return space


STUDY_JOURNAL = "optuna-journal.log"  # in a local run directory: the study, readable by optuna-dashboard


def study_storage(spec: SweepSpec, storage_root: str):
    """The Optuna storage for this sweep's study (see ``search.study_storage``), or None (in memory)."""
    import optuna

    if spec.search.study_storage:
        return optuna.storages.RDBStorage(spec.search.study_storage)
    run_dir = experiment_path(spec, storage_root)
    if storage.is_uri(run_dir):
        return None  # a journal needs a local file; the pickled searcher in the bucket still resumes
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(run_dir, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(run_dir, STUDY_JOURNAL)))


@dataclass
class WarmStart:
    """The previous runs' trials a new study starts with (``search.warm_start``)."""

    points: list[tuple[dict[str, Any], list[float], str]] = field(default_factory=list)  # params, values, source
    skipped: Counter = field(default_factory=Counter)  # reason -> trials

    def summary(self, runs: int) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return (f"warm start: {len(self.points)} trial(s) from {runs} previous run(s) given to Optuna as COMPLETE"
                + (f"; skipped {sum(self.skipped.values())} ({why})" if why else ""))


def _previous_spec(run: str) -> SweepSpec | None:
    """The previous run's resolved spec, for the values its trials held fixed; None if unreadable."""
    try:
        return parse_spec(storage.read_text(storage.join(run, "spec.resolved.yaml")))
    except (OSError, SpecError):
        return None


def _point(spec: SweepSpec, prev: SweepSpec | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The previous trial as a point of this space, or None when it is not one.

    A path this sweep searches but the previous one held fixed takes the previous spec's value
    (what the trial ran with): a trial without it would shrink the intersection space that
    TPE (multivariate), NSGA-II and GP model jointly, for the whole sweep. A path the previous
    run searched but this one holds fixed must equal this spec's value.
    """
    space = spec.search.space
    params = {}
    for path, dom in space.items():
        if path in config:
            value = config[path]
        elif prev is None:
            return None
        else:
            try:
                value = prev.value_at(path)
            except SpecError:
                return None
        # Optuna's integer distribution refuses 3.0 where the spec's range check would take it.
        if not _in_domain(value, dom) or (isinstance(dom, IntRange) and not isinstance(value, int)):
            return None
        params[path] = value
    for path in config.keys() - space.keys():
        try:
            if spec.value_at(path) != config[path]:
                return None
        except SpecError:  # a field (e.g. a reward) this spec does not have
            return None
    return params


def load_warm_start(spec: SweepSpec) -> WarmStart:
    """Read ``search.warm_start``'s runs; a run without trials.json is a SweepError naming it."""
    from grpo_ray.sweep import SweepError

    warm = WarmStart()
    metrics = [o.metric for o in spec.search.objectives]
    for entry in spec.search.warm_start:
        run = storage.normalize(entry)
        if not storage.exists(run):
            raise SweepError(f"search.warm_start: {entry}: no such run directory")
        try:
            rows = json.loads(storage.read_text(storage.join(run, "trials.json")))
        except (OSError, ValueError) as e:
            why = "no trials.json (a finished sweep's directory has one)" if isinstance(e, OSError) else f"{e}"
            raise SweepError(f"search.warm_start: {entry}: {why}") from None
        if not isinstance(rows, list):
            raise SweepError(f"search.warm_start: {entry}: trials.json is not a list of trials")
        prev = _previous_spec(run)
        for r in rows:
            values = [(r.get("metrics") or {}).get(m) for m in metrics]
            if r.get("error"):
                warm.skipped["failed"] += 1
            elif r.get("stopped_early"):
                warm.skipped["stopped early"] += 1  # undertrained numbers: the study keeps them out too
            elif not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                warm.skipped["without every objective"] += 1
            elif (params := _point(spec, prev, r.get("config") or {})) is None:
                warm.skipped["outside the space"] += 1
            else:
                warm.points.append((params, [float(v) for v in values], f"{entry}#{r.get('trial_id')}"))
    return warm


def make_searcher(spec: SweepSpec, storage_root: str | None = None,
                  on_event: ProgressFn | None = None) -> PruningOptunaSearch:
    import optuna

    from grpo_ray.early_stop import PruningOptunaSearch

    s = spec.search
    # Optuna samples its first n_startup_trials (10 by default) at random: a short sweep needs fewer.
    startup = {"n_startup_trials": s.startup_trials} if s.startup_trials is not None else {}
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, multivariate=True, **startup),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed, **startup),
    }
    metrics = [o.metric for o in s.objectives]
    modes = [o.mode for o in s.objectives]
    note = (lambda msg: on_event("note", {"message": msg})) if on_event else (lambda msg: None)
    warm = load_warm_start(spec)
    if s.warm_start:
        note(warm.summary(len(s.warm_start)))
    # The seed recipe goes first, so every sweep is measured against it; unless a previous run measured it.
    baseline = spec.baseline_point() if s.baseline_first else None
    if baseline is not None and any(params == baseline for params, _, _ in warm.points):
        note("baseline_first: the spec's own values were already evaluated in a previous run; not run again")
        baseline = None
    return PruningOptunaSearch(  # OptunaSearch, plus: a trial stopped early is PRUNED in the study
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=samplers[s.sampler](),
        points_to_evaluate=[baseline] if baseline else None,
        study_name=spec.name,
        storage=study_storage(spec, storage_root) if storage_root else None,
        warm_start=warm.points,
    )


def keep_credentials_out_of_ray_logs() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into every trial's runtime env.

    Ray's runtime-env agent logs each runtime env in plain text (``/tmp/ray/session_*/logs``,
    visible in the dashboard), secrets included; tests/test_faults.py caught it. Trials get
    credentials from their node instead: inherited from the driver when Ray runs on this
    machine, the instance profile or the node's environment on a cluster (cluster/gpu.yaml).
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(
        v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_")
    )


def init_ray() -> None:
    """Connect to the cluster if one is there, else start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    # Checkpointing every report window is intended; Tune's "snapshot too often" warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        include_dashboard=False,
        log_to_driver=os.environ.get("GRPO_RAY_TRIAL_LOGS", "0") == "1",
        configure_logging=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "0"}},
    )


def experiment_path(spec: SweepSpec, storage_root: str) -> str:
    return storage.join(storage_root, spec.name)


def run_search(spec: SweepSpec, storage_root: str, resume: bool = False,
               on_event: ProgressFn | None = None) -> list[TrialRecord]:
    """Run (or resume) the sweep; return every trial's final record."""
    from ray import tune

    from grpo_ray.trial.run import tune_trainable

    init_ray()
    keep_credentials_out_of_ray_logs()
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, spec=spec),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    path = experiment_path(spec, storage_root)
    from grpo_ray.tune_progress import ProgressCallback

    callbacks = [ProgressCallback(on_event)] if on_event else []
    from grpo_ray.tracking import callbacks as tracking_callbacks

    callbacks += tracking_callbacks(spec, path)  # MLflow / W&B runs per trial (spec.tracking)
    from grpo_ray.early_stop import MarkStoppedEarly, make_scheduler

    scheduler = make_scheduler(spec)  # ASHA (search.early_stopping) or None: Tune's FIFO
    if scheduler is not None:
        callbacks.append(MarkStoppedEarly(spec.grpo.max_steps))
    if resume and tune.Tuner.can_restore(path):
        from grpo_ray.report import read_status
        from grpo_ray.tune_progress import set_listener

        set_listener(on_event)  # the restored callbacks come without the display
        if on_event:
            on_event("resumed", {"finished": sum(t.status == "TERMINATED" for t in read_status(path))})
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space(spec))
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(spec, storage_root, on_event),
                # ASHA carries its own single metric; the searcher keeps the objectives.
                scheduler=scheduler,
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent_trials,
                # A finished trial's actor runs the next one with its model still loaded (trial/warm.py).
                reuse_actors=spec.trial.reuse_model,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=storage_root,
                verbose=0,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            ),
        )
    grid = tuner.fit()
    records = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(r.path)
        error = str(r.error) if r.error else None
        if error:  # a trial that had to end its process (a native hang) left its cause beside Ray's
            cause = trial_cause(path, os.path.basename(r.path))
            if cause and cause not in error:
                error += "\n" + cause
        records.append(
            TrialRecord(
                trial_id=str(trial_id),
                config={k: v for k, v in (r.config or {}).items()},
                metrics={k: v for k, v in (r.metrics or {}).items() if not isinstance(v, dict)},
                checkpoint=r.checkpoint.path if r.checkpoint else None,
                error=error,
                stopped_early=bool((r.metrics or {}).get("stopped_early")),
                extra={"path": r.path, "checkpoint_obj": r.checkpoint},
            )
        )
    return records
