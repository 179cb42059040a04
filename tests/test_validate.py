"""`grpo-ray validate` refuses what a sweep would fail on, and every command answers a careless
path or spec file with one line and exit 2 (issue #26). Real CLI processes, real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BASE = """name: v
backend: hf
model: {{source: {model}}}
data:
  sft: null
  grpo:
    source: {data}
    columns: {{question: q, answer: a}}
  eval: {{size: 2}}
rewards:
  - name: check_answer
  - name: {reward}
resources: {{cpu: 1, gpu: 0}}
search:
  space:
    {space}
"""


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_ray.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def _spec(tmp_path: Path, model: str = "builtin:tiny-qwen3", data: str | None = None, reward: str = "check_numbers",
          space: str = "lora.rank: {choice: [4, 8]}", rows: str | None = None) -> Path:
    data_path = tmp_path / "train.jsonl"
    data_path.write_text(rows if rows is not None else "".join(
        f'{{"q": "What is {i} + 1?", "a": "{i + 1}"}}\n' for i in range(10)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE.format(model=model, data=data or data_path, reward=reward, space=space))
    return spec


def _refused(*args: str) -> str:
    r = _cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr
    line = " ".join(r.stderr.split())  # rich may wrap a long line
    assert line.startswith("error:"), r.stderr
    return line


def test_a_good_spec_validates(tmp_path):
    r = _cli("validate", str(_spec(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "name: v" in r.stdout


@pytest.mark.parametrize("kwargs, where, needle", [
    # every value a domain can produce: a later choice, the high end of a range
    ({"space": "lora.rank: {choice: [4, -8]}"}, "spec.yaml:16: search.space.lora.rank", "choice value -8"),
    ({"space": "grpo.min_p: {uniform: [0.5, 1.5]}"}, "spec.yaml:16: search.space.grpo.min_p", "uniform value 1.5"),
    ({"space": "grpo.num_generations: {int: [1, 4]}"}, "spec.yaml:16: search.space.grpo.num_generations",
     "int value 1"),
    ({"reward": "nosuch_reward"}, "spec.yaml:12: rewards.1.name", "nosuch_reward"),
    ({"reward": "nosuchpkg.mod:fn"}, "spec.yaml:12: rewards.1.name", "cannot import 'nosuchpkg.mod'"),
    ({"data": "/no/such/nope.jsonl"}, "spec.yaml:7: data.grpo.source", "nope.jsonl: no such file"),
    ({"rows": '{"q": "a", "a": "not a number"}\n'}, "data.grpo", "no usable rows"),
    ({"rows": '{"question": "a", "a": "1"}\n'}, "spec.yaml:8: data.grpo.columns", "missing column(s) q"),
    ({"model": "./models/nope"}, "spec.yaml:3: model.source", "no such file or directory"),
    ({"model": "/no/such/model.gguf"}, "spec.yaml:3: model.source", "no such GGUF file"),
    ({"model": "not/a/hub/name"}, "spec.yaml:3: model.source", "not a hub model name"),
])
def test_validate_names_field_and_line_of_what_the_sweep_would_fail_on(tmp_path, kwargs, where, needle):
    line = _refused("validate", str(_spec(tmp_path, **kwargs)))
    assert where in line and needle in line, line


def test_eval_holdout_leaving_no_training_rows_is_refused(tmp_path):
    spec = _spec(tmp_path, rows='{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n')
    line = _refused("validate", str(spec))
    assert "data.eval.size" in line and "cannot hold out" in line


def test_careless_spec_files_get_one_line(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"name: x\n" + bytes(range(128, 256)) * 4)
    assert "not UTF-8" in _refused("validate", str(binary))
    big = tmp_path / "big.yaml"
    with big.open("w") as f:  # a 50 MB system prompt used to hang validate
        f.write("name: x\nformat:\n  system_prompt: ")
        f.write("a" * 50_000_000)
    line = _refused("validate", str(big))
    assert "over the limit of 1,000,000 bytes" in line
    control = tmp_path / "bell.yaml"
    control.write_text("name: x\ngrpo: \x07\n")
    assert "bell.yaml:2: invalid YAML: special characters are not allowed (#x0007)" in _refused("validate", str(control))
    assert "is a directory" in _refused("validate", str(tmp_path))
    assert "cannot read spec file" in _refused("sweep", str(tmp_path / "missing.yaml"))
    assert "not UTF-8" in _refused("sweep", str(binary), "--storage", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_run_commands_answer_a_wrong_path_with_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for cmd in ("status", "report", "export"):
        assert "not a directory" in _refused(cmd, str(a_file)), cmd
        assert "no such directory" in _refused(cmd, str(tmp_path / "nope")), cmd
    assert "not a directory" in _refused("pull", str(a_file), str(tmp_path / "dest"))
