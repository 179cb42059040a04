"""The spec -> TRL table: every TRL argument a trial sets, with the spec field it comes from; the
SFTConfig and GRPOConfig arguments built from it; and the check of what a backend's trainer then
really ran with (``effective_settings``), which refuses a change to a sampled value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.base import SettingChangedError

# --------------------------------------------------------------------------- the spec -> TRL table
# Every TRL argument a trial sets, with the spec field it comes from: the arguments are built
# from it, and what a backend's trainer then ran with is compared with it field by field
# (effective_settings). None: a setting of ours, not the user's (no spec field to name).
SFT_ARGS: dict[str, str | None] = {
    "max_steps": "sft.max_steps", "learning_rate": "sft.learning_rate",
    "per_device_train_batch_size": "sft.batch_size",
    "gradient_accumulation_steps": "sft.gradient_accumulation_steps", "warmup_steps": "sft.warmup_steps",
    "weight_decay": "sft.weight_decay", "max_length": "sft.max_length", "optim": "grpo.optim",
    "lr_scheduler_type": None,
}
GRPO_ARGS: dict[str, str | None] = {
    "max_steps": "grpo.max_steps", "learning_rate": "grpo.learning_rate",
    "num_generations": "grpo.num_generations",
    "per_device_train_batch_size": "grpo.batch_size",  # x num_generations: whole groups (SPEC_UNITS)
    "gradient_accumulation_steps": "grpo.gradient_accumulation_steps",
    "max_completion_length": "grpo.max_completion_length", "temperature": "grpo.temperature",
    "top_p": "grpo.top_p", "top_k": "grpo.top_k", "min_p": "grpo.min_p", "beta": "grpo.beta",
    "weight_decay": "grpo.weight_decay", "warmup_steps": "grpo.warmup_ratio",
    "lr_scheduler_type": "grpo.lr_scheduler_type", "optim": "grpo.optim",
    "loss_type": "grpo.loss_type", "importance_sampling_level": "grpo.importance_sampling_level",
    "scale_rewards": "grpo.scale_rewards", "epsilon": "grpo.epsilon", "epsilon_high": "grpo.epsilon_high",
    "num_iterations": "grpo.num_iterations", "mask_truncated_completions": "grpo.mask_truncated_completions",
    "vllm_importance_sampling_correction": "grpo.vllm_importance_sampling_correction",
    "reward_weights": "rewards", "log_completions": None,
}
# Spec fields whose TRL argument is in other units: (TRL value, TRL config) -> the field's value.
SPEC_UNITS: dict[str, Callable[[Any, Any], Any]] = {
    "grpo.batch_size": lambda v, args: v // args.num_generations,  # prompts, not completions
}
# Spec fields a backend may keep under another argument: how to read the value that applies.
# Unsloth's SFT trainer truncates in its own dataset preparation: it moves max_length to its
# max_seq_length and sets max_length to None (unsloth/models/rl.py, 2026.10.7).
EFFECTIVE_READERS: dict[str, Callable[[Any], Any]] = {
    "sft.max_length": lambda args: args.max_length if args.max_length is not None
    else getattr(args, "max_seq_length", None),
}
COMMON_ARGS: dict[str, str | None] = {
    "gradient_checkpointing": "lora.gradient_checkpointing", "seed": "grpo.seed", "bf16": None,
    "report_to": None, "save_strategy": None, "logging_steps": None, "disable_tqdm": None,
    "dataloader_num_workers": None,
}


def _common_args(spec: SweepSpec) -> dict[str, Any]:
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {
        # TRL turns it on by default; false must reach the trainer too, or it would enable it again.
        # Any other setting is checkpointing on either backend (see gradient_checkpointing()).
        "gradient_checkpointing": spec.lora.gradient_checkpointing is not False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "bf16": bf16,
        "seed": spec.grpo.seed,
        "dataloader_num_workers": 0,
    }


def sft_config_kwargs(spec: SweepSpec) -> dict[str, Any]:
    s = spec.sft
    return _common_args(spec) | {
        "max_steps": s.max_steps,
        "learning_rate": s.learning_rate,
        "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "warmup_steps": s.warmup_steps,
        "weight_decay": s.weight_decay,
        "max_length": s.max_length or spec.model.max_seq_length,
        "optim": spec.grpo.optim,
        "lr_scheduler_type": "linear",
    }


def grpo_config_kwargs(spec: SweepSpec, reward_weights: list[float]) -> dict[str, Any]:
    g = spec.grpo
    return _common_args(spec) | {
        "max_steps": g.max_steps,
        "learning_rate": g.learning_rate,
        "num_generations": g.num_generations,
        # One GRPO group per prompt: the batch must hold whole groups.
        "per_device_train_batch_size": g.batch_size * g.num_generations,
        "gradient_accumulation_steps": g.gradient_accumulation_steps,
        "max_completion_length": g.max_completion_length,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "min_p": g.min_p or None,
        "beta": g.beta,
        "weight_decay": g.weight_decay,
        "warmup_steps": g.warmup_ratio,  # transformers 5: a float below 1 is a ratio of max_steps
        "lr_scheduler_type": g.lr_scheduler_type,
        "optim": g.optim,
        "reward_weights": reward_weights,
        "log_completions": False,
        # The algorithm, every field explicit: Unsloth rewrites the ones left unset (None), and a
        # value passed is one the trial can check it ran with (effective_settings).
        "loss_type": g.loss_type,
        "importance_sampling_level": g.importance_sampling_level,
        "scale_rewards": g.scale_rewards,
        "epsilon": g.epsilon,
        "epsilon_high": g.effective_epsilon_high(),
        "num_iterations": g.num_iterations,
        "mask_truncated_completions": g.mask_truncated_completions,
        "vllm_importance_sampling_correction": g.vllm_importance_sampling_correction,
    }


@dataclass(frozen=True)
class Change:
    """One TRL argument a backend's trainer ran with a value other than the one passed."""

    argument: str
    field: str  # the spec field it comes from
    asked: Any
    ran: Any

    def describe(self) -> str:
        return f"{self.field}: asked {self.asked!r}, ran {self.ran!r}"


def _plain(v: Any) -> Any:
    """A TRL argument's value as JSON: enums by their value, lists element-wise, anything else as text."""
    v = getattr(v, "value", v)  # SchedulerType, OptimizerNames...
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def effective_settings(args: Any, requested: dict[str, Any], table: dict[str, str | None]
                       ) -> tuple[dict[str, Any], list[Change]]:
    """What a trainer's ``args`` (a TRL config, after Unsloth and TRL's ``__post_init__``) holds for
    every argument in ``requested`` that comes from a spec field: ``({spec field: value ran},
    [every change from what was asked])``. Our own settings (``None`` in the table) are left to
    the full record (:func:`trl_args_dict`): TRL respells some of them (``report_to``).

    >>> from types import SimpleNamespace
    >>> ran, changes = effective_settings(SimpleNamespace(loss_type="dr_grpo", scale_rewards="none"),
    ...     {"loss_type": "dr_grpo", "scale_rewards": "group"}, GRPO_ARGS)
    >>> ran, [c.describe() for c in changes]
    ({'grpo.loss_type': 'dr_grpo', 'grpo.scale_rewards': 'none'}, ["grpo.scale_rewards: asked 'group', ran 'none'"])
    """
    table = COMMON_ARGS | table
    ran: dict[str, Any] = {}
    changes: list[Change] = []
    for arg, asked in requested.items():
        if arg not in table or not hasattr(args, arg):
            continue
        field = table[arg]
        if field is None:  # a setting of ours (report_to, logging...): in the full record only
            continue
        value = _plain(EFFECTIVE_READERS[field](args) if field in EFFECTIVE_READERS else getattr(args, arg))
        if arg == "scale_rewards":  # TRL's own spellings of the same setting
            value = {True: "group", False: "none"}.get(value, value)
        if not _same(_plain(asked), value):
            changes.append(Change(arg, field, _plain(asked), value))
        ran[field] = SPEC_UNITS[field](value, args) if field in SPEC_UNITS else value
    return ran, changes


def refuse_sampled_changes(changes: list[Change], sampled: set[str], backend: str, stage: str) -> None:
    """Raise :class:`SettingChangedError` for a change to a value the search sampled (``sampled``:
    its dotted paths); other changes are the backend's defaults, recorded by the trial."""
    bad = [c for c in changes if c.field in sampled]
    if bad:
        c = bad[0]
        raise SettingChangedError(
            f"{c.field}: the search sampled {c.asked!r} but the {backend} backend's {stage} trainer ran "
            f"{c.ran!r} (it rewrites this setting in this combination of values); a result for a configuration "
            f"that never ran would mislead the search. Take {c.field} out of search.space, or set it to "
            f"{c.ran!r} where it is combined with the values that make the backend change it")


def trl_args_dict(args: Any) -> dict[str, Any]:
    """Every argument of a TRL config as JSON (tokens redacted by transformers' ``to_dict``)."""
    out = {k: _plain(v) for k, v in args.to_dict().items()}
    sampling = getattr(args, "vllm_sampling_params", None)  # Unsloth's, outside the dataclass fields
    if sampling is not None:
        out["vllm_sampling_params"] = str(sampling)
    return out




# --------------------------------------------------------------------------- the spec -> vLLM engine
def engine_compile_kwargs(spec: SweepSpec) -> dict[str, Any]:
    """Unsloth ``from_pretrained`` arguments for vLLM's engine from ``model.compile``.

    Compiled (the default) passes nothing: Unsloth's own choice, a torch.compile'd engine
    (``compilation_config=3``). Eager needs both arguments: ``enforce_eager`` alone turns CUDA
    graphs off, but vLLM still compiles the model at the level Unsloth sets explicitly.

    >>> from grpo_ray.config.spec import SweepSpec
    >>> engine_compile_kwargs(SweepSpec(name="x"))
    {}
    >>> engine_compile_kwargs(SweepSpec(name="x", model={"compile": False}))
    {'enforce_eager': True, 'compilation_config': 0}
    """
    return {} if spec.model.compile else {"enforce_eager": True, "compilation_config": 0}
