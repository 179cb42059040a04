"""Wall time of the embedded smoke sweep on this machine, and each trial's time.

    python bench/smoke_sweep.py            # writes bench/results/smoke_sweep.json

Runs the README's main-job command (`grpo-ray sweep sweeps/smoke.yaml`) in a subprocess,
cold Ray start included, and reads each trial's `time_total_s` from trials.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as storage:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", "sweeps/smoke.yaml", "--storage", storage],
                       check=True, cwd=REPO, capture_output=True)
        wall = time.time() - t0
        run = Path(storage, "smoke")
        trials = json.loads((run / "trials.json").read_text())
        best = json.loads((run / "best" / "best.json").read_text())
    result = {
        "bench": "smoke_sweep",
        "command": "python bench/smoke_sweep.py",
        "device": device_info(),
        "commit": commit("src", "sweeps/smoke.yaml"),
        "config": "sweeps/smoke.yaml",
        "numbers": {
            "sweep_wall_s": round(wall, 1),
            "trials": len(trials),
            "trial_s": [round(t["metrics"].get("time_total_s", float("nan")), 1) for t in trials],
            "export_s": best.get("export_seconds"),
            "search_s": best.get("sweep_seconds"),
        },
    }
    out = REPO / "bench" / "results" / "smoke_sweep.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["numbers"], indent=2))


if __name__ == "__main__":
    main()
