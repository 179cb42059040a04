"""One trial, top to bottom: the Ray Tune trainable (:func:`tune_trainable` -> :func:`run_trial`
-> :class:`TrialRecipe`).

    config (sampled by Optuna) -> the trial's spec -> setup(): model + LoRA, data, rewards, the
    TRL configurations that will run -> warm_up(): SFT format warm-up, held-out eval -> train():
    GRPO, reporting to Tune every few steps (rewards, format rate, completion length, group
    diagnostics, held-out accuracy, LoRA checkpoint)

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
from grpo_ray.task.rewards import FORMAT_RATE
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.compile_clock import CompileClock
from grpo_ray.trial.gpu_sampler import GpuSampler

STATE_FILE = "trial_state.json"  # in each checkpoint: the GRPO step reached and the trial's fixed metrics
EFFECTIVE_FILE = "effective_config.json"  # in each checkpoint: every TRL argument the trainers ran with


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
        self.lora: dict[str, Any] = {}  # the adapter as the model holds it (common.applied_lora)

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

    def record_lora(self, model: Any, spec: SweepSpec) -> None:
        """Record the LoRA ``model`` trains, read from its layers: the trial's rank and alpha by
        spec field, and (``lora_tensor_rank``, ``effective_config.json``) the width it trains at,
        the search's largest rank with ``lora.pad_rank``."""
        from grpo_ray.trial.common import applied_lora

        ran, self.lora = applied_lora(model, spec)
        self.ran |= ran

    def callback(self, stage: str, requested: dict[str, Any], table: dict[str, str | None]) -> Any:
        from grpo_ray.trial.common import EffectiveConfig

        return EffectiveConfig(stage, requested, table, self.check)

    def metrics(self) -> dict[str, Any]:
        # Lists (the reward weights) stay in the file: a metric is a number or a string.
        out: dict[str, Any] = {f"effective/{k}": v for k, v in self.ran.items() if not isinstance(v, list)}
        if isinstance(self.lora.get("tensor_rank"), int):
            out["lora_tensor_rank"] = self.lora["tensor_rank"]
        if self.changes:
            out["changed_by_backend"] = "; ".join(self.changes.values())
        return out

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"by_field": self.ran, "changed_by_backend": list(self.changes.values()),
                                    "lora": self.lora, "trl": self.full}, indent=1, default=str))


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


def run_trial(config: dict[str, Any], spec: SweepSpec, report: Callable[[dict[str, Any], str], None] | None = None,
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
    from grpo_ray.trial.backends import import_backend_first

    import_backend_first(trial_spec.backend, trial_spec.model.compile)  # before the guard imports transformers
    from grpo_ray.trial import warm
    from grpo_ray.trial.base import SettingChangedError
    from grpo_ray.trial.guard import TrialHungError, Watchdog

    from grpo_ray.trial.phases import PhasePoster, posting

    # Every beat is also the trial's phase on the sweep's live display (nothing outside a sweep).
    poster = PhasePoster.for_this_trial(spec.name)
    watchdog = Watchdog(trial_spec.trial.step_timeout_s, write_cause=record_fault, on_beat=poster)
    try:  # the GPU sampler (NVML, in this process: the driver may have no GPU) stops when the trial does
        with watchdog, GpuSampler() as gpu, posting(poster):
            recipe = TrialRecipe(trial_spec, spec, set(config), report or _tune_report, watchdog, resume_from,
                                 context, gpu)
            recipe.setup()
            recipe.warm_up()
            return recipe.train()
    except TrialHungError:
        warm.release()
        raise TrialHungError(watchdog.cause) from None
    except SettingChangedError:  # refused before any step of the trainer: the model is as it was
        raise
    except Exception:  # not SystemExit: Tune ends a stopped trial's thread with it, the model is fine
        warm.release()  # a failed trial may leave the model in any state: the next one loads afresh
        raise


class TrialRecipe:
    """One trial, read top to bottom (torchtune's recipe shape): :meth:`setup` (model, data,
    rewards, the configurations that will run), :meth:`warm_up` (held-out eval before SFT, SFT,
    held-out eval after it; or a retry's checkpoint), :meth:`train` (GRPO, a report to Tune every
    ``grpo.report_every`` steps through :meth:`_report_window`).

    ``trial_spec``: the spec with the sampled values; ``spec``: the sweep's own (the objective's
    reward weights); ``sampled``: the dotted paths the search chose (a backend may not change them).
    """

    def __init__(self, trial_spec: SweepSpec, spec: SweepSpec, sampled: set[str], report, watchdog,
                 resume_from: Path | None, context: dict[str, Any] | None, gpu: GpuSampler) -> None:
        self.spec, self.base_spec, self.sampled = trial_spec, spec, sampled
        self.report, self.watchdog, self.resume_from, self.context, self.gpu = report, watchdog, resume_from, context, gpu
        self.t0 = time.time()
        self.compile_clock = CompileClock()  # torch.compile's share of this trial, model load included
        self.fixed: dict[str, Any] = {}  # reported with every window and kept in checkpoints for a retry
        # Where a trial's time goes (seconds), reported with every window: set-up of each trainer,
        # held-out evaluation, and GRPO's own steps (bench/warm_sweep.py reads them).
        self.phases: dict[str, float] = {"eval_seconds": 0.0}
        self.last: dict[str, float] = {}
        self.first_step = 0

    # ------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        self._setup_model()
        self._setup_data()
        self._setup_rewards()
        self._setup_configs()

    def _setup_model(self) -> None:
        from grpo_ray.models import resolve_model
        from grpo_ray.trial import warm
        from grpo_ray.trial.common import FirstStep  # after run_trial imported the backend first

        # A warm actor's model is reused.
        self.watchdog.beat("loading the model")  # a cold one may queue for packed neighbours' engine starts
        self.model_dir = resolve_model(self.spec.model.source)
        self.backend, reused = warm.acquire(self.model_dir, self.spec)
        t_loaded = time.time()
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(self.spec.resources.cpu)))
        self.watchdog.beat("preparing the data")
        # This attempt's own timings and place; a retry reports its own, not the checkpoint's.
        self.attempt = {"trial_started_at": self.t0, "load_s": t_loaded - self.t0, "model_reused": float(reused),
                        # of load_s, the wait for packed neighbours' engine starts (trial/engine_lock.py)
                        "engine_wait_s": 0.0 if reused else float(getattr(self.backend, "engine_wait_s", 0.0))
                        } | (self.context or {})
        # When the GPU starts working for this trial: its first training step or evaluation.
        # Start-up is everything before it (model load or adapter reset, data, trainer set-up).
        self.busy = FirstStep()
        self.gpu.steps_since = lambda: self.busy.at  # its samples from here on count as "during steps"

    def _setup_data(self) -> None:
        from grpo_ray.trial import warm

        # Data and GRPO prompts depend on these alone; a warm actor's next trial gets them as they were.
        self.data_key = (self.spec.data.model_dump_json(),)
        self.data = warm.shared(("data", *self.data_key), lambda: load_datasets(self.spec.data), self.spec)
        self.fmt = template.format_of(self.spec.format)
        self.fixed["eval_size"] = float(len(self.data.eval))

    def _setup_rewards(self) -> None:
        from grpo_ray.task.rewards import RewardSet

        self.rewards = RewardSet.resolve([(r.name, r.weight) for r in self.spec.rewards],
                                         self.base_spec.reward_weights(), self.fmt, self.backend.tokenizer.eos_token)

    def _setup_configs(self) -> None:
        # The configuration that really runs: refused now, before any step, if the backend would
        # change a sampled value; recorded again by each trainer as its loop starts.
        from grpo_ray.trial.trl_args import GRPO_ARGS, SFT_ARGS

        self.effective = EffectiveRecord(self.sampled, self.backend.name)
        self.effective.record_lora(self.backend.model, self.spec)
        self.run_sft = self.spec.sft.enabled and bool(self.data.sft)
        self.sft_kwargs = (self.effective.check("SFT", *self.backend.sft_args(self.spec), SFT_ARGS)
                           if self.run_sft else {})
        self.grpo_kwargs = self.effective.check("GRPO", *self.backend.grpo_args(self.spec, self.rewards.weights),
                                                GRPO_ARGS)

    # ------------------------------------------------------------------------- warm-up (SFT)
    def warm_up(self) -> None:
        """SFT and the held-out evaluations around it; a retry loads its checkpoint instead."""
        state = _read_state(self.resume_from)
        self.first_step = int(state["step"]) if state else 0
        if state:  # a retry: SFT and the first GRPO steps are in the checkpoint's LoRA
            self.backend.load_adapter(self.resume_from)
            self.fixed |= state["fixed"] | {"resumed_from_step": self.first_step}
            self.watchdog.beat(f"loading the checkpoint of step {self.first_step}")
            return
        if self.spec.data.eval.before_sft:
            ev = self._held_out()
            self.fixed |= ev.accuracy_metrics("base_eval_accuracy") | {"base_format_rate": ev.format_rate}
        if self.run_sft:
            self._sft()
        ev = self._held_out()
        self.fixed |= ev.accuracy_metrics("sft_eval_accuracy") | {"sft_format_rate": ev.format_rate}

    def _sft(self) -> None:
        from grpo_ray.trial.common import LoopStart, lora_norm
        from grpo_ray.trial.guard import TrialGuard
        from grpo_ray.trial.trl_args import SFT_ARGS

        self.watchdog.beat("SFT: starting (a cold process compiles its first step)")
        t_sft, sft_loop, sft_clock = time.time(), LoopStart(), CompileClock()
        msgs = [template.sft_messages(e.question, e.reasoning or "", e.answer, self.fmt) for e in self.data.sft]
        self.fixed |= self.backend.sft(msgs, self.spec, [TrialGuard(self.watchdog, self.spec, "SFT"), self.busy,
                                                          sft_loop,
                                                          self.effective.callback("SFT", self.sft_kwargs, SFT_ARGS)])
        self.fixed["sft_seconds"] = time.time() - t_sft
        self.fixed["sft_setup_s"] = (sft_loop.at or t_sft) - t_sft
        self.fixed["sft_compile_s"] = sft_clock.since()[1]
        self.fixed["sft_lora_norm"] = lora_norm(self.backend.model)

    def _held_out(self):  # greedy, on the same held-out set every time
        from grpo_ray.task.evaluate import evaluate

        self.busy.mark()
        self.watchdog.beat("held-out evaluation")
        t = time.time()
        ev = evaluate(self.backend, self.data.eval, self.fmt, self.spec.data.eval.max_new_tokens)
        self.phases["eval_seconds"] += time.time() - t
        self.watchdog.beat("held-out evaluation done")
        return ev

    # -------------------------------------------------------------------------------- GRPO
    def train(self) -> dict[str, float]:
        """GRPO to grpo.max_steps (the rest of them on a retry); returns the last metrics reported."""
        from grpo_ray.trial import warm
        from grpo_ray.trial.common import LoopStart, StepReporter
        from grpo_ray.trial.guard import TrialGuard
        from grpo_ray.trial.trl_args import GRPO_ARGS

        spec, first_step = self.spec, self.first_step
        reporter = WindowReporter(spec, self.rewards.base_weights, self.rewards.logged_names, self._report_window,
                                  first_step)
        self.grpo_loop = LoopStart()
        grpo_spec, grpo_kwargs = spec, self.grpo_kwargs
        if first_step:
            if first_step >= spec.grpo.max_steps:  # it died after its last report: nothing left to do
                return {}
            # The rest of the steps, with a fresh optimizer and learning-rate schedule, on a shuffle
            # other than the first attempt's (the same seed would replay its first prompts).
            grpo_spec = apply_overrides(spec, {"grpo.max_steps": spec.grpo.max_steps - first_step,
                                               "grpo.seed": spec.grpo.seed + first_step})
            grpo_kwargs = self.backend.grpo_args(grpo_spec, self.rewards.weights)[0]
        self.eval_before_grpo = self.phases["eval_seconds"]
        rows_key = ("grpo_rows", *self.data_key, self.model_dir, spec.format.model_dump_json(), spec.model.add_bos,
                    spec.grpo.max_prompt_length)
        rows = warm.shared(rows_key, lambda: grpo_rows(self.data, self.backend.tokenizer, grpo_spec), spec)
        callbacks = [TrialGuard(self.watchdog, spec, "GRPO", first_step), StepReporter(reporter.on_step), self.busy,
                     self.grpo_loop, self.effective.callback("GRPO", grpo_kwargs, GRPO_ARGS)]
        self.watchdog.beat("GRPO: starting (a cold process compiles its first steps)")
        self.t_grpo = time.time()
        self.backend.grpo(rows, self.rewards.funcs, self.rewards.weights, grpo_spec, callbacks)
        reporter.flush(reporter.step)  # a run that ended before max_steps reports its last window too
        return dict(self.last)

    def _report_window(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluate, then report the window's metrics and a LoRA checkpoint to Tune."""
        import torch

        ev = self._held_out()
        if self.grpo_loop.at is not None:  # the steps' own time: the loop's, less the evaluations in it
            steps = max(step - self.first_step, 1)
            self.phases["grpo_setup_s"] = self.grpo_loop.at - self.t_grpo
            self.phases["grpo_step_s"] = (time.time() - self.grpo_loop.at
                                          - (self.phases["eval_seconds"] - self.eval_before_grpo)) / steps
        graphs, compile_s = self.compile_clock.since()
        metrics |= self.fixed | self.attempt | self.busy.metrics(self.t0) | self.phases | self.gpu.metrics() | {
            "compiled_graphs": float(graphs),
            "compile_s": compile_s,
            "step": step,
            **ev.accuracy_metrics("eval_accuracy"),
            "eval_format_rate": ev.format_rate,
            **self.effective.metrics(),
            "elapsed_s": time.time() - self.t0,
            "reported_at": time.time(),  # the trial's last report is its end (bench and report: utilization)
        }
        if torch.cuda.is_available():  # vLLM's KV cache lives in torch's allocator too (Unsloth)
            metrics["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with tempfile.TemporaryDirectory(prefix="grpo-ray-ckpt-") as d:
            self.backend.save_adapter(Path(d))
            Path(d, STATE_FILE).write_text(json.dumps({"step": step, "fixed": self.fixed}))
            self.effective.write(Path(d, EFFECTIVE_FILE))
            self.report(metrics, d)
        self.last.clear()
        self.last.update(metrics)


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
