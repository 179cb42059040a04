"""Checks of an exported GGUF: read it back, and run it in llama.cpp against the merged HF model
(tokenization and next-token logits), or against another GGUF (greedy agreement).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from grpo_ray.export.base import ExportError, gguf_errors
from grpo_ray.export.llama_cpp import capture_fd2, log_tail, require_llama_cpp
from grpo_ray.gguf.reader import read_gguf_metadata

log = logging.getLogger(__name__)

# llama.cpp's base GGUF + LoRA adapter against the merged HF model: the base may be quantized
# (its matmuls then also quantize activations), so less strict than the 0.99 of a float GGUF
LORA_MIN_CORR = 0.98
# --------------------------------------------------------------------------------------------
# checks


_REQUIRED_ARCH_KV = (
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base",
)


def read_back(path: Path, expected_tensors: list[str], arch: str, *, gguf_reader_max_tokens: int = 65536
              ) -> dict[str, Any]:
    """Read ``path`` back and verify its tensors, layout and required KV fields.

    The file is parsed by :func:`grpo_ray.gguf.reader.read_gguf_metadata`, which also checks the
    layout; when its vocabulary is small (the reference reader needs ~30 s for a 262k
    vocabulary) ``gguf.GGUFReader`` parses it too and must agree.
    """
    import gguf

    with gguf_errors():
        meta = read_gguf_metadata(path)
    names = [t.name for t in meta.tensors]
    if sorted(names) != sorted(expected_tensors):
        missing = sorted(set(expected_tensors) - set(names))
        extra = sorted(set(names) - set(expected_tensors))
        raise ExportError(f"{path.name}: tensors differ from those written; missing {missing}, extra {extra}")
    got_arch = meta.get("general.architecture")
    if got_arch != arch:
        raise ExportError(f"{path.name}: general.architecture is {got_arch!r}, expected {arch!r}")
    required = ["general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.tokens"] + [
        f"{arch}.{k}" for k in _REQUIRED_ARCH_KV
    ]
    missing_kv = [k for k in required if k not in meta.kv]
    if missing_kv:
        raise ExportError(f"{path.name}: missing KV fields {missing_kv}")
    n_tok = len(meta.get("tokenizer.ggml.tokens"))
    emb = next(t for t in meta.tensors if t.name == "token_embd.weight")
    if emb.dims[-1] != n_tok:  # ggml order: (n_embd, n_vocab)
        raise ExportError(f"{path.name}: token_embd has {emb.dims[-1]} rows for {n_tok} tokens")
    out = {"n_tensors": len(names), "n_kv": len(meta.kv), "n_tokens": n_tok,
           "tensor_types": sorted({t.type.name for t in meta.tensors}), "reader": "read_gguf_metadata"}
    if n_tok <= gguf_reader_max_tokens:
        r = gguf.GGUFReader(path)
        r_tensors = [(t.name, t.tensor_type, int(t.data_offset)) for t in r.tensors]
        ours = [(t.name, t.type, meta.data_offset + t.offset) for t in meta.tensors]
        r_keys = [k for k in r.fields if not k.startswith("GGUF.")]
        if r_tensors != ours or r_keys != list(meta.kv):
            raise ExportError(f"{path.name}: gguf.GGUFReader and read_gguf_metadata disagree")
        out["reader"] += "+gguf.GGUFReader"
    return out


def _sample_texts(tokenizer, chat_template: str | None, system_prompt: str | None) -> list[str]:
    texts = [
        "What is 12 + 30?\n<think>Let me add: 12 + 30 = 42.</think><SOLUTION>42</SOLUTION>",
        "  two spaces, a tab\tand\n\nnew lines\r\n; 3.14159 1234567 -17 x^2",
        "Unicode: café naïve Übermaß 日本語 Привет 🚀 — ∑ x² ≤ ∞",
        "it's don't I'll 'quoted' \"double\" (parens) [brackets] {braces} <tags>",
    ]
    if chat_template:
        try:
            msgs = [{"role": "user", "content": "Compute 7 * 6 and show your working."}]
            if system_prompt:
                msgs.insert(0, {"role": "system", "content": system_prompt})
            texts.insert(
                0, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                 chat_template=chat_template)
            )
        except Exception as e:  # pragma: no cover - exotic templates
            log.warning("could not render the chat template for the checks: %s", e)
    return texts


def greedy_agreement(reference: Path, candidate: Path, prompts: list[str], max_tokens: int = 32,
                     candidate_lora: Path | None = None) -> dict[str, Any]:
    """How often ``candidate`` (a quantized GGUF) answers exactly as ``reference`` (16-bit) does.

    ``candidate_lora``: an adapter GGUF llama.cpp applies to ``candidate`` (base GGUF + LoRA).

    Both run greedily in llama.cpp on the same prompts; the rate is the share of prompts whose
    completions are identical, a strict, deployment-level measure of what quantization changed.
    """
    llama_cpp = require_llama_cpp("the quantization agreement check")

    def answers(path: Path, lora: Path | None = None) -> list[str]:
        with capture_fd2():  # llama.cpp prints its load log to fd 2
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, verbose=False, seed=0,
                                  lora_path=str(lora) if lora is not None else None)
        try:
            return [llm(p, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"] for p in prompts]
        finally:
            llm.close()

    ref, cand = answers(reference), answers(candidate, candidate_lora)
    same = sum(a == b for a, b in zip(ref, cand))
    return {"prompts": len(prompts), "identical": same, "rate": same / len(prompts) if prompts else None,
            "max_tokens": max_tokens, "reference": reference.name, "candidate": candidate.name,
            **({"candidate_lora": candidate_lora.name} if candidate_lora is not None else {})}


def compare_with_llama_cpp(
    gguf_path: Path, hf_dir: Path, *, chat_template: str | None = None, system_prompt: str | None = None,
    texts: list[str] | None = None, max_tokens: int = 96, hf_model=None, tokenizer=None,
    hf_logits_cache: dict | None = None, lora_path: Path | None = None,
) -> dict[str, Any]:
    """Load ``gguf_path`` in llama.cpp; compare its tokenization and logits with the HF model in ``hf_dir``.

    With ``lora_path`` (an adapter GGUF, see :func:`write_lora_gguf`) llama.cpp applies it to
    ``gguf_path`` at load, as ``--lora`` does.

    Returns numbers only; :func:`judge` decides pass/fail.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc = require_llama_cpp("the llama.cpp check")
    tok = tokenizer or AutoTokenizer.from_pretrained(hf_dir)
    texts = texts or _sample_texts(tok, chat_template, system_prompt)
    with capture_fd2() as read:
        try:
            llm = lc.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=True, n_threads=None,
                           lora_path=str(lora_path) if lora_path is not None else None)
        except Exception as e:
            raise ExportError(f"llama.cpp could not load {gguf_path.name}: {e}\n{log_tail(read())}") from e
        try:
            tok_mismatch = []
            n_cases = 0
            for text in texts:
                for special in (False, True):
                    n_cases += 1
                    hf_ids = tok(text, add_special_tokens=special)["input_ids"]
                    ll_ids = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)
                    if list(hf_ids) != list(ll_ids):
                        tok_mismatch.append(
                            {"text": text, "add_special": special, "hf": hf_ids[:40], "llama": ll_ids[:40]}
                        )

            # the same ids go to both models (the rendered template carries its own BOS, if any)
            ids = list(tok(texts[0], add_special_tokens=False)["input_ids"])[:max_tokens]
            llm.reset()
            llm.eval(ids)
            ll = np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()
    cache = hf_logits_cache if hf_logits_cache is not None else {}
    hf = cache.get(tuple(ids))
    if hf is None:
        model = hf_model
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            model.eval()
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits[0].float().numpy()
        cache[tuple(ids)] = hf
    n = min(hf.shape[-1], ll.shape[-1])
    hf, ll = hf[:, :n], ll[:, :n]
    diff = np.abs(hf - ll)
    corrs = [float(np.corrcoef(hf[i], ll[i])[0, 1]) for i in range(len(ids))]
    top_hf, top_ll = hf.argmax(-1), ll.argmax(-1)
    # a top-1 disagreement counts only when llama.cpp's pick is clearly worse on the HF logits
    tol = 2.0 * float(diff.max())
    top1_ok = [bool(a == b or hf[i, a] - hf[i, b] <= tol) for i, (a, b) in enumerate(zip(top_hf, top_ll))]
    return {
        "gguf": gguf_path.name,
        **({"lora": Path(lora_path).name} if lora_path is not None else {}),
        "tokenization_cases": n_cases,
        "tokenization_mismatches": tok_mismatch,
        "n_positions": len(ids),
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "logits_scale": float(np.abs(hf).max()),
        "logits_min_corr": float(min(corrs)),
        "top1_agreement": float(np.mean(top_hf == top_ll)),
        "top1_last_equal": bool(top_hf[-1] == top_ll[-1]),
        "top1_ok": bool(all(top1_ok)),
    }


def judge(r: dict[str, Any], min_corr: float) -> list[str]:
    problems = []
    if r["tokenization_mismatches"]:
        m = r["tokenization_mismatches"][0]
        problems.append(
            f"llama.cpp tokenization differs from the HF tokenizer in {len(r['tokenization_mismatches'])}/"
            f"{r['tokenization_cases']} cases, e.g. {m['text']!r} (add_special={m['add_special']}): "
            f"hf={m['hf']} llama={m['llama']}"
        )
    if r["logits_min_corr"] < min_corr:
        problems.append(f"logits correlation {r['logits_min_corr']:.4f} < {min_corr}")
    if not r["top1_ok"]:
        problems.append(f"top-1 next token differs (agreement {r['top1_agreement']:.2f})")
    return problems


