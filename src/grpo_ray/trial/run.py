"""One trial, top to bottom: the Ray Tune trainable.

    config (sampled by Optuna) -> the trial's spec -> data -> model + LoRA
    -> SFT format warm-up -> held-out eval -> GRPO, reporting to Tune every few steps
       (rewards, format rate, completion length, held-out accuracy, LoRA checkpoint)

The objective ``reward`` is the sum of each reward's mean weighted by the *spec's* weights,
not the trial's sampled ones: when the search varies reward weights, the weighted total a
trial optimizes (``reward_weighted``) is not comparable across trials, this one is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from grpo_ray.task import template
from grpo_ray.task.data import DataError, Datasets, load_datasets
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.compile_clock import CompileClock
from grpo_ray.trial.gpu_sampler import GpuSampler

STATE_FILE = "trial_state.json"  # in each checkpoint: the GRPO step reached and the trial's fixed metrics
EFFECTIVE_FILE = "effective_config.json"  # in each checkpoint: every TRL argument the trainers ran with
FORMAT_RATE = "format_rate"  # an extra zero-weight reward so TRL logs the format rate per step


def _format_rate_reward(fmt: template.Format, eos_token: str | None):
    from grpo_ray.task.rewards import make_rewards

    exact = make_rewards(fmt, eos_token)["match_format_exactly"]

    def format_rate(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float]:
        return [1.0 if s > 0 else 0.0 for s in exact(prompts=prompts, completions=completions, **kwargs)]

    return format_rate


# What each GRPO step says about its groups, averaged over a report window: reported to Tune
# (early_stopping.metric can use them), status, trials.json and the report. Names: TRL 1.15's logs.
GROUP_DIAGNOSTICS: dict[str, tuple[str, ...]] = {
    # Groups whose completions all got the same reward: zero advantage, no gradient. Near 1:
    # the problems are too easy or too hard for the model (or the rewards too coarse).
    "zero_std_groups": ("frac_reward_zero_std",),
    # Completions cut at grpo.max_completion_length: near 1, raise it (or mask them).
    "truncated_rate": ("completions/clipped_ratio",),
    # Tokens whose ratio left the clipping range (cispo: whose weight was capped).
    "clip_ratio": ("clip_ratio/region_mean", "cispo_clip_ratio"),
    "clip_ratio_low": ("clip_ratio/low_mean",),
    "clip_ratio_high": ("clip_ratio/high_mean",),
    "kl": ("kl",),  # only with grpo.beta > 0
    "entropy": ("entropy",),
}


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class WindowReporter:
    """Collects per-step GRPO logs; every ``report_every`` steps evaluates and reports to Tune."""

    def __init__(self, spec: SweepSpec, base_weights: dict[str, float], names: list[str], report,
                 first_step: int = 0) -> None:
        self.spec, self.base_weights, self.names, self.report = spec, base_weights, names, report
        self.window: list[dict[str, float]] = []
        self.first_reward: float | None = None  # the first GRPO step's: warm vs fresh actor (bench/warm_sweep.py)
        # A resumed trial's trainer counts from 0 again; the trial's steps go on from its checkpoint.
        self.offset = self.last_reported = self.step = first_step

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        step += self.offset
        if self.first_reward is None:
            self.first_reward = logs.get("reward")
        self.window.append(logs)
        self.step = step
        if step % self.spec.grpo.report_every == 0 or step >= self.spec.grpo.max_steps:
            self.flush(step)

    def metrics(self) -> dict[str, float]:
        w = self.window
        per = {n: _mean([x.get(f"rewards/{n}/mean", float("nan")) for x in w]) for n in self.names}
        out = {f"rewards/{n}/mean": v for n, v in per.items()}
        out["reward"] = sum(self.base_weights.get(n, 1.0) * v for n, v in per.items())
        out["reward_weighted"] = _mean([x.get("reward", float("nan")) for x in w])
        out["format_rate"] = _mean([x.get(f"rewards/{FORMAT_RATE}/mean", float("nan")) for x in w])
        out["completion_length"] = _mean([x.get("completions/mean_length", float("nan")) for x in w])
        for name, keys in GROUP_DIAGNOSTICS.items():
            out[name] = _mean([next((x[k] for k in keys if k in x), float("nan")) for x in w])
        if self.first_reward is not None:
            out["first_step_reward"] = self.first_reward
        return out

    def flush(self, step: int) -> None:
        if not self.window or step == self.last_reported:
            return
        metrics = self.metrics()
        self.window, self.last_reported = [], step
        self.report(step, metrics)


class EffectiveRecord:
    """The configuration a trial's trainers really ran with (issue: "the config that really ran").

    Each trainer's TRL config is read after Unsloth's patched classes and TRL's ``__post_init__``
    had their say: by the spec field it came from (reported as ``effective/<field>``, so
    ``trials.json`` and the report show it beside the sampled ``config``), in full in each
    checkpoint's ``effective_config.json``, and every value changed from what the trial passed
    (``changed_by_backend``). A change to a value the search sampled ends the trial instead
    (trl_args.refuse_sampled_changes): the search must never be told a result for a
    configuration that did not run.
    """

    def __init__(self, sampled: set[str], backend: str) -> None:
        self.sampled, self.backend = sampled, backend
        self.ran: dict[str, Any] = {}
        self.changes: dict[tuple[str, str], str] = {}  # (stage, TRL argument) -> description
        self.full: dict[str, dict[str, Any]] = {}

    def record(self, stage: str, args: Any, ran: dict[str, Any], changes: list[Any]) -> None:
        from grpo_ray.trial.trl_args import trl_args_dict

        self.ran |= ran
        self.full[stage] = trl_args_dict(args)
        for c in changes:
            self.changes[(stage, c.argument)] = f"{stage} {c.describe()}"

    def check(self, stage: str, requested: dict[str, Any], args: Any, table: dict[str, str | None]
              ) -> dict[str, Any]:
        """Record ``args`` (a TRL config: one just built, before training, or a trainer's as its loop
        starts, through :meth:`callback`) and refuse a sampled value changed. Returns ``requested``."""
        from grpo_ray.trial.trl_args import effective_settings, refuse_sampled_changes

        ran, changes = effective_settings(args, requested, table)
        self.record(stage, args, ran, changes)
        refuse_sampled_changes(changes, self.sampled, self.backend, stage)
        return requested

    def callback(self, stage: str, requested: dict[str, Any], table: dict[str, str | None]) -> Any:
        from grpo_ray.trial.common import EffectiveConfig

        return EffectiveConfig(stage, requested, table, self.check)

    def metrics(self) -> dict[str, Any]:
        # Lists (the reward weights) stay in the file: a metric is a number or a string.
        out: dict[str, Any] = {f"effective/{k}": v for k, v in self.ran.items() if not isinstance(v, list)}
        if self.changes:
            out["changed_by_backend"] = "; ".join(self.changes.values())
        return out

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"by_field": self.ran, "changed_by_backend": list(self.changes.values()),
                                    "trl": self.full}, indent=1, default=str))


def grpo_rows(data: Datasets, tokenizer: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """GRPO prompts with their answers; prompts longer than max_prompt_length are dropped (as the seed)."""
    fmt = template.format_of(spec.format)
    rows = []
    for e in data.grpo:
        prompt = template.prompt_messages(e.question, fmt)
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if len(ids) <= spec.grpo.max_prompt_length:
            rows.append({"prompt": prompt, "answer": e.answer})
    if not rows:  # a configuration error (DataError): the same every attempt, so Tune does not retry it
        raise DataError(
            f"no GRPO prompt fits grpo.max_prompt_length={spec.grpo.max_prompt_length} tokens; raise it"
        )
    return rows


def run_trial(config: dict[str, Any], spec: SweepSpec, report=None,
              record_fault: Callable[[str], None] | None = None, resume_from: Path | None = None,
              context: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one trial of ``spec`` with the sampled ``config`` ({dotted path: value}).

    ``report(metrics, checkpoint_dir)`` defaults to Ray Tune's ``tune.report``; tests and the
    benchmark can pass their own. ``record_fault(cause)`` keeps a cause that cannot be raised
    (a hang in native code ends the process). ``resume_from``: a checkpoint this trial reported
    before (a retry after its process or node died): its LoRA is loaded, the SFT warm-up and
    the GRPO steps already done are skipped. ``context``: fixed values added to every report
    (where the trial ran). Returns the last metrics reported.
    """
    trial_spec = apply_overrides(spec, config)
    from grpo_ray.trial import warm
    from grpo_ray.trial.base import SettingChangedError
    from grpo_ray.trial.guard import TrialHungError, Watchdog

    watchdog = Watchdog(trial_spec.trial.step_timeout_s, write_cause=record_fault)
    try:  # the GPU sampler (NVML, in this process: the driver may have no GPU) stops when the trial does
        with watchdog, GpuSampler() as gpu:
            return _run(trial_spec, spec, set(config), report or _tune_report, watchdog, resume_from, context, gpu)
    except TrialHungError:
        warm.release()
        raise TrialHungError(watchdog.cause) from None
    except SettingChangedError:  # refused before any step of the trainer: the model is as it was
        raise
    except Exception:  # not SystemExit: Tune ends a stopped trial's thread with it, the model is fine
        warm.release()  # a failed trial may leave the model in any state: the next one loads afresh
        raise


def _run(trial_spec: SweepSpec, spec: SweepSpec, sampled: set[str], report, watchdog, resume_from: Path | None,
         context: dict[str, Any] | None, gpu: GpuSampler) -> dict[str, float]:
    from grpo_ray.models import resolve_model
    from grpo_ray.trial import warm

    t0 = time.time()
    compile_clock = CompileClock()  # torch.compile's share of this trial, model load included
    # First: the unsloth backend must be imported before trl. A warm actor's model is reused.
    model_dir = resolve_model(trial_spec.model.source)
    backend, reused = warm.acquire(model_dir, trial_spec)
    t_loaded = time.time()
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(trial_spec.resources.cpu)))
    from grpo_ray.task.evaluate import evaluate
    from grpo_ray.task.rewards import resolve_rewards
    from grpo_ray.trial.common import FirstStep, LoopStart, StepReporter, lora_norm
    from grpo_ray.trial.trl_args import GRPO_ARGS, SFT_ARGS
    from grpo_ray.trial.guard import TrialGuard

    watchdog.beat("loading the model")
    # Data and GRPO prompts depend on these alone; a warm actor's next trial gets them as they were.
    data_key = (trial_spec.data.model_dump_json(),)
    data = warm.shared(("data", *data_key), lambda: load_datasets(trial_spec.data), trial_spec)
    fmt = template.format_of(trial_spec.format)
    eos = backend.tokenizer.eos_token
    names = [r.name for r in trial_spec.rewards]
    funcs = resolve_rewards(names, fmt, eos)
    func_names = [f.__name__ for f in funcs]
    funcs.append(_format_rate_reward(fmt, eos))
    weights = [r.weight for r in trial_spec.rewards] + [0.0]
    base_weights = {f.__name__: w for f, w in zip(funcs, spec.reward_weights().values())}

    # When the GPU starts working for this trial: its first training step or evaluation.
    # Start-up is everything before it (model load or adapter reset, data, trainer set-up).
    busy = FirstStep()
    gpu.steps_since = lambda: busy.at  # its samples from here on count as "during steps"
    fixed: dict[str, float] = {"eval_size": float(len(data.eval))}  # kept in checkpoints for a retry
    # This attempt's own timings and place; a retry reports its own, not the checkpoint's.
    attempt = {"trial_started_at": t0, "load_s": t_loaded - t0, "model_reused": float(reused),
               # of load_s, the wait for packed neighbours' engine starts (trial/engine_lock.py)
               "engine_wait_s": 0.0 if reused else float(getattr(backend, "engine_wait_s", 0.0))} | (context or {})

    # Where a trial's time goes (seconds), reported with every window: set-up of each trainer,
    # held-out evaluation, and GRPO's own steps (bench/warm_sweep.py reads them).
    phases = {"eval_seconds": 0.0}

    def held_out():  # greedy, on the same held-out set every time
        busy.mark()
        t = time.time()
        ev = evaluate(backend, data.eval, fmt, trial_spec.data.eval.max_new_tokens)
        phases["eval_seconds"] += time.time() - t
        watchdog.beat("a held-out evaluation")
        return ev

    # The configuration that really runs: refused now, before any step, if the backend would
    # change a sampled value; recorded again by each trainer as its loop starts.
    effective = EffectiveRecord(sampled, backend.name)
    run_sft = trial_spec.sft.enabled and bool(data.sft)
    sft_kwargs = effective.check("SFT", *backend.sft_args(trial_spec), SFT_ARGS) if run_sft else {}
    grpo_kwargs = effective.check("GRPO", *backend.grpo_args(trial_spec, weights), GRPO_ARGS)

    state = _read_state(resume_from)
    first_step = int(state["step"]) if state else 0
    if state:  # a retry: SFT and the first GRPO steps are in the checkpoint's LoRA
        backend.load_adapter(resume_from)
        fixed |= state["fixed"] | {"resumed_from_step": first_step}
        watchdog.beat(f"loading the checkpoint of step {first_step}")
    else:
        if trial_spec.data.eval.before_sft:
            ev = held_out()
            fixed |= ev.accuracy_metrics("base_eval_accuracy") | {"base_format_rate": ev.format_rate}
        if run_sft:
            t_sft, sft_loop, sft_clock = time.time(), LoopStart(), CompileClock()
            msgs = [template.sft_messages(e.question, e.reasoning or "", e.answer, fmt) for e in data.sft]
            fixed |= backend.sft(msgs, trial_spec, [TrialGuard(watchdog, trial_spec, "SFT"), busy, sft_loop,
                                                    effective.callback("SFT", sft_kwargs, SFT_ARGS)])
            fixed["sft_seconds"] = time.time() - t_sft
            fixed["sft_setup_s"] = (sft_loop.at or t_sft) - t_sft
            fixed["sft_compile_s"] = sft_clock.since()[1]
            fixed["sft_lora_norm"] = lora_norm(backend.model)
        ev = held_out()
        fixed |= ev.accuracy_metrics("sft_eval_accuracy") | {"sft_format_rate": ev.format_rate}

    last: dict[str, float] = {}

    def report_window(step: int, metrics: dict[str, float]) -> None:
        ev = held_out()
        if grpo_loop.at is not None:  # the steps' own time: the loop's, less the evaluations in it
            steps = max(step - first_step, 1)
            phases["grpo_setup_s"] = grpo_loop.at - t_grpo
            phases["grpo_step_s"] = (time.time() - grpo_loop.at - (phases["eval_seconds"] - eval_before_grpo)) / steps
        graphs, compile_s = compile_clock.since()
        metrics |= fixed | attempt | busy.metrics(t0) | phases | gpu.metrics() | {
            "compiled_graphs": float(graphs),
            "compile_s": compile_s,
            "step": step,
            **ev.accuracy_metrics("eval_accuracy"),
            "eval_format_rate": ev.format_rate,
            **effective.metrics(),
            "elapsed_s": time.time() - t0,
            "reported_at": time.time(),  # the trial's last report is its end (bench and report: utilization)
        }
        if torch.cuda.is_available():  # vLLM's KV cache lives in torch's allocator too (Unsloth)
            metrics["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with tempfile.TemporaryDirectory(prefix="grpo-ray-ckpt-") as d:
            backend.save_adapter(Path(d))
            Path(d, STATE_FILE).write_text(json.dumps({"step": step, "fixed": fixed}))
            effective.write(Path(d, EFFECTIVE_FILE))
            report(metrics, d)
        last.clear()
        last.update(metrics)

    reporter = WindowReporter(trial_spec, base_weights, func_names, report_window, first_step)
    grpo_loop = LoopStart()
    grpo_spec = trial_spec
    if first_step:
        if first_step >= trial_spec.grpo.max_steps:  # it died after its last report: nothing left to do
            return {}
        # The rest of the steps, with a fresh optimizer and learning-rate schedule, on a shuffle
        # other than the first attempt's (the same seed would replay its first prompts).
        grpo_spec = apply_overrides(trial_spec, {"grpo.max_steps": trial_spec.grpo.max_steps - first_step,
                                                 "grpo.seed": trial_spec.grpo.seed + first_step})
        grpo_kwargs = backend.grpo_args(grpo_spec, weights)[0]
    eval_before_grpo = phases["eval_seconds"]
    rows_key = ("grpo_rows", *data_key, model_dir, trial_spec.format.model_dump_json(), trial_spec.model.add_bos,
                trial_spec.grpo.max_prompt_length)
    rows = warm.shared(rows_key, lambda: grpo_rows(data, backend.tokenizer, grpo_spec), trial_spec)
    callbacks = [TrialGuard(watchdog, trial_spec, "GRPO"), StepReporter(reporter.on_step), busy, grpo_loop,
                 effective.callback("GRPO", grpo_kwargs, GRPO_ARGS)]
    t_grpo = time.time()
    backend.grpo(rows, funcs, weights, grpo_spec, callbacks)
    reporter.flush(reporter.step)  # a run that ended before max_steps reports its last window too
    return dict(last)


def _read_state(checkpoint: Path | None) -> dict[str, Any] | None:
    if checkpoint is None or not Path(checkpoint, STATE_FILE).is_file():
        return None
    return json.loads(Path(checkpoint, STATE_FILE).read_text())


def _tune_report(metrics: dict[str, float], checkpoint_dir: str) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


def tune_trainable(config: dict[str, Any], spec: SweepSpec) -> None:
    """The function Ray Tune runs (wrapped with ``tune.with_parameters(..., spec=spec)``)."""
    from ray import tune

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = _placement()
    checkpoint = tune.get_checkpoint()  # set when Tune retries this trial after a failure
    if checkpoint is None:
        run_trial(config, spec, record_fault=_record_fault_in_storage, context=context)
        return
    with checkpoint.as_directory() as d:  # local for a local run; downloaded from a bucket
        run_trial(config, spec, record_fault=_record_fault_in_storage, resume_from=Path(d), context=context)


def _placement() -> dict[str, Any]:
    """Where this trial runs: node, GPU(s) and worker process (views/utilization.py groups by them)."""
    import ray

    gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    return {"node": ray.get_runtime_context().get_node_id()[:12], "gpus": gpus, "worker_pid": os.getpid()}


def _record_fault_in_storage(cause: str) -> None:
    """Write ``cause`` into this trial's directory in the run's storage, where status reads it."""
    # Tune's public API names only the node-local trial directory, which is never synced back
    # when the process dies; its storage context knows the trial's place in the run's storage.
    from ray.train._internal.session import get_session

    from grpo_ray.run_dir import FAULT_FILE

    st = get_session().storage
    with st.storage_filesystem.open_output_stream(f"{st.trial_fs_path}/{FAULT_FILE}") as f:
        f.write(cause.encode() + b"\n")
