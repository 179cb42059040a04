"""The quality benchmark: does a sweep end with a better model than running the tutorial once?

Three `grpo-ray sweep` runs from one recipe (bench/quality.yaml, the tutorial's settings on
google/gemma-3-270m), at the same steps per trial:

1. ``tutorial``: the recipe's own values on 3 seeds (``search.sampler: grid`` over
   ``grpo.seed``); the same trials' accuracy after SFT is the SFT-alone arm;
2. ``sweep``: Optuna (TPE, ASHA on held-out accuracy) over the space a practitioner would search:
   GRPO variant (loss_type), learning rates, group size, temperature, SFT length and learning
   rate, LoRA rank, the answer reward's weight; scored on the validation set, where it chooses;
3. ``rerun``: the sweep's winner (its best.json, the product's own pick) on 3 fresh seeds;
4. ``paired`` (``rerun --paired``, PAIRED=1 in the session): the tutorial's recipe on the
   re-run's seeds in the same lease, so winner and tutorial differ in nothing but the recipe.

Tutorial and rerun are scored on the test set (bench/data/heldout_test.jsonl), which nothing
chooses on, so picking the best of many trials does not inflate the comparison
(bench/heldout_math.py). bench/quality_summary.py turns the three runs into the JSON.

Steps (the device: after ../shared/device/stage.sh --model and install-on-device.sh):

    setsid nohup bash bench/quality_session.sh COMMIT > /tmp/q.log 2>&1 &
    bash bench/quality_poll.sh 560      # back to back, until /tmp/q/DONE

which runs ``python bench/quality.py specs``, the tutorial and sweep runs side by side on one
Ray cluster, ``python bench/quality.py rerun``, the rerun, and the summary. On this CPU machine
the same pipeline runs on the tiny model (``--cpu``: checks the plumbing, learns nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from _common import REPO

TUTORIAL_SEEDS = [11, 22, 33]
RERUN_SEEDS = [44, 55, 66]  # fresh: no trial of the sweep or the tutorial ran with them

# What a practitioner would search on this recipe. The tutorial's values lie inside (so the
# sweep's first trial is the tutorial, seed 3407); the ranges are the ones GRPO-on-LoRA
# practice uses, wider than the tutorial's 5e-6 for a 40-step run.
SPACE: dict[str, Any] = {
    "grpo.loss_type": {"choice": ["dapo", "grpo", "dr_grpo", "bnpo"]},
    "grpo.learning_rate": {"loguniform": [2.0e-6, 1.0e-4]},
    "grpo.num_generations": {"choice": [4, 8]},
    "grpo.temperature": {"uniform": [0.7, 1.2]},
    "sft.max_steps": {"choice": [50, 100]},
    "sft.learning_rate": {"loguniform": [5.0e-5, 5.0e-4]},
    "lora.rank": {"choice": [16, 32, 64]},
    "rewards.check_answer.weight": {"uniform": [0.5, 3.0]},
}


def _base(cpu: bool, gguf: str | None) -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "bench" / "quality.yaml").read_text())
    if gguf:
        spec["model"]["source"] = gguf
    if cpu:  # the plumbing on this machine: tiny model, hf backend, a few steps
        spec |= {"backend": "hf", "storage": "/tmp/grpo-quality-cpu"}
        spec["model"] = {"source": "builtin:tiny-qwen3", "max_seq_length": 320}
        spec["sft"] |= {"max_steps": 2, "batch_size": 2}
        spec["grpo"] |= {"max_steps": 4, "report_every": 2, "optim": "adamw_torch", "max_completion_length": 24}
        spec["data"]["eval"] |= {"size": 20, "max_new_tokens": 24}
        spec["resources"] = {"gpu": 0, "cpu": 1}
    for key in ("source",):
        src = spec["data"]["eval"]["source"]
        src[key] = str(REPO / src[key]) if not Path(src[key]).is_absolute() else src[key]
    return spec


def _grid_on_seeds(spec: dict[str, Any], name: str, seeds: list[int], fixed: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    spec["name"] = name
    for path, value in fixed.items():  # the winner's values, written where the spec keeps them
        _set(spec, path, value)
    spec["search"] |= {"sampler": "grid", "num_samples": len(seeds), "max_concurrent_trials": len(seeds),
                       "space": {"grpo.seed": {"choice": seeds}}}
    return spec


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    if path.startswith("rewards."):
        name, _, attr = path[len("rewards."):].rpartition(".")
        rewards = spec.setdefault("rewards", [{"name": n} for n in
                                              ["match_format_exactly", "match_format_approximately",
                                               "check_answer", "check_numbers"]])
        next(r for r in rewards if r["name"] == name)[attr] = value
        return
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def make_specs(out: Path, cpu: bool, gguf: str | None, sweep_trials: int) -> None:
    base = _base(cpu, gguf)
    out.mkdir(parents=True, exist_ok=True)
    tutorial = _grid_on_seeds(base, "quality-tutorial", TUTORIAL_SEEDS, {})
    sweep = copy.deepcopy(base)
    sweep["name"] = "quality-sweep"
    sweep["data"]["eval"]["source"]["source"] = str(REPO / "bench" / "data" / "heldout_val.jsonl")
    sweep["search"] |= {
        "sampler": "tpe", "num_samples": sweep_trials, "max_concurrent_trials": 4, "startup_trials": 4,
        "space": SPACE if not cpu else {k: v for k, v in SPACE.items() if k != "sft.max_steps"},
        # Stop a trial whose held-out accuracy is in the lower half at its first report.
        "early_stopping": {"metric": "eval_accuracy", "mode": "max", "grace_period": sweep["grpo"]["report_every"],
                           "reduction_factor": 2},
    }
    for name, spec in (("tutorial", tutorial), ("sweep", sweep)):
        (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"wrote {out / name}.yaml")


def make_rerun(out: Path, sweep_run: Path | None, winner_json: str | None, cpu: bool, gguf: str | None,
               paired: bool = False) -> None:
    """rerun.yaml from the sweep's best.json, or from ``winner_json`` (its hyperparameters, as an
    earlier lease's bench/results recorded them: the re-run arm alone in a later lease).

    ``paired`` also writes paired.yaml: the tutorial's recipe on the re-run's seeds, to run beside
    it in the same lease, so each seed gives a winner-minus-tutorial difference measured on one
    machine at one commit (the arms of different leases differ in more than the recipe)."""
    if winner_json:
        trial_id, winner = "(given)", json.loads(winner_json)
    else:
        best = json.loads((sweep_run / "best" / "best.json").read_text())
        trial_id, winner = best["trial_id"], best["hyperparameters"]
    spec = _grid_on_seeds(_base(cpu, gguf), "quality-rerun", RERUN_SEEDS, winner)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerun.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"wrote {out}/rerun.yaml: the sweep's winner {trial_id} {json.dumps(winner)}")
    if paired:
        tutorial = _grid_on_seeds(_base(cpu, gguf), "quality-paired", RERUN_SEEDS, {})
        (out / "paired.yaml").write_text(yaml.safe_dump(tutorial, sort_keys=False))
        print(f"wrote {out}/paired.yaml: the tutorial's recipe on the re-run's seeds {RERUN_SEEDS}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("specs", help="write tutorial.yaml and sweep.yaml")
    s.add_argument("--sweep-trials", type=int, default=6)
    r = sub.add_parser("rerun", help="write rerun.yaml from the sweep's best.json")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep-run", type=Path, help="the sweep's run directory (its best/best.json)")
    which.add_argument("--winner", help="the winner's hyperparameters as JSON ({dotted.path: value})")
    r.add_argument("--paired", action="store_true",
                   help="also write paired.yaml: the tutorial's recipe on the re-run's seeds, run beside it")
    for p in (s, r):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--gguf", help="the gemma GGUF (default: bench/quality.yaml's model.source)")
        p.add_argument("--cpu", action="store_true", help="tiny model, hf backend: the plumbing only")
    a = ap.parse_args(argv)
    if a.cmd == "specs":
        make_specs(a.out, a.cpu, a.gguf, a.sweep_trials)
    else:
        make_rerun(a.out, a.sweep_run, a.winner, a.cpu, a.gguf, a.paired)
    return 0


if __name__ == "__main__":
    sys.exit(main())
