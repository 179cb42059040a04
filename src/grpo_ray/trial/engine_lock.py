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
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

LOCK_DIR = Path(os.environ.get("GRPO_RAY_LOCK_DIR", Path(tempfile.gettempdir()) / "grpo-ray-locks"))


def visible_gpus() -> list[str]:
    """Stable ids (UUIDs) of the GPUs this process sees: the same card has the same id in every process."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


@contextmanager
def one_start_per_gpu(gpus: list[str], timeout_s: float = 1800.0, lock_dir: Path | None = None,
                      say: Callable[[str], None] = log.warning) -> Iterator[float]:
    """Hold the start-up lock of each of ``gpus`` (none: no lock); yields the seconds spent waiting."""
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
                left = max(0.0, timeout_s - (time.monotonic() - t0))
                try:
                    lock.acquire(timeout=left)
                except Timeout:
                    say(f"GPU {gpu}: still starting after {timeout_s:.0f} s; starting without waiting longer")
                    continue
            except OSError as e:
                say(f"GPU {gpu}: cannot take the start-up lock in {lock_dir} ({e}); starting without it")
                continue
            held.callback(lock.release)
        yield time.monotonic() - t0
