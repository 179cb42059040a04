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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from grpo_ray import storage
from grpo_ray.errors import SweepError
from grpo_ray.report import last_line
from grpo_ray.select import TrialRecord, pareto_front, pick_best
from grpo_ray.spec import SpecError, SpecLines, SweepSpec, apply_overrides, dump_spec


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


def export_trial(spec: SweepSpec, best: TrialRecord, dest: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """Export ``best``'s adapter (merged 16-bit + GGUF) to ``dest`` (local dir or URI)."""
    from transformers import AutoTokenizer

    from grpo_ray.export import export_model
    from grpo_ray.models import resolve_model

    trial_spec = apply_overrides(spec, best.config)
    with tempfile.TemporaryDirectory(prefix="grpo-ray-export-") as tmp:
        adapter = Path(tmp, "adapter")
        ckpt = best.extra.get("checkpoint_obj")
        if ckpt is not None:
            ckpt.to_directory(str(adapter))
        elif best.checkpoint:
            storage.copy_dir(best.checkpoint, str(adapter))
        else:
            raise SweepError(f"trial {best.trial_id} has no checkpoint to export")
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))  # the trial's, with its chat template
        out = Path(tmp, "best")
        # A quantized GGUF base ships as itself plus a LoRA adapter GGUF: re-quantizing a merge
        # would round the fine-tune away (bench/results/export_gemma_cpu.json).
        src = str(trial_spec.model.source)
        base_gguf = Path(src) if src.lower().endswith(".gguf") and Path(src).is_file() else None
        result = export_model(
            Path(resolve_model(trial_spec.model.source)),
            adapter,
            out,
            gguf_types=list(spec.export.gguf),
            chat_template=tokenizer.chat_template,
            system_prompt=trial_spec.format.system_prompt,
            check=spec.export.check,
            progress=progress,
            name=spec.name,
            base_gguf=base_gguf,
        )
        summary = json.loads((out / "export.json").read_text())
        agreement = quantized_agreement(spec, trial_spec, tokenizer, result.ggufs, progress)
        if agreement:
            summary["quantized_agreement"] = agreement
            (out / "export.json").write_text(json.dumps(summary, indent=2))
        progress(f"copying export to {dest}")
        storage.copy_dir(str(out), dest)
    return summary


def quantized_agreement(spec: SweepSpec, trial_spec: SweepSpec, tok: Any, ggufs: dict[str, Path],
                        progress: Callable[[str], None]) -> dict[str, Any]:
    """Greedy agreement of each quantized GGUF with the 16-bit one on held-out prompts."""
    from grpo_ray import template
    from grpo_ray.data import load_datasets
    from grpo_ray.export import ExportError, greedy_agreement, llama_cpp_available

    reference = next((ggufs[t] for t in ("f16", "bf16", "f32") if t in ggufs), None)
    quantized = {t: p for t, p in ggufs.items() if t not in ("f16", "bf16", "f32")}
    n = spec.export.agreement_prompts
    if reference is None or not quantized or n == 0 or not llama_cpp_available():
        return {}
    fmt = trial_spec.format.to_format()
    examples = load_datasets(trial_spec.data).eval[:n]
    prompts = [tok.apply_chat_template(template.prompt_messages(e.question, fmt), tokenize=False,
                                       add_generation_prompt=True) for e in examples]
    if tok.bos_token and prompts and prompts[0].startswith(tok.bos_token):
        prompts = [p[len(tok.bos_token):] for p in prompts]  # llama.cpp adds BOS itself
    out = {}
    for gguf_type, path in quantized.items():
        progress(f"greedy agreement of {gguf_type} with {reference.name} on {len(prompts)} held-out prompts")
        out[gguf_type] = r = greedy_agreement(reference, path, prompts)
        floor = spec.export.min_agreement
        if floor is not None and r["rate"] < floor:
            raise ExportError(f"{path.name} answers like {reference.name} on {r['rate']:.0%} of held-out prompts, "
                              f"below export.min_agreement={floor}: the quantization erased what training changed. Re-export "
                              f"with a larger type: grpo-ray export <run> --gguf f16,q8_0")
    return out


def finish(spec: SweepSpec, storage_root: str, trials: list[TrialRecord], seconds: float,
           progress: Callable[[str], None]) -> SweepOutcome:
    """Select the winner, export it and write trials.json and best.json."""
    from grpo_ray.utilization import utilization

    run_dir = storage.join(storage_root, spec.name)
    storage.write_text(storage.join(run_dir, "trials.json"), json.dumps([_record_json(t) for t in trials], indent=2))
    storage.write_text(storage.join(run_dir, "spec.resolved.yaml"), dump_spec(spec))
    use = utilization((t.metrics, t.error is None) for t in trials)
    storage.write_text(storage.join(run_dir, "utilization.json"), json.dumps(use, indent=2))
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
    storage.write_text(storage.join(run_dir, "best", "best.json"), json.dumps(info, indent=2, default=str))
    from grpo_ray.tracking import log_winner

    log_winner(spec, run_dir, info, progress)  # tag the best trial's MLflow / W&B run; never raises
    return SweepOutcome(run_dir=run_dir, best=best, best_json=info, trials=trials, seconds=seconds, utilization=use)


def export_best(spec: SweepSpec, run_dir: str, trials: list[TrialRecord], best: TrialRecord,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """Export ``best`` into ``<run_dir>/best`` and return the content of best.json."""
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    best_dir = storage.join(run_dir, "best")
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
    storage.write_text(storage.join(best_dir, "README.md"), model_card(spec, info))
    return info


def _utilization(run_dir: str) -> dict[str, Any] | None:
    """The sweep's GPU use that finish wrote, so a later `grpo-ray export` keeps it in best.json."""
    path = storage.join(run_dir, "utilization.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None  # a run older than it


def model_card(spec: SweepSpec, info: dict[str, Any]) -> str:
    """A model card for the exported trial: base, data, rewards, hyperparameters, metrics."""
    trial_spec = apply_overrides(spec, info["hyperparameters"])
    d = trial_spec.data
    m = info["metrics"]

    def ds(x: Any) -> str:
        return "none" if x is None else f"`{x.source}`" + (f" ({x.subset})" if x.subset else "") + f", split `{x.split}`"

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# {spec.name}: best trial {info['trial_id']}",
        "",
        f"Base model: `{spec.model.source}`, LoRA rank {trial_spec.lora.rank}, trained by grpo-ray "
        f"(SFT format warm-up, then GRPO), chosen from {info['trials']['total']} trials.",
        "",
        f"- SFT data: {ds(d.sft)}; GRPO data: {ds(d.grpo)}; held-out eval: {int(m.get('eval_size') or 0)} problems "
        + ("from a separate set" if d.eval.source else "held out from the GRPO set, disjoint from training"),
        "- Rewards (weight): " + ", ".join(f"`{r.name}` ({num(r.weight)})" for r in trial_spec.rewards),
        f"- Output format: reasoning between `{spec.format.reasoning_start}` and `{spec.format.reasoning_end}`, "
        f"answer between `{spec.format.solution_start}` and `{spec.format.solution_end}`",
        f"- Selection: {info['rule']}",
        "",
        "## Hyperparameters",
        "",
        *[f"- `{k}`: {num(v)}" for k, v in info["hyperparameters"].items()],
        "",
        "## Metrics (last report)",
        "",
        *[f"- `{k}`: {num(m[k])}" for k in ["eval_accuracy", "eval_format_rate", "sft_eval_accuracy", "reward",
                                           "format_rate", "completion_length", "step"] if k in m],
        "",
        "## Files",
        "",
        "`lora/` adapter, `merged16/` merged 16-bit model, `*.gguf` for llama.cpp, `Modelfile` for "
        "Ollama (`ollama create NAME -f Modelfile`), `best.json` the full record.",
        "",
    ]
    return "\n".join(lines)


def load_trials(run_dir: str) -> list[TrialRecord]:
    """The trials of a finished sweep, from trials.json, with each one's last LoRA checkpoint."""
    try:
        rows = json.loads(storage.read_text(storage.join(run_dir, "trials.json")))
    except (OSError, FileNotFoundError) as e:
        raise SweepError(f"{run_dir}: no trials.json (is this a finished sweep's directory?): {e}") from None
    entries = storage.list_dir(run_dir)
    records = []
    for r in rows:
        trial_dirs = [e for e in entries if e.startswith(f"tune_trainable_{r['trial_id']}_")]
        ckpt = None
        if trial_dirs:
            trial_dir = storage.join(run_dir, trial_dirs[0])
            ckpts = [c for c in storage.list_dir(trial_dir) if c.startswith("checkpoint_")]
            ckpt = storage.join(trial_dir, ckpts[-1]) if ckpts else None
        records.append(TrialRecord(trial_id=r["trial_id"], config=r["config"], metrics=r["metrics"],
                                   checkpoint=ckpt, error=r.get("error"),
                                   stopped_early=bool(r.get("stopped_early"))))
    return records


def export_run(run_dir: str, trial_id: str | None = None,
               progress: Callable[[str], None] = lambda s: None, gguf: list[str] | None = None) -> dict[str, Any]:
    """Re-export a finished sweep: its best trial by the same rule, or ``trial_id``; ``gguf``
    replaces the spec's ``export.gguf`` types (e.g. after a quantization failed its check)."""
    from grpo_ray.spec import parse_spec

    spec_file = storage.join(run_dir, "spec.resolved.yaml")
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
        storage.remove_dir(storage.join(run_dir, "best"))
        info = export_best(spec, run_dir, trials, best, progress)
        storage.write_text(storage.join(run_dir, "best", "best.json"), json.dumps(info, indent=2, default=str))
    return info


# A hub repo id: `name` or `org/name` (letters, digits, -, _, .). Validate checks only this shape
# for hub sources: it never reaches the network (the sweep may run where the hub is, validate elsewhere).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _is_local_source(source: str) -> bool:
    from grpo_ray.data import BUILTIN, LOCAL_SUFFIXES

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
    from grpo_ray.data import DataError, load_datasets, load_rows, to_examples
    from grpo_ray.models import ModelError, check_model_source
    from grpo_ray.rewards import RewardError, resolve_rewards
    from grpo_ray.search import load_warm_start

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
    fmt = spec.format.to_format()
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


def run_sweep(spec: SweepSpec, storage_root: str | None = None, resume: bool = False,
              on_event: Callable[[str, dict[str, Any]], None] | None = None,
              progress: Callable[[str], None] = lambda s: None, lines: SpecLines | None = None) -> SweepOutcome:
    """The main job: search, select, export.

    One driver per run: the run's lock (run_lock.py) is held from before the first write to the
    end, and released however the sweep ends. An interrupted search raises
    :class:`~grpo_ray.search.SweepInterrupted` before anything is selected or exported.
    """
    from grpo_ray import run_lock, workdirs
    from grpo_ray.packing import resolve_resources
    from grpo_ray.search import init_ray, run_search

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
        if on_event:
            for note in notes:
                on_event("note", {"message": note})
        # Written now too, so `status` and `report` of a running sweep know its objectives and space;
        # and a storage that cannot be written fails here, before any GPU time is spent.
        try:
            storage.write_text(storage.join(root, spec.name, "spec.resolved.yaml"), dump_spec(spec))
        except OSError as e:
            raise SweepError(f"storage {root}: cannot write the run there ({e}); pass --storage a writable "
                             "directory or bucket URI") from None
        t0 = time.time()
        trials = run_search(spec, root, resume=resume, on_event=on_event)
        return finish(spec, root, trials, time.time() - t0, progress)
    finally:
        lock.release()
