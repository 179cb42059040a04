"""GPU tests (marked `gpu`): the unsloth backend on the real gemma-3-270m GGUF.

Skipped without CUDA. On the device (see ../shared/device/README.md):
    python3 -m pytest tests -m gpu -x
The model comes from $GRPO_RAY_GEMMA_GGUF or /tmp/models/gemma-3-270m-q4_k_m.gguf (stage.sh --model).
"""

import os
from pathlib import Path

import pytest

from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from conftest import REPO

pytestmark = pytest.mark.gpu
GGUF = Path(os.environ.get("GRPO_RAY_GEMMA_GGUF", "/tmp/models/gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="module")
def gemma_gguf():
    if not GGUF.exists():
        pytest.skip(f"{GGUF} not staged")
    return str(GGUF)


def test_auto_backend_is_unsloth_on_cuda():
    from grpo_ray.trial.backends import choose_backend

    assert choose_backend("auto") == "unsloth"


def test_unsloth_config_rewrites_are_caught_by_the_trial(tmp_path):
    """Unsloth's patched GRPOConfig (2026.10.7) turns group scaling off for dr_grpo; a trial
    that sampled both must refuse, one that left scale_rewards alone records the change, and the
    tutorial's explicit defaults come through unchanged (docs/grpo_variants.md)."""
    import unsloth  # noqa: F401  (patches trl first)
    from trl import GRPOConfig

    from grpo_ray.trial.base import SettingChangedError
    from grpo_ray.trial.trl_args import (
        GRPO_ARGS,
        effective_settings,
        grpo_config_kwargs,
        refuse_sampled_changes,
    )

    spec = load_spec(REPO / "sweeps" / "rewards.yaml")
    for overrides, changed in [({}, []), ({"grpo.loss_type": "dapo"}, []),
                               ({"grpo.loss_type": "dr_grpo"}, ["grpo.scale_rewards"])]:
        kwargs = grpo_config_kwargs(apply_overrides(spec, overrides), [1.0] * 4)
        args = GRPOConfig(output_dir=str(tmp_path), **kwargs)
        ran, changes = effective_settings(args, kwargs, GRPO_ARGS)
        assert [c.field for c in changes] == changed, (overrides, changes)
        assert ran["grpo.loss_type"] == (overrides.get("grpo.loss_type") or "dapo")
        assert (ran["grpo.epsilon_high"], ran["grpo.mask_truncated_completions"]) == (0.2, False)
        assert ran["grpo.vllm_importance_sampling_correction"] is False
    # The last case again, as a search that sampled both values sees it: refused.
    kwargs = grpo_config_kwargs(apply_overrides(spec, {"grpo.loss_type": "dr_grpo"}), [1.0] * 4)
    _, changes = effective_settings(GRPOConfig(output_dir=str(tmp_path), **kwargs), kwargs, GRPO_ARGS)
    with pytest.raises(SettingChangedError, match="grpo.scale_rewards: the search sampled 'group'"):
        refuse_sampled_changes(changes, {"grpo.loss_type", "grpo.scale_rewards"}, "unsloth", "GRPO")


def _short_spec(gemma_gguf):
    # One spec for the trials of this module: the same load key, so the process keeps one
    # model and one vLLM engine (trial/warm.py) instead of starting a second engine. The
    # trials differ in lora.rank, so the rank is searched, as in a sweep: the engine's LoRA
    # slots are sized for the largest rank the search can sample, which is part of the key.
    # (Left out, trial B's key had max rank 8 against A's 16 and B loaded a second model:
    # bench/results/gpu_tests_h200_5446a99.log.gz.)
    spec = load_spec(REPO / "bench" / "gemma_learn.yaml")
    return apply_overrides(spec, {
        "model.source": gemma_gguf, "sft.max_steps": 10, "grpo.max_steps": 4, "grpo.report_every": 2,
        "data.eval.size": 16, "data.eval.before_sft": False, "grpo.num_generations": 4,
        # the group size searched too: the log-prob function's chunk count is sized for the largest
        "search.space": {"lora.rank": {"choice": [8, 16]}, "grpo.num_generations": {"choice": [4, 8]}},
    })


def test_unsloth_trial_reports_and_checkpoints(gemma_gguf, tmp_path):
    from grpo_ray.trial.run import run_trial

    spec = _short_spec(gemma_gguf)
    reports = []
    final = run_trial({"lora.rank": 16}, spec, report=lambda m, d: reports.append((m, sorted(os.listdir(d)))))
    assert [m["step"] for m, _ in reports] == [2, 4]
    assert "adapter_model.safetensors" in reports[-1][1]
    assert 0 <= final["eval_accuracy"] <= 1 and final["completion_length"] > 0


def test_a_warm_unsloth_model_takes_the_next_trials_lora_in_place(gemma_gguf):
    """Trial B after trial A in one process (a reused Tune actor): Unsloth's wrapping, the LoRA
    modules and the vLLM engine stay; B's adapter is its own rank and B trains and evaluates
    through vLLM. At 0ec4420 Unsloth's regex target_modules made every warm trial wrap the
    model again (bench/results/warm_sweep_h200_0ec4420.json)."""
    from safetensors.torch import load_file

    from grpo_ray.trial import warm
    from grpo_ray.trial.run import run_trial

    # Unpadded (the default, auto, pads these warm trials): B's adapter is a new shape, resized in place
    spec = apply_overrides(_short_spec(gemma_gguf), {"lora.pad_rank": False})
    run_trial({"lora.rank": 16}, spec, report=lambda m, d: None)  # trial A (or the previous test's model)
    backend = warm._warm.backend
    peft_model = backend.model
    linears = [m for n, m in peft_model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    reports = []
    final = run_trial({"lora.rank": 8, "grpo.learning_rate": 2e-5}, spec,
                      report=lambda m, d: reports.append((m, load_file(f"{d}/adapter_model.safetensors"))))
    assert warm._warm.backend is backend and backend.model is peft_model  # no reload, no re-wrap
    assert linears == [m for n, m in peft_model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert all(m["model_reused"] == 1.0 for m, _ in reports)
    shapes = {tuple(v.shape)[0] for k, v in reports[-1][1].items() if "lora_A" in k}
    assert shapes == {8}
    assert 0 <= final["eval_accuracy"] <= 1 and final["completion_length"] > 0


def test_a_warm_trial_with_a_new_temperature_compiles_nothing(gemma_gguf):
    """Trial B after trial A on the same warm model, the same rank, another sampling
    temperature: B reuses every graph A compiled. Without trial/unsloth_patches.py, unsloth_zoo's
    GRPO log-prob function was compiled again for each new temperature (42-67 s of every warm
    trial of the 1.7B shape at 55e4f1e)."""
    from grpo_ray.trial.run import run_trial

    spec = _short_spec(gemma_gguf)
    run_trial({"lora.rank": 16, "grpo.temperature": 1.0}, spec, report=lambda m, d: None)
    final = run_trial({"lora.rank": 16, "grpo.temperature": 0.85}, spec, report=lambda m, d: None)
    print("WARM TRIAL AT A NEW TEMPERATURE: compiled_graphs", final["compiled_graphs"], "compile_s", final["compile_s"])
    assert final["model_reused"] == 1.0
    assert final["compiled_graphs"] == 0, final["compile_s"]


def test_a_warm_trial_with_a_new_group_size_and_rank_compiles_nothing(gemma_gguf):
    """Trial B after trial A on the same warm model, another group size (8 completions per
    prompt against 4), rank and temperature: B reuses every graph A compiled, SFT included. At
    8d5b03e a new group size recompiled Unsloth's log-prob function for 41-57 s
    (trial/unsloth_patches.py, one_chunk_count), and every warm SFT ran without autocast and
    recompiled about 25 graphs (common.restore_forward): either shows here as compiled graphs."""
    from grpo_ray.trial.run import run_trial

    spec = _short_spec(gemma_gguf)
    run_trial({"lora.rank": 16, "grpo.num_generations": 4, "grpo.temperature": 1.0}, spec, report=lambda m, d: None)
    final = run_trial({"lora.rank": 8, "grpo.num_generations": 8, "grpo.temperature": 0.9}, spec,
                      report=lambda m, d: None)
    print("WARM TRIAL, NEW GROUP SIZE AND RANK: compiled_graphs", final["compiled_graphs"], "compile_s",
          final["compile_s"], "sft_compile_s", final.get("sft_compile_s"), "sft_loss", final["sft_loss"])
    assert final["model_reused"] == 1.0
    assert final["compiled_graphs"] == 0, final["compile_s"]


def test_a_padded_warm_unsloth_trial_keeps_the_adapters_shape(gemma_gguf):
    """lora.pad_rank on Unsloth + vLLM: trial A (rank 16) then trial B (rank 8), both padded to
    the search's 16, in one process. B's LoRA weights are A's Parameter objects; B's padding is
    still exactly zero after its SFT and GRPO (Unsloth's LoRA kernels, adamw_8bit); B saves rank
    8 with alpha 16 and evaluates through vLLM with the padded adapter (r 16, lora_alpha 32).
    Printed for the lease: B's compiled_graphs and compile_s, what padding is for (a warm trial
    that changed rank recompiled 32-34 graphs at 0cf12c9)."""
    import json

    from safetensors.torch import load_file

    from grpo_ray.trial import warm
    from grpo_ray.trial.run import run_trial

    def lora(model):
        return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}

    spec = _short_spec(gemma_gguf)
    run_trial({"lora.rank": 16, "lora.pad_rank": True}, spec, report=lambda m, d: None)
    model = warm._warm.backend.model
    ids = {n: id(p) for n, p in lora(model).items()}
    reports = []

    def report(m, d):
        live = lora(warm._warm.backend.model)
        moved = [n for n, p in live.items() if (p[8:] if ".lora_A." in n else p[:, 8:]).count_nonzero()]
        widths = {p.shape[0] for n, p in live.items() if ".lora_A." in n}
        reports.append((m, load_file(f"{d}/adapter_model.safetensors"),
                        json.loads(open(f"{d}/adapter_config.json").read()), moved, widths))

    final = run_trial({"lora.rank": 8, "lora.pad_rank": True, "grpo.learning_rate": 2e-5}, spec, report=report)
    assert warm._warm.backend.model is model and {n: id(p) for n, p in lora(model).items()} == ids
    for m, saved, config, moved, widths in reports:
        assert m["model_reused"] == 1.0 and m["lora_tensor_rank"] == 16 and widths == {16}
        assert not moved, moved[:3]
        assert (config["r"], config["lora_alpha"]) == (8, 16)
        assert {tuple(v.shape)[0] for k, v in saved.items() if "lora_A" in k} == {8}
    # B trained (its B matrices start at zero), so its padding had gradients' chances to move
    assert any(v.count_nonzero() for k, v in reports[0][1].items() if "lora_B" in k)
    print("PADDED WARM TRIAL B: compiled_graphs", final["compiled_graphs"], "compile_s", final["compile_s"])
    assert 0 <= final["eval_accuracy"] <= 1 and final["completion_length"] > 0


def test_vllm_share_too_small_names_the_setting_to_raise(gemma_gguf):
    """A real refusal, not a synthetic one: 0.5% of an H100 (~0.4 GiB) cannot hold gemma's
    weights plus a KV cache, and the trial must say which setting to raise."""
    from grpo_ray.trial.common import TrialDoesNotFitError
    from grpo_ray.trial.run import run_trial

    spec = load_spec(REPO / "bench" / "gemma_learn.yaml")
    spec = apply_overrides(spec, {"model.source": gemma_gguf, "model.gpu_memory_utilization": 0.005})
    with pytest.raises(TrialDoesNotFitError, match=r"raise model.gpu_memory_utilization \(now 0.005\)") as exc:
        run_trial({}, spec, report=lambda m, d: None)
    print("MESSAGE:", exc.value)


def test_a_fixed_kv_cache_sizes_the_engine_without_profiling_the_card(gemma_gguf, tmp_path):
    """model.kv_cache_gib: the engine gets exactly that KV cache (trial/engine_lock.py
    fixed_kv_cache sets vLLM's kv_cache_memory_bytes on its worker) and the trial runs. In a
    process of its own: another load key in this module's process would start a second engine."""
    import subprocess
    import sys

    script = tmp_path / "fixed_kv.py"
    script.write_text(
        "import json, sys\n"
        "from grpo_ray.config.load import load_spec\n"
        "from grpo_ray.config.overrides import apply_overrides\n"
        "from grpo_ray.trial.run import run_trial\n"
        f"spec = apply_overrides(load_spec({str(REPO / 'bench' / 'gemma_learn.yaml')!r}), {{\n"
        f"    'model.source': {gemma_gguf!r}, 'model.kv_cache_gib': 0.5, 'sft.max_steps': 4, 'grpo.max_steps': 2,\n"
        "    'grpo.report_every': 2, 'data.eval.size': 8, 'data.eval.before_sft': False, 'grpo.num_generations': 4})\n"
        "final = run_trial({}, spec, report=lambda m, d: None)\n"
        "print('FINAL', json.dumps({'completion_length': final['completion_length']}))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200,
                         env=os.environ | {"PYTHONUNBUFFERED": "1"})
    out = run.stdout + run.stderr
    print(out[-3000:])
    assert run.returncode == 0
    assert "reserved 0.5 GiB memory for KV Cache as specified by kv_cache_memory_bytes" in out
    assert "Error in memory profiling" not in out and "FINAL" in out
