"""The search: Ray Tune's Tuner with OptunaSearch on the spec's objectives.

Ray is started locally unless a cluster is reachable (``RAY_ADDRESS``, or a head node
started by ``ray up`` / ``ray start`` on this machine). Trials run :func:`tune_trainable`
with the resources of ``spec.resources``. A sweep interrupted (Ctrl-C, lost head node)
resumes from its storage with ``--resume``: finished trials are kept, unfinished ones go on
from their last checkpoint (see trial/run.py).

Ctrl-C and SIGTERM (:class:`_StopOnSignal`): the first one asks Tune to end the run the way
its own Ctrl-C handler does (trials stopped, the experiment state saved, unfinished trials
left to resume), then :class:`SweepInterrupted` is raised instead of returning the trials, so
nothing half-trained is selected or exported. A second one stops at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grpo_ray import storage
from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import parse_spec
from grpo_ray.config.search import Choice, IntRange, LogUniform, Uniform, in_domain
from grpo_ray.config.spec import SweepSpec
from grpo_ray.run_dir import STUDY_JOURNAL, spec_resolved_path, trials_path
from grpo_ray.select import TrialRecord
from grpo_ray.views.status import last_line, trial_cause, trial_log

if TYPE_CHECKING:
    from grpo_ray.sweep.searcher import BaselineOnceSearch
    from grpo_ray.sweep.tune_progress import ProgressFn


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal; what finished is kept, nothing is selected or exported."""

    def __init__(self, signum: int, run_dir: str, finished: int) -> None:
        self.signum, self.run_dir, self.finished = signum, run_dir, finished
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"sweep interrupted by {self.signal_name}; {finished} trial(s) finished, kept in {run_dir}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _no_tune_resume_hint(record: logging.LogRecord) -> bool:
    """Drop Tune's own stop and resume lines ("Resume experiment with: Tuner.restore(...)"): the
    CLI prints the grpo-ray command that resumes, and a Python call would only mislead."""
    msg = record.getMessage()
    return "Tuner.restore" not in msg and "Stop signal received" not in msg


class _StopOnSignal:
    """SIGINT and SIGTERM while Tune runs: the first ends the run gracefully, a second at once.

    Tune's own graceful stop is its SIGINT handler, which it also installs for SIGUSR1 (always)
    and which sets an event the run loop checks; Tune's SIGINT handler is turned off here
    (``TUNE_DISABLE_SIGINT_HANDLER``) so that SIGTERM and SIGINT take the same road: ours calls
    Tune's SIGUSR1 handler. Restores the previous handlers on exit.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        logging.getLogger("ray.tune.tune").addFilter(_no_tune_resume_hint)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        logging.getLogger("ray.tune.tune").removeFilter(_no_tune_resume_hint)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            # Everything finished so far is on storage (trial checkpoints, Tune's last snapshot).
            print(f"\na second signal ({signal.Signals(signum).name}): stopping at once", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name} received: stopping the trials and saving the sweep's state "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if callable(tune_handler):  # Tune's graceful stop; absent before Tune started: fit() is not called
            tune_handler(signum, frame)


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


def grid_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """``search.sampler: grid``'s combinations: every choice, every integer of an int range."""
    return {path: list(dom.choice) if isinstance(dom, Choice) else list(range(dom.int_[0], dom.int_[1] + 1))
            for path, dom in spec.search.space.items()}


def study_storage(spec: SweepSpec, storage_root: str) -> Any:
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
        return parse_spec(storage.read_text(spec_resolved_path(run)))
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
        if not in_domain(value, dom) or (isinstance(dom, IntRange) and not isinstance(value, int)):
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
    from grpo_ray.errors import SweepError

    warm = WarmStart()
    metrics = [o.metric for o in spec.search.objectives]
    for entry in spec.search.warm_start:
        run = storage.normalize(entry)
        if not storage.exists(run):
            raise SweepError(f"search.warm_start: {entry}: no such run directory")
        try:
            rows = json.loads(storage.read_text(trials_path(run)))
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
                  on_event: ProgressFn | None = None) -> BaselineOnceSearch:
    import optuna

    from grpo_ray.sweep.searcher import BaselineOnceSearch

    s = spec.search
    # Optuna samples its first n_startup_trials (10 by default) at random: a short sweep needs fewer.
    startup = {"n_startup_trials": s.startup_trials} if s.startup_trials is not None else {}
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, multivariate=True, **startup),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=s.seed, **startup),
        "grid": lambda: optuna.samplers.GridSampler(grid_space(spec), seed=s.seed),
    }
    metrics = [o.metric for o in s.objectives]
    modes = [o.mode for o in s.objectives]
    note = (lambda msg: on_event("note", {"message": msg})) if on_event else (lambda msg: None)
    warm = load_warm_start(spec)
    if s.warm_start:
        note(warm.summary(len(s.warm_start)))
    # The baseline goes first, so every sweep is measured against it; unless a previous run measured it.
    # A grid visits every combination anyway, the spec's own values among them when they lie inside.
    baseline = spec.baseline_point() if s.baseline_first and s.sampler != "grid" else None
    if baseline is not None and any(params == baseline for params, _, _ in warm.points):
        note("baseline_first: the spec's own values were already evaluated in a previous run; not run again")
        baseline = None
    # OptunaSearch, plus: a trial stopped early is PRUNED in the study; the baseline queued once per run.
    return BaselineOnceSearch(
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


def _configuration_errors() -> tuple[type[BaseException], ...]:
    """Errors a trial's configuration causes (the spec, data, rewards, model, backend, a sampled
    value the backend would change): the same
    every attempt, so a retry would only spend another model load to fail again."""
    from grpo_ray.models import ModelError
    from grpo_ray.task.data import DataError
    from grpo_ray.task.rewards import RewardError
    from grpo_ray.trial.base import BackendError, SettingChangedError

    return (SpecError, DataError, ModelError, RewardError, BackendError, SettingChangedError)


def no_retry_for_configuration_errors() -> None:
    """Make Tune fail a trial at once when it raised a configuration error (see above).

    Tune retries every failure up to ``max_failures`` and offers no per-error choice: between
    counting the failure (``Trial.handle_error``) and deciding on a retry
    (``Trial.should_recover``) nothing of ours runs. So both are wrapped: the first notes whether
    the trial's exception (a RayTaskError carrying the trial's own as ``cause``) is a
    configuration error, in the trial's temporary state (never saved with the experiment), and
    the second then says no. Other failures (a killed process, a transient error) retry as before.
    """
    from ray.exceptions import RayTaskError
    from ray.tune.experiment.trial import Trial

    if getattr(Trial, "_grpo_ray_no_config_retry", False):
        return
    handle_error, should_recover = Trial.handle_error, Trial.should_recover
    kinds = _configuration_errors()

    def _handle_error(self: Trial, exc: Any = None) -> None:
        handle_error(self, exc)
        cause = exc.cause if isinstance(exc, RayTaskError) else None
        self.temporary_state.configuration_error = isinstance(cause, kinds)

    def _should_recover(self: Trial) -> bool:
        if getattr(self.temporary_state, "configuration_error", False):
            return False
        return should_recover(self)

    Trial.handle_error, Trial.should_recover = _handle_error, _should_recover
    Trial._grpo_ray_no_config_retry = True


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


def _finished(run_dir: str) -> int:
    from grpo_ray.views.status import read_status

    try:
        return sum(t.status == "TERMINATED" for t in read_status(run_dir))
    except (OSError, ValueError):
        return 0


def run_search(spec: SweepSpec, storage_root: str, resume: bool = False,
               on_event: ProgressFn | None = None) -> list[TrialRecord]:
    """Run (or resume) the sweep; return every trial's final record."""
    from ray import tune

    from grpo_ray.trial.run import tune_trainable

    init_ray()
    keep_credentials_out_of_ray_logs()
    no_retry_for_configuration_errors()
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, spec=spec),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    path = experiment_path(spec, storage_root)
    from grpo_ray.sweep.tune_progress import ProgressCallback

    from grpo_ray.run_dir import phases_path
    from grpo_ray.trial.phases import board_name, start_board

    # Each running trial's phase between its reports, for the display and `grpo-ray status` (trial/phases.py).
    board = start_board(spec.name)
    callbacks = [ProgressCallback(on_event, board_name(spec.name), phases_path(path))]
    from grpo_ray.tracking import callbacks as tracking_callbacks

    callbacks += tracking_callbacks(spec, path)  # MLflow / W&B runs per trial (spec.tracking)
    from grpo_ray.sweep.early_stop import MarkStoppedEarly, make_scheduler

    scheduler = make_scheduler(spec)  # ASHA (search.early_stopping) or None: Tune's FIFO
    if scheduler is not None:
        callbacks.append(MarkStoppedEarly(spec.grpo.max_steps))
    if resume and tune.Tuner.can_restore(path):
        from grpo_ray.sweep.tune_progress import set_listener
        from grpo_ray.views.status import read_status

        set_listener(on_event)  # the restored callbacks come without the display
        if on_event:
            on_event("resumed", {"finished": sum(t.status == "TERMINATED" for t in read_status(path))})
        try:
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space(spec))
        except ModuleNotFoundError as e:
            # Tune pickled our searcher and callbacks by module path: a run saved by a grpo-ray whose
            # modules have since moved cannot be unpickled. Its finished trials are not lost.
            if not (e.name or "").startswith("grpo_ray"):
                raise
            from grpo_ray import storage
            from grpo_ray.errors import SweepError
            from grpo_ray.run_dir import trials_path

            reuse = (f"; its trials can seed the new search: search.warm_start: ['{path}']"
                     if storage.exists(trials_path(path)) else "; `grpo-ray status` still shows its trials")
            raise SweepError(f"{path}: saved by another version of grpo-ray (its module {e.name} does not exist "
                             f"in this one), so it cannot be resumed. Run the spec under a new name{reuse}") from None
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
    stop = _StopOnSignal()
    with stop:
        try:
            if not stop.received:
                grid = tuner.fit()
        except KeyboardInterrupt:  # the second signal
            pass
        finally:
            try:  # the display's actor ends with the search; it must not mask how the search ended
                import ray

                ray.kill(board)
            except Exception:  # noqa: BLE001 - already gone with its Ray
                pass
    if stop.received:
        raise SweepInterrupted(stop.received[0], path, _finished(path))
    records = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(r.path)
        error, log = None, None
        if r.error:
            # One line: the cause the trial recorded itself (fault.txt: a native hang that ended its
            # process), else the exception's last line; the whole traceback stays in the log named.
            error = trial_cause(path, os.path.basename(r.path)) or last_line(str(r.error))
            log = trial_log(path, os.path.basename(r.path))
        records.append(
            TrialRecord(
                trial_id=str(trial_id),
                config={k: v for k, v in (r.config or {}).items()},
                metrics={k: v for k, v in (r.metrics or {}).items() if not isinstance(v, dict)},
                checkpoint=r.checkpoint.path if r.checkpoint else None,
                error=error,
                stopped_early=bool((r.metrics or {}).get("stopped_early")),
                extra={"path": r.path, "checkpoint_obj": r.checkpoint, "log": log},
            )
        )
    return records
