"""The ``hf`` backend: transformers + PEFT LoRA + TRL, on CPU or any GPU. No Unsloth, no vLLM.

It is the reference path (and the only one on a machine without CUDA): slow generation,
but every step is plain TRL, so what runs here is what the tests prove.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.workdirs import make_workdir
from grpo_ray.trial.common import (
    adapter_rank,
    guard_errors,
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
from grpo_ray.trial.trl_args import grpo_config_kwargs, sft_config_kwargs


class HFBackend:
    name = "hf"

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self._forward: Any = None  # the PEFT model's own forward, before any trainer wrapped it
        # Removed with this backend, or by the driver once this process is gone (workdirs.py).
        self._workdir = make_workdir(self, "grpo-ray-hf-")
        self._spec: SweepSpec | None = None  # the spec the model's current adapter was made for

    def load(self, model_dir: str, spec: SweepSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from grpo_ray.trial import cpu_logprob

        cpu_logprob.install()  # TRL's SFT and GRPO losses both need it where Triton is missing
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = base.to("cuda") if torch.cuda.is_available() else base
        self.new_adapter(spec)

    def new_adapter(self, spec: SweepSpec) -> None:
        """Give the model a fresh LoRA of ``spec``'s rank, initialised from its seed.

        A warm model's adapter is resized in place (common.resize_lora); otherwise the LoRA
        layers come out and PEFT wraps the model again. Both end in the same seeded init. With
        ``lora.pad_rank`` the adapter is the search's largest rank wide (common.adapter_rank).
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        made_for, self._spec = self._spec, spec
        if resize_lora(self.model, spec, made_for):
            restore_forward(self.model, self._forward)
        else:
            base = self.model.unload() if isinstance(self.model, PeftModel) else self.model  # LoRA layers out
            lora = LoraConfig(
                r=adapter_rank(spec),  # the trial's rank, or the search's largest (lora.pad_rank)
                lora_alpha=peft_lora_alpha(spec),
                lora_dropout=spec.lora.dropout,
                target_modules=spec.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)
            self._forward = instance_forward(self.model)
        init_lora(self.model, spec)
        seed_adapter_init(spec)
        self.tokenizer = prepare_tokenizer(self.tokenizer, spec)

    def sft_args(self, spec: SweepSpec) -> tuple[dict[str, Any], Any]:
        from trl import SFTConfig

        kwargs = sft_config_kwargs(spec)
        return kwargs, SFTConfig(output_dir=str(self._workdir / "sft"), **kwargs)

    def grpo_args(self, spec: SweepSpec, reward_weights: list[float]) -> tuple[dict[str, Any], Any]:
        from trl import GRPOConfig

        kwargs = grpo_config_kwargs(spec, reward_weights)
        kwargs["top_k"] = max(spec.grpo.top_k, 0)  # transformers: 0 disables top-k (vLLM uses -1)
        return kwargs, GRPOConfig(output_dir=str(self._workdir / "grpo"), **kwargs)

    def sft(self, messages: list[list[dict[str, str]]], spec: SweepSpec, callbacks: list[Any]) -> dict[str, float]:
        from datasets import Dataset
        from trl import SFTTrainer

        _, args = self.sft_args(spec)
        trainer = SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=Dataset.from_dict({"messages": messages}),
            processing_class=self.tokenizer,
            callbacks=callbacks,
        )
        out = guard_errors(trainer.train, spec)
        return {"sft_loss": float(out.training_loss)}

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
        trainer = GRPOTrainer(
            model=self.model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=self.tokenizer,
            callbacks=callbacks,
        )
        guard_errors(trainer.train, spec)

    def generate(self, prompts: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        out: list[str] = []
        self.model.eval()
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.model.device)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        self.model.train()
        return out

    def load_adapter(self, adapter_dir: Path) -> None:
        load_lora_weights(self.model, adapter_dir)

    def save_adapter(self, out_dir: Path) -> None:
        save_lora_adapter(self.model, out_dir, self._spec)  # the trial's own rank, padded or not
        save_tokenizer(self.tokenizer, out_dir, self._workdir / "tokenizer")
