"""Print bench/warm_sweep.py's JSON as one line per trial (where its time went) and each mode's
utilization. Usage: python bench/warm_summary.py warm.json [--smi smi.csv]

``--smi``: nvidia-smi's samples (bench/warm_session.sh writes them every 2 s) averaged over
each trial's steps (first step to last report): how hard the GPU itself worked while the
sweep counted it busy."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

COLS = ["model_reused", "load_s", "startup_s", "sft_setup_s", "sft_seconds", "eval_seconds", "grpo_setup_s",
        "grpo_step_s", "elapsed_s", "first_step_reward", "gpu_max_allocated_gib", "sft_compile_s", "compile_s",
        "compiled_graphs"]


def _f(v: object) -> str:
    return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{str(v)[:8]:>8}"


def read_smi(path: str) -> list[tuple[float, float, float]]:
    """(unix time, GPU utilization %, memory used MiB) per nvidia-smi line."""
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            rows.append((t.timestamp(), float(parts[1].rstrip(" %")), float(parts[2].split()[0])))
        except (ValueError, IndexError):
            continue  # a header or an error line
    return rows


def gpu_use(smi: list[tuple[float, float, float]], trial: dict) -> str:
    a, b = trial.get("first_step_at"), trial.get("reported_at")
    util = [u for t, u, _ in smi if a and b and a <= t <= b]
    if not util:
        return "gpu util: no samples"
    return (f"gpu util in steps: mean {statistics.fmean(util):.1f}%, median {statistics.median(util):.0f}%, "
            f"max {max(util):.0f}% ({len(util)} samples)")


def main(path: str, smi_path: str | None = None) -> None:
    smi = read_smi(smi_path) if smi_path else []
    result = json.load(open(path))
    for mode, m in result.get("modes", {}).items():
        print(f"== {mode}", "(partial)" if m.get("partial") else "", m.get("error", ""))
        print(f"{'trial':>9} {'status':>10} " + " ".join(f"{c[:8]:>8}" for c in COLS))
        for t in m.get("trials", []):
            cfg = t.get("config") or {}
            print(f"{t['trial_id'][-9:]:>9} {str(t.get('status') or t.get('error') or 'done')[:10]:>10} "
                  + " ".join(_f(t.get(c)) for c in COLS),
                  {k.split(".")[-1]: (round(v, 6) if isinstance(v, float) else v) for k, v in cfg.items()})
            if smi:
                print(" " * 20, gpu_use(smi, t))
        print("utilization:", json.dumps(m.get("utilization")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("warm_json")
    ap.add_argument("--smi")
    args = ap.parse_args()
    main(args.warm_json, args.smi)
