"""How much of a GPU each trial asks Ray Tune for: ``resources.gpu``, or ``auto``.

A small model leaves most of a card idle: packed trials overlap one's generation, reward
scoring and Python overhead with the others' kernels. ``resources.gpu: auto`` picks:

- ``0`` when this sweep runs on a Ray of this machine alone and the machine has no GPU (the
  CPU path: trials then run the ``hf`` backend);
- ``1`` when the model is not small for the card: its 16-bit weights take more than
  :data:`PACK_WEIGHT_SHARE` (3%) of the smallest GPU's memory in the cluster (Qwen3-4B's 7.5 GiB
  on an H200, Qwen3-1.7B's 3.2 GiB on anything under 107 GiB, an 80 GiB H100 included), and
  whenever the model size or the GPU memory cannot be known on the driver (a hub model not on
  its disk, an autoscaling cluster with no GPU node up yet);
- else ``1/k`` for the largest ``k`` (k trials per GPU) that all of these allow:
  ``resources.max_trials_per_gpu``, unset: :func:`default_trials_per_gpu` (8 when the weights
  take at most :data:`DENSE_WEIGHT_SHARE`, 1%, of the card; else 2); the card's memory
  (:func:`trials_fit_memory`: each trial's slice must hold its engine in
  ``model.gpu_memory_utilization`` of it and its training in the rest); and the GPU nodes' CPU
  cores (k x ``resources.cpu`` per GPU: Ray places trials by CPUs as well as GPU shares, so
  asking for more would pack some cards and leave others idle, and a small model's step is
  bound by its host process).

The sweep prints the choice and what bounds it. Why 3%: the tutorial's Qwen3-1.7B shape (2.3% of
an H200) keeps the card busy 57-66% of the time alone (NVML, during GRPO steps), and two of its
trials stepping together kept it 91% busy and did 1.26-1.36 times the work of one alone (2.45 s
per step each, against 1.55-1.67 s alone: bench/results/packed_qwen3_h200_85f0640.json). A
bigger model, or the same one on a smaller card, keeps the card busier alone and leaves less for
a neighbour; it was not measured, so it runs alone.

Why eight below 1%, two up to 3%: gemma-3-270m (0.5 GiB, 0.36% of an H200) ran 24 trials eight
per GPU, none failed, 136.0 trials per GPU-hour after the first trials, the card 52% busy during
steps over the whole sweep and 80-93% during its warm trials
(bench/results/warm_sweep_density_h200_920d3f9.json). Side by side in one lease, at the default
engine share, eight per GPU finished 124.3 trials per GPU-hour after the first and two 51.5
(warm trials alone: 219.5 against 65.5), and the trials that ran fresh at both densities got the
same first-step rewards (warm_sweep_density_h200_ffe34b9.json). The 1.7B shape gains only 1.3x
from a second trial (above), so up to 3% stays at two. Between 1% and 3% (a 1.7B model on a
small card, a 0.5B on an L4) nothing was measured beyond two. The costs of density: more trials
at once, so the search learns from fewer finished trials before it samples the next; packed cold
starts queue for the card (the eighth of a cold wave took its first step 291-385 s after the
first began); and each needs ``resources.cpu`` cores (default 2: eight packed gemma-3-270m
trials kept about 8-9 of the node's 16 cores busy, ``.top.txt.gz`` beside that result).

Each packed trial's vLLM engine reserves ``model.gpu_memory_utilization`` of its *slice*
(SweepSpec.vllm_memory_share), so the engines split the card instead of each claiming 0.7
of it. The memory this rests on: one gemma-3-270m trial on an H200 used 38.8 GB with vLLM
holding 0.25 of the card (35 GB), so training took about 4 GB beside the engine
(bench/results/warm_sweep_reuse_h200.json); packed two per H200, gemma-3-270m trials used
15-17.7 GiB each (warm_sweep_packed_h200_c2ff95b.json). Packed engines start one at a time
(trial/engine_lock.py).

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
from grpo_ray.config.sections import MAX_TRIALS_PER_GPU, share_of
from grpo_ray.config.spec import SweepSpec

PACK_WEIGHT_SHARE = 0.03  # weights at most 3% of the card (Qwen3-1.7B on an H200): packed (module docstring)

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


# What one trial needs beside its share of the card, in GiB (trials_fit_memory). Training: the
# 4 GB one gemma-3-270m trial took beside its vLLM engine on an H200 (warm_sweep_reuse_h200.json),
# plus the weights once more as a margin that grows with the model (activations and logits grow
# with its width and vocabulary; Unsloth shares the weights themselves with the engine). Engine:
# the weights, plus its peak activation, CUDA graphs and the KV cache of a step's sequences (1.07
# GiB besides the KV for the Qwen3-1.7B shape on an H200: bench/results/speed_phases_h200_a9f965a.log.gz).
TRAIN_GIB = 4.0
ENGINE_EXTRA_GIB = 2.0
DENSE_WEIGHT_SHARE = 0.01  # weights at most 1% of the card (gemma-3-270m: 0.36% of an H200): eight per GPU by default
DEFAULT_TRIALS_PER_GPU = 2  # resources.max_trials_per_gpu unset, weights over 1%: the 1.7B shape's measured density


def default_trials_per_gpu(weights: float, gpu_gib: float) -> tuple[int, str]:
    """How many trials may share a GPU when ``resources.max_trials_per_gpu`` is unset, and why
    (module docstring: what each density measured).

    >>> default_trials_per_gpu(0.5, 141)[0]   # gemma-3-270m on an H200: 0.36% of the card
    8
    >>> default_trials_per_gpu(3.2, 141)[0]   # Qwen3-1.7B on an H200: 2.3%
    2
    >>> default_trials_per_gpu(0.5, 24)[0]    # gemma-3-270m on a 24 GiB card: 2.1%
    2
    """
    if weights <= DENSE_WEIGHT_SHARE * gpu_gib:
        return MAX_TRIALS_PER_GPU, (f"{MAX_TRIALS_PER_GPU}, the default for weights at most "
                                    f"{DENSE_WEIGHT_SHARE:.0%} of the card")
    return DEFAULT_TRIALS_PER_GPU, (f"{DEFAULT_TRIALS_PER_GPU}, the default for weights over "
                                    f"{DENSE_WEIGHT_SHARE:.0%} of the card")


def trials_fit_memory(weights: float, gpu_gib: float, engine_share: float) -> int:
    """How many trials of a model with ``weights`` GiB of 16-bit weights fit on a ``gpu_gib`` card
    when each engine reserves ``engine_share`` (``model.gpu_memory_utilization``) of its trial's slice.

    >>> trials_fit_memory(0.5, 141, 0.7)   # gemma-3-270m on an H200: a slice of 15.0 GiB is enough
    8
    >>> trials_fit_memory(0.5, 24, 0.7)    # ... on a 24 GiB card, one
    1
    >>> trials_fit_memory(3.2, 80, 0.7)    # Qwen3-1.7B on an H100: training needs 7.2 GiB, 30% of 24.0
    3
    """
    if engine_share >= 1.0:
        return 1  # the engine takes the whole slice: nothing is left to train in but the card's spare
    slice_need = max((weights + ENGINE_EXTRA_GIB) / engine_share, (TRAIN_GIB + weights) / (1.0 - engine_share))
    return max(1, min(MAX_TRIALS_PER_GPU, int(gpu_gib / slice_need + 1e-9)))


def gpu_per_trial(weights: float | None, gpus: int, gpu_gib: float | None, alone: bool,
                  cpu_per_trial: float = 0.0, node_cpus_per_gpu: float | None = None,
                  max_per_gpu: int | None = None, engine_share: float = 0.7) -> tuple[float, str]:
    """The ``auto`` rule (module docstring): the GPU share per trial and why.

    ``node_cpus_per_gpu``: the fewest CPU cores per GPU on the GPU nodes up (None: none up, not
    checked); ``max_per_gpu``: resources.max_trials_per_gpu (None: unset, so
    :func:`default_trials_per_gpu`); ``engine_share``: model.gpu_memory_utilization."""
    if gpus == 0 and alone:
        return 0.0, "no GPU on this machine: trials run on its CPUs"
    if weights is None or gpu_gib is None:
        known = "model size" if weights is None else "GPU memory"
        return 1.0, f"one trial per GPU (the {known} is not known on the driver)"
    if weights > PACK_WEIGHT_SHARE * gpu_gib:
        return 1.0, (f"one trial per GPU: {weights:.2g} GiB of weights is over {PACK_WEIGHT_SHARE:.0%} of "
                     f"{gpu_gib:.0f} GiB")
    # Each bound: how many trials per GPU it allows, why, and what to change to pack more.
    by_memory = trials_fit_memory(weights, gpu_gib, engine_share)
    if max_per_gpu is None:
        max_per_gpu, said = default_trials_per_gpu(weights, gpu_gib)
        limit = f"resources.max_trials_per_gpu is unset ({said})"
    else:
        limit = f"resources.max_trials_per_gpu is {max_per_gpu}"
    bounds = [(max_per_gpu, limit, ""),
              (by_memory, f"{by_memory} fit{'s' if by_memory == 1 else ''} a {gpu_gib:.0f} GiB GPU's memory", "")]
    if node_cpus_per_gpu is not None and cpu_per_trial > 0:
        by_cpu = max(1, int(node_cpus_per_gpu / cpu_per_trial + 1e-9))
        bounds.append((by_cpu, f"the GPU nodes have {node_cpus_per_gpu:g} CPUs per GPU for {cpu_per_trial:g} per "
                               f"trial (resources.cpu)", "; lower resources.cpu to pack them"))
    k, why, hint = min(bounds, key=lambda b: b[0])  # ties: the first named, the spec's own limit
    if k <= 1:
        return 1.0, f"one trial per GPU: {why}{hint}"
    names = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    return share_of(k), (f"{names.get(k, k)} trials per GPU: {weights:.2g} GiB of 16-bit weights is at most "
                         f"{PACK_WEIGHT_SHARE:.0%} of a {gpu_gib:.0f} GiB GPU, and {why}")


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
                                   cpus_per_gpu(), spec.resources.max_trials_per_gpu,
                                   spec.model.gpu_memory_utilization)
        # The density is now in the number; spec.resolved.yaml keeps the number, which a resumed
        # sweep reads back (max_trials_per_gpu beside a number would be refused there).
        spec = apply_overrides(spec, {"resources.gpu": share, "resources.max_trials_per_gpu": None})
        notes.append(f"resources.gpu: auto -> {share:g} ({why})")
    if spec.search.max_concurrent_trials == "auto":
        assert isinstance(spec.resources.gpu, float | int)  # resolved just above
        n, why = trials_at_once(float(spec.resources.gpu), spec.resources.cpu, spec.search.num_samples, gpus,
                                float(ray.cluster_resources().get("CPU", 0)), autoscaler_gpus())
        spec = apply_overrides(spec, {"search.max_concurrent_trials": n})
        notes.append(f"search.max_concurrent_trials: auto -> {n} ({why})")
    return spec, notes

