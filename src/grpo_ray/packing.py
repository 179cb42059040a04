"""How much of a GPU each trial asks Ray Tune for: ``resources.gpu``, or ``auto``.

A small model leaves most of a card idle: two trials on one GPU overlap one's generation,
reward scoring and Python overhead with the other's kernels. ``resources.gpu: auto`` picks:

- ``0`` when this sweep runs on a Ray of this machine alone and the machine has no GPU (the
  CPU path: trials then run the ``hf`` backend);
- ``0.5`` (two trials per GPU) when the model's 16-bit weights take at most
  :data:`PACK_WEIGHT_SHARE` of the smallest GPU's memory in the cluster: e.g. gemma-3-270m
  (0.5 GiB) on any card of 27 GiB or more, Qwen3-1.7B (3.4 GiB) only on a 170 GiB card;
- ``1`` otherwise, and whenever the model size or the GPU memory cannot be known on the
  driver (a hub model not on its disk, an autoscaling cluster with no GPU node up yet).

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
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from grpo_ray.spec import SweepSpec, apply_overrides

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


def _local_gpu_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 2**30


def gpu_per_trial(weights: float | None, gpus: int, gpu_gib: float | None, alone: bool) -> tuple[float, str]:
    """The ``auto`` rule (module docstring): the GPU share per trial and why."""
    if gpus == 0 and alone:
        return 0.0, "no GPU on this machine: trials run on its CPUs"
    if weights is None or gpu_gib is None:
        known = "model size" if weights is None else "GPU memory"
        return 1.0, f"one trial per GPU (the {known} is not known on the driver)"
    if weights <= PACK_WEIGHT_SHARE * gpu_gib:
        return 0.5, (f"two trials per GPU: {weights:.2g} GiB of 16-bit weights is at most "
                     f"{PACK_WEIGHT_SHARE:.0%} of a {gpu_gib:.0f} GiB GPU")
    return 1.0, f"one trial per GPU: {weights:.2g} GiB of weights is over {PACK_WEIGHT_SHARE:.0%} of {gpu_gib:.0f} GiB"


def resolve_resources(spec: SweepSpec) -> tuple[SweepSpec, str | None]:
    """``spec`` with ``resources.gpu: auto`` replaced by a number (Ray must be up); and why, if it was auto."""
    if spec.resources.gpu != "auto":
        return spec, None
    gpus, gpu_gib, alone = cluster_gpus()
    share, why = gpu_per_trial(weights_gib(spec.model.source), gpus, gpu_gib, alone)
    return apply_overrides(spec, {"resources.gpu": share}), f"resources.gpu: auto -> {share:g} ({why})"

