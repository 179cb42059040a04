"""The sweep spec: the YAML a user writes, validated with pydantic. The single source of truth.

Every field is declared here with its default (the defaults follow Unsloth's GRPO tutorial)
and a description. Unknown keys are errors. ``load_spec`` turns YAML syntax errors and
validation errors into a :class:`SpecError` that names the file, the line and the field.

A trial's configuration is the spec with the sampled search-space values applied at their
dotted paths (``lora.rank``, ``grpo.temperature``, ``rewards.check_answer.weight``), validated
again, so a trial can never run a configuration the spec would have refused.

This module must not import torch, ray or trl: ``grpo-ray validate`` answers in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo_ray import template


class SpecError(ValueError):
    """A user error in a spec: carries the file, line and field so the CLI can print one line."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = file or "<spec>"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: " + (f"{field}: " if field else "")
        super().__init__(prefix + message)


class _FieldError(ValueError):
    """A cross-field check's error that belongs to one dotted field (so the error names its line)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model & format
class ModelSpec(_Strict):
    """The base model every trial fine-tunes.

    Parameters that choose the model: ``source``. Parameters that size it in memory:
    ``max_seq_length``, ``gpu_memory_utilization``, ``load_in_4bit``. Parameters of its
    prompts: ``add_bos``.
    """

    source: str = Field(
        "unsloth/Qwen3-1.7B-Base",
        description="The base model: a Hub name, a local HF directory, a .gguf file, or 'builtin:tiny-qwen3' (a "
        "tiny random Qwen3 for tests on CPU). The default is the tutorial recipe's base (sweeps/rewards.yaml).",
    )
    max_seq_length: int = Field(
        2048, gt=0, description="Longest prompt + completion, in tokens; grpo.max_prompt_length + "
        "grpo.max_completion_length must fit in it. Higher: longer reasoning, more GPU memory (vLLM's KV cache "
        "and the activations). The tutorial's: 2048.")
    gpu_memory_utilization: float = Field(
        0.7, gt=0, le=1, description="vLLM's share of the trial's GPU memory (unsloth backend); with trials packed "
        "on a GPU (resources.gpu below 1) the share of the trial's slice: 0.7 at gpu 0.5 reserves 35% of the card. "
        "Higher: a larger KV cache (faster generation), less memory left for training. The tutorial's: 0.7.")
    load_in_4bit: bool = Field(
        False, description="Load the base weights in 4 bits (QLoRA; unsloth backend): about a quarter of the "
        "weights' memory, slightly less accurate and slower steps. The tutorial's: false (16-bit LoRA).")
    add_bos: Literal["auto", "always", "never"] = Field(
        "auto", description="Put BOS in front of every prompt; auto = when the tokenizer has one (Gemma needs it)."
    )


class FormatSpec(_Strict):
    """The reasoning format the model learns and the rewards check (defaults: the tutorial's).

    Parameters of the prompt: ``system_prompt``. The tags of a completion:
    ``reasoning_start`` ... ``reasoning_end``, then ``solution_start`` answer ``solution_end``.
    """

    system_prompt: str = Field(
        template.DEFAULT_SYSTEM_PROMPT, description="System prompt put before every problem (SFT, GRPO and "
        "evaluation); it should name the four tags. The tutorial's, with its tags filled in.")
    reasoning_start: str = Field(
        template.REASONING_START, description="Tag that opens the reasoning; every generation prompt ends with it, "
        "so completions start inside the reasoning. The tutorial's: <think>.")
    reasoning_end: str = Field(
        template.REASONING_END, description="Tag that closes the reasoning. The tutorial's: </think>.")
    solution_start: str = Field(
        template.SOLUTION_START, description="Tag that opens the answer the rewards and evaluation parse. The "
        "tutorial's: <SOLUTION>.")
    solution_end: str = Field(
        template.SOLUTION_END, description="Tag that closes the answer. The tutorial's: </SOLUTION>.")

    def to_format(self) -> template.Format:
        return template.Format(**self.model_dump())


# --------------------------------------------------------------------------- data
class Columns(_Strict):
    """Which columns of a data set hold what: the problem, its answer, worked reasoning, its kind."""

    question: str = Field("question", description="Column holding the problem text.")
    answer: str = Field("answer", description="Column holding the reference answer.")
    reasoning: str | None = Field(None, description="Column with worked reasoning (SFT only; SFT rows without it "
                                  "are dropped).")
    kind: str | None = Field(None, description="Column naming each problem's kind (eval set only): held-out "
                             "accuracy is then also reported per kind, as eval_accuracy/<kind>.")


class DatasetSpec(_Strict):
    """One data set. Where it comes from: ``source``, ``subset``, ``split``. How its rows are read:
    ``columns``. Which rows are kept: ``numeric_only``, ``limit``."""

    source: str = Field(description="Hub dataset name, a local .jsonl/.json/.parquet/.csv file, or "
                        "'builtin:math_mini' (a small offline math set).")
    subset: str | None = Field(None, description="Hub config name (e.g. 'en'); null: the data set's default.")
    split: str = Field("train", description="Hub split to load (e.g. 'train', 'cot'); local files are read whole.")
    columns: Columns = Field(Columns(), description="Column names of the problem, its answer and its reasoning.")
    numeric_only: bool = Field(
        True, description="Keep rows whose answer parses as a number (the check_answer and check_numbers rewards "
        "and the held-out accuracy compare numbers). The tutorial's: true.")
    limit: int | None = Field(
        None, gt=0, description="Use at most this many rows (after filtering and the held-out split); null: all. "
        "Lower: faster data loading and start-up, fewer distinct problems.")


class EvalSpec(_Strict):
    """The held-out evaluation (greedy, exact numeric match; not in the tutorial).

    Parameters that choose the problems: ``source``, ``size``. Parameters of the generation:
    ``max_new_tokens``. When it runs: after SFT, every grpo.report_every steps, and ``before_sft``.
    """

    source: DatasetSpec | None = Field(None, description="A separate eval set; default: held out from the GRPO set.")
    size: int = Field(
        100, gt=0, description="Held-out problems scored after each report window (the same ones for every trial). "
        "Higher: a less noisy eval_accuracy, longer evaluations.")
    max_new_tokens: int = Field(
        256, gt=0, description="Tokens each greedy evaluation answer may run to. Higher: long reasoning is not cut "
        "(a cut answer scores 0), slower evaluations; near grpo.max_completion_length measures what GRPO trains.")
    before_sft: bool = Field(False, description="Also score the base model before the SFT warm-up.")


class DataSpec(_Strict):
    """The data (defaults: the tutorial's sets). The training sets: ``sft`` (the format warm-up)
    and ``grpo``. The held-out evaluation: ``eval``. Their shuffling and split: ``seed``."""

    sft: DatasetSpec | None = Field(
        DatasetSpec(
            source="unsloth/OpenMathReasoning-mini",
            split="cot",
            columns=Columns(question="problem", answer="expected_answer", reasoning="generated_solution"),
            limit=None,
        ),
        description="The SFT format warm-up's set: problems with worked reasoning (columns.reasoning); null: no SFT. "
        "The tutorial's: unsloth/OpenMathReasoning-mini, split cot.",
    )
    grpo: DatasetSpec = Field(
        DatasetSpec(
            source="open-r1/DAPO-Math-17k-Processed", subset="en", columns=Columns(question="prompt", answer="solution")
        ),
        description="The GRPO set: problems with reference answers; the eval set is held out from it unless "
        "eval.source is given. The tutorial's: open-r1/DAPO-Math-17k-Processed, subset en.",
    )
    eval: EvalSpec = Field(EvalSpec(), description="The held-out evaluation.")
    seed: int = Field(3407, description="Shuffle and held-out split seed (same for every trial).")


# --------------------------------------------------------------------------- training
class RewardSpec(_Strict):
    """One reward function of GRPO and its weight in the summed reward."""

    name: str = Field(description="A builtin reward (match_format_exactly, match_format_approximately, "
                      "check_answer, check_numbers) or an import path 'package.module:function' with TRL's reward "
                      "signature. Searchable weight: rewards.<name>.weight.")
    weight: float = Field(
        1.0, description="Multiplies this reward in the total GRPO maximises (TRL's reward_weights). Higher: the "
        "policy favours what this reward checks over the others. The tutorial's: 1.0 for each.")


def _default_rewards() -> list[RewardSpec]:
    names = ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers"]
    return [RewardSpec(name=n) for n in names]


class LoraSpec(_Strict):
    """The LoRA adapter trained in both stages.

    Parameters that size the adapter: ``rank``, ``alpha``, ``target_modules``. Regularisation:
    ``dropout``. Memory: ``gradient_checkpointing``.
    """

    rank: int = Field(
        32, gt=0, description="LoRA rank r: the width of each adapter matrix. Higher: more capacity, more memory "
        "and slower steps (vLLM reserves LoRA slots for the largest rank a trial can sample). The tutorial's: 32.")
    alpha: int | None = Field(
        None, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / rank). Higher: larger "
        "updates at the same learning rate. Default (null): 2 x rank, as the tutorial.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input, a share in [0, 1). Higher: more "
        "regularisation, slower learning. The tutorial's: 0 (Unsloth's fast path).")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get an adapter. Fewer: less memory and fewer trainable parameters, less "
        "capacity. The tutorial's: every attention and MLP projection (the default).")
    gradient_checkpointing: Literal["unsloth", True, False] = Field(
        "unsloth", description="Recompute activations in the backward pass instead of keeping them: less GPU "
        "memory, slower steps. unsloth: Unsloth's offloaded checkpointing (the tutorial's "
        "use_gradient_checkpointing='unsloth'; plain checkpointing, TRL's default, on the hf backend); true: "
        "plain; false: none, the fastest steps where the activations fit (a small model on a large GPU).")


class SftSpec(_Strict):
    """The SFT format warm-up before GRPO (TRL's SFTTrainer), which teaches the tags.

    Parameters that control the length of training: ``enabled``, ``max_steps``. The optimizer:
    ``learning_rate``, ``warmup_steps``, ``weight_decay`` (and grpo.optim). The batch: ``batch_size``,
    ``gradient_accumulation_steps``, ``max_length``.
    """

    enabled: bool = Field(
        True, description="Run the SFT warm-up (also needs data.sft); false: GRPO starts from the base model, which "
        "then has to find the format by itself.")
    max_steps: int = Field(
        60, gt=0, description="SFT optimizer steps. Higher: a firmer format, more time and a risk of "
        "overfitting the small SFT set.")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate (linear decay after the warm-up). Higher: faster, less stable "
        "learning. The tutorial's: 2e-4.")
    batch_size: int = Field(
        1, gt=0, description="Examples per step per device. Higher: smoother gradients, more memory. The "
        "tutorial's: 1.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Batches summed into one optimizer step: an effective batch of batch_size x this "
        "without the memory. Higher: smoother, slower steps. The tutorial's: 1.")
    max_length: int | None = Field(
        None, gt=0, description="Longest SFT example, in tokens (longer ones are truncated). Default: the model's "
        "max_seq_length.")
    warmup_steps: int = Field(
        5, ge=0, description="Steps of linear learning-rate warm-up from 0. The tutorial's: 5.")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay. Higher: stronger pull of the weights toward 0. The tutorial's: "
        "0.01.")


class GrpoSpec(_Strict):
    """GRPO (TRL's GRPOTrainer), grouped like TRL's GRPOConfig.

    Parameters that control the length of training: ``max_steps``, ``report_every``.
    Parameters of the optimizer: ``learning_rate``, ``weight_decay``, ``warmup_ratio``,
    ``lr_scheduler_type``, ``optim``, ``seed``. Parameters of the batch and the data:
    ``num_generations``, ``batch_size``, ``gradient_accumulation_steps``, ``max_prompt_length``.
    Parameters that control the generation: ``max_completion_length``, ``temperature``, ``min_p``,
    ``top_p``, ``top_k``. Parameters of the GRPO algorithm: ``beta``, ``loss_type``,
    ``importance_sampling_level``, ``scale_rewards``, ``epsilon``, ``epsilon_high``,
    ``num_iterations``, ``mask_truncated_completions``, ``vllm_importance_sampling_correction``
    (see docs/grpo_variants.md).
    """

    max_steps: int = Field(
        100, gt=0, description="GRPO optimizer steps per trial (early stopping's time axis). Higher: more learning, "
        "proportionally more time. The tutorial's: 100.")
    learning_rate: float = Field(
        5e-6, gt=0, description="Peak learning rate. Higher: faster learning, a risk of collapsing the policy. The "
        "tutorial's: 5e-6.")
    num_generations: int = Field(
        4, ge=2, description="Completions per prompt (the GRPO group): advantages compare a completion with its "
        "group. Higher: better advantage estimates, more generation time and memory. The tutorial's: 4.")
    batch_size: int = Field(
        1, gt=0, description="Prompts per step per device (TRL's per_device_train_batch_size is this x "
        "num_generations). Higher: smoother gradients, more memory. The tutorial's: 1.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Batches summed into one optimizer step. Higher: smoother, slower steps at the same "
        "memory. The tutorial's: 1.")
    max_prompt_length: int = Field(
        512, gt=0, description="Longest prompt, in tokens; longer prompts are dropped from the GRPO set. "
        "With max_completion_length it must fit in model.max_seq_length.")
    max_completion_length: int = Field(
        1024, gt=0, description="Tokens each GRPO completion may run to (longer ones are cut). Higher: room for "
        "long reasoning, more generation time and memory.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the GRPO completions. Higher: more diverse groups (more "
        "signal), more noise. The tutorial's: 1.0.")
    min_p: float = Field(
        0.1, ge=0, le=1, description="Drop tokens whose probability is below this share of the likeliest one's; "
        "0 disables. Higher: safer, less diverse completions. The tutorial's: 0.1.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep the likeliest tokens up to this total probability; "
        "1.0 disables. The tutorial's: 1.0.")
    top_k: int = Field(-1, description="Keep only the k likeliest tokens; -1 disables top-k, as the tutorial.")
    beta: float = Field(
        0.0, ge=0, description="KL coefficient: penalty on drifting from the reference model; 0 loads no reference "
        "model. Higher: a more conservative policy, more memory. The tutorial's: 0.0.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay. The tutorial's: 0.01.")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of max_steps spent warming the learning rate up from 0. The "
        "tutorial's: 0.1.")
    lr_scheduler_type: str = Field(
        "linear", description="Learning-rate schedule after the warm-up (a transformers scheduler name: linear, "
        "cosine, constant, ...). The tutorial's: linear.")
    optim: str = Field(
        "adamw_torch", description="Optimizer of both stages (a transformers optim name). The tutorial's: "
        "adamw_8bit, GPU only, with less optimizer memory; the default adamw_torch runs anywhere.")
    seed: int = Field(
        3407, description="Training seed of both stages (LoRA init, sampling, data order); the tutorial's: 3407. "
        "Searching it ({choice: [1, 2, 3]}) measures seed noise.")
    report_every: int = Field(
        5, gt=0, description="Steps between reports to Tune (and eval runs). Lower: finer curves and early "
        "stopping, more time spent evaluating.")

    # --- the GRPO algorithm. Defaults: what the Unsloth tutorial's trainer really ran with
    # (TRL 1.15 + Unsloth 2026.10.7: an unset loss_type becomes TRL's dapo, an unset beta 0.0,
    # and the vLLM importance-sampling correction is switched off; see docs/grpo_variants.md).
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="How token losses are aggregated (TRL's GRPOConfig.loss_type). dapo: normalised by "
        "the active tokens of the whole accumulated batch (DAPO, arXiv 2503.14476; the tutorial's); grpo: per "
        "sequence, then averaged (the original GRPO, DeepSeekMath; biased toward short correct answers); "
        "dr_grpo: by a constant, max_completion_length (Dr. GRPO, arXiv 2503.20783); bnpo: by the active tokens "
        "of the local batch; cispo: clips the importance weights, not the update (MiniMax-M1, arXiv 2506.13585); "
        "sapo: a soft, temperature-controlled gate instead of clipping (arXiv 2511.20347); luspo: GSPO scaled by "
        "length, needs importance_sampling_level: sequence (arXiv 2602.05261); vespo: a smooth Gamma weighting of "
        "sequence-level weights, needs importance_sampling_level: token (arXiv 2602.10693).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: one importance ratio per token (GRPO, the tutorial's); sequence: one per "
        "completion, the mean of its tokens' log-ratios (GSPO, arXiv 2507.18071; with loss_type: grpo, as the "
        "paper).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="How advantages are scaled: group: by each group's reward std (GRPO, the tutorial's); "
        "batch: by the whole batch's std (PPO-Lite, arXiv 2508.08221); none: not at all (Dr. GRPO: the std "
        "favours too easy and too hard questions). Unsloth turns group off for loss_type: dr_grpo (a trial that "
        "sampled both fails with that message; a default left alone is recorded as changed).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping bound of the ratio: 1 - epsilon (PPO, the "
                           "tutorial's 0.2).")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clipping bound: 1 + epsilon_high. null: epsilon (the tutorial's), or 5.0 with "
        "loss_type: cispo, where it caps the importance weight itself (ScaleRL, arXiv 2510.13786, uses 4-8). DAPO's "
        "clip-higher uses 0.28.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each generated batch (mu in the GRPO "
                                "paper); above 1 the ratio and clipping start to matter. The tutorial's: 1.")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO's overlong "
        "filtering). The tutorial's: false.")
    vllm_importance_sampling_correction: bool = Field(
        False, description="Correct for vLLM's sampling probabilities differing from the trainer's (truncated "
        "importance sampling, TRL's default sequence_mask mode; unsloth backend only: the hf backend samples with "
        "the trained model itself). The tutorial's: false (Unsloth's default).")

    def effective_epsilon_high(self) -> float:
        """The upper clipping bound a trial runs with (``epsilon_high`` resolved)."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 5.0 if self.loss_type == "cispo" else self.epsilon

    @model_validator(mode="after")
    def _check_variant(self) -> "GrpoSpec":
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise _FieldError("grpo.importance_sampling_level", "loss_type luspo is a sequence-level loss: set "
                              "grpo.importance_sampling_level: sequence, or choose another loss_type")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise _FieldError("grpo.importance_sampling_level", "loss_type vespo computes sequence weights itself: "
                              "set grpo.importance_sampling_level: token")
        if self.loss_type == "cispo" and self.effective_epsilon_high() < 1:
            raise _FieldError("grpo.epsilon_high", f"{self.epsilon_high} caps every importance weight below 1 with "
                              "loss_type cispo (the cap is epsilon_high itself, not 1 + epsilon_high); use 4-8, or "
                              "null for 5.0")
        return self


# --------------------------------------------------------------------------- search
class Choice(_Strict):
    """``{choice: [8, 16, 32]}``: one of the listed values (any YAML values)."""

    choice: list[Any] = Field(min_length=1, description="The values a trial can get; every one is validated at "
                              "the path when the spec loads.")


class Uniform(_Strict):
    """``{uniform: [0.7, 1.2]}``: a float drawn evenly between low and high."""

    uniform: tuple[float, float] = Field(description="[low, high], low < high; both ends are validated at the path.")


class LogUniform(_Strict):
    """``{loguniform: [1.0e-6, 2.0e-5]}``: a float drawn evenly on a log scale (learning rates)."""

    loguniform: tuple[float, float] = Field(description="[low, high], 0 < low < high; both ends are validated at "
                                            "the path.")


class IntRange(_Strict):
    """``{int: [50, 200]}``: an integer between low and high, both included."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # The YAML key is `int`; the attribute can't be, or it would shadow the type in this class.
    int_: tuple[int, int] = Field(alias="int", description="Inclusive integer range [low, high].")


Domain = Union[Choice, Uniform, LogUniform, IntRange]


class Objective(_Strict):
    """One objective of the search: a metric each trial reports and its direction."""

    metric: Literal["reward", "eval_accuracy", "format_rate", "reward_weighted", "eval_format_rate"] = Field(
        description="reward: the sum of each reward's mean weighted by the spec's own weights (comparable across "
        "trials); eval_accuracy: held-out exact-answer share; format_rate: share of GRPO completions in the exact "
        "format; reward_weighted: the total with the trial's sampled weights; eval_format_rate: the format share on "
        "the held-out set.")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better.")


# Metrics every trial reports at each window (trial/run.py) that early stopping can judge by.
ReportedMetric = Literal["reward", "eval_accuracy", "format_rate", "reward_weighted", "eval_format_rate",
                         "completion_length", "zero_std_groups", "truncated_rate", "clip_ratio", "kl", "entropy"]


class EarlyStopping(_Strict):
    """ASHA (Ray Tune's ASHAScheduler): at each rung, a trial below the top 1/reduction_factor stops.

    Time is the GRPO step a trial reports (``step``): rungs sit at grace_period x
    reduction_factor^k steps and are judged at the first report at or after them.
    """

    type: Literal["asha"] = Field("asha", description="The scheduler; only asha (asynchronous successive halving).")
    metric: ReportedMetric = Field("reward", description="The reported metric the rungs compare.")
    mode: Literal["max", "min"] = Field("max", description="max: a higher metric survives; min: a lower one.")
    grace_period: int | None = Field(
        None, gt=0, description="GRPO steps every trial runs before it can be stopped; default: grpo.report_every."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="Keep the top 1/reduction_factor at each rung. Higher: more trials stopped sooner, "
        "more risk of stopping a slow starter.")
    max_t: int | None = Field(
        None, gt=0, description="Steps that bound the rungs; default (and minimum): the largest grpo.max_steps a "
        "trial can run."
    )


class SearchSpec(_Strict):
    """The search (Ray Tune + Optuna).

    Parameters of the sampler: ``sampler``, ``seed``, ``startup_trials``, ``study_storage``,
    ``warm_start``. What is searched and judged: ``space``, ``objectives``, ``baseline_first``.
    How many trials and how they run: ``num_samples``, ``max_concurrent_trials``, ``max_failures``,
    ``early_stopping``.
    """

    sampler: Literal["tpe", "nsga2", "random", "gp", "grid"] = Field(
        "tpe", description="Optuna's sampler. tpe: models the results (multivariate TPE); nsga2: evolutionary, for "
        "several objectives; random; gp: Gaussian process; grid: every combination of the space's choices once "
        "(every domain a choice or an int range; num_samples at most the number of combinations), e.g. one "
        "configuration on several seeds: space: {grpo.seed: {choice: [1, 2, 3]}}.")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="reward"), Objective(metric="eval_accuracy")], min_length=1,
        description="What the search optimises: one objective, or several (then the best trials form a Pareto "
        "front). Default: the mean reward and the held-out accuracy, both maximised."
    )
    num_samples: int = Field(
        40, gt=0, description="Trials in the sweep (baseline included). Higher: a better search, proportionally "
        "more GPU time.")
    max_concurrent_trials: Union[int, Literal["auto"]] = Field(
        "auto", description="Trials running at once. auto: as many as the cluster holds at resources.gpu per trial "
        "(GPUs now, or what the autoscaler may start), or at resources.cpu on a machine without GPUs; at most "
        "num_samples (packing.py)."
    )
    seed: int = Field(3407, description="The sampler's seed: the same spec proposes the same trials.")
    startup_trials: int | None = Field(
        None, ge=1, description="Trials the tpe and gp samplers draw at random before they model the results; "
        "null: Optuna's default, 10, which makes a sweep of 10 trials or fewer a random search "
        "(bench/results/search_compare_cpu.json)."
    )
    space: dict[str, Domain] = Field(
        default_factory=dict, description="Dotted spec path (lora.rank, grpo.temperature, "
        "rewards.<name>.weight) -> domain (choice, uniform, loguniform, int); empty: every trial runs the spec.")
    study_storage: str | None = Field(
        None, description="Where the Optuna study lives: an RDB URL (sqlite:///..., postgresql://...) shared "
        "between sweeps, or null: a journal file in the run directory when storage is local, else in memory "
        "(Tune still saves the searcher with the run, so --resume works either way)."
    )
    max_failures: int = Field(1, ge=0, description="Retries of a trial that raised, before it counts as failed.")
    baseline_first: bool = Field(
        True, description="Run the spec's own values (the seed recipe) as the first trial, when inside the space."
    )
    early_stopping: EarlyStopping | None = Field(None, description="Stop poor trials early (ASHA); off by default.")
    warm_start: list[str] = Field(
        default_factory=list, description="Previous runs (<storage>/<name>: a directory or URI) whose trials.json "
        "the Optuna study starts with: each finished trial inside this space that reported every objective is "
        "added as COMPLETE, so the sampler exploits it instead of exploring again. Checked before any trial starts."
    )

    @field_validator("max_concurrent_trials", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("expected a whole number > 0 or 'auto' (as many as the cluster holds)")

    @field_validator("warm_start")
    @classmethod
    def _distinct_runs(cls, v: list[str]) -> list[str]:
        # A run listed twice would add its trials twice and weigh them double in the sampler.
        if any(not r.strip() for r in v):
            raise ValueError("expected run directories or URIs (<storage>/<name>), got an empty entry")
        dupes = sorted({r for r in v if v.count(r) > 1})
        if dupes:
            raise ValueError(f"run listed twice: {', '.join(dupes)}")
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _one_domain_key(cls, v: Any) -> Any:
        kinds = ("choice", "uniform", "loguniform", "int")
        for path, dom in (v or {}).items():
            if not (isinstance(dom, dict) and len(dom) == 1 and next(iter(dom)) in kinds):
                raise ValueError(
                    f"{path}: expected one of {{choice: [..]}}, {{uniform: [low, high]}}, "
                    f"{{loguniform: [low, high]}}, {{int: [low, high]}}; got {dom!r}"
                )
        return v


class ResourcesSpec(_Strict):
    """What one trial reserves from Ray: ``gpu`` and ``cpu``."""

    gpu: Union[float, Literal["auto"]] = Field(
        "auto", description="GPUs per trial; a fraction packs trials onto one GPU (0.5: two per GPU). auto: 0 on a "
        "machine without GPUs, 0.5 when the model's weights are at most 2% of the GPU's memory, else 1 (packing.py).")

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("expected a number >= 0 (0.5 packs two trials per GPU) or 'auto'")
    cpu: float = Field(
        4.0, gt=0, description="CPU cores Ray reserves per trial (data loading, rewards, tokenizing). Higher: "
        "fewer trials at once on a machine without GPUs.")


class ExportSpec(_Strict):
    """Export of the best trial after the sweep (to <storage>/<name>/best/).

    What is written: ``enabled``, ``merged16``, ``gguf``. How it is checked: ``check``,
    ``agreement_prompts``, ``min_agreement``.
    """

    enabled: bool = Field(
        True, description="Export the best trial at the end of the sweep: its LoRA adapter, the merged 16-bit "
        "model, GGUF files and an Ollama Modelfile. false: only the trials' checkpoints remain.")
    merged16: bool = Field(
        True, description="The merged 16-bit HF model (best/merged16/, bf16 or fp16 as the base). The GGUF files "
        "are converted from it, so it is written whenever the export runs (this switch is not read yet).")
    gguf: list[Literal["f16", "bf16", "f32", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]] = Field(
        ["q8_0"], description="GGUF types to write for llama.cpp / Ollama (q4_k_m, q5_k_m, q6_k need llama.cpp's "
        "bindings). Smaller types: smaller, faster files, more quantization error (see min_agreement).")
    check: bool = Field(True, description="Load the GGUF back with llama.cpp and compare with the HF model.")
    agreement_prompts: int = Field(
        16, ge=0, description="Held-out prompts on which each quantized GGUF's greedy answers are compared "
        "with the 16-bit GGUF's (needs llama.cpp's bindings; 0 skips)."
    )
    min_agreement: float | None = Field(
        0.5, ge=0, le=1, description="Fail the export when a quantized GGUF's greedy answers match the 16-bit "
        "GGUF's on fewer held-out prompts than this share (null: record only). A fine-tune of an already "
        "quantized base can lose its whole LoRA delta to re-quantization (bench/results/export_gemma_cpu.json)."
    )


class TrialSpec(_Strict):
    """How a trial runs: its hang watchdog (``step_timeout_s``) and model reuse (``reuse_model``)."""

    step_timeout_s: float | None = Field(
        1800, gt=0, description="End a trial that finishes no SFT/GRPO step or evaluation for this long, in "
        "seconds (a hung generation or reward function); null disables. The first GRPO step on a cold GPU "
        "compiles for minutes."
    )
    reuse_model: bool = Field(
        True, description="Keep a trial's loaded base model (and vLLM engine) in its Ray actor for the next "
        "trial, which only gets a fresh LoRA, optimizer and settings: no model load, no engine start-up, no "
        "recompilation between trials (trial/warm.py). false: every trial starts a fresh process."
    )


class TrackingSpec(_Strict):
    """Where a sweep is watched besides Tune's own files: MLflow and/or Weights & Biases (tracking/).

    Parameters of MLflow: ``mlflow_uri``, ``mlflow_experiment``. Parameters of W&B:
    ``wandb_project``, ``wandb_entity``, ``wandb_mode``, ``wandb_dir``.

    Credentials never live here (this section is written to spec.resolved.yaml): MLflow reads
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN and W&B reads
    WANDB_API_KEY from the environment.
    """

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI: a local directory (a file store, created if missing), file://..., "
        "http(s)://host:port of a tracking server, or sqlite:///mlflow.db. One run per trial (its sampled config as "
        "params, every reported metric by GRPO step, its final status as the tag grpo_ray.status) under a parent run "
        "for the sweep. null (default): no MLflow. `grpo-ray sweep --mlflow URI` sets it.")
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment the runs go to; null (default): the sweep's name.")
    wandb_project: str | None = Field(
        None, description="Weights & Biases project: one run per trial, grouped by the sweep's name. null "
        "(default): no W&B. `grpo-ray sweep --wandb PROJECT` sets it.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); null (default): the key's own.")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="online: send to W&B (needs WANDB_API_KEY or `wandb login`); offline: write run "
        "directories to sync later with `wandb sync`; auto (default): online when WANDB_API_KEY is set, else offline.")
    wandb_dir: str | None = Field(
        None, description="Local directory W&B writes its run files under (<dir>/wandb/); null (default): the run "
        "directory when storage is local, else ./wandb-runs.")

    @model_validator(mode="after")
    def _no_password_in_uri(self) -> "TrackingSpec":
        import re

        # spec.resolved.yaml and the MLflow store itself would keep it in plain text. A model
        # validator, so that the error message does not quote the URI (and its password) back.
        v = self.mlflow_uri
        if v is not None and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", v, re.IGNORECASE):
            raise _FieldError("tracking.mlflow_uri", "a password in the URI would be written to spec.resolved.yaml: "
                              "drop it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment")
        if v is not None and not v.strip():
            raise _FieldError("tracking.mlflow_uri", "expected a directory or a tracking URI, or null for no MLflow")
        return self

    @field_validator("wandb_project", "wandb_entity", "mlflow_experiment", "wandb_dir")
    @classmethod
    def _name(cls, v: str | None, info: Any) -> str | None:
        import re

        # An empty name would silently mean "the default" to MLflow and W&B.
        if v is not None and not v.strip():
            raise ValueError("expected a non-empty value, or null for the default")
        # W&B refuses these in a project name, and only says so once the first trial started.
        if v is not None and info.field_name == "wandb_project" and re.search(r"[/\\#?%:]", v):
            raise ValueError("a W&B project name cannot contain / \\ # ? % :")
        return v


class SweepSpec(_Strict):
    """A whole sweep: only ``name`` is required; every section defaults to the tutorial's recipe.

    The run: ``name``, ``backend``, ``storage``. The recipe: ``model``, ``format``, ``data``,
    ``rewards``, ``lora``, ``sft``, ``grpo``. The search: ``search``, ``resources``, ``trial``.
    After and around it: ``export``, ``tracking``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; results go to <storage>/<name>.")
    model: ModelSpec = Field(ModelSpec(), description="The base model and how it is loaded.")
    format: FormatSpec = Field(FormatSpec(), description="The system prompt and the reasoning and solution tags.")
    data: DataSpec = Field(DataSpec(), description="The SFT, GRPO and held-out evaluation sets.")
    rewards: list[RewardSpec] = Field(
        default_factory=_default_rewards, min_length=1, description="The GRPO reward functions and their weights, "
        "each name once. Default: the tutorial's four rewards, weight 1.0 each.")
    lora: LoraSpec = Field(LoraSpec(), description="The LoRA adapter both stages train.")
    sft: SftSpec = Field(SftSpec(), description="The SFT format warm-up.")
    grpo: GrpoSpec = Field(GrpoSpec(), description="GRPO training: optimizer, batch, generation and algorithm.")
    search: SearchSpec = Field(SearchSpec(), description="The search space, the sampler and the objectives.")
    resources: ResourcesSpec = Field(ResourcesSpec(), description="GPUs and CPUs reserved per trial.")
    trial: TrialSpec = Field(TrialSpec(), description="A trial's watchdog and model reuse.")
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="Training stack: unsloth (Unsloth + vLLM generation, CUDA only, the tutorial's), hf "
        "(transformers + PEFT, generation by the trained model; runs on CPU), auto: unsloth on CUDA, else hf.")
    storage: str = Field("./runs", description="Local directory or URI (s3://, gs://) for results; credentials "
                         "come from the environment.")
    export: ExportSpec = Field(ExportSpec(), description="The best trial's export: adapter, merged model, GGUF.")
    tracking: TrackingSpec = Field(TrackingSpec(), description="MLflow and Weights & Biases tracking.")

    @field_validator("rewards")
    @classmethod
    def _unique_rewards(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        names = [r.name for r in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward listed twice: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _check_lengths(self) -> "SweepSpec":
        if self.grpo.max_prompt_length + self.grpo.max_completion_length > self.model.max_seq_length:
            raise ValueError(
                "grpo.max_prompt_length + grpo.max_completion_length "
                f"({self.grpo.max_prompt_length} + {self.grpo.max_completion_length}) exceeds "
                f"model.max_seq_length ({self.model.max_seq_length}): lower one or raise max_seq_length"
            )
        return self

    @model_validator(mode="after")
    def _check_grid(self) -> "SweepSpec":
        if self.search.sampler != "grid":
            return self
        size = 1
        for path, dom in self.search.space.items():
            if not isinstance(dom, (Choice, IntRange)):
                raise _FieldError(f"search.space.{path}", "sampler grid needs every domain to be {choice: [..]} or "
                                  "{int: [low, high]}; use another sampler for continuous ranges")
            size *= len(dom.choice) if isinstance(dom, Choice) else dom.int_[1] - dom.int_[0] + 1
        if not self.search.space:
            raise _FieldError("search.sampler", "grid needs a search.space to enumerate")
        if self.search.num_samples > size:
            raise _FieldError("search.num_samples", f"{self.search.num_samples} exceeds the grid's {size} "
                              f"combinations: set num_samples: {size}")
        return self

    @model_validator(mode="after")
    def _resolve_early_stopping(self) -> SweepSpec:
        es = self.search.early_stopping
        if es is None:
            return self
        longest = self.max_grpo_steps()
        # Filled in here so spec.resolved.yaml shows the rungs the sweep really used.
        if es.grace_period is None:
            es.grace_period = min(self.grpo.report_every, longest)
        if es.max_t is None:
            es.max_t = longest
        if es.max_t < longest:
            raise _FieldError("search.early_stopping.max_t", (
                f"{es.max_t} is below the largest grpo.max_steps a trial can run ({longest}): every trial "
                f"would be cut at {es.max_t} steps; lower grpo.max_steps instead"))
        if es.grace_period > es.max_t:
            raise _FieldError("search.early_stopping.grace_period", (
                f"{es.grace_period} exceeds max_t ({es.max_t}, by default the largest grpo.max_steps): "
                "no trial could ever be stopped"))
        return self

    # --- derived values the trial needs
    def _largest(self, path: str, fixed: int) -> int:
        """The largest integer any trial can sample at ``path``; ``fixed`` when the search leaves it alone."""
        dom = self.search.space.get(path)
        if isinstance(dom, Choice):
            return max(int(x) for x in dom.choice)
        if isinstance(dom, IntRange):
            return dom.int_[1]
        return fixed

    def max_lora_rank(self) -> int:
        """The largest rank any trial can sample (vLLM reserves LoRA slots for it)."""
        return self._largest("lora.rank", self.lora.rank)

    def vllm_memory_share(self) -> float:
        """vLLM's ``gpu_memory_utilization``: the spec's share of this trial's slice of the GPU, so
        trials packed on one card (``resources.gpu`` below 1) split its memory instead of each
        reserving the same share of the whole card."""
        gpu = self.resources.gpu
        return self.model.gpu_memory_utilization * (min(1.0, gpu) if isinstance(gpu, float) and gpu > 0 else 1.0)

    def max_grpo_steps(self) -> int:
        """The most GRPO steps any trial can run (early stopping's horizon)."""
        return self._largest("grpo.max_steps", self.grpo.max_steps)

    def baseline_point(self) -> dict[str, Any] | None:
        """The spec's own value at every search path, if each lies inside its domain."""
        data = self.model_dump(mode="python")
        point: dict[str, Any] = {}
        for path, dom in self.search.space.items():
            node, key = _slot(data, path)
            value = node[key]
            if not _in_domain(value, dom):
                return None
            point[path] = value
        return point

    def value_at(self, path: str) -> Any:
        """The value at a dotted spec path (``lora.rank``, ``rewards.<name>.weight``); SpecError if none."""
        node, key = _slot(self.model_dump(mode="python"), path)
        return node[key]

    def reward_weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}


def check_space(spec: SweepSpec) -> None:
    """Every search path names a real spec field and every value its domain can produce validates
    there: each choice, and both ends of a range (the field's constraints are intervals, so the
    ends bound every value in between)."""
    for path, domain in spec.search.space.items():
        field = f"search.space.{path}"
        try:
            _check_domain(domain)
        except ValueError as e:
            raise SpecError(e.args[0], field=field) from None
        kind = next(iter(domain.model_dump(by_alias=True)))
        for value in _domain_values(domain):
            try:
                apply_overrides(spec, {path: value})
            except SpecError as e:
                if e.field is None or e.field == path:  # a constraint of the field itself
                    msg = e.message
                else:  # another field's check that this value trips (e.g. lengths over max_seq_length)
                    msg = f"{e.field}: {e.message}"
                raise SpecError(f"{kind} value {value!r}: {msg}", field=field) from None


def _domain_values(d: Domain) -> list[Any]:
    """The values of a domain that bound what a trial can get: all choices, or both ends."""
    if isinstance(d, Choice):
        return list(d.choice)
    lo, hi = next(iter(d.model_dump().values()))
    return [lo, hi]


def _check_domain(d: Domain) -> None:
    if isinstance(d, (Uniform, LogUniform, IntRange)):
        lo, hi = next(iter(d.model_dump().values()))
        if not lo < hi:
            raise ValueError(f"expected low < high, got [{lo}, {hi}]")
        if isinstance(d, LogUniform) and lo <= 0:
            raise ValueError(f"loguniform needs low > 0, got {lo}")


def _in_domain(value: Any, d: Domain) -> bool:
    if isinstance(d, Choice):
        return value in d.choice
    lo, hi = next(iter(d.model_dump().values()))
    return isinstance(value, (int, float)) and lo <= value <= hi


def split_reward_path(path: str) -> tuple[str, str] | None:
    """``rewards.<name>.weight`` -> (name, 'weight'); reward names may contain dots and colons."""
    if path.startswith("rewards.") and path.count(".") >= 2:
        name, _, attr = path[len("rewards."):].rpartition(".")
        return name, attr
    return None


def _slot(data: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The mapping and key that a dotted spec path names inside ``data`` (a dumped spec)."""
    reward = split_reward_path(path)
    if reward is not None:
        name, attr = reward
        matches = [r for r in data["rewards"] if r["name"] == name]
        if not matches or attr not in matches[0]:
            known = ", ".join(f"rewards.{r['name']}.weight" for r in data["rewards"])
            raise SpecError(f"no such reward field (known: {known})", field=path)
        return matches[0], attr
    node, keys = data, path.split(".")
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise SpecError(f"no such field '{'.'.join(keys[: i + 1])}'", field=path)
        if i < len(keys) - 1:
            node = node[key]
    return node, keys[-1]


def apply_overrides(spec: SweepSpec, overrides: dict[str, Any]) -> SweepSpec:
    """Return a copy of ``spec`` with ``{dotted.path: value}`` applied (a trial's config)."""
    data = spec.model_dump(mode="python", by_alias=True)  # `int` domains dump as `int`, not `int_`
    for path, value in overrides.items():
        node, key = _slot(data, path)
        node[key] = value
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e, None, None) from None


# --------------------------------------------------------------------------- loading
class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    mapping_lines.setdefault(id(loader), {})[id(mapping)] = lines
    return mapping


mapping_lines: dict[int, dict[int, dict[str, int]]] = {}
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(doc: Any, loc: tuple[Any, ...], lines: dict[int, dict[str, int]]) -> int | None:
    """Walk ``loc`` into the parsed document; the line of the deepest key that exists."""
    line, node = None, doc
    for key in loc:
        if isinstance(node, dict) and key in node:
            line = lines.get(id(node), {}).get(key, line)
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            break
    return line


def _from_validation(e: ValidationError, file: str | None, doc: Any, lines: dict | None = None) -> SpecError:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))  # drop union tags
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):  # a cross-field check names the field it is about
        loc = tuple(cause.field.split("."))
    field = ".".join(str(p) for p in loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `grpo-ray validate --help` for the fields)"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    more = len(e.errors()) - 1
    if more > 0:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    line = _line_of(doc, loc, lines or {}) if doc is not None else None
    return SpecError(msg, file=file, line=line, field=field)


class SpecLines:
    """The line of each field of a parsed spec file, for errors found after parsing (``validate``'s
    checks of data, rewards and model)."""

    def __init__(self, file: str, doc: Any, lines: dict[int, dict[str, int]]) -> None:
        self.file, self._doc, self._lines = file, doc, lines

    def line(self, field: str) -> int | None:
        """The line of a dotted field (``data.sft.source``, ``rewards.1.name``), or of its deepest parent."""
        loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
        return _line_of(self._doc, loc, self._lines)

    def error(self, field: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(field), field=field)


def parse_spec(text: str, file: str = "<spec>") -> SweepSpec:
    """Parse and validate spec YAML text; raise :class:`SpecError` on any user error."""
    return parse_spec_lines(text, file)[0]


def parse_spec_lines(text: str, file: str = "<spec>") -> tuple[SweepSpec, SpecLines]:
    """:func:`parse_spec`, and where each field stands in ``text``."""
    try:
        loader = _LineLoader(text)  # the reader refuses control characters here, before parsing
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise SpecError(f"invalid YAML: {e.reason} (#x{ord(e.character) if isinstance(e.character, str) else e.character:04x})", file=file, line=line) from None
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e}", file=file, line=line) from None
    except yaml.YAMLError as e:  # e.g. a control character met while reading
        raise SpecError(f"invalid YAML: {' '.join(str(e).split())}", file=file) from None
    finally:
        lines = mapping_lines.pop(id(loader), {})
        loader.dispose()
    if not isinstance(doc, dict):
        raise SpecError("expected a mapping of spec fields at the top level", file=file, line=1)
    try:
        spec = SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise _from_validation(e, file, doc, lines) from None
    try:
        check_space(spec)
    except SpecError as e:
        path = e.field.split(".", 2)[2]
        line = lines.get(id(doc["search"]["space"]), {}).get(path)
        raise SpecError(e.message, file=file, line=line, field=e.field) from None
    return spec, SpecLines(file, doc, lines)


MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; a bigger file is a mistake (and YAML parsing is slow)


def read_spec_text(path: str | Path) -> str:
    """A spec file's text, or a :class:`SpecError` in one line: missing, a directory, too big, not UTF-8."""
    p = Path(path)
    try:
        if p.is_dir():
            raise SpecError("is a directory, expected a spec file (YAML)", file=str(path))
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{size:,} bytes, over the limit of {MAX_SPEC_BYTES:,} bytes (1 MB) for a spec; "
                            "keep long texts (a system prompt) short or out of the spec", file=str(path))
        data = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e.strerror or e}", file=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"not UTF-8 text (byte {e.start}: 0x{data[e.start]:02x}); a spec is a YAML file",
                        file=str(path), line=line) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a spec file. Relative local data/model paths stay relative to the current directory."""
    return parse_spec(read_spec_text(path), file=str(path))


def load_spec_lines(path: str | Path) -> tuple[SweepSpec, SpecLines]:
    """:func:`load_spec`, and where each field stands in the file (for later checks' errors)."""
    return parse_spec_lines(read_spec_text(path), file=str(path))


def dump_spec(spec: SweepSpec) -> str:
    """The resolved spec (defaults filled in) as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True), sort_keys=False, width=100)
