"""Time grpo_ray.export.pipeline.export_model stage by stage.

    python bench/export_speed.py                          # the tiny builtin model + a random LoRA
    python bench/export_speed.py --base DIR --adapter DIR --types f16,q8_0,q4_k_m
    python bench/export_speed.py --gguf path/to/base.gguf # a GGUF base via grpo_ray.gguf.hf_dir

Prints one JSON object: seconds per progress stage, total, file sizes and the check numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _random_adapter(base: Path, out: Path, scale: float) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="HF model dir (default: build the tiny model)")
    ap.add_argument("--gguf", type=Path, help="a GGUF base, materialized with grpo_ray.gguf.hf_dir")
    ap.add_argument("--adapter", type=Path, help="PEFT adapter dir (default: a random r=4 LoRA)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--bos", action="store_true", help="chat template with BOS (Gemma)")
    ap.add_argument("--out", type=Path, help="export dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    from grpo_ray.export.pipeline import export_model
    from grpo_ray.task import template

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        t0 = time.perf_counter()
        if args.gguf:
            from grpo_ray.gguf.hf_dir import materialize_gguf

            base = materialize_gguf(args.gguf)
        elif args.base:
            base = args.base
        else:
            from grpo_ray.tiny import build_tiny_model

            base = build_tiny_model(tmp_p / "tiny")
        adapter = args.adapter or _random_adapter(base, tmp_p / "lora", scale=0.01)
        prep = time.perf_counter() - t0

        stages: dict[str, float] = {}
        last = [time.perf_counter(), None]

        def progress(msg: str) -> None:
            now = time.perf_counter()
            if last[1] is not None:
                stages[last[1]] = round(now - last[0], 3)
            last[0], last[1] = now, msg
            print(f"[{now - t0:8.2f}s] {msg}", file=sys.stderr, flush=True)

        t1 = time.perf_counter()
        res = export_model(
            base, adapter, args.out or tmp_p / "export", gguf_types=args.types.split(","),
            chat_template=template.chat_template(bos_token=args.bos), check=not args.no_check,
            progress=progress,
        )
        total = time.perf_counter() - t1
        print(json.dumps({
            "base": str(base), "prepare_s": round(prep, 2), "export_s": round(total, 2), "stages_s": stages,
            "sizes": res.sizes, "checks": res.checks,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
