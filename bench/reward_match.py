"""Warm vs fresh: the first GRPO step of each configuration wherever bench/warm_sweep.py ran it.

A trial's first-step reward depends only on its configuration and seeds (its LoRA starts from
its seed on a fresh or a reused actor alike, trial/warm.py), so a configuration that ran on a
fresh actor in one result file and on a warm one in another should get the same reward. The
search seed makes trial k sample the same configuration in every mode and lease, so the
result files line up. Prints, per configuration seen more than once, every run of it: file,
mode, fresh or warm, first-step reward and, where recorded, the adapter's norm after SFT
(sft_lora_norm: if that differs too, SFT already differed).

Then two summaries that tell a reuse leak from run-to-run noise:
- the largest spread of one configuration's first-step reward among its warm runs only, and
  between its warm and fresh runs: if warm runs on different leases disagree as much as warm
  and fresh do, reuse is not what moves the reward;
- sft_lora_norm by LoRA rank, fresh and warm apart. In bench/warm_sweep.yaml's space only
  ``lora.rank`` shapes SFT (the rest is GRPO's), so every trial of one rank runs the same SFT
  from the same init and should end at the same norm.

Usage: python bench/reward_match.py bench/results/warm_sweep_h200_0ec4420.json \
           bench/results/warm_sweep_packed_h200_c2ff95b.json bench/results/warm_sweep_reuse_h200_32d5bab.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def runs(paths: list[str]) -> dict[tuple, list[dict]]:
    """Every finished trial with a first-step reward, grouped by its sampled configuration."""
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for path in paths:
        result = json.loads(Path(path).read_text())
        for mode, m in result.get("modes", {}).items():
            for t in m.get("trials", []):
                if t.get("first_step_reward") is None:
                    continue
                key = tuple(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in t["config"].items()))
                by_config[key].append({"file": Path(path).name, "mode": mode, "warm": bool(t.get("model_reused")),
                                       "reward": t["first_step_reward"], "sft_lora_norm": t.get("sft_lora_norm"),
                                       "rank": t["config"].get("lora.rank")})
    return by_config


def spread(values: list[float]) -> float | None:
    return max(values) - min(values) if len(values) > 1 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    same = differ = 0
    among_warm: list[float] = []  # per configuration: spread of its warm runs' rewards
    warm_fresh: list[float] = []  # per configuration: largest |warm - fresh|
    norms: dict[tuple, list[float]] = defaultdict(list)  # (rank, warm) -> sft_lora_norm of each trial
    for key, seen in runs(args.results).items():
        for r in seen:
            if r["sft_lora_norm"] is not None:
                norms[(r["rank"], r["warm"])].append(r["sft_lora_norm"])
        if len(seen) < 2:
            continue
        rewards = {r["reward"] for r in seen}
        same, differ = same + (len(rewards) == 1), differ + (len(rewards) > 1)
        print(", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                        for k, v in key) + ("  SAME" if len(rewards) == 1 else f"  DIFFERENT by {spread(list(rewards)):.6g}"))
        for r in seen:
            norm = f"  sft_lora_norm {r['sft_lora_norm']:.9g}" if r["sft_lora_norm"] is not None else ""
            print(f"    {r['file']} [{r['mode']}] {'warm ' if r['warm'] else 'fresh'}  {r['reward']:.10g}{norm}")
        warm = [r["reward"] for r in seen if r["warm"]]
        fresh = [r["reward"] for r in seen if not r["warm"]]
        if (warm_spread := spread(warm)) is not None:
            among_warm.append(warm_spread)
        if warm and fresh:
            warm_fresh.append(max(abs(w - f) for w in warm for f in fresh))
    print(f"{same} configuration(s) with one first-step reward everywhere, {differ} with more than one")
    if among_warm:
        print(f"largest spread among one configuration's warm runs: {max(among_warm):.6g} ({len(among_warm)} configuration(s))")
    if warm_fresh:
        print(f"largest |warm - fresh| of one configuration: {max(warm_fresh):.6g} ({len(warm_fresh)} configuration(s))")
    for (rank, warm), values in sorted(norms.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        print(f"sft_lora_norm, rank {rank}, {'warm ' if warm else 'fresh'}: "
              + ", ".join(f"{v!r} ({values.count(v)} trial(s))" for v in sorted(set(values))))


if __name__ == "__main__":
    main()
