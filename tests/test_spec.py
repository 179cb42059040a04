import subprocess
import sys

import pytest

from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import load_spec, parse_spec
from grpo_ray.config.overrides import apply_overrides
from conftest import REPO


def test_shipped_specs_validate():
    smoke = load_spec(REPO / "sweeps" / "smoke.yaml")
    assert smoke.model.source == "builtin:tiny-qwen3" and smoke.search.num_samples >= 2
    gpu = load_spec(REPO / "sweeps" / "rewards.yaml")
    assert gpu.model.source == "unsloth/Qwen3-1.7B-Base"
    assert gpu.max_lora_rank() == 64
    assert {"lora.rank", "grpo.num_generations", "grpo.temperature", "grpo.learning_rate", "grpo.loss_type",
            "sft.max_steps", "sft.learning_rate"} <= set(gpu.search.space)
    # The answer rewards' weights are searched; the format rewards' are not (saturated after SFT).
    assert {k for k in gpu.search.space if k.startswith("rewards.")} == {
        "rewards.check_answer.weight", "rewards.check_numbers.weight"}


def test_defaults_follow_the_seed():
    spec = parse_spec("name: x\n")
    assert spec.model.source == "unsloth/Qwen3-1.7B-Base"
    assert spec.data.sft.source == "unsloth/OpenMathReasoning-mini" and spec.data.sft.split == "cot"
    assert spec.data.grpo.source == "open-r1/DAPO-Math-17k-Processed" and spec.data.grpo.subset == "en"
    assert [r.name for r in spec.rewards] == [
        "match_format_exactly", "match_format_approximately", "check_answer", "check_numbers"]
    assert (spec.grpo.min_p, spec.grpo.top_p, spec.grpo.top_k) == (0.1, 1.0, -1)
    assert "<SOLUTION>" in spec.format.system_prompt


@pytest.mark.parametrize(
    "text, line, field, needle",
    [
        ("name: x\nlora:\n  rnak: 3\n", 3, "lora.rnak", "unknown key"),
        ("name: x\nlora:\n  gradient_checkpointing: sometimes\n", 3, "lora.gradient_checkpointing", "unsloth"),
        ("name: x\nlora:\n  pad_rank: sometimes\n", 3, "lora.pad_rank", "'auto', True or False"),
        ("name: x\ngrpo:\n  temperature: -1\n", 3, "grpo.temperature", "greater than 0"),
        ("name: x\nsearch:\n  space:\n    lora.rnk: {choice: [1]}\n", 4, "search.space.lora.rnk", "no such field"),
        ("name: x\nsearch:\n  space:\n    grpo.temperature: {uniform: [2, 1]}\n", 4,
         "search.space.grpo.temperature", "low < high"),
        ("name: x\nsearch:\n  space:\n    lora.rank: {uniform: [2.5, 3]}\n", 4, "search.space.lora.rank", "integer"),
        ("name: x\nsearch:\n  space:\n    grpo.temperature: {beta: [1, 2]}\n", 3, "search.space", "choice"),
        ("name: x\nsearch:\n  space:\n    rewards.nope.weight: {uniform: [1, 2]}\n", 4,
         "search.space.rewards.nope.weight", "rewards.check_answer.weight"),
        ("name: x\nsearch:\n  space:\n    model.compile: {choice: [true, false]}\n", 4,
         "search.space.model.compile", "cannot be searched"),
        ("name: x\nrewards:\n  - name: a\n  - name: a\n", 2, "rewards", "twice"),
        ("name: [\n", 2, None, "invalid YAML"),
        ("- a\n", 1, None, "mapping"),
        ("grpo: {}\n", None, "name", "required"),
    ],
)
def test_bad_specs_name_line_and_field(text, line, field, needle):
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "bad.yaml")
    e = exc.value
    assert e.file == "bad.yaml" and e.line == line and e.field == field
    assert needle in str(e) and str(e).startswith("bad.yaml")


def test_overrides_make_a_valid_trial_spec():
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    t = apply_overrides(spec, {"lora.rank": 4, "rewards.check_answer.weight": 1.5, "grpo.temperature": 0.9})
    assert t.lora.rank == 4 and t.grpo.temperature == 0.9
    assert t.reward_weights()["check_answer"] == 1.5 and spec.reward_weights()["check_answer"] == 1.0
    with pytest.raises(SpecError, match="greater than or equal to 2"):
        apply_overrides(spec, {"grpo.num_generations": 1})


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "grpo_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_validate_cli_prints_resolved_spec():
    r = _cli("validate", "sweeps/smoke.yaml")
    assert r.returncode == 0, r.stderr
    assert "source: builtin:tiny-qwen3" in r.stdout and "min_p: 0.1" in r.stdout


def test_validate_cli_user_error_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrpo:\n  num_generatons: 4\n")
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert f"{bad}:3" in r.stderr and "grpo.num_generatons" in r.stderr and "unknown key" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    r = _cli("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read spec file" in r.stderr
    r = _cli("sweep", str(bad), "--storage", str(tmp_path / "runs"))
    assert r.returncode == 2 and "grpo.num_generatons" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_baseline_point_is_the_seed_recipe_when_inside_the_space():
    gpu = load_spec(REPO / "sweeps" / "rewards.yaml")
    assert gpu.baseline_point() == {
        "sft.max_steps": 60, "sft.learning_rate": 2e-4, "grpo.loss_type": "dapo",
        "lora.rank": 32, "grpo.num_generations": 4, "grpo.temperature": 1.0, "grpo.learning_rate": 5e-6,
        "rewards.check_answer.weight": 1.0, "rewards.check_numbers.weight": 1.0}
    outside = parse_spec("name: x\nsearch:\n  space:\n    lora.rank: {choice: [8, 16]}\n")  # seed rank is 32
    assert outside.baseline_point() is None
