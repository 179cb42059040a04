"""Warm vs fresh: the first GRPO step of each configuration wherever bench/warm_sweep.py ran it.

A trial's first-step reward depends only on its configuration and seeds (its LoRA starts from
its seed on a fresh or a reused actor alike, trial/warm.py), so a configuration that ran on a
fresh actor in one result file and on a warm one in another should get the same reward. The
search seed makes trial k sample the same configuration in every mode and lease, so the
result files line up. Prints, per configuration seen more than once, every run of it: file,
mode, fresh or warm, first-step reward and, where recorded, the adapter's norm after SFT
(sft_lora_norm: if that differs too, SFT already differed).

Then summaries that tell a reuse leak from run-to-run noise, within one result file (one
lease: one machine, one set of compile caches) and across files:
- within a lease: the largest |warm - fresh| of one configuration, and the largest spread
  among its fresh runs. Zero for both means reuse changed nothing there;
- across leases: the largest spread among one configuration's fresh runs, among its warm runs,
  and between warm and fresh. If fresh runs on different leases disagree as much as warm and
  fresh do, reuse is not what moves the reward;
- sft_lora_norm by LoRA rank, fresh and warm apart. In bench/warm_sweep.yaml's space only
  ``lora.rank`` shapes SFT (the rest is GRPO's), so every trial of one rank runs the same SFT
  from the same init and should end at the same norm, up to the kernels torch.compile picked.

Usage: python bench/reward_match.py bench/results/warm_sweep_h200_0ec4420.json \
           bench/results/warm_sweep_packed_h200_c2ff95b.json bench/results/warm_sweep_reuse_h200_32d5bab.json \
           bench/results/warm_sweep_fresh_h200_b00a605.json
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


def gap(warm: list[float], fresh: list[float]) -> float | None:
    """The largest |warm - fresh| over every pair, or None without both."""
    return max(abs(w - f) for w in warm for f in fresh) if warm and fresh else None


def rewards_of(seen: list[dict], warm: bool) -> list[float]:
    return [r["reward"] for r in seen if r["warm"] == warm]


def largest(label: str, values: list[float]) -> None:
    if values:
        print(f"{label}: {max(values):.6g} ({len(values)} configuration(s))")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    same = differ = 0
    # per configuration (and, for the first two, per lease): the spreads the summaries report
    lease_gap: list[float] = []
    lease_fresh: list[float] = []
    among_fresh: list[float] = []
    among_warm: list[float] = []
    warm_fresh: list[float] = []
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
        for file in sorted({r["file"] for r in seen}):
            in_lease = [r for r in seen if r["file"] == file]
            if (g := gap(rewards_of(in_lease, True), rewards_of(in_lease, False))) is not None:
                lease_gap.append(g)
            if (f := spread(rewards_of(in_lease, False))) is not None:
                lease_fresh.append(f)
        for values, spreads in ((rewards_of(seen, False), among_fresh), (rewards_of(seen, True), among_warm)):
            if (s := spread(values)) is not None:
                spreads.append(s)
        if (g := gap(rewards_of(seen, True), rewards_of(seen, False))) is not None:
            warm_fresh.append(g)
    print(f"{same} configuration(s) with one first-step reward everywhere, {differ} with more than one")
    largest("within one lease, largest |warm - fresh|", lease_gap)
    largest("within one lease, largest spread among fresh runs", lease_fresh)
    largest("across leases, largest spread among fresh runs", among_fresh)
    largest("across leases, largest spread among warm runs", among_warm)
    largest("across leases, largest |warm - fresh|", warm_fresh)
    for (rank, warm), values in sorted(norms.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        print(f"sft_lora_norm, rank {rank}, {'warm ' if warm else 'fresh'}: "
              + ", ".join(f"{v!r} ({values.count(v)} trial(s))" for v in sorted(set(values))))


if __name__ == "__main__":
    main()
