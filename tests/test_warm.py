"""Warm trial actors (trial/warm.py): a trial on a reused model starts as it would on a fresh one.

Real TRL SFT + GRPO trials of the smoke spec on the tiny Qwen3 (hf backend), in this process
the way Ray Tune runs consecutive trials in one reused actor.
"""

import gc
import math
import weakref

import pytest
from safetensors.torch import load_file

from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.training import RewardSpec
from grpo_ray.trial import warm
from grpo_ray.trial.run import run_trial
from conftest import REPO

# Trial B differs from trial A in everything a trial owns: LoRA rank, learning rates, sampling,
# group size and reward weights. Weight decay is off so only gradients move the adapter.
TRIAL_A = {"lora.rank": 8, "grpo.learning_rate": 5e-4, "grpo.temperature": 1.2, "grpo.num_generations": 4,
           "rewards.check_answer.weight": 0.5, "grpo.weight_decay": 0.0}
TRIAL_B = {"lora.rank": 4, "grpo.learning_rate": 2e-3, "grpo.temperature": 0.8, "grpo.num_generations": 2,
           "rewards.check_answer.weight": 2.0, "grpo.weight_decay": 0.0}


def _run(spec, config, keep):
    reports = []

    def report(metrics, ckpt_dir):
        reports.append((dict(metrics), load_file(f"{ckpt_dir}/adapter_model.safetensors")))

    run_trial(config, spec, report=report)
    keep.append(reports)
    return reports


def _spec():
    # test_trial's digit reward varies within a group, so GRPO has a gradient to follow.
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    return spec.model_copy(update={"rewards": [*spec.rewards, RewardSpec(name="test_trial:digit_reward", weight=0.5)]})


@pytest.fixture(scope="module")
def b_fresh_and_reused(tiny_model_dir):
    spec = _spec()
    runs: list = []
    warm.release()
    _run(spec, TRIAL_A, runs)   # a fresh actor: loads the model
    reused = _run(spec, TRIAL_B, runs)  # the next trial in the same actor: the model stays
    warm.release()              # what a fresh actor would have
    fresh = _run(spec, TRIAL_B, runs)
    warm.release()
    return runs[0], reused, fresh


def test_the_next_trial_reuses_the_loaded_model(b_fresh_and_reused):
    a, reused, fresh = b_fresh_and_reused
    assert a[0][0]["model_reused"] == 0.0 and fresh[0][0]["model_reused"] == 0.0
    assert reused[0][0]["model_reused"] == 1.0
    # Its adapter is its own: rank 4 (lora_A is r x in_features), not trial A's rank 8.
    shapes = {k: tuple(v.shape) for k, v in reused[0][1].items() if "lora_A" in k}
    assert shapes and all(s[0] == 4 for s in shapes.values())
    for m in (a[0][0], reused[0][0]):
        assert m["startup_s"] >= 0 and m["first_step_at"] >= m["trial_started_at"]
        assert m["reported_at"] >= m["first_step_at"]


def test_a_reused_actor_gives_the_same_trial_as_a_fresh_one(b_fresh_and_reused):
    """Same adapter init from the seed, no optimizer, scheduler or sampling state carried over
    from trial A: every report of trial B, metrics and LoRA weights, equals the fresh run's."""
    _, reused, fresh = b_fresh_and_reused
    assert [m["step"] for m, _ in reused] == [m["step"] for m, _ in fresh]
    timing = {"trial_started_at", "first_step_at", "reported_at", "startup_s", "load_s", "elapsed_s",
              "sft_seconds", "model_reused", "sft_setup_s", "eval_seconds", "grpo_setup_s", "grpo_step_s",
              "compile_s", "sft_compile_s", "compiled_graphs"}
    for (m_r, w_r), (m_f, w_f) in zip(reused, fresh):
        for key in set(m_f) - timing:
            a, b = m_r[key], m_f[key]
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (m_f["step"], key, a, b)
        assert set(w_r) == set(w_f)
        assert all((w_r[k] == w_f[k]).all() for k in w_f), f"step {m_f['step']}: LoRA weights differ"
    # The comparison has teeth: trial B's training moved its adapter between reports.
    first, last = fresh[0][1], fresh[-1][1]
    assert any(not (first[k] == last[k]).all() for k in first)


def test_what_shapes_the_loaded_model_is_the_cache_key(tiny_model_dir):
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    model = str(tiny_model_dir)
    warm.release()
    first, reused = warm.acquire(model, spec)
    assert not reused
    again, reused = warm.acquire(model, apply_overrides(spec, {"lora.rank": 4, "grpo.learning_rate": 1e-4}))
    assert reused and again is first
    longer, reused = warm.acquire(model, apply_overrides(spec, {"model.max_seq_length": 512}))
    assert not reused and longer is not first
    off, reused = warm.acquire(model, apply_overrides(spec, {"trial.reuse_model": False}))
    assert not reused and off is not longer
    _, reused = warm.acquire(model, spec)  # reuse off kept nothing to reuse
    assert not reused
    warm.release()


def test_a_warm_adapter_is_resized_in_place_with_the_wrapping_kept(tiny_model_dir):
    """The next trial's LoRA is resized inside the same PEFT wrapper (on Unsloth: no re-patching),
    trainers' forward wrappers are undone, and the init equals a fresh wrap's."""
    from types import MethodType

    from grpo_ray.trial.common import resize_lora

    # Unpadded, so a new rank is a new shape to resize to (padded adapters: tests/test_pad_rank.py)
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"lora.pad_rank": False})
    warm.release()
    backend, _ = warm.acquire(str(tiny_model_dir), spec)
    peft_model = backend.model
    # What Accelerate does at each trainer's prepare under bf16: an instance forward wrapping the last.
    peft_model._original_forward = peft_model.forward
    peft_model.forward = MethodType(lambda self, *a, **k: None, peft_model)
    rank4 = apply_overrides(spec, {"lora.rank": 4})
    linears = [m for n, m in peft_model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    config_a = peft_model.peft_config["default"]
    again, reused = warm.acquire(str(tiny_model_dir), rank4)
    assert reused and again.model is peft_model
    # The same Linear modules with new weights (what compiled graphs saw stays the same objects).
    assert linears and linears == [m for n, m in peft_model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert "forward" not in peft_model.__dict__ and "_original_forward" not in peft_model.__dict__
    assert peft_model.peft_config["default"].r == 4
    # A new config object: unsloth_zoo caches the vLLM LoRA config by the config's identity.
    assert peft_model.peft_config["default"] is not config_a and config_a.r == spec.lora.rank
    assert peft_model.peft_config["default"].lora_alpha == 8 and peft_model.base_model.peft_config["default"].r == 4
    resized = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert all(v.shape[0] == 4 for k, v in resized.items() if "lora_A" in k)
    warm.release()
    fresh, _ = warm.acquire(str(tiny_model_dir), rank4)
    assert fresh.model is not peft_model
    wrapped = {k: v for k, v in fresh.model.state_dict().items() if "lora_" in k}
    assert set(wrapped) == set(resized) and all((wrapped[k] == resized[k]).all() for k in wrapped)
    # Anything but rank and alpha (here the targets) is refused untouched: the caller wraps afresh.
    other = apply_overrides(rank4, {"lora.target_modules": ["q_proj", "v_proj"], "lora.rank": 8})
    assert not resize_lora(fresh.model, other, made_for=rank4)
    assert not resize_lora(fresh.model, apply_overrides(rank4, {"lora.rank": 8}), made_for=None)
    assert fresh.model.peft_config["default"].r == 4
    warm.release()


def test_a_warm_trials_trainers_run_under_autocast_like_a_fresh_ones():
    # Real Accelerate, bf16 on CPU, in its own process (its state is a process-wide singleton that
    # later trainers in this one would inherit). Each trainer prepares the model; between trials
    # the warm actor puts it back (restore_forward). Accelerate's "prepared" mark, left on the
    # model, made the next trial's trainers skip the autocast wrapping: a warm SFT ran without it
    # on an H200 at 8d5b03e (another loss, 25 graphs compiled again).
    import subprocess
    import sys

    script = """
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from grpo_ray.trial.common import instance_forward, restore_forward

class Model(torch.nn.Module):
    def forward(self):
        return torch.is_autocast_enabled("cpu")

model = Model()
saved, seen = instance_forward(model), []
for trial in range(2):
    for trainer in ("sft", "grpo"):
        AcceleratorState._reset_state(True)  # each TRL trainer builds its own Accelerator
        Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
        seen.append(model())
    model.__dict__.pop("forward", None)  # Unsloth's GRPO unwraps the forward for good (unwrap_model)
    restore_forward(model, saved)
print(seen)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["[True,", "True,", "True,", "True]"], out.stdout


def test_unsloths_regex_targets_are_resized_too(tiny_model_dir):
    """Unsloth hands PEFT a regex for an explicit target list (its vision-model path, which Gemma 3
    takes): the H200 run at 0ec4420 showed every warm trial wrapping the model again for it
    (FastLanguageModel.get_peft_model in 64% of the warm start-up samples). The targets are
    compared in the specs, so such an adapter is resized in place as well."""
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {"lora.pad_rank": False})  # a new shape
    warm.release()
    backend, _ = warm.acquire(str(tiny_model_dir), spec)
    peft_model = backend.model
    names = "|".join(spec.lora.target_modules)  # the shape of unsloth_zoo's get_peft_regex output
    peft_model.peft_config["default"].target_modules = rf"(?:.*?(?:self_attn|mlp).*?(?:{names}).*?)"
    again, reused = warm.acquire(str(tiny_model_dir), apply_overrides(spec, {"lora.rank": 4}))
    assert reused and again.model is peft_model and peft_model.peft_config["default"].r == 4
    warm.release()


def test_the_next_trial_reuses_the_prepared_data(tiny_model_dir, monkeypatch):
    """Data sets and templated, length-filtered GRPO prompts are made once per actor for the
    settings they depend on; other data settings, or reuse off, make them again."""
    from grpo_ray.trial import run

    made = {"data": 0, "rows": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            made[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run, "load_datasets", counted("data", run.load_datasets))
    monkeypatch.setattr(run, "grpo_rows", counted("rows", run.grpo_rows))
    spec = apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"),
                           {"sft.max_steps": 1, "grpo.max_steps": 1, "grpo.report_every": 1})
    warm.release()
    for config in ({"lora.rank": 8}, {"lora.rank": 4, "grpo.temperature": 0.8}):  # what a trial owns
        run_trial(config, spec, report=lambda m, d: None)
    assert made == {"data": 1, "rows": 1}
    run_trial({"grpo.max_prompt_length": 120}, spec, report=lambda m, d: None)  # same data, other prompts
    assert made == {"data": 1, "rows": 2}
    run_trial({"data.grpo.limit": 40}, spec, report=lambda m, d: None)
    assert made == {"data": 2, "rows": 3}
    off = apply_overrides(spec, {"trial.reuse_model": False})
    run_trial({}, off, report=lambda m, d: None)
    run_trial({}, off, report=lambda m, d: None)
    assert made == {"data": 4, "rows": 5}
    warm.release()


def test_a_warm_model_is_kept_out_of_the_collectors_way_until_released(tiny_model_dir):
    """Each trainer's start runs a full gc.collect() (about 1 s a trial on an Unsloth + vLLM heap):
    a warm actor freezes what its load left, once, and release() unfreezes it, so a dropped
    model is collected whole rather than leaked."""
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    warm.release()
    gc.unfreeze()
    off, _ = warm.acquire(str(tiny_model_dir), apply_overrides(spec, {"trial.reuse_model": False}))
    assert gc.get_freeze_count() == 0  # a process that ends with its trial keeps the GC as it was
    del off
    backend, _ = warm.acquire(str(tiny_model_dir), spec)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    # What a trial makes and keeps is not frozen by the next trial's start: an object alive then
    # that died later in a cycle would hold its memory until release().
    kept = [[i] for i in range(1000)]
    again, reused = warm.acquire(str(tiny_model_dir), apply_overrides(spec, {"lora.rank": 4}))
    # (Frozen objects that lose their last reference, like the old adapter's, are still freed.)
    assert reused and 0 < gc.get_freeze_count() <= frozen
    del kept
    model = weakref.ref(backend.model)
    del backend, again
    warm.release()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert model() is None


def test_a_failed_trial_leaves_no_model_behind(tiny_model_dir):
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    warm.release()
    # No GRPO prompt fits 8 tokens: the trial fails after loading the model and its SFT.
    with pytest.raises(ValueError, match="max_prompt_length"):
        run_trial({"grpo.max_prompt_length": 8, "sft.max_steps": 1}, spec, report=lambda m, d: None)
    _, reused = warm.acquire(str(tiny_model_dir), spec)
    assert not reused
    warm.release()


def test_a_sweep_runs_its_next_trial_in_the_finished_trials_actor(tmp_path):
    """A real Ray Tune sweep, one trial at a time: trial 2 runs in trial 1's actor, model loaded."""
    import json
    import subprocess
    import sys

    import yaml

    doc = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    doc["search"] |= {"num_samples": 2, "max_concurrent_trials": 1}
    doc["export"] = {"enabled": False}
    spec_file = tmp_path / "one_at_a_time.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec_file), "--storage", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trials = sorted((t["metrics"] for t in json.loads((tmp_path / "smoke" / "trials.json").read_text())),
                    key=lambda m: m["trial_started_at"])
    assert [m["model_reused"] for m in trials] == [0.0, 1.0]
    assert trials[0]["worker_pid"] == trials[1]["worker_pid"]
    assert trials[1]["load_s"] < trials[0]["load_s"]
