"""Warm trial actors: the loaded base model (and its vLLM engine) outlives a trial.

Loading is the dear part of a short trial: on the Unsloth + vLLM path a cold process pays
minutes of engine start-up and compilation before its first step (README, "Keeping the GPU
busy"). Ray Tune reuses a finished trial's actor for the next trial that asks for the same
resources (``reuse_actors``, on with ``trial.reuse_model``); this module keeps the backend
loaded in that process, so the next trial pays only for what is its own:

- a new LoRA adapter of its rank, initialised from its seed through the same
  :meth:`Backend.new_adapter` a fresh load ends with, so a trial starts from the same state on
  a reused actor as on a fresh one (tests/test_warm.py checks the first steps match);
- its optimizer, learning-rate schedule, sampling settings and reward weights, which every
  trial builds afresh in its own trainers anyway.

What the trials share besides the model is kept too (:func:`shared`): the loaded data sets
and the GRPO prompts, templated and length-filtered, which on the tutorial's 17k DAPO prompts
cost seconds of an idle GPU per trial (bench/data_prep.py).

Anything that shapes the loaded model itself (the source, backend, sequence length, 4-bit
loading, vLLM's memory share, the largest LoRA rank vLLM reserves room for, gradient
checkpointing) is the cache key:
a trial that differs there loads its own model.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from grpo_ray.config.spec import SweepSpec
from grpo_ray.trial.backends import choose_backend, make_backend
from grpo_ray.trial.base import Backend

log = logging.getLogger(__name__)


@dataclass
class _Warm:
    key: tuple[Any, ...]
    backend: Backend


_warm: _Warm | None = None  # this process's loaded model, kept between the trials Tune runs in it
_shared: dict[tuple[Any, ...], Any] = {}  # data the trials of this process share (shared())
_SHARED_MAX = 4  # entries kept: a sweep over data settings would otherwise hold every variant
T = TypeVar("T")


def shared(key: tuple[Any, ...], make: Callable[[], T], spec: SweepSpec) -> T:
    """``make()``, once per ``key`` in this process while ``spec.trial.reuse_model`` is on.

    ``key`` must hold everything the value depends on; callers must not mutate the value.
    """
    if not spec.trial.reuse_model:
        return make()
    if key not in _shared:
        while len(_shared) >= _SHARED_MAX:
            _shared.pop(next(iter(_shared)))
        _shared[key] = make()
    return _shared[key]


def load_key(model_dir: str, spec: SweepSpec) -> tuple[Any, ...]:
    """What a loaded model depends on; two trials with equal keys can share it."""
    m = spec.model
    # Checkpointing too: Unsloth patches it into the model it wraps, and unwrapping need not undo it.
    # Not lora.pad_rank: it sets the adapter's width, which every trial's new_adapter sets anyway
    # (common.resize_lora), and the base model and engine do not depend on it.
    return (choose_backend(spec.backend), model_dir, m.max_seq_length, m.load_in_4bit,
            m.gpu_memory_utilization, m.kv_cache_gib, m.compile, spec.max_lora_rank(), spec.lora.gradient_checkpointing)


def acquire(model_dir: str, spec: SweepSpec) -> tuple[Backend, bool]:
    """A backend with ``model_dir`` loaded and a fresh adapter for ``spec``; True when it was warm."""
    global _warm
    key = load_key(model_dir, spec)
    if spec.trial.reuse_model and _warm is not None and _warm.key == key:
        try:
            _warm.backend.new_adapter(spec)
        except Exception as e:  # a reuse that fails costs a load, never the trial
            log.warning("could not reuse the loaded model (%s: %s); loading it again", type(e).__name__, e)
        else:
            _reset_device_stats()
            return _warm.backend, True
    release()
    backend = make_backend(spec.backend, compile=spec.model.compile)
    backend.load(model_dir, spec)
    if spec.trial.reuse_model:
        _warm = _Warm(key, backend)
        _freeze_heap()
    return backend, False


def _freeze_heap() -> None:
    """Take what the load left (model, engine, imported modules) out of the GC's generations.

    Every trial's trainers run a full ``gc.collect()`` as they start (accelerate's
    ``free_memory``); on an Unsloth + vLLM heap py-spy caught each at about 1 s, twice per
    trial (bench/results/warm_sweep_reuse_h200_32d5bab.spy.txt.gz). What a load leaves lives
    as long as the actor, so collections need not walk it; objects trials make are still
    collected. release() unfreezes, so a dropped model is collected whole.

    Once per load, not per trial: an object alive at a trial's start that dies in a reference
    cycle later (a trainer some library still pointed to) would stay frozen, with its GPU
    memory, until release(); over a night's sweep that could add up. vLLM already freezes
    its own start-up heap in-process (and Unsloth's freeze around each ``train()`` then
    stands aside), so on that path this adds Unsloth's wrapping to what is frozen. On the H200
    at b00a605 the one warm trial's py-spy samples held no collection at all (2-3 per warm
    trial before; bench/results/warm_sweep_fresh_h200_b00a605.spy.txt.gz).
    """
    gc.collect()  # garbage of the load itself would otherwise be frozen in until release()
    gc.freeze()


def release() -> None:
    """Drop this process's warm model and shared data (a trial that failed may have left them in any state)."""
    global _warm
    _shared.clear()
    if _warm is None:
        return
    _warm = None
    gc.unfreeze()  # the model frozen at load (_freeze_heap) is garbage now, cycles and all
    gc.collect()
    _reset_device_stats()


def _reset_device_stats() -> None:
    # Each trial reports its own peak memory, not the largest of every trial this actor ran.
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
