"""`grpo-ray sweep` refuses bad input before any trial starts: one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SPEC = """name: bad
backend: hf
model: {{source: {model}}}
data:
  sft: null
  grpo: {{source: {data}, columns: {{question: q, answer: a}}}}
  eval: {{size: 2}}
rewards:
  - {{name: {reward}}}
resources: {{cpu: 1, gpu: 0}}
"""


def _sweep(tmp_path, model="builtin:tiny-qwen3", data=None, reward="check_answer", lines=None):
    data_path = tmp_path / "train.jsonl"
    data_path.write_text(lines if lines is not None else "".join(
        f'{{"q": "What is {i} + 1?", "a": "{i + 1}"}}\n' for i in range(10)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model=model, data=data or data_path, reward=reward))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec), "--storage", str(tmp_path / "runs")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "runs").exists(), "a refused sweep must not write results"
    return r.stderr


def test_bad_json_line_in_data_file(tmp_path):
    err = _sweep(tmp_path, lines='{"q": "a", "a": "1"}\n{"q": "b", "a": 2\n')
    assert "train.jsonl:2: cannot parse as jsonl" in err


def test_missing_column(tmp_path):
    err = _sweep(tmp_path, lines='{"question": "a", "a": "1"}\n')
    assert "missing column(s) q; available: question, a" in err


def test_missing_data_file(tmp_path):
    err = _sweep(tmp_path, data=tmp_path / "nope.parquet")
    assert "nope.parquet: no such file" in err


@pytest.mark.parametrize("model, needle", [
    ("/no/such/model.gguf", "no such GGUF file"),
    ("builtin:huge", "unknown builtin model"),
])
def test_bad_model_source(tmp_path, model, needle):
    assert needle in _sweep(tmp_path, model=model)


def test_unknown_reward(tmp_path):
    err = _sweep(tmp_path, reward="nosuchpkg.mod:fn")
    assert "nosuchpkg.mod:fn" in err


def broken_reward(prompts, completions, **kwargs):
    raise RuntimeError("reward server unreachable")


def test_sweep_whose_trials_all_fail_says_why_and_keeps_the_record(tmp_path):
    spec = tmp_path / "spec.yaml"
    text = (REPO / "sweeps" / "smoke.yaml").read_text()
    text = text.replace("num_samples: 3", "num_samples: 2").replace("max_concurrent_trials: auto", "max_failures: 0\n  max_concurrent_trials: auto")
    text += "\nrewards:\n  - {name: test_cli:broken_reward}\n"
    spec.write_text(text.replace("    rewards.check_answer.weight: {uniform: [0.5, 2.0]}\n", ""))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec), "--storage", str(tmp_path / "runs")],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 of 2 trials failed" in r.stderr and "reward server unreachable" in r.stderr
    assert "Traceback" not in r.stderr.split("error:")[-1]
    trials = json.loads((tmp_path / "runs" / "smoke" / "trials.json").read_text())
    assert len(trials) == 2 and all("reward server unreachable" in t["error"] for t in trials)
    assert not (tmp_path / "runs" / "smoke" / "best").exists()
