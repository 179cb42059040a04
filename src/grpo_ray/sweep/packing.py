"""How much of a GPU each trial asks Ray Tune for: ``resources.gpu``, or ``auto``.

A small model leaves most of a card idle: two trials on one GPU overlap one's generation,
reward scoring and Python overhead with the other's kernels. ``resources.gpu: auto`` picks:

- ``0`` when this sweep runs on a Ray of this machine alone and the machine has no GPU (the
  CPU path: trials then run the ``hf`` backend);
- ``0.5`` (two trials per GPU) when the model's 16-bit weights take at most
  :data:`PACK_WEIGHT_SHARE` of the smallest GPU's memory in the cluster: e.g. gemma-3-270m
  (0.5 GiB) on any card of 27 GiB or more, Qwen3-1.7B (3.4 GiB) only on a 170 GiB card;
- ``1`` otherwise, and whenever the model size or the GPU memory cannot be known on the
  driver (a hub model not on its disk, an autoscaling cluster with no GPU node up yet);
- ``1`` too when the GPU nodes up have fewer CPU cores per GPU than two trials ask for
  (2 x ``resources.cpu``): Ray would then pack two trials on some cards and leave others idle,
  because it places trials by CPUs as well as GPU shares, and a small model's step is bound by
  its host process (the quality benchmark's four packed steps took 3-4 times one alone).

Each packed trial's vLLM engine reserves ``model.gpu_memory_utilization`` of its *slice*
(SweepSpec.vllm_memory_share), so the engines split the card instead of each claiming 0.7
of it. The memory this rests on: one gemma-3-270m trial on an H200 used 38.8 GB with vLLM
holding 0.25 of the card (35 GB), so training took about 4 GB beside the engine
(bench/results/warm_sweep_reuse_h200.json); two packed trials on a 48 GB card at the default
share hold 2 x (0.35 x 48 + 4) = 42 GB. Packed two per H200, 12 gemma-3-270m trials used
15-17.7 GiB each, none failed, and ran 49.7 trials per GPU-hour after the first ones
(bench/results/warm_sweep_packed_h200_c2ff95b.json), against 18.1 one at a time at the same
trial code (bench/results/warm_sweep_reuse_h200_32d5bab.json). Packed engines start one at a
time (trial/engine_lock.py).

``search.max_concurrent_trials: auto`` (the default) then fills the cluster: GPUs /
``resources.gpu`` trials at once (16 on 8 GPUs packed two per GPU), or CPUs /
``resources.cpu`` on a machine without GPUs, never more than ``search.num_samples``. On a
cluster that autoscales from no GPU node (cluster/gpu.yaml), the GPUs counted are those its
autoscaler may start, read from the config ``ray up`` leaves on the head
(``~/ray_bootstrap_config.yaml``): a limit of the GPUs up at the start would be 0 there. A
fixed default (4 before) left half of an 8-GPU cluster idle all night at ``resources.gpu: 1``,
and three quarters of it packed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.spec import SweepSpec

PACK_WEIGHT_SHARE = 0.02  # weights at most 2% of the card: two trials per GPU

# GPU memory (GiB) by the accelerator type Ray advertises for a node (``accelerator_type:<T>``).
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48, "L40": 48,
                  "A6000": 48, "A10G": 24, "L4": 24, "A10": 24, "T4": 16, "V100": 16}


def weights_gib(source: str) -> float | None:
    """The model's weights in 16 bits, in GiB, from what is on this disk; None when not known here."""
    if source.startswith("builtin:"):
        return 0.001  # the tiny offline model
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors) * 2 / 2**30
    if path.is_dir():
        files = list(path.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            n = 0
            for f in files:
                with safe_open(str(f), framework="numpy") as st:
                    for key in st.keys():
                        shape = st.get_slice(key).get_shape()
                        n += math.prod(shape)
            return n * 2 / 2**30
    return None


def cluster_gpus() -> tuple[int, float | None, bool]:
    """(GPUs in the Ray cluster now, the smallest one's memory in GiB or None, whether Ray is this machine's alone)."""
    import ray

    total = int(ray.cluster_resources().get("GPU", 0))
    alive = [n for n in ray.nodes() if n.get("Alive")]
    mems = []
    for node in alive:
        for key in node.get("Resources", {}):
            if key.startswith("accelerator_type:") and key.split(":", 1)[1] in GPU_MEMORY_GIB:
                mems.append(GPU_MEMORY_GIB[key.split(":", 1)[1]])
    local = _local_gpu_gib()
    if local is not None:
        mems.append(local)
    alone = not os.environ.get("RAY_ADDRESS") and len(alive) == 1
    return total, (min(mems) if mems else None), alone


def cpus_per_gpu() -> float | None:
    """The fewest CPU cores per GPU on the GPU nodes up now; None when no GPU node is up."""
    import ray

    ratios = [float(n["Resources"].get("CPU", 0)) / float(n["Resources"]["GPU"])
              for n in ray.nodes() if n.get("Alive") and float(n.get("Resources", {}).get("GPU", 0) or 0) > 0]
    return min(ratios) if ratios else None


def _local_gpu_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 2**30


def gpu_per_trial(weights: float | None, gpus: int, gpu_gib: float | None, alone: bool,
                  cpu_per_trial: float = 0.0, node_cpus_per_gpu: float | None = None) -> tuple[float, str]:
    """The ``auto`` rule (module docstring): the GPU share per trial and why.

    ``node_cpus_per_gpu``: the fewest CPU cores per GPU on the GPU nodes up (None: none up, not checked)."""
    if gpus == 0 and alone:
        return 0.0, "no GPU on this machine: trials run on its CPUs"
    if weights is None or gpu_gib is None:
        known = "model size" if weights is None else "GPU memory"
        return 1.0, f"one trial per GPU (the {known} is not known on the driver)"
    if weights <= PACK_WEIGHT_SHARE * gpu_gib:
        if node_cpus_per_gpu is not None and 2 * cpu_per_trial > node_cpus_per_gpu + 1e-9:
            return 1.0, (f"one trial per GPU: two would need {2 * cpu_per_trial:g} CPUs per GPU (2 x "
                         f"resources.cpu), the GPU nodes have {node_cpus_per_gpu:g}; lower resources.cpu to pack them")
        return 0.5, (f"two trials per GPU: {weights:.2g} GiB of 16-bit weights is at most "
                     f"{PACK_WEIGHT_SHARE:.0%} of a {gpu_gib:.0f} GiB GPU")
    return 1.0, f"one trial per GPU: {weights:.2g} GiB of weights is over {PACK_WEIGHT_SHARE:.0%} of {gpu_gib:.0f} GiB"


FALLBACK_CONCURRENCY = 4  # GPUs unknown: no GPU node up and no autoscaler config on this machine
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster config on the head


def autoscaler_gpus(path: str = BOOTSTRAP_CONFIG) -> int | None:
    """GPUs the cluster's autoscaler may start (its worker types' ``resources.GPU`` x
    ``max_workers``, within the cluster's ``max_workers``), or None without a readable config."""
    import yaml

    file = Path(path).expanduser()
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return None
    total = 0.0
    per_node: list[tuple[float, int]] = []  # worker types: (GPUs of a node, how many such nodes)
    for name, node in config["available_node_types"].items():
        if not isinstance(node, dict):
            continue
        gpus = float((node.get("resources") or {}).get("GPU", 0) or 0)
        if name == config.get("head_node_type"):
            total += gpus  # one head, outside the workers' count
        elif gpus > 0 and int(node.get("max_workers", 0) or 0) > 0:
            per_node.append((gpus, int(node["max_workers"])))
    # The cluster's own max_workers bounds the worker nodes of all types together: fill it with
    # the types that have the most GPUs per node, the most the autoscaler could give.
    budget = int(config.get("max_workers", 10**6) or 0)
    for gpus, count in sorted(per_node, reverse=True):
        take = min(count, budget)
        total, budget = total + gpus * take, budget - take
    return int(total) if total > 0 else None


def trials_at_once(gpu_share: float, cpu_per_trial: float, num_samples: int, gpus: int, cpus: float,
                   autoscale_gpus: int | None) -> tuple[int, str]:
    """The ``max_concurrent_trials: auto`` rule (module docstring): how many trials at once, and why."""
    if gpu_share > 0:
        capacity, where = gpus, f"{gpus} GPU(s) in the cluster"
        if autoscale_gpus is not None and autoscale_gpus > gpus:
            capacity, where = autoscale_gpus, f"{autoscale_gpus} GPU(s) the autoscaler may start"
        if capacity == 0:
            return min(FALLBACK_CONCURRENCY, num_samples), (
                "no GPU in the cluster yet and no autoscaler config on this machine; set "
                "search.max_concurrent_trials to GPUs / resources.gpu")
        slots, per = int(capacity / gpu_share + 1e-9), f"{gpu_share:g} GPU per trial"
    else:
        slots, where, per = int(cpus / cpu_per_trial + 1e-9), f"{cpus:g} CPU(s)", f"{cpu_per_trial:g} CPU per trial"
    n = max(1, min(slots, num_samples))
    capped = " (num_samples)" if slots > num_samples else ""
    return n, f"{where} at {per}{capped}"


def resolve_resources(spec: SweepSpec) -> tuple[SweepSpec, list[str]]:
    """``spec`` with ``resources.gpu`` and ``search.max_concurrent_trials`` made numbers where they
    were ``auto`` (Ray must be up); and, for each, why."""
    import ray

    notes: list[str] = []
    if spec.resources.gpu != "auto" and spec.search.max_concurrent_trials != "auto":
        return spec, notes  # both set by the user: no need to ask the cluster (or CUDA) anything
    gpus, gpu_gib, alone = cluster_gpus()
    if spec.resources.gpu == "auto":
        share, why = gpu_per_trial(weights_gib(spec.model.source), gpus, gpu_gib, alone, spec.resources.cpu,
                                   cpus_per_gpu())
        spec = apply_overrides(spec, {"resources.gpu": share})
        notes.append(f"resources.gpu: auto -> {share:g} ({why})")
    if spec.search.max_concurrent_trials == "auto":
        assert isinstance(spec.resources.gpu, float | int)  # resolved just above
        n, why = trials_at_once(float(spec.resources.gpu), spec.resources.cpu, spec.search.num_samples, gpus,
                                float(ray.cluster_resources().get("CPU", 0)), autoscaler_gpus())
        spec = apply_overrides(spec, {"search.max_concurrent_trials": n})
        notes.append(f"search.max_concurrent_trials: auto -> {n} ({why})")
    return spec, notes

