"""The spec's training sections: the rewards, the LoRA adapter, the SFT warm-up and GRPO (grouped like
TRL's GRPOConfig), with the tutorial's defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from grpo_ray.config.errors import FieldError
from grpo_ray.config.sections import Strict


# --------------------------------------------------------------------------- training
class RewardSpec(Strict):
    """One reward function of GRPO and its weight in the summed reward."""

    name: str = Field(description="A builtin reward (match_format_exactly, match_format_approximately, "
                      "check_answer, check_numbers) or an import path 'package.module:function' with TRL's reward "
                      "signature. Searchable weight: rewards.<name>.weight.")
    weight: float = Field(
        1.0, description="Multiplies this reward in the total GRPO maximises (TRL's reward_weights). Higher: the "
        "policy favours what this reward checks over the others. The tutorial's: 1.0 for each.")


class LoraSpec(Strict):
    """The LoRA adapter trained in both stages.

    Parameters that size the adapter: ``rank``, ``alpha``, ``target_modules``. Regularisation:
    ``dropout``. Memory: ``gradient_checkpointing``. Warm-actor speed: ``pad_rank``.
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
    pad_rank: Literal["auto", True, False] = Field(
        "auto", description="Build every trial's adapter at the largest lora.rank the search can sample (the rank "
        "vLLM reserves room for): the trial's own rank trains in the first rows of A and columns of B, the rest "
        "start at zero and stay zero, and the scaling stays alpha / rank, so the trial computes the same function "
        "as unpadded (equal up to float rounding) and its checkpoints, best adapter and export hold its own rank "
        "and alpha. Why: a warm actor's next trial then keeps the adapter's tensor shapes, so the unsloth "
        "backend need not recompile its graphs for a new rank (on an H200, gemma-3-270m: warm trials that changed "
        "rank spent 17-78 s of 79-153 s recompiling unpadded at 0cf12c9; padded at 8d5b03e, those that kept "
        "grpo.num_generations compiled nothing in GRPO, 10.3 s in all, the SFT stage's: docs/performance.md). "
        "Cost: every trial's LoRA products, gradients and optimizer state are the largest rank's. Linear layers "
        "only (an embedding in target_modules is refused). auto: pad when trial.reuse_model is on and "
        "search.space samples lora.rank (then the padding is what saves the recompiles); true: always; false: "
        "never.")


class SftSpec(Strict):
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


class GrpoSpec(Strict):
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
        "num_generations). Higher: smoother gradients, more memory, and more completions per GPU-second: vLLM "
        "decodes a step's sequences together, so twice as many cost little more (a Qwen3-1.7B shape with its LoRA on "
        "an H200: 3.90 ms per token step for 16 sequences, 3.76 ms for 8; bench/results/vllm_decode_h200_55e4f1e.json)"
        ". The tutorial's: 1.")
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
            raise FieldError("grpo.importance_sampling_level", "loss_type luspo is a sequence-level loss: set "
                              "grpo.importance_sampling_level: sequence, or choose another loss_type")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise FieldError("grpo.importance_sampling_level", "loss_type vespo computes sequence weights itself: "
                              "set grpo.importance_sampling_level: token")
        if self.loss_type == "cispo" and self.effective_epsilon_high() < 1:
            raise FieldError("grpo.epsilon_high", f"{self.epsilon_high} caps every importance weight below 1 with "
                              "loss_type cispo (the cap is epsilon_high itself, not 1 + epsilon_high); use 4-8, or "
                              "null for 5.0")
        return self


