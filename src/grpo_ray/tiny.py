"""A tiny randomly initialised Qwen3 with its own byte-level BPE tokenizer, built offline.

It is the smoke sweep's model and the test suite's model: a few MB, seconds to build on a
CPU, the same architecture and tokenizer family (byte-level BPE, Qwen2 pre-tokenizer) as
the real Qwen3 target, so the whole path (TRL training, LoRA merge, GGUF export, llama.cpp
load) is exercised for real. It learns nothing useful; it is not meant to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from grpo_ray.config.sections import (
    DEFAULT_SYSTEM_PROMPT,
    REASONING_END,
    REASONING_START,
    SOLUTION_END,
    SOLUTION_START,
)
from grpo_ray.task import template

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Qwen2's pre-tokenizer split, so the GGUF export can declare `tokenizer.ggml.pre = qwen2`
# and llama.cpp pre-tokenizes exactly as the HF tokenizer does.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_text() -> list[str]:
    rows = (Path(__file__).parent / "assets" / "math_mini.jsonl").read_text().splitlines()
    texts = [DEFAULT_SYSTEM_PROMPT]
    for line in rows:
        r = json.loads(line)
        texts.append(
            f"{r['question']}{REASONING_START}{r['reasoning']}{REASONING_END}"
            f"{SOLUTION_START}{r['answer']}{SOLUTION_END}"
        )
    return texts


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on the shipped math set (deterministic) and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = template.chat_template()
    return fast


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tiny random Qwen3 (config, bf16-safe fp32 safetensors, tokenizer) to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cached_tiny_model(cache_root: str | Path | None = None) -> Path:
    """The builtin ``tiny-qwen3`` model, built once per machine and reused (atomic rename)."""
    root = Path(cache_root or os.environ.get("GRPO_RAY_CACHE", Path.home() / ".cache" / "grpo-ray"))
    target = root / "builtin" / "tiny-qwen3-v1"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{os.getpid()}-tiny-qwen3"
    build_tiny_model(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: its copy is identical (same seed)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
