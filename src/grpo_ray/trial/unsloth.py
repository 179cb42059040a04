"""The ``unsloth`` backend: Unsloth's FastLanguageModel with vLLM generation (the tutorial's fast path).

One model object serves SFT, GRPO and evaluation: Unsloth loads the base weights once,
shares them with an in-process vLLM engine (``fast_inference=True``) sized for the largest
LoRA rank the sweep can sample, and TRL's GRPOTrainer (patched by Unsloth) generates through
that engine. Evaluation generates greedily through ``fast_generate`` with the trial's LoRA.

Unsloth must be imported before trl, transformers and peft in the process, so this module
imports it first and :func:`grpo_ray.trial.backends.make_backend` imports this module before
anything else touches those packages.
"""

from __future__ import annotations

import os

_TORCH_LOGS = os.environ.get("TORCH_LOGS")  # Unsloth's import drops it (compile_clock.restore_torch_logs)
import unsloth  # noqa: E402,F401  (must come first: it patches transformers, trl and peft)

from pathlib import Path
from typing import Any, Callable

from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.workdirs import make_workdir
from grpo_ray.trial.common import (
    adapter_rank,
    guard_errors,
    gradient_checkpointing,
    init_lora,
    instance_forward,
    load_lora_weights,
    peft_lora_alpha,
    prepare_tokenizer,
    resize_lora,
    restore_forward,
    save_lora_adapter,
    save_tokenizer,
    seed_adapter_init,
)
from grpo_ray.trial.trl_args import engine_compile_kwargs, grpo_config_kwargs, sft_config_kwargs
from grpo_ray.trial.compile_clock import restore_torch_logs
from grpo_ray.trial.unsloth_patches import prepare_grpo_logprobs
from grpo_ray.trial.engine_lock import fixed_kv_cache, one_start_per_gpu, release_at_engine_warmup, visible_gpus

restore_torch_logs(_TORCH_LOGS)

# Unsloth's row ranges per completion in its GRPO log-prob function: its multiplier, 4 below
# 20,480 tokens (unsloth/models/rl_replacements.py: max(4, seq_len // 4096)). With longer ones
# Unsloth's count can exceed what unsloth_patches.one_chunk_count asks for: such calls keep
# their own (a graph each).
LOGPROB_CHUNKS_PER_ROW = 4


class UnslothBackend:
    name = "unsloth"

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self._forward: Any = None  # the PEFT model's own forward, before any trainer wrapped it
        # Removed with this backend, or by the driver once this process is gone (workdirs.py).
        self._workdir = make_workdir(self, "grpo-ray-unsloth-")
        self._spec: SweepSpec | None = None  # the spec the model's current adapter was made for
        self.engine_wait_s = 0.0  # seconds the last load waited for other trials' engine starts

    def load(self, model_dir: str, spec: SweepSpec) -> None:
        from unsloth import FastLanguageModel

        def _load() -> None:
            self.model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=model_dir,
                max_seq_length=spec.model.max_seq_length,
                load_in_4bit=spec.model.load_in_4bit,
                fast_inference=True,
                max_lora_rank=spec.max_lora_rank(),
                gpu_memory_utilization=spec.vllm_memory_share(),
                **engine_compile_kwargs(spec),
            )
            self.tokenizer = tokenizer

        # A packed neighbour starting its engine at the same time would skew vLLM's memory profile;
        # the next one may start once this engine has sized its KV cache, or, with a fixed one
        # (model.kv_cache_gib), as it is set (trial/engine_lock.py).
        with one_start_per_gpu(visible_gpus()) as lock, release_at_engine_warmup(lock.release), \
                fixed_kv_cache(spec.model.kv_cache_gib, lock.release):
            self.engine_wait_s = lock.waited_s  # queued behind neighbours' starts: part of load_s, not its cost
            guard_errors(_load, spec)
        self.new_adapter(spec)

    def new_adapter(self, spec: SweepSpec) -> None:
        """Give the model a fresh LoRA of ``spec``'s rank, initialised from its seed.

        The base weights and the vLLM engine that shares them stay loaded (trial/warm.py). A
        warm model's adapter is resized in place (common.resize_lora), keeping Unsloth's
        patching; otherwise PEFT's ``unload`` puts the base layers back and Unsloth wraps the
        model again as on a fresh load (it refuses a second ``get_peft_model`` on a model that
        still has a LoRA). Both end in the same seeded init. With ``lora.pad_rank`` the adapter
        is the search's largest rank wide (common.adapter_rank): a warm trial keeps its shapes,
        so the compiled graphs of the blocks are reused rather than compiled for a new rank.
        """
        from peft import PeftModel
        from unsloth import FastLanguageModel

        made_for, self._spec = self._spec, spec
        if resize_lora(self.model, spec, made_for):
            restore_forward(self.model, self._forward)
        else:
            base = self.model.unload() if isinstance(self.model, PeftModel) else self.model
            seed_adapter_init(spec)
            self.model = FastLanguageModel.get_peft_model(
                base,
                r=adapter_rank(spec),  # the trial's rank, or the search's largest (lora.pad_rank)
                target_modules=spec.lora.target_modules,
                lora_alpha=peft_lora_alpha(spec),  # Unsloth hands vLLM this config: lora_alpha / r scales
                lora_dropout=spec.lora.dropout,
                use_gradient_checkpointing=gradient_checkpointing(spec, self.name),
                random_state=spec.grpo.seed,
            )
            self._forward = instance_forward(self.model)
        init_lora(self.model, spec)
        seed_adapter_init(spec)
        self.tokenizer = prepare_tokenizer(self.tokenizer, spec)

    def sft_args(self, spec: SweepSpec) -> tuple[dict[str, Any], Any]:
        from trl import SFTConfig  # Unsloth's patched class: it rewrites some arguments as it is built

        # dataset_num_proc=1 is Unsloth's "tokenize in-process": left unset it forks a pool of
        # workers sized to the host's cores for a few hundred short texts, every trial.
        kwargs = sft_config_kwargs(spec)
        return kwargs, SFTConfig(output_dir=str(self._workdir / "sft"), dataset_text_field="text",
                                 dataset_num_proc=1, **kwargs)

    def grpo_args(self, spec: SweepSpec, reward_weights: list[float]) -> tuple[dict[str, Any], Any]:
        from trl import GRPOConfig  # Unsloth's patched class: it rewrites some arguments as it is built

        kwargs = grpo_config_kwargs(spec, reward_weights)
        return kwargs, GRPOConfig(output_dir=str(self._workdir / "grpo"),
                                  vllm_sampling_params=self._sampling_params(spec), **kwargs)

    def sft(self, messages: list[list[dict[str, str]]], spec: SweepSpec, callbacks: list[Any]) -> dict[str, float]:
        from datasets import Dataset
        from trl import SFTTrainer

        texts = [self.tokenizer.apply_chat_template(m, tokenize=False) for m in messages]
        # SFTTrainer tokenizes plain text *with* special tokens: where the tokenizer adds BOS
        # itself (Gemma), a template that also prints it would give every example two.
        bos = self.tokenizer.bos_token
        if bos and self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            texts = [t.removeprefix(bos) for t in texts]
        _, args = self.sft_args(spec)
        trainer = SFTTrainer(
            model=self.model,
            processing_class=self.tokenizer,
            train_dataset=Dataset.from_dict({"text": texts}),
            args=args,
            callbacks=callbacks,
        )
        out = guard_errors(trainer.train, spec)
        return {"sft_loss": float(out.training_loss)}

    def _sampling_params(self, spec: SweepSpec, **overrides: Any) -> Any:
        from vllm import SamplingParams

        g = spec.grpo
        params = dict(
            min_p=g.min_p, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
            stop=[self.tokenizer.eos_token], include_stop_str_in_output=True,
        )
        return SamplingParams(**(params | overrides))

    def grpo(
        self,
        rows: list[dict[str, Any]],
        reward_funcs: list[Callable[..., list[float]]],
        reward_weights: list[float],
        spec: SweepSpec,
        callbacks: list[Any],
    ) -> None:
        from datasets import Dataset
        from trl import GRPOTrainer

        _, args = self.grpo_args(spec, reward_weights)
        # Once per process (later calls find it done): the log-prob graph then serves every
        # trial's temperature instead of compiling again for each (trial/unsloth_patches.py),
        # and every group size: Unsloth splits rows x LOGPROB_CHUNKS_PER_ROW ranges, so the most
        # the search can ask for is one count for all its trials.
        prepare_grpo_logprobs(LOGPROB_CHUNKS_PER_ROW * spec.max_grpo_rows())
        trainer = GRPOTrainer(
            model=self.model,
            processing_class=self.tokenizer,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list(rows),
            callbacks=callbacks,
        )
        guard_errors(trainer.train, spec)

    def generate(self, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        # Token ids, not text: vLLM would add BOS again to a template that already prints it.
        ids = [
            self.tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True) for p in prompts
        ]
        ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
        lora_dir = self._workdir / "eval_lora"
        # Written as the model holds it, padded with lora.pad_rank (not save_lora_adapter's cut):
        # vLLM reads r = the search's largest rank, which it reserves anyway, and lora_alpha
        # scaled to match (common.peft_lora_alpha), so it scales by the trial's alpha / rank.
        self.model.save_lora(str(lora_dir))
        params = self._sampling_params(self._spec, temperature=0.0, max_tokens=max_new_tokens, min_p=0.0)
        outputs = self.model.fast_generate(
            [{"prompt_token_ids": x} for x in ids],
            sampling_params=params,
            lora_request=self.model.load_lora(str(lora_dir)),
            use_tqdm=False,
        )
        return [o.outputs[0].text for o in outputs]

    def load_adapter(self, adapter_dir: Path) -> None:
        load_lora_weights(self.model, adapter_dir)

    def save_adapter(self, out_dir: Path) -> None:
        save_lora_adapter(self.model, out_dir, self._spec)  # the trial's own rank, padded or not
        save_tokenizer(self.tokenizer, out_dir, self._workdir / "tokenizer")
