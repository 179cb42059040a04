"""The path of one sweep: search -> pick the best trial -> export it -> best.json.

Results land under ``<storage>/<run name>/``: Ray Tune's trial directories, ``trials.json``
(every trial's config and final metrics) and ``best/`` (the exported winner and
``best.json``, written last so its presence means the export finished).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from grpo_ray import storage
from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import SpecLines, dump_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.search import concurrency_costs_learning, informed_trials
from grpo_ray.config.spec import SweepSpec
from grpo_ray.errors import SweepError
from grpo_ray.run_dir import (
    CHECKPOINT_PREFIX,
    MODEL_CARD,
    best_json_path,
    best_path,
    spec_resolved_path,
    trial_dir_prefix,
    trials_path,
    utilization_path,
)
from grpo_ray.select import TrialRecord, pareto_front, pick_best
from grpo_ray.views.status import last_line


@dataclass
class SweepOutcome:
    run_dir: str
    best: TrialRecord | None
    best_json: dict[str, Any] | None
    trials: list[TrialRecord]
    seconds: float
    utilization: dict[str, Any] | None = None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def _record_json(t: TrialRecord) -> dict[str, Any]:
    return {
        "trial_id": t.trial_id,
        "config": t.config,
        "metrics": {k: _clean(v) for k, v in t.metrics.items() if isinstance(v, (int, float, str, bool))},
        "error": t.error,  # one line; the full traceback is in "log"
        "log": t.extra.get("log"),
        "stopped_early": t.stopped_early,
    }


def finish(spec: SweepSpec, storage_root: str, trials: list[TrialRecord], seconds: float,
           progress: Callable[[str], None]) -> SweepOutcome:
    """Select the winner, export it and write trials.json and best.json."""
    from grpo_ray.views.utilization import utilization

    run_dir = storage.join(storage_root, spec.name)
    storage.write_text(trials_path(run_dir), json.dumps([_record_json(t) for t in trials], indent=2))
    storage.write_text(spec_resolved_path(run_dir), dump_spec(spec))
    use = utilization((t.metrics, t.error is None) for t in trials)
    storage.write_text(utilization_path(run_dir), json.dumps(use, indent=2))
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    best = pick_best(trials, objectives)
    if best is None:
        errors = [t.error for t in trials if t.error]
        cause = ""
        if errors:
            cause = f"; {len(errors)} of {len(trials)} trials failed, the first with: {last_line(errors[0])[:300]}"
        raise SweepError(f"no trial finished with all objectives reported{cause}; trial logs and "
                         f"trials.json are in {run_dir}")
    info = export_best(spec, run_dir, trials, best, progress)
    info["sweep_seconds"] = round(seconds, 1)
    storage.write_text(best_json_path(run_dir), json.dumps(info, indent=2, default=str))
    from grpo_ray.tracking import log_winner

    log_winner(spec, run_dir, info, progress)  # tag the best trial's MLflow / W&B run; never raises
    return SweepOutcome(run_dir=run_dir, best=best, best_json=info, trials=trials, seconds=seconds, utilization=use)


def export_best(spec: SweepSpec, run_dir: str, trials: list[TrialRecord], best: TrialRecord,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """Export ``best`` into ``<run_dir>/best`` and return the content of best.json."""
    from grpo_ray.export.best import export_trial, model_card

    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    best_dir = best_path(run_dir)
    info: dict[str, Any] = {
        "run": spec.name,
        "trial_id": best.trial_id,
        "hyperparameters": best.config,
        "metrics": {k: _clean(v) for k, v in best.metrics.items() if isinstance(v, (int, float, str, bool))},
        "rule": "Pareto front of " + ", ".join(f"{m} ({mode})" for m, mode in objectives)
        + "; then highest eval_accuracy, then the objectives in order, then lowest trial id",
        "pareto_front": [t.trial_id for t in pareto_front(trials, objectives)],
        "trials": {"total": len(trials), "errored": sum(1 for t in trials if t.error)},
        "utilization": _utilization(run_dir),
    }
    if spec.export.enabled:
        t0 = time.time()
        info["export"] = export_trial(spec, best, best_dir, progress)
        info["export_seconds"] = round(time.time() - t0, 1)
    storage.write_text(storage.join(best_dir, MODEL_CARD), model_card(spec, info))
    return info


def _utilization(run_dir: str) -> dict[str, Any] | None:
    """The sweep's GPU use that finish wrote, so a later `grpo-ray export` keeps it in best.json."""
    path = utilization_path(run_dir)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None  # a run older than it


def load_trials(run_dir: str) -> list[TrialRecord]:
    """The trials of a finished sweep, from trials.json, with each one's last LoRA checkpoint."""
    try:
        rows = json.loads(storage.read_text(trials_path(run_dir)))
    except (OSError, FileNotFoundError) as e:
        raise SweepError(f"{run_dir}: no trials.json (is this a finished sweep's directory?): {e}") from None
    entries = storage.list_dir(run_dir)
    records = []
    for r in rows:
        trial_dirs = [e for e in entries if e.startswith(trial_dir_prefix(r['trial_id']))]
        ckpt = None
        if trial_dirs:
            trial_dir = storage.join(run_dir, trial_dirs[0])
            ckpts = [c for c in storage.list_dir(trial_dir) if c.startswith(CHECKPOINT_PREFIX)]
            ckpt = storage.join(trial_dir, ckpts[-1]) if ckpts else None
        records.append(TrialRecord(trial_id=r["trial_id"], config=r["config"], metrics=r["metrics"],
                                   checkpoint=ckpt, error=r.get("error"),
                                   stopped_early=bool(r.get("stopped_early"))))
    return records


def export_run(run_dir: str, trial_id: str | None = None,
               progress: Callable[[str], None] = lambda s: None, gguf: list[str] | None = None) -> dict[str, Any]:
    """Re-export a finished sweep: its best trial by the same rule, or ``trial_id``; ``gguf``
    replaces the spec's ``export.gguf`` types (e.g. after a quantization failed its check)."""
    from grpo_ray.config.load import parse_spec

    spec_file = spec_resolved_path(run_dir)
    spec = parse_spec(storage.read_text(spec_file), file=spec_file)
    trials = load_trials(run_dir)
    if trial_id is None:
        best = pick_best(trials, [(o.metric, o.mode) for o in spec.search.objectives])
        if best is None:
            raise SweepError(f"{run_dir}: no trial finished with all objectives reported")
    else:
        matches = [t for t in trials if t.trial_id == trial_id]
        if not matches:
            raise SweepError(f"{run_dir}: no trial {trial_id!r} (trials: {', '.join(t.trial_id for t in trials)})")
        best = matches[0]
    changes: dict[str, Any] = {"enabled": True} | ({"gguf": gguf} if gguf else {})
    try:
        spec = apply_overrides(spec, {f"export.{k}": v for k, v in changes.items()})
    except SpecError as e:
        raise SweepError(f"--gguf: {e.message}") from None
    from grpo_ray import run_lock

    # Not while a sweep of the run is going: it writes best/ itself when it ends.
    with run_lock.acquire(run_dir, resume=True, command=" ".join(sys.argv)):
        # best.json means "this export finished": it must not describe files being replaced. The
        # whole directory goes, so files of the previous export (another trial, other GGUF types)
        # cannot pass as this one's.
        previous = _exported_trial(run_dir)
        storage.remove_dir(best_path(run_dir))
        info = export_best(spec, run_dir, trials, best, progress)
        storage.write_text(best_json_path(run_dir), json.dumps(info, indent=2, default=str))
    from grpo_ray.tracking import log_winner

    # The sweep's MLflow / W&B runs follow best/: the exported trial is tagged with the new files,
    # and an earlier winner, if this export picked another trial, is untagged. Never raises.
    log_winner(spec, run_dir, info, progress, previous=previous)
    return info


def _exported_trial(run_dir: str) -> str | None:
    """The trial id of the export in ``<run>/best`` now, if there is one that can be read."""
    try:
        return str(json.loads(storage.read_text(best_json_path(run_dir)))["trial_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# A hub repo id: `name` or `org/name` (letters, digits, -, _, .). Validate checks only this shape
# for hub sources: it never reaches the network (the sweep may run where the hub is, validate elsewhere).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _is_local_source(source: str) -> bool:
    from grpo_ray.task.data import BUILTIN, LOCAL_SUFFIXES

    p = Path(source).expanduser()
    return (source in BUILTIN or source.startswith(("builtin:", ".", "/", "~"))
            or p.suffix.lower() in LOCAL_SUFFIXES or p.exists())


def preflight(spec: SweepSpec, lines: SpecLines | None = None) -> None:
    """Catch user errors before any trial starts (and in ``grpo-ray validate``): model path,
    rewards, data files with rows left after the filters, the previous runs of ``search.warm_start``.

    Inside a trial these would only surface as N identical trial failures after start-up. Each
    error is a :class:`SpecError` naming the spec field (and its line when ``lines`` is given),
    or a :class:`SweepError` naming ``search.warm_start`` and the run.
    Nothing here needs a GPU or the network: hub names are checked for their shape only.
    """
    from grpo_ray.models import ModelError, check_model_source
    from grpo_ray.sweep.search import load_warm_start
    from grpo_ray.task import template
    from grpo_ray.task.data import DataError, load_datasets, load_rows, to_examples
    from grpo_ray.task.rewards import RewardError, resolve_rewards

    def fail(field: str, e: BaseException | str) -> SpecError:
        msg = str(e)
        if lines is not None:
            return lines.error(field, msg)
        return SpecError(msg, field=field)

    src = spec.model.source
    try:
        check_model_source(src)
    except ModelError as e:
        raise fail("model.source", e) from None
    if not _is_local_source(src) and not _HUB_ID.match(src):
        raise fail("model.source", f"{src}: no such file or directory, and not a hub model name (org/name)")
    fmt = template.format_of(spec.format)
    for i, r in enumerate(spec.rewards):
        try:
            resolve_rewards([r.name], fmt, None)
        except RewardError as e:
            raise fail(f"rewards.{i}.name", e) from None
    sets = [("data.sft", spec.data.sft), ("data.grpo", spec.data.grpo), ("data.eval.source", spec.data.eval.source)]
    all_local = True
    for field, ds in sets:
        if ds is None:
            continue
        if not _is_local_source(ds.source):
            all_local = False
            if not _HUB_ID.match(ds.source):
                raise fail(f"{field}.source", f"{ds.source}: no such file, and not a hub data set name (org/name)")
            continue
        try:
            rows = load_rows(ds)
        except DataError as e:
            raise fail(f"{field}.source", e) from None
        try:
            to_examples(ds, rows)
        except DataError as e:
            raise fail(f"{field}.columns" if "missing column" in str(e) else field, e) from None
    if all_local:  # the held-out split and the SFT reasoning filter: rows left for every set
        try:
            load_datasets(spec.data)
        except DataError as e:
            msg = str(e)
            field = ("data.eval.size" if "data.eval.size" in msg
                     else "data.sft.columns.reasoning" if "reasoning" in msg else "data")
            raise fail(field, e) from None
    load_warm_start(spec)  # a SweepError naming search.warm_start; the searcher reads them again when Tune starts


def pad_note(spec: SweepSpec) -> str | None:
    """A line on what ``lora.pad_rank: auto`` decided, when it pads: the user never set it, and
    every trial then trains (and uses memory) at the search's largest rank.

    >>> from grpo_ray.config.spec import SweepSpec
    >>> pad_note(SweepSpec(name="x", search={"space": {"lora.rank": {"choice": [8, 64]}}}))[:62]
    "lora.pad_rank: auto -> every trial's LoRA is built at rank 64,"
    >>> pad_note(SweepSpec(name="x")) is None  # the rank is not searched
    True
    """
    if spec.lora.pad_rank != "auto" or not spec.pads_lora_rank():
        return None
    return (f"lora.pad_rank: auto -> every trial's LoRA is built at rank {spec.max_lora_rank()}, the search's "
            "largest, its own rank in the first rows and zeros in the rest, so a warm actor's next trial reuses "
            "the compiled graphs whatever its rank; checkpoints and the export keep each trial's own rank "
            "(lora.pad_rank: false trains each at its own rank)")


def search_note(spec: SweepSpec) -> str | None:
    """A line when so many trials run at once that tpe or gp draws fewer than half of
    the sweep from finished results (``search.max_concurrent_trials`` resolved), where one at a
    time it would draw at least half: a dense packing on a large cluster turns TPE into random
    search, and the user should know what to change. (A sweep too short to learn even one at a
    time, like the 3-trial smoke sweep, is not the concurrency's doing: no line.)

    >>> from grpo_ray.config.spec import SweepSpec
    >>> space = {"grpo.learning_rate": {"loguniform": [1e-6, 1e-5]}}
    >>> search_note(SweepSpec(name="x", search={"space": space, "max_concurrent_trials": 32}))[:58]
    'search: 32 trials at once and the first 10 drawn at random'
    >>> search_note(SweepSpec(name="x", search={"space": space, "max_concurrent_trials": 8})) is None
    True
    >>> search_note(SweepSpec(name="x", search={"space": space, "max_concurrent_trials": 32, "sampler": "random"})) is None
    True
    >>> search_note(SweepSpec(name="x", search={"space": space, "max_concurrent_trials": 2, "num_samples": 3})) is None
    True
    """
    s = spec.search
    startup = s.learning_startup()
    if startup is None or not isinstance(s.max_concurrent_trials, int):
        return None
    informed = informed_trials(s.num_samples, s.max_concurrent_trials, startup)
    if not concurrency_costs_learning(s.num_samples, informed, startup):
        return None
    return (f"search: {s.max_concurrent_trials} trials at once and the first {startup} drawn at random, so "
            f"{s.sampler} draws only {informed} of the {s.num_samples} trials from finished results (trial k "
            "starts when k - at-once trials have finished); for a search that learns, raise search.num_samples, or "
            "lower search.max_concurrent_trials or resources.max_trials_per_gpu, or search.startup_trials")


def run_sweep(spec: SweepSpec, storage_root: str | None = None, resume: bool = False,
              on_event: Callable[[str, dict[str, Any]], None] | None = None,
              progress: Callable[[str], None] = lambda s: None, lines: SpecLines | None = None) -> SweepOutcome:
    """The main job: search, select, export.

    One driver per run: the run's lock (run_lock.py) is held from before the first write to the
    end, and released however the sweep ends. An interrupted search raises
    :class:`~grpo_ray.sweep.search.SweepInterrupted` before anything is selected or exported.
    """
    from grpo_ray import run_lock
    from grpo_ray.sweep.packing import resolve_resources
    from grpo_ray.sweep.search import init_ray, run_search
    from grpo_ray.trial import workdirs

    root = storage.normalize(storage_root or spec.storage)
    preflight(spec, lines)
    run_dir = storage.join(root, spec.name)
    try:
        lock = run_lock.acquire(run_dir, resume, command=" ".join(sys.argv))
    except OSError as e:  # the lock is the run's first write: a storage that cannot be written fails here
        raise SweepError(f"storage {root}: cannot write the run there ({e}); pass --storage a writable "
                         "directory or bucket URI") from None
    try:
        workdirs.remove_orphans()  # left by trial processes of earlier sweeps on this host that were killed
        init_ray()  # before the resources: `auto` looks at the cluster's GPUs and CPUs
        spec, notes = resolve_resources(spec)
        notes = [*notes, *(n for n in (pad_note(spec), search_note(spec)) if n)]
        if on_event:
            for note in notes:
                on_event("note", {"message": note})
        # Written now too, so `status` and `report` of a running sweep know its objectives and space;
        # and a storage that cannot be written fails here, before any GPU time is spent.
        try:
            storage.write_text(spec_resolved_path(storage.join(root, spec.name)), dump_spec(spec))
        except OSError as e:
            raise SweepError(f"storage {root}: cannot write the run there ({e}); pass --storage a writable "
                             "directory or bucket URI") from None
        t0 = time.time()
        trials = run_search(spec, root, resume=resume, on_event=on_event)
        return finish(spec, root, trials, time.time() - t0, progress)
    finally:
        lock.release()
