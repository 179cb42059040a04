"""The quality benchmark's own plumbing (bench/quality.py, bench/quality_summary.py): the specs it
writes are valid sweeps that differ only where they should, and the summary's verdict reads the
right arms. The benchmark's numbers come from the GPU (bench/README.md); these tests make sure a
lease is not spent on a script that cannot answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import quality_summary as qs  # noqa: E402


def _trial(tid: str, seed: int, acc: float, sft_acc: float, **extra) -> dict:
    return {"trial_id": tid, "config": {"grpo.seed": seed},
            "metrics": {"eval_accuracy": acc, "sft_eval_accuracy": sft_acc, "eval_accuracy/add": acc,
                        "trial_started_at": 100.0, "reported_at": 400.0}, **extra}


def _write(path: Path, trials: list[dict]) -> str:
    path.write_text(json.dumps(trials))
    return str(path)


def test_paired_verdict_compares_the_same_seeds_and_separates_sft(tmp_path):
    tutorial = _write(tmp_path / "t.json", [_trial("t1", 11, 0.50, 0.40), _trial("t2", 22, 0.52, 0.42),
                                            _trial("t3", 33, 0.48, 0.38)])
    rerun = _write(tmp_path / "r.json", [_trial("r1", 44, 0.20, 0.18), _trial("r2", 55, 0.22, 0.17),
                                         _trial("r3", 66, 0.18, 0.16),
                                         _trial("rx", 77, 0.99, 0.99, error="OOM")])  # a failed trial never counts
    paired = _write(tmp_path / "p.json", [_trial("p1", 44, 0.10, 0.10), _trial("p2", 55, 0.13, 0.12),
                                          _trial("p3", 66, 0.11, 0.10)])
    runs = {name: qs.load_run(path) for name, path in
            (("tutorial", tutorial), ("sweep", None), ("rerun", rerun), ("paired", paired))}
    s = qs.summarize(runs)
    # The paired run, not the other lease's tutorial (0.50 here), is what the winner is measured against.
    assert s["verdict"]["tutorial_arm"].startswith("paired")
    assert abs(s["verdict"]["rerun_minus_tutorial"] - (0.20 - 0.1133333)) < 1e-6
    assert s["verdict"]["beats"] is True
    final = s["paired"]["final"]
    assert final["seeds"] == [44, 55, 66] and final["positive"] == 3
    assert [round(d, 3) for d in final["differences"]] == [0.10, 0.09, 0.07]
    after_sft = s["paired"]["after_sft"]
    assert [round(d, 3) for d in after_sft["differences"]] == [0.08, 0.05, 0.06]
    assert s["arms"]["rerun"]["failed"] == 1 and s["arms"]["rerun"]["n"] == 3
    assert s["arms"]["sweep"]["missing"] == "not given"


def test_without_a_paired_run_the_verdict_uses_the_tutorial_and_says_when_seeds_are_too_few(tmp_path):
    tutorial = _write(tmp_path / "t.json", [_trial("t1", 11, 0.10, 0.09), _trial("t2", 22, 0.12, 0.10)])
    rerun = _write(tmp_path / "r.json", [_trial("r1", 44, 0.11, 0.10)])
    runs = {"tutorial": qs.load_run(tutorial), "sweep": qs.load_run(None), "rerun": qs.load_run(rerun),
            "paired": qs.load_run(None)}
    s = qs.summarize(runs)
    assert s["paired"] is None
    assert s["verdict"]["tutorial_arm"] == "tutorial"
    assert s["verdict"]["beats"] is None and "fewer than 2 finished seeds" in s["verdict"]["sentence"]


def test_rerun_specs_are_valid_sweeps_that_differ_only_in_the_winner(tmp_path):
    winner = {"grpo.loss_type": "bnpo", "sft.max_steps": 3, "rewards.check_answer.weight": 1.5}
    subprocess.run([sys.executable, str(BENCH / "quality.py"), "rerun", "--out", str(tmp_path), "--cpu",
                    "--winner", json.dumps(winner), "--paired"], check=True, capture_output=True, text=True)
    rerun = yaml.safe_load((tmp_path / "rerun.yaml").read_text())
    paired = yaml.safe_load((tmp_path / "paired.yaml").read_text())
    assert rerun["search"]["space"] == paired["search"]["space"] == {"grpo.seed": {"choice": [44, 55, 66]}}
    assert rerun["grpo"]["loss_type"] == "bnpo" and "loss_type" not in paired["grpo"]
    assert rerun["sft"]["max_steps"] == 3 and paired["sft"]["max_steps"] == 2
    assert next(r for r in rerun["rewards"] if r["name"] == "check_answer")["weight"] == 1.5
    # Nothing else differs: a difference in accuracy is the winner's recipe, not the benchmark's setup.
    for spec in (rerun, paired):
        for key in ("name", "rewards"):
            spec.pop(key, None)
        spec["grpo"].pop("loss_type", None)
        spec["sft"].pop("max_steps")
    assert rerun == paired
    for name in ("rerun.yaml", "paired.yaml"):
        r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "validate", str(tmp_path / name)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
