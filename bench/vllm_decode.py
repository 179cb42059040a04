"""Where the 1.7B step's generation goes: vLLM's decode, with and without the trial's LoRA (#24).

The profile at a9f965a put 0.99 s of the 1.36 s GRPO step of the random Qwen3-1.7B shape in
generation: 256 decode steps of about 3.9 ms for 8 completions, over five times the 0.7 ms an
H200 needs to read the 3.4 GB of weights once per step (docs/performance.md). This measures the
same engine as a trial (Unsloth's ``fast_inference``, LoRA r=32 on all seven projections, half
the card) outside the trainer, so the share each part takes is read directly:

- decode ms per token step at 8, 16 and 32 sequences, **without a LoRA** (the base model alone)
  and **with the trial's LoRA** (vLLM's punica kernels on every projection), timed end to end
  around ``fast_generate`` with the GPU synchronised; ``ignore_eos`` so every sequence decodes
  ``--tokens`` tokens, as the random model does in a trial;
- the engine's own settings (CUDA graphs or eager, compilation level, capture sizes), read back;
- with ``--profile``: torch.profiler's CUDA kernel table for one batch of 8, with and without the
  LoRA (the top kernels by GPU time; graph-launched kernels appear where CUPTI traces them).

Usage (device, after ../shared/device/stage.sh --model): ``python3 bench/vllm_decode.py --profile
--out $OUT/decode.json`` (one engine start, about two minutes with warm compile caches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e: the floor of a decode step is one read of the weights


def per_token_ms(seconds: list[float], tokens: int) -> dict[str, float]:
    """Mean and spread of a batch's wall time, per decode step in ms.

    >>> per_token_ms([1.0, 1.2, 1.1], 256)
    {'ms_per_token_step': 4.297, 'sd': 0.391, 'runs': 3}
    """
    ms = [s / tokens * 1000 for s in seconds]
    return {"ms_per_token_step": round(statistics.mean(ms), 3),
            "sd": round(statistics.stdev(ms), 3) if len(ms) > 1 else 0.0, "runs": len(ms)}


def lora_share(base_ms: float, lora_ms: float) -> float:
    """The part of a LoRA decode step the adapter adds (0.25: a quarter of the step).

    >>> lora_share(2.0, 4.0)
    0.5
    """
    return round((lora_ms - base_ms) / lora_ms, 3) if lora_ms > 0 else 0.0


def _engine_settings(model) -> dict[str, object]:
    """What the engine was built with, read back (best effort: vLLM's layout moves between versions)."""
    out: dict[str, object] = {}
    try:
        cfg = model.vllm_engine.llm_engine.vllm_config
        out["enforce_eager"] = cfg.model_config.enforce_eager
        cc = cfg.compilation_config
        for name in ("level", "mode", "cudagraph_mode", "cudagraph_capture_sizes", "use_cudagraph"):
            if hasattr(cc, name):
                out[name] = str(getattr(cc, name))
        lc = cfg.lora_config
        out["lora"] = {k: getattr(lc, k, None) for k in ("max_lora_rank", "max_loras", "fully_sharded_loras")} if lc else None
    except Exception as e:  # noqa: BLE001 - a report, not a check
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/qwen3-1.7b-random")
    ap.add_argument("--batches", default="8,16,32", help="sequences decoded together (a trial's: 8 per prompt)")
    ap.add_argument("--tokens", type=int, default=256, help="decode steps per sequence (the trial's completion length)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="torch.profiler's kernel table for a batch of 8, each way")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()

    import unsloth  # noqa: F401 - first, as in a trial
    import torch
    from unsloth import FastLanguageModel
    from vllm import SamplingParams

    from trial_gpu import make_random_qwen3

    model_dir = make_random_qwen3(Path(args.model_dir))
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=1024, load_in_4bit=False, fast_inference=True,
        max_lora_rank=args.rank, gpu_memory_utilization=0.5)
    load_s = time.time() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=2 * args.rank, use_gradient_checkpointing="unsloth", random_state=3407,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model.save_lora("/tmp/vllm_decode_lora")
    lora = model.load_lora("/tmp/vllm_decode_lora")
    ids = tok(" ".join(f"w{i}" for i in range(10, 60)))["input_ids"]
    params = SamplingParams(temperature=1.0, min_p=0.1, max_tokens=args.tokens, ignore_eos=True, seed=3407)

    def run(batch: int, with_lora: bool) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.fast_generate([{"prompt_token_ids": ids}] * batch, sampling_params=params,
                            lora_request=lora if with_lora else None, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    numbers: dict[str, object] = {"load_s": round(load_s, 1), "weight_gb": round(weight_bytes / 1e9, 3),
                                  "floor_ms_per_token_step": round(weight_bytes / H200_BANDWIDTH * 1000, 3),
                                  "engine": _engine_settings(model), "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {}
        for with_lora in (False, True):
            run(batch, with_lora)  # warm-up: first use of this batch size and adapter
            row["lora" if with_lora else "base"] = per_token_ms([run(batch, with_lora) for _ in range(args.repeats)],
                                                                args.tokens)
        row["lora_share"] = lora_share(row["base"]["ms_per_token_step"], row["lora"]["ms_per_token_step"])
        numbers["batches"][str(batch)] = row
        print(batch, json.dumps(row), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        numbers["kernels"] = {}
        for with_lora in (False, True):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(8, with_lora)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
            numbers["kernels"]["lora" if with_lora else "base"] = table
            print(table, flush=True)
    result = {"bench": "vllm_decode", "config": vars(args) | {"model": "random Qwen3-1.7B shape",
                                                               "gpu_memory_utilization": 0.5},
              "numbers": numbers, "device": device_info(), "commit": commit("src", "bench"),
              "wall_s": round(time.time() - t0, 1), "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in numbers.items() if k != "kernels"}, indent=2))


if __name__ == "__main__":
    main()
