"""bench/spy_summary.py --steps-breakdown: where warm trials' GRPO steps spend their host time, from
py-spy dumps in bench/spy_sample.sh's format, written here with known answers."""

from __future__ import annotations

import doctest
import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import spy_summary  # noqa: E402


def dump(t: float, pid: int, threads: list[tuple[str, list[str]]]) -> str:
    lines = [f"=== {t} {pid}", f"Process {pid}: ray::ImplicitFunc.train", "Python v3.12.3 (/usr/bin/python3.12)"]
    for i, (state, frames) in enumerate(threads):
        lines.append(f'Thread {pid + i} ({state}): "T{i}"')
        lines += [f"    {f} (/usr/lib/python3/dist-packages/x.py:{n})" for n, f in enumerate(frames, 1)]
    return "\n".join(lines) + "\n"


def test_steps_breakdown_counts_only_warm_trials_steps_by_bucket(tmp_path):
    ckpt = ["Linear.forward", "CheckpointFunction.backward", "_engine_run_backward"]
    gen = ["LLMEngine.step", "_generate", "training_step"]
    text = "".join([
        dump(5, 1, [("active", ckpt)]),                     # before the warm trial's first step: not counted
        dump(12, 1, [("active", ckpt), ("idle", gen)]),     # idle threads do not count
        dump(13, 1, [("active+gil", gen)]),
        dump(14, 1, [("active", ["_compile", "convert_frame"])]),
        dump(15, 1, [("idle", gen)]),                       # nothing active: idle
        dump(16, 2, [("active", gen)]),                     # a cold trial's process: not counted
        "=== 17 1\nError: Failed to get stack traces\n",  # an unreadable dump has no active thread
    ])
    path = tmp_path / "spy.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    trials = [{"worker_pid": 1, "trial_started_at": 1, "first_step_at": 10, "reported_at": 100, "model_reused": 1},
              {"worker_pid": 2, "trial_started_at": 1, "first_step_at": 10, "reported_at": 100, "model_reused": 0}]
    assert spy_summary.steps_breakdown(str(path), trials) == {
        "idle": 2, "checkpointed backward": 1, "vllm generate": 1, "compile": 1}


def test_doctests():
    assert doctest.testmod(spy_summary).failed == 0
