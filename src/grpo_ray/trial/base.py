"""The small interface every trial backend implements (the choice between them: backends.py).

A backend owns the model: loading it with a LoRA adapter of the trial's rank, the SFT
warm-up, GRPO, greedy generation for evaluation, and saving the adapter. The trial
(:mod:`grpo_ray.trial.run`) owns the order of those steps and the reporting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from grpo_ray.config.spec import SweepSpec

# Called after each GRPO optimizer step with (step, TRL's logged metrics); see common.StepReporter.
StepCallback = Callable[[int, dict[str, float]], None]


class Backend(Protocol):
    name: str
    tokenizer: Any

    def load(self, model_dir: str, spec: SweepSpec) -> None: ...  # the base model, then new_adapter(spec)

    # A fresh LoRA for ``spec`` (rank, alpha, dropout, targets), initialised from its seed; the
    # one before it is dropped. A warm actor's next trial starts here (trial/warm.py).
    def new_adapter(self, spec: SweepSpec) -> None: ...

    # The TRL config each trainer will get, and the keyword arguments it was built from: a
    # trial checks, before it trains, that the backend keeps what the search sampled (Unsloth's
    # patched config classes rewrite some GRPO arguments as they are built).
    def sft_args(self, spec: SweepSpec) -> tuple[dict[str, Any], Any]: ...

    def grpo_args(self, spec: SweepSpec, reward_weights: list[float]) -> tuple[dict[str, Any], Any]: ...

    # ``callbacks``: transformers TrainerCallbacks the trial hands to the trainer (progress
    # reporting, the NaN and hang guards); the backend passes them on unchanged.
    def sft(self, messages: list[list[dict[str, str]]], spec: SweepSpec, callbacks: list[Any]) -> dict[str, float]: ...

    def grpo(
        self,
        rows: list[dict[str, Any]],
        reward_funcs: list[Callable[..., list[float]]],
        reward_weights: list[float],
        spec: SweepSpec,
        callbacks: list[Any],
    ) -> None: ...

    def generate(self, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]: ...

    def load_adapter(self, adapter_dir: Path) -> None: ...  # a checkpoint's LoRA (a retried trial)

    def save_adapter(self, out_dir: Path) -> None: ...


class SettingChangedError(ValueError):
    """A backend's trainer ran with another value than the trial sampled (trial/trl_args.py
    refuse_sampled_changes): the search would be told a result for a configuration that never
    ran. Deterministic: a retry changes nothing (sweep/search.py fails it at once)."""


class BackendError(RuntimeError):
    """A backend that cannot run here (missing packages, no GPU): says what to install or set."""
