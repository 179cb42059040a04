"""Print bench/warm_sweep.py's JSON as one line per trial (where its time went) and each mode's
utilization. Usage: python bench/warm_summary.py warm.json"""

from __future__ import annotations

import json
import sys

COLS = ["model_reused", "load_s", "startup_s", "sft_setup_s", "sft_seconds", "eval_seconds", "grpo_setup_s",
        "grpo_step_s", "elapsed_s", "first_step_reward", "gpu_max_allocated_gib"]


def _f(v: object) -> str:
    return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{str(v)[:8]:>8}"


def main(path: str) -> None:
    result = json.load(open(path))
    for mode, m in result.get("modes", {}).items():
        print(f"== {mode}", "(partial)" if m.get("partial") else "", m.get("error", ""))
        print(f"{'trial':>9} {'status':>10} " + " ".join(f"{c[:8]:>8}" for c in COLS))
        for t in m.get("trials", []):
            cfg = t.get("config") or {}
            print(f"{t['trial_id'][-9:]:>9} {str(t.get('status') or t.get('error') or 'done')[:10]:>10} "
                  + " ".join(_f(t.get(c)) for c in COLS),
                  {k.split(".")[-1]: (round(v, 6) if isinstance(v, float) else v) for k, v in cfg.items()})
        print("utilization:", json.dumps(m.get("utilization")))


if __name__ == "__main__":
    main(sys.argv[1])
