"""A real trial (TRL SFT + GRPO on the tiny Qwen3, hf backend) without Ray in the way."""

import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.training import RewardSpec
from grpo_ray.trial.run import run_trial
from conftest import REPO


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory, tiny_model_dir):
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    # A user reward by import path; it varies within a group, so GRPO has a gradient to follow.
    spec = spec.model_copy(update={"rewards": [*spec.rewards, RewardSpec(name="test_trial:digit_reward", weight=0.5)]})
    reports, report = _keeper(tmp_path_factory.mktemp("ckpts"))
    final = run_trial(CONFIG | {"grpo.learning_rate": 1e-3}, spec, report=report)
    return spec, reports, final


# The trial of this module (its learning rate set per test).
CONFIG = {"lora.rank": 4, "grpo.num_generations": 2, "rewards.check_answer.weight": 2.0, "grpo.weight_decay": 0.0}


def _keeper(keep):
    """A ``report`` that keeps each window's metrics and a copy of its checkpoint under ``keep``."""
    reports = []

    def report(metrics, ckpt_dir):
        dst = keep / f"step{metrics['step']}"
        shutil.copytree(ckpt_dir, dst)
        reports.append((dict(metrics), dst))

    return reports, report


def digit_reward(prompts, completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / 10 for t in texts]


def test_reports_every_window_with_all_metrics(trial_run):
    spec, reports, final = trial_run
    steps = [m["step"] for m, _ in reports]
    assert steps == list(range(spec.grpo.report_every, spec.grpo.max_steps + 1, spec.grpo.report_every))
    for m, _ in reports:
        for key in ["reward", "reward_weighted", "format_rate", "completion_length", "eval_accuracy",
                    "eval_format_rate", "sft_eval_accuracy", "sft_loss"]:
            assert key in m and not math.isnan(m[key]), key
        for name in ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers",
                     "digit_reward"]:
            assert f"rewards/{name}/mean" in m
        assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_size"] == 16
    assert final == reports[-1][0]


def test_reports_where_the_trial_time_went(trial_run):
    """Set-up of each trainer, evaluation and GRPO's per-step time: parts of the trial's wall time."""
    spec, reports, _ = trial_run
    for (m, _), (nxt, _) in zip(reports, reports[1:]):
        assert nxt["eval_seconds"] > m["eval_seconds"]  # one more held-out evaluation per window
    m = reports[-1][0]
    for key in ["sft_setup_s", "sft_seconds", "eval_seconds", "grpo_setup_s", "grpo_step_s"]:
        assert m[key] > 0, key
    assert m["sft_setup_s"] < m["sft_seconds"]
    # torch.compile's share (tests/test_compile_clock.py shows it counting real compiles).
    assert 0 <= m["sft_compile_s"] <= m["sft_seconds"] and 0 <= m["compile_s"] <= m["elapsed_s"]
    assert m["compiled_graphs"] >= 0
    parts = m["sft_seconds"] + m["eval_seconds"] + m["grpo_setup_s"] + m["grpo_step_s"] * spec.grpo.max_steps
    assert parts <= m["elapsed_s"]
    assert parts > 0.8 * (m["elapsed_s"] - m["load_s"])  # little of the trial is left unaccounted for


def test_objective_reward_uses_spec_weights_not_trial_weights(trial_run):
    _, reports, _ = trial_run
    m = reports[-1][0]
    per = [m[f"rewards/{n}/mean"] for n in
           ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers", "digit_reward"]]
    assert m["reward"] == pytest.approx(sum(per[:4]) + 0.5 * per[4])  # the spec's weights
    weighted = per[0] + per[1] + 2.0 * per[2] + per[3] + 0.5 * per[4]  # the trial trains with check_answer x2
    assert m["reward_weighted"] == pytest.approx(weighted, rel=1e-4, abs=1e-4)


def test_checkpoints_hold_a_trained_lora_adapter(trial_run):
    _, reports, _ = trial_run
    first, last = reports[0][1], reports[-1][1]
    assert (last / "adapter_config.json").exists() and (last / "tokenizer.json").exists()
    a, b = load_file(first / "adapter_model.safetensors"), load_file(last / "adapter_model.safetensors")
    assert set(a) == set(b)
    # No weight decay here, so only a GRPO gradient can move the adapter between reports.
    assert any(not (a[k] == b[k]).all() for k in a), "GRPO steps did not change the adapter"
    assert "<SOLUTION>" in (last / "chat_template.jinja").read_text()


def test_out_of_memory_names_the_settings_to_lower():
    import torch

    from grpo_ray.trial.common import TrialDoesNotFitError, guard_errors

    spec = load_spec(REPO / "sweeps" / "rewards.yaml")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrialDoesNotFitError) as exc:
        guard_errors(oom, spec)
    msg = str(exc.value)
    for setting in ["model.gpu_memory_utilization (now 0.7", "grpo.max_completion_length (1536)",
                    "grpo.num_generations", "lora.rank in the search space (64)", "model.load_in_4bit"]:
        assert setting in msg

    def vllm_refuses():
        raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")

    with pytest.raises(TrialDoesNotFitError, match=r"raise model.gpu_memory_utilization \(now 0.7\)"):
        guard_errors(vllm_refuses, spec)

    def cuda_error_text():  # an OOM re-raised as a RuntimeError keeps the training advice
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(TrialDoesNotFitError, match="lower model.gpu_memory_utilization"):
        guard_errors(cuda_error_text, spec)

    def other():
        raise ValueError("unrelated")

    with pytest.raises(ValueError, match="unrelated"):
        guard_errors(other, spec)
    assert guard_errors(lambda: 3, spec) == 3

    # a fixed KV cache (model.kv_cache_gib): the advice names it, not the share it replaces
    fixed = apply_overrides(spec, {"model.kv_cache_gib": 0.25})

    def cache_too_small():
        raise ValueError("... 0.28 GiB KV cache is needed, which is larger than the available KV cache memory (0.25 GiB)")

    with pytest.raises(TrialDoesNotFitError, match=r"model.kv_cache_gib \(0.25 GiB\) cannot hold one sequence of "
                       r"model.max_seq_length \(2048\) tokens"):
        guard_errors(cache_too_small, fixed)
    with pytest.raises(TrialDoesNotFitError, match=r"lower model.kv_cache_gib \(now 0.25 GiB") as exc:
        guard_errors(oom, fixed)
    assert "gpu_memory_utilization" not in str(exc.value)


def test_a_retried_trial_resumes_from_its_checkpoint(trial_run, tmp_path):
    """What Tune hands a trial retried after its process or node died: the step-2 checkpoint.
    The retry skips SFT and the steps done, reports from step 4 on, and starts from that LoRA
    (with a learning rate of 1e-30, below float32 resolution, its final adapter is exactly the
    checkpoint's)."""
    spec, reports, _ = trial_run
    step2 = reports[0][1]
    assert reports[0][0]["step"] == 2
    resumed, report = _keeper(tmp_path)
    final = run_trial(CONFIG | {"grpo.learning_rate": 1e-30}, spec, report=report, resume_from=step2)
    assert [m["step"] for m, _ in resumed] == list(range(4, spec.grpo.max_steps + 1, spec.grpo.report_every))
    assert final["resumed_from_step"] == 2
    # SFT was not run again: its numbers (down to the wall time it took) are the first attempt's.
    for key in ["sft_seconds", "sft_loss", "sft_eval_accuracy"]:
        assert final[key] == reports[0][0][key], key
    # But its timings are its own, not the checkpoint's (utilization.py counts each attempt).
    assert final["trial_started_at"] > reports[-1][0]["reported_at"]
    a = load_file(step2 / "adapter_model.safetensors")
    b = load_file(resumed[-1][1] / "adapter_model.safetensors")
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


def test_a_rank_r_checkpoint_resumes_into_a_padded_model(trial_run, tmp_path):
    """The same step-2 checkpoint (rank 4, as every checkpoint is saved) retried with
    lora.pad_rank: the model's adapter is the search's largest rank wide (8 here), the checkpoint
    fills its first rows and columns, and the retry continues as the unpadded retry does: with
    a learning rate of 1e-30 its adapter is exactly the checkpoint's, with a real one every
    report equals the unpadded retry's (trial/common.py load_lora_weights)."""
    from grpo_ray.trial import warm

    spec, reports, _ = trial_run
    step2 = reports[0][1]
    widths = []

    def resume(config, keep):
        runs, report = _keeper(keep)

        def with_width(metrics, ckpt_dir):
            model = warm._warm.backend.model
            widths.append({p.shape[0] for n, p in model.named_parameters() if ".lora_A." in n})
            report(metrics, ckpt_dir)

        warm.release()
        run_trial(config, spec, report=with_width, resume_from=step2)
        warm.release()
        return runs

    still = resume(CONFIG | {"grpo.learning_rate": 1e-30, "lora.pad_rank": True}, tmp_path / "still")
    assert widths and all(w == {8} for w in widths)  # trained padded: a no-op padding fails here
    a = load_file(step2 / "adapter_model.safetensors")
    b = load_file(still[-1][1] / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    padded = resume(CONFIG | {"grpo.learning_rate": 1e-3, "lora.pad_rank": True}, tmp_path / "padded")
    # Unpadded said so: the smoke spec's warm trials of a searched rank are padded by default (auto)
    plain = resume(CONFIG | {"grpo.learning_rate": 1e-3, "lora.pad_rank": False}, tmp_path / "plain")
    assert [m["step"] for m, _ in padded] == [m["step"] for m, _ in plain] == [4]
    for (m_p, d_p), (m_u, d_u) in zip(padded, plain):
        for key in ("reward", "reward_weighted", "eval_accuracy", "completion_length", "sft_lora_norm"):
            assert m_p[key] == m_u[key] or (math.isnan(m_p[key]) and math.isnan(m_u[key])), key
        w_p, w_u = load_file(d_p / "adapter_model.safetensors"), load_file(d_u / "adapter_model.safetensors")
        assert set(w_p) == set(w_u) and all(torch.equal(w_p[k], w_u[k]) for k in w_u)
        assert any(not torch.equal(w_u[k], a[k]) for k in a)  # the retry trained: the check has teeth


def test_unsloth_compiled_cache_is_shared_by_the_trials_of_a_node(monkeypatch, tmp_path):
    """Each Tune trial runs in its own working directory; Unsloth's default cache is relative."""
    from grpo_ray.trial.backends import share_compile_caches

    monkeypatch.setenv("GRPO_RAY_CACHE", str(tmp_path))
    monkeypatch.delenv("UNSLOTH_COMPILE_LOCATION", raising=False)
    assert share_compile_caches() == {"UNSLOTH_COMPILE_LOCATION": str(tmp_path / "unsloth_compiled_cache")}
    monkeypatch.setenv("UNSLOTH_COMPILE_LOCATION", "/mine")
    assert share_compile_caches() == {"UNSLOTH_COMPILE_LOCATION": "/mine"}  # the user's choice wins


def test_a_failed_compilation_names_model_compile():
    """A real torch.compile failure on CPU (a backend that raises, as Inductor or Triton do when a
    kernel will not build): the trial says to set model.compile: false, with the cause; a trial
    already eager gets the error as it was."""
    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    from grpo_ray.trial.common import TrialCompileError, guard_errors

    def failing_backend(gm, example_inputs):
        raise RuntimeError("ptxas fatal: unresolved extern function")

    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    for compiled in (True, False):
        torch._dynamo.reset()
        step = torch.compile(lambda x: x.sin() + 1, backend=failing_backend)
        if compiled:
            with pytest.raises(TrialCompileError) as exc:
                guard_errors(lambda: step(torch.ones(3)), spec)
            assert "set model.compile: false" in str(exc.value) and "ptxas fatal" in str(exc.value)
            assert isinstance(exc.value.__cause__, BackendCompilerFailed)
        else:
            with pytest.raises(BackendCompilerFailed):
                guard_errors(lambda: step(torch.ones(3)), apply_overrides(spec, {"model.compile": False}))
    torch._dynamo.reset()


def test_model_compile_false_makes_training_and_engine_eager(monkeypatch):
    """model.compile: false reaches Unsloth twice: its training compile is off from import on
    (UNSLOTH_COMPILE_DISABLE, unless the user set it), and the engine is built eager. A warm
    model made with the other setting is not reused."""
    from grpo_ray.trial import warm
    from grpo_ray.trial.backends import eager_training
    from grpo_ray.trial.trl_args import engine_compile_kwargs

    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    eager = apply_overrides(spec, {"model.compile": False})
    monkeypatch.delenv("UNSLOTH_COMPILE_DISABLE", raising=False)
    assert eager_training(True) == {} and "UNSLOTH_COMPILE_DISABLE" not in os.environ
    assert eager_training(False) == {"UNSLOTH_COMPILE_DISABLE": "1"}
    monkeypatch.setenv("UNSLOTH_COMPILE_DISABLE", "partial")
    assert eager_training(False) == {"UNSLOTH_COMPILE_DISABLE": "partial"}  # the user's choice wins
    assert engine_compile_kwargs(spec) == {}
    assert engine_compile_kwargs(eager) == {"enforce_eager": True, "compilation_config": 0}
    assert warm.load_key("m", spec) != warm.load_key("m", eager)


def test_gradient_checkpointing_is_what_the_spec_says(tiny_model_dir):
    """TRL turns checkpointing on by default; lora.gradient_checkpointing: false must turn it
    off in the trainers (the fastest steps for a small model): each decoder layer then runs
    forward once per training pass, not again in the backward pass. A warm model made with
    the other setting is not reused (Unsloth patches checkpointing into the model it wraps)."""
    import torch

    from grpo_ray.trial import warm

    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    short = {"sft.max_steps": 2, "grpo.max_steps": 2, "grpo.report_every": 2}
    calls = {}
    for setting in ("unsloth", False):
        warm.release()
        backend, _ = warm.acquire(str(tiny_model_dir), apply_overrides(spec, {"lora.gradient_checkpointing": setting}))
        layer = next(m for n, m in backend.model.named_modules() if n.endswith("layers.0"))
        calls[setting] = 0

        def count(module, args, setting=setting):  # forwards that build a graph: training, recompute
            calls[setting] += torch.is_grad_enabled()

        hook = layer.register_forward_pre_hook(count)
        final = run_trial({"lora.gradient_checkpointing": setting} | short, spec, report=lambda m, d: None)
        hook.remove()
        assert final["step"] == 2 and not math.isnan(final["sft_loss"])
    assert calls[False] > 0 and calls["unsloth"] >= 1.5 * calls[False], calls  # about 2x
    key = lambda v: warm.load_key("m", apply_overrides(spec, {"lora.gradient_checkpointing": v}))  # noqa: E731
    assert key(False) != key("unsloth")
    warm.release()


def test_a_trial_writes_its_tokenizer_once_and_every_checkpoint_holds_it(tiny_model_dir, monkeypatch):
    """Every report's checkpoint loads on its own (tokenizer and chat template included), but the
    tokenizer is serialized once, not at every report (Gemma's is 32 MB, about a second each)."""
    from transformers import AutoTokenizer

    from grpo_ray.trial import warm

    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    warm.release()
    backend, _ = warm.acquire(str(tiny_model_dir), spec)  # the trial below runs on this model
    saves = []
    cls = type(backend.tokenizer)
    original = cls.save_pretrained
    monkeypatch.setattr(cls, "save_pretrained", lambda self, *a, **k: saves.append(1) or original(self, *a, **k))
    seen = []

    def report(metrics, ckpt_dir):
        tok = AutoTokenizer.from_pretrained(ckpt_dir)
        seen.append("<SOLUTION>" in tok.chat_template and tok.pad_token is not None)

    run_trial({"sft.max_steps": 1, "grpo.max_steps": 3, "grpo.report_every": 1}, spec, report=report)
    warm.release()
    assert seen == [True, True, True] and len(saves) == 1


def test_sft_lora_norm_is_where_sft_left_the_adapter(tmp_path, tiny_model_dir):
    """A GRPO step that barely moves the adapter: its checkpoint still holds SFT's adapter, whose norm is reported."""
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    reports, report = _keeper(tmp_path)
    run_trial(CONFIG | {"grpo.learning_rate": 1e-12, "grpo.max_steps": 1, "grpo.report_every": 1}, spec, report=report)
    (m, ckpt), = reports
    weights = load_file(ckpt / "adapter_model.safetensors")
    norm = math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights.values()))
    assert m["sft_lora_norm"] == pytest.approx(norm, rel=1e-6)
    b_norm = math.sqrt(sum(float(w.double().pow(2).sum()) for k, w in weights.items() if "lora_B" in k))
    assert b_norm > 1e-4  # SFT moved B away from its zero init: the norm is of a trained adapter


STAND_IN_UNSLOTH = '''
import json, os, sys
# What a real Unsloth checks as it is imported: had transformers, peft or trl come first?
json.dump({m: m in sys.modules for m in ("transformers", "peft", "trl")}, open(os.environ["SEEN"], "w"))
'''


def test_a_trial_imports_unsloth_before_transformers_peft_and_trl(tmp_path):
    """Unsloth patches transformers, peft and trl as it is imported; after them it only warns
    that training "may run slower" (every H200 trial process did at 5446a99: the watchdog's TRL
    callback came first). No CUDA here, so a stand-in ``unsloth`` module on the path records
    what was already imported, and the backend's CUDA check is bypassed; the trial then stops
    at the stand-in's missing FastLanguageModel, after the import that is checked."""
    import json
    import subprocess
    import sys

    (tmp_path / "unsloth.py").write_text(STAND_IN_UNSLOTH)
    (tmp_path / "vllm.py").write_text("")  # the backend checks that vLLM is installed too
    code = (
        "import grpo_ray.trial.backends as b\n"
        "b.cuda_available = lambda: True\n"
        "from grpo_ray.config.load import load_spec\n"
        "from grpo_ray.trial.run import run_trial\n"
        f"spec = load_spec({str(REPO / 'sweeps' / 'smoke.yaml')!r})\n"
        "try:\n"
        "    run_trial({}, spec.model_copy(update={'backend': 'unsloth'}), report=lambda m, d: None)\n"
        "except ImportError as e:\n"
        "    print('stopped as expected:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "src")]),
               SEEN=str(tmp_path / "seen.json"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "stopped as expected" in r.stdout, r.stdout + r.stderr[-3000:]
    assert json.loads((tmp_path / "seen.json").read_text()) == {"transformers": False, "peft": False, "trl": False}


def test_unsloth_missing_on_a_gpu_machine_says_what_to_install(monkeypatch):
    """backend auto on a CUDA machine without the gpu extra: one clear configuration error (not
    retried, shown in status), not an ImportError in every trial. No CUDA here, so the check is
    bypassed; unsloth and vllm are really absent from this machine."""
    import importlib.util

    import grpo_ray.trial.backends as b
    from grpo_ray.trial.base import BackendError

    assert importlib.util.find_spec("unsloth") is None  # this test needs a machine without it
    monkeypatch.setattr(b, "cuda_available", lambda: True)
    with pytest.raises(BackendError, match=r"unsloth and vllm are not installed here: pip install 'grpo-ray\[gpu\]'"):
        b.import_backend_first("auto")
    assert b.import_backend_first("hf") == "hf"
