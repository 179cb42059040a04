"""Merge a trained LoRA into its base: the merged 16-bit HF model (bf16 or fp16 as the base) the
GGUF files are written from, and the adapter itself as shipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from grpo_ray.export.base import SUPPORTED_ARCHITECTURES, ExportError
from grpo_ray.gguf.tokenizer import TOKENIZER_SIDECAR

# --------------------------------------------------------------------------------------------
# the export


def merge_lora(base_model_dir: Path, adapter_dir: Path, merged_dir: Path, hf_arch: str, cfg: dict[str, Any],
           chat_template: str | None) -> tuple[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "")
    # gemma3 activations overflow fp16; it is always bf16
    is_bf16 = "bfloat16" in base_dtype or SUPPORTED_ARCHITECTURES[hf_arch] == "gemma3"
    dtype = torch.bfloat16 if is_bf16 else torch.float16
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged_dir.mkdir(parents=True)
    merged.save_pretrained(merged_dir)
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(merged_dir)
    sidecar = base_model_dir / TOKENIZER_SIDECAR
    if sidecar.is_file():
        shutil.copy2(sidecar, merged_dir / TOKENIZER_SIDECAR)
    del merged, peft_model, model
    return ("bfloat16" if dtype == torch.bfloat16 else "float16"), tok


def copy_adapter(adapter_dir: Path, lora_dir: Path) -> None:
    lora_dir.mkdir(parents=True)
    need = ["adapter_config.json"]
    weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / n).is_file()]
    if not (adapter_dir / "adapter_config.json").is_file() or not weights:
        raise ExportError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    for n in need + weights[:1]:
        shutil.copy2(adapter_dir / n, lora_dir / n)


