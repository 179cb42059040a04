"""Warm vs fresh: the first GRPO step of each configuration wherever bench/warm_sweep.py ran it.

A trial's first-step reward depends only on its configuration and seeds (its LoRA starts from
its seed on a fresh or a reused actor alike, trial/warm.py), so a configuration that ran on a
fresh actor in one result file and on a warm one in another should get the same reward. The
search seed makes trial k sample the same configuration in every mode and lease, so the
result files line up. Prints, per configuration seen more than once, every run of it: file,
mode, fresh or warm, first-step reward and, where recorded, the adapter's norm after SFT
(sft_lora_norm: if that differs too, SFT already differed).

Usage: python bench/reward_match.py bench/results/warm_sweep_h200_0ec4420.json \
           bench/results/warm_sweep_packed_h200_c2ff95b.json
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
                                       "reward": t["first_step_reward"], "sft_lora_norm": t.get("sft_lora_norm")})
    return by_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    same = differ = 0
    for key, seen in runs(args.results).items():
        if len(seen) < 2:
            continue
        rewards = {r["reward"] for r in seen}
        same, differ = same + (len(rewards) == 1), differ + (len(rewards) > 1)
        print(", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                        for k, v in key) + ("  SAME" if len(rewards) == 1 else "  DIFFERENT"))
        for r in seen:
            norm = f"  sft_lora_norm {r['sft_lora_norm']:.9g}" if r["sft_lora_norm"] is not None else ""
            print(f"    {r['file']} [{r['mode']}] {'warm ' if r['warm'] else 'fresh'}  {r['reward']:.10g}{norm}")
    print(f"{same} configuration(s) with one first-step reward everywhere, {differ} with more than one")


if __name__ == "__main__":
    main()
