"""One vLLM engine start at a time per GPU, for packed trials (``resources.gpu`` < 1).

vLLM sizes its KV cache at start-up by profiling: it runs a dummy batch and counts every byte
the card lost meanwhile as its own. Two packed trials that start their engines together on
one card each count the other's allocations too, and the later one can find no memory left
for its cache blocks. On the H200 that happened to the first of two packed gemma-3-270m
trials ("No available memory for the cache blocks"); Unsloth retried it with a smaller
``gpu_memory_utilization`` (0.105 instead of 0.124) after a failed attempt of 64 s
(bench/results/warm_sweep_packed_h200_c2ff95b.json, trial 68a59a2c: load 145 s against 125 s
for its neighbour). Without that retry the trial fails; with it the engine is left with less
memory than the spec asked for.

So a trial holds a lock file per visible GPU, on the node's local disk, while it loads the
model and starts the engine. The lock is an OS file lock (``filelock``): the kernel releases
it when its process dies, so a crashed start never blocks the next trial. A trial that waits
longer than ``timeout_s`` goes on without the lock and says so: a neighbour stuck in its own
start-up must not hang this one; so does a trial that cannot take it at all (a lock directory
it cannot write; the files are made writable by all, for sweeps of several users on a node).

Only the sizing needs the card to itself, so the lock goes to the next trial as soon as this
engine has sized and allocated its KV cache (:func:`release_at_engine_warmup`): vLLM's worker
then warms up, captures its CUDA graphs and JIT-compiles its sampling kernels, 30 of the 44 s
of an engine start of the Qwen3-1.7B shape on an H200 with warm compile caches (the log beside
bench/results/speed_phases_h200_a9f965a.json: KV cache sized at 18:28:55, engine ready at
18:29:26). Those steps add little memory (the CUDA-graph pool: 0.52 GiB there), far less than
this trial's training allocates after the load, which a neighbour's sizing could always
overlap. With k trials packed on a card, the last one waited for k-1 whole starts; it should
now wait for k-1 sizings (on the H200 at 0cf12c9: 30-35 s per start ahead, against about
130 s for a whole start). With a fixed KV cache (``model.kv_cache_gib``, :func:`fixed_kv_cache`)
the engine reads no free memory at all, and the lock goes on as the cache is set.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from filelock import FileLock, Timeout

from grpo_ray.trial import phases

log = logging.getLogger(__name__)

LOCK_DIR = Path(os.environ.get("GRPO_RAY_LOCK_DIR", Path(tempfile.gettempdir()) / "grpo-ray-locks"))


def visible_gpus() -> list[str]:
    """Stable ids (UUIDs) of the GPUs this process sees: the same card has the same id in every process."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


@dataclass
class StartLock:
    """The start-up locks one trial holds (:func:`one_start_per_gpu`)."""

    waited_s: float  # queued behind neighbours' starts: part of the trial's load_s, not its cost
    release: Callable[[], None]  # hand the GPUs to the next trial now (again: nothing)


@contextmanager
def one_start_per_gpu(gpus: list[str], timeout_s: float = 1800.0, lock_dir: Path | None = None,
                      say: Callable[[str], None] = log.warning) -> Iterator[StartLock]:
    """Hold the start-up lock of each of ``gpus`` (none: no lock) until the block ends or the
    yielded handle's ``release()``."""
    lock_dir = lock_dir or LOCK_DIR
    t0 = time.monotonic()
    with ExitStack() as held:
        for gpu in sorted(set(gpus)):  # one order everywhere: two trials on two GPUs cannot deadlock
            try:  # the lock is a courtesy between trials: a disk that refuses it must not fail the trial
                lock_dir.mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(lock_dir / f"gpu-{gpu}.lock"), mode=0o666)
                lock.acquire(timeout=0)
            except Timeout:  # before OSError: filelock's Timeout is a TimeoutError, an OSError
                say(f"waiting for another trial on GPU {gpu} to finish starting its vLLM engine "
                    "(two engines profiling one card at once undercount its free memory)")
                phases.post("loading the model: queued behind a packed neighbour's engine start")
                left = max(0.0, timeout_s - (time.monotonic() - t0))
                try:
                    lock.acquire(timeout=left)
                except Timeout:
                    say(f"GPU {gpu}: still starting after {timeout_s:.0f} s; starting without waiting longer")
                    continue
                finally:
                    phases.post("loading the model: starting the engine")
            except OSError as e:
                say(f"GPU {gpu}: cannot take the start-up lock in {lock_dir} ({e}); starting without it")
                continue
            held.callback(lock.release)
        yield StartLock(time.monotonic() - t0, held.close)  # ExitStack.close: once, then a no-op


VLLM_WORKER = "vllm.v1.worker.gpu_worker"  # its Worker sizes the KV cache, then compile_or_warm_up_model
_at_warmup: list[Callable[[], None]] = []  # what the hooked warm-up calls first, while a load is under way
_at_sizing: list[Callable[[Any], None]] = []  # what the hooked sizing calls first, with the worker


def _hook_worker(module_name: str, method: str, call_first: Callable[[Any], None]) -> bool:
    """Make vLLM's ``Worker.<method>`` call ``call_first(worker)`` before its own body; False when
    this vLLM has no such class or method (the caller then goes on without the hook)."""
    try:
        worker = importlib.import_module(module_name).Worker
        original = getattr(worker, method)
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_grpo_ray_hook", False):
        return True

    @functools.wraps(original)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        call_first(self)
        return original(self, *args, **kwargs)

    hooked._grpo_ray_hook = True  # type: ignore[attr-defined]
    setattr(worker, method, hooked)
    return True


def _hook_vllm_warmup(module_name: str = VLLM_WORKER) -> bool:
    """Make vLLM's ``Worker.compile_or_warm_up_model`` call :data:`_at_warmup` first; False when
    this vLLM has no such method (the lock is then held to the end of the load, as before)."""
    def call_registered(worker: Any) -> None:
        for fn in list(_at_warmup):
            fn()

    return _hook_worker(module_name, "compile_or_warm_up_model", call_registered)


def _hook_vllm_sizing(module_name: str = VLLM_WORKER) -> bool:
    """Make vLLM's ``Worker.determine_available_memory`` (where it sizes the KV cache) call
    :data:`_at_sizing` first, with the worker."""
    def call_registered(worker: Any) -> None:
        for fn in list(_at_sizing):
            fn(worker)

    return _hook_worker(module_name, "determine_available_memory", call_registered)


@contextmanager
def _registered(registry: list[Any], fn: Any, hooked: bool) -> Iterator[bool]:
    """``fn`` in ``registry`` for the block (a model load), for the hooked vLLM method to call."""
    registry.append(fn)
    try:
        yield hooked
    finally:
        registry.remove(fn)


def release_at_engine_warmup(release: Callable[[], None], module_name: str = VLLM_WORKER) -> ContextManager[bool]:
    """Within the block (a model load), call ``release`` when vLLM's worker has allocated its KV
    cache and begins its warm-up; yields whether vLLM could be hooked. The engine must run in
    this process (Unsloth sets VLLM_ENABLE_V1_MULTIPROCESSING=0); in a child process the hook
    never fires, and the lock is released when the load ends."""
    return _registered(_at_warmup, release, _hook_vllm_warmup(module_name))


def fixed_kv_cache(gib: float | None, release: Callable[[], None],
                   module_name: str = VLLM_WORKER) -> ContextManager[bool]:
    """Within the block (a model load), give vLLM's engine a KV cache of ``gib`` GiB
    (``model.kv_cache_gib``) instead of one sized from the card's free memory, and hand the
    start lock on (``release``) as it is sized. Yields whether vLLM could be hooked; ``gib``
    None: nothing changes, and the engine profiles the card as vLLM does by default.

    vLLM's own ``kv_cache_memory_bytes``: the worker still runs its profiling forward pass (it
    compiles the model for the largest batch) but reads no free memory, so neither a
    neighbour's allocations nor its releases move this engine's cache ("Error in memory
    profiling" cannot happen), and nothing after this point needs the card to itself. vLLM's
    startup plan (VLLM_ENABLE_STARTUP_PLAN) sets the same field at the same place. Unsloth
    does not pass the argument through, so it is set on the worker's cache config here, in
    this process (Unsloth runs the engine in-process).
    """
    if gib is None:
        return nullcontext(False)
    size = int(gib * 2**30)

    def at_sizing(worker: Any) -> None:
        worker.cache_config.kv_cache_memory_bytes = size
        release()

    return _registered(_at_sizing, at_sizing, _hook_vllm_sizing(module_name))
