"""GRPO variants in the spec, the configuration that really ran, group diagnostics, accuracy per kind.

The sweep here is real (Ray Tune + Optuna's grid sampler, the hf backend, the tiny Qwen3); the
backend that rewrites a sampled value is a stand-in: Unsloth, whose patched config classes do it
on the GPU, cannot be imported on a machine without CUDA, so a TRL config subclass applies the
rule Unsloth 2026.10.7 applies (unsloth/models/rl.py: dr_grpo turns group reward scaling off).
The same check ran against the real Unsloth on the GPU (bench/README.md, quality benchmark).
"""

from __future__ import annotations

import doctest
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import load_spec, parse_spec

SMOKE = (REPO / "sweeps" / "smoke.yaml").read_text()


def _spec_text(grpo_extra: str) -> str:
    return SMOKE.replace("  optim: adamw_torch\n", "  optim: adamw_torch\n" + grpo_extra)


def test_validate_accepts_every_grpo_variant_field():
    spec = parse_spec(_spec_text(
        "  loss_type: grpo\n  importance_sampling_level: sequence\n  scale_rewards: none\n  epsilon: 0.1\n"
        "  epsilon_high: 0.28\n  num_iterations: 2\n  mask_truncated_completions: true\n"
        "  vllm_importance_sampling_correction: true\n"))
    g = spec.grpo
    assert (g.loss_type, g.importance_sampling_level, g.scale_rewards) == ("grpo", "sequence", "none")
    assert (g.epsilon, g.effective_epsilon_high(), g.num_iterations) == (0.1, 0.28, 2)
    assert g.mask_truncated_completions and g.vllm_importance_sampling_correction


def test_the_defaults_are_what_the_tutorial_ran():
    """Unsloth's tutorial sets none of these; TRL 1.15 + Unsloth 2026.10.7 resolve them to these values."""
    g = load_spec(REPO / "sweeps" / "rewards.yaml").grpo
    assert (g.loss_type, g.importance_sampling_level, g.scale_rewards, g.beta) == ("dapo", "token", "group", 0.0)
    assert (g.epsilon, g.effective_epsilon_high(), g.num_iterations) == (0.2, 0.2, 1)
    assert not g.mask_truncated_completions and not g.vllm_importance_sampling_correction


@pytest.mark.parametrize("extra, field, words", [
    ("  loss_type: foo\n", "grpo.loss_type", ["'dapo'", "'dr_grpo'", "'cispo'", "'foo'"]),
    ("  scale_rewards: yes\n", "grpo.scale_rewards", ["'group'", "'batch'", "'none'"]),
    ("  importance_sampling_level: seq\n", "grpo.importance_sampling_level", ["'token'", "'sequence'"]),
    ("  num_iterations: 0\n", "grpo.num_iterations", ["greater than or equal to 1"]),
    ("  loss_type: luspo\n", "grpo.importance_sampling_level", ["importance_sampling_level: sequence"]),
    ("  loss_type: cispo\n  epsilon_high: 0.5\n", "grpo.epsilon_high", ["below 1", "4-8"]),
])
def test_validate_rejects_a_bad_value_naming_file_line_field_and_what_is_accepted(tmp_path, extra, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(_spec_text(extra))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "validate", str(path)],
                       capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    line = next(i for i, t in enumerate(_spec_text(extra).splitlines(), 1) if t.strip() == extra.splitlines()[-1].strip())
    msg = " ".join(r.stderr.split())
    assert f"{path}:" in msg and f"{field}:" in msg, msg
    assert f"{path}:{line}:" in msg or field == "grpo.importance_sampling_level", msg  # luspo: the field is unset
    for w in words:
        assert w in msg, (w, msg)


def test_grid_sampler_needs_discrete_domains_and_at_most_its_combinations():
    base = yaml.safe_load(SMOKE)
    base["search"] |= {"sampler": "grid", "num_samples": 3,
                       "space": {"grpo.loss_type": {"choice": ["dapo", "grpo", "dr_grpo"]}}}
    assert parse_spec(yaml.safe_dump(base)).search.sampler == "grid"
    for space, n, wanted in [({"grpo.temperature": {"uniform": [0.7, 1.2]}}, 3, "search.space.grpo.temperature"),
                             ({"grpo.loss_type": {"choice": ["dapo", "grpo"]}}, 3, "search.num_samples")]:
        base["search"] |= {"space": space, "num_samples": n}
        with pytest.raises(SpecError) as e:
            parse_spec(yaml.safe_dump(base))
        assert e.value.field == wanted, str(e.value)


def test_every_trl_argument_a_trial_passes_is_in_the_table_it_is_checked_against():
    """A new argument added to the config builders but not to the tables would never be checked."""
    from grpo_ray.trial.trl_args import (
        COMMON_ARGS,
        GRPO_ARGS,
        SFT_ARGS,
        grpo_config_kwargs,
        sft_config_kwargs,
    )

    spec = load_spec(REPO / "sweeps" / "rewards.yaml")
    assert set(sft_config_kwargs(spec)) == set(SFT_ARGS | COMMON_ARGS)
    assert set(grpo_config_kwargs(spec, [1.0] * 4)) == set(GRPO_ARGS | COMMON_ARGS)


def test_a_length_a_backend_keeps_under_another_name_is_not_a_change():
    """Unsloth's SFT config moves max_length to max_seq_length (its own truncation): the same length."""
    from types import SimpleNamespace

    from grpo_ray.trial.trl_args import SFT_ARGS, effective_settings

    ran, changes = effective_settings(SimpleNamespace(max_length=None, max_seq_length=384), {"max_length": 384},
                                      SFT_ARGS)
    assert ran == {"sft.max_length": 384} and changes == []
    ran, changes = effective_settings(SimpleNamespace(max_length=None, max_seq_length=256), {"max_length": 384},
                                      SFT_ARGS)
    assert [c.describe() for c in changes] == ["sft.max_length: asked 384, ran 256"]


def test_effective_settings_doctest():
    from grpo_ray.trial import trl_args  # effective_settings' example lives where the function does

    result = doctest.testmod(trl_args)
    assert result.attempted >= 1 and result.failed == 0


# --------------------------------------------------------------------------- a backend that rewrites
def _unsloth_like(monkeypatch, trainer_sets: dict | None = None):
    """TRL's GRPOConfig with Unsloth 2026.10.7's dr_grpo rule (see the module docstring); with
    ``trainer_sets``, a GRPOTrainer that changes those arguments as it is built (what a trainer,
    not its config class, may do)."""
    import trl

    class UnslothLikeGRPOConfig(trl.GRPOConfig):
        def __post_init__(self):
            if self.loss_type == "dr_grpo" and self.scale_rewards in (True, "group"):
                self.scale_rewards = False
            super().__post_init__()

    monkeypatch.setattr(trl, "GRPOConfig", UnslothLikeGRPOConfig)
    if trainer_sets:
        class RewritingTrainer(trl.GRPOTrainer):
            def __init__(self, *a, args=None, **kw):
                for k, v in trainer_sets.items():
                    setattr(args, k, v)
                super().__init__(*a, args=args, **kw)

        monkeypatch.setattr(trl, "GRPOTrainer", RewritingTrainer)


def _trial(config, tiny_model_dir):
    from grpo_ray.trial import warm
    from grpo_ray.trial.run import run_trial

    warm.release()
    reports = []
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    config = {"grpo.max_steps": 2, "grpo.num_generations": 2, "sft.max_steps": 2} | config
    try:
        final = run_trial(config, spec, report=lambda m, d: reports.append(dict(m)))
    finally:
        warm.release()
    return final, reports


def test_a_sampled_value_the_backend_changes_fails_the_trial_before_it_trains(monkeypatch, tiny_model_dir):
    from grpo_ray.trial.base import SettingChangedError

    _unsloth_like(monkeypatch)
    with pytest.raises(SettingChangedError) as e:
        _trial({"grpo.loss_type": "dr_grpo", "grpo.scale_rewards": "group"}, tiny_model_dir)
    msg = str(e.value)
    assert msg.startswith("grpo.scale_rewards: the search sampled 'group'"), msg
    assert "ran 'none'" in msg and "hf backend" in msg and "search.space" in msg


def test_a_trainer_that_changes_a_sampled_value_fails_the_trial_at_its_first_step(monkeypatch, tiny_model_dir):
    from grpo_ray.trial.base import SettingChangedError

    _unsloth_like(monkeypatch, trainer_sets={"epsilon": 0.3})
    with pytest.raises(SettingChangedError) as e:
        _trial({"grpo.epsilon": 0.2}, tiny_model_dir)
    assert str(e.value).startswith("grpo.epsilon: the search sampled 0.2 but the hf backend's GRPO trainer ran 0.3")


def test_a_default_the_backend_changes_is_recorded_not_refused(monkeypatch, tiny_model_dir):
    _unsloth_like(monkeypatch)
    final, reports = _trial({"grpo.loss_type": "dr_grpo"}, tiny_model_dir)
    assert reports and final["effective/grpo.loss_type"] == "dr_grpo"
    assert final["effective/grpo.scale_rewards"] == "none"  # what ran, not what the spec said
    assert final["changed_by_backend"] == "GRPO grpo.scale_rewards: asked 'group', ran 'none'"


# --------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """A grid over three loss types through the CLI, scored on an eval set with problem kinds."""
    root = tmp_path_factory.mktemp("variants")
    rows = [json.loads(x) for x in (REPO / "src" / "grpo_ray" / "assets" / "math_mini.jsonl").read_text().splitlines()]
    kinds = {"buys": "add", "gives": "sub", "fills": "mul", "shares": "div", "change": "two_step"}
    held = [r | {"kind": next((k for w, k in kinds.items() if w in r["question"]), "other")} for r in rows[-40:]]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    spec = yaml.safe_load(SMOKE)
    spec["name"] = "variants"
    spec["grpo"] |= {"max_steps": 2, "report_every": 2}
    spec["sft"]["max_steps"] = 2
    spec["data"]["eval"] |= {"size": 12, "source": {"source": str(root / "eval.jsonl"),
                                                    "columns": {"kind": "kind"}}}
    spec["search"] |= {"sampler": "grid", "num_samples": 3, "max_concurrent_trials": 2,
                       "space": {"grpo.loss_type": {"choice": ["dapo", "grpo", "dr_grpo"]}}}
    spec["export"] = {"enabled": False}
    (root / "variants.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(root / "variants.yaml"),
                        "--storage", str(root / "runs")], capture_output=True, text=True, cwd=REPO, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "runs" / "variants", held


def test_a_grid_over_loss_types_runs_each_once_and_records_what_ran(grid_run):
    run, _ = grid_run
    trials = json.loads((run / "trials.json").read_text())
    assert sorted(t["config"]["grpo.loss_type"] for t in trials) == ["dapo", "dr_grpo", "grpo"]
    for t in trials:
        m = t["metrics"]
        assert t["error"] is None
        assert m["effective/grpo.loss_type"] == t["config"]["grpo.loss_type"]
        assert m["effective/grpo.scale_rewards"] == "group" and "changed_by_backend" not in m  # plain TRL
        assert m["effective/grpo.batch_size"] == 1  # prompts per step, as the spec counts them (TRL: 1 x 4)
        ckpts = sorted(run.glob(f"*{t['trial_id']}*/checkpoint_*/effective_config.json"))
        assert ckpts, t["trial_id"]
        full = json.loads(ckpts[-1].read_text())
        assert full["trl"]["GRPO"]["loss_type"] == t["config"]["grpo.loss_type"]
        assert full["trl"]["SFT"]["max_steps"] == 2 and full["changed_by_backend"] == []


def test_group_diagnostics_reach_trials_json_and_status(grid_run):
    run, _ = grid_run
    for t in json.loads((run / "trials.json").read_text()):
        m = t["metrics"]
        for key in ["zero_std_groups", "truncated_rate", "clip_ratio", "entropy"]:
            assert m[key] is not None and 0.0 <= m[key] <= (1.0 if key != "entropy" else 50.0), (key, m[key])
        assert m["kl"] is None  # beta 0: TRL computes no KL (NaN in the trial, null in JSON)
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "status", str(run)], capture_output=True, text=True,
                       cwd=REPO, check=False, env={**__import__("os").environ, "COLUMNS": "250"})
    assert r.returncode == 0 and "no-grad" in r.stdout and "cut" in r.stdout, r.stdout + r.stderr


def test_held_out_accuracy_is_reported_per_problem_kind(grid_run):
    run, held = grid_run
    for t in json.loads((run / "trials.json").read_text()):
        m = t["metrics"]
        kinds = {k.split("/", 1)[1] for k in m if k.startswith("eval_accuracy/")}
        assert kinds and kinds <= {r["kind"] for r in held}, kinds
        assert {k.split("/", 1)[1] for k in m if k.startswith("sft_eval_accuracy/")} == kinds
        assert all(0.0 <= m[f"eval_accuracy/{k}"] <= 1.0 for k in kinds)


def test_the_report_shows_the_winners_effective_configuration(grid_run):
    run, _ = grid_run
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "report", str(run)], capture_output=True, text=True,
                       cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    page = (run / "report.html").read_text()
    assert "The configuration that really ran" in page and "grpo.loss_type" in page
    assert "zero_std_groups" in page


def test_no_grpo_prompt_fitting_is_a_configuration_error(tiny_model_dir):
    """Raised as DataError, which search.py fails at once instead of retrying (the same every attempt)."""
    from transformers import AutoTokenizer

    from grpo_ray.task.data import DataError, load_datasets
    from grpo_ray.sweep.search import _configuration_errors
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.trial.common import prepare_tokenizer
    from grpo_ray.trial.run import grpo_rows

    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"grpo.max_prompt_length": 8})
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir), spec)
    with pytest.raises(DataError, match="no GRPO prompt fits grpo.max_prompt_length=8 tokens") as e:
        grpo_rows(load_datasets(spec.data), tok, spec)
    assert isinstance(e.value, _configuration_errors())
