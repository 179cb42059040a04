"""How busy this trial's GPUs really are: NVML samples taken inside the trial's own process.

The sweep's driver may run on a CPU head node (cluster/gpu.yaml) that sees no GPU at all, so
the samples are taken where the GPU is: a daemon thread in the trial reads NVML's
``utilization.gpu`` (the share of the last sample period in which a kernel ran, what
nvidia-smi shows) and ``memory.used`` of each GPU the trial may use, every ``interval``
seconds, and keeps running sums: overall (from the sampler's start) and during steps (from
the trial's first training step or evaluation, ``FirstStep.at``, on). Every report carries
:meth:`GpuSampler.metrics`; views/utilization.py aggregates them per device and per sweep.

NVML reports the whole card: trials packed on one GPU (``resources.gpu: 0.5``) each see
their neighbour's load too, so their numbers are the card's, not their own share; per device
they are averaged over the trials' samples, never summed. ``memory.used`` is the card's as
well (every process on it), where ``gpu_max_allocated_gib`` is this trial's own allocator.

Without ``pynvml`` (package ``nvidia-ml-py``, the ``gpu`` extra) or a driver NVML can open
(a CPU machine), the sampler does nothing and :meth:`GpuSampler.metrics` is ``{}``: measuring
must never fail a trial.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

GIB = 2**30


def visible_indices(nvml: Any, visible: str | None) -> list[int]:
    """NVML indices of the GPUs ``visible`` (a ``CUDA_VISIBLE_DEVICES`` value) names.

    ``None`` (unset): every GPU. ``""``: none (Ray sets that for a trial without a GPU).
    Integers are taken as NVML indices: Ray hands out GPU ids in NVML's (PCI bus) order, which is
    CUDA's order on a node of one GPU model. UUIDs (``GPU-8932f937-...``, CUDA also takes a
    unique prefix) are matched against each device's UUID. Entries that name no GPU (MIG
    instances, whose utilization NVML does not report, or a stale id) are left out.
    """
    count = int(nvml.nvmlDeviceGetCount())
    if visible is None:
        return list(range(count))
    uuids: list[str] | None = None
    out: list[int] = []
    for item in (s.strip() for s in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            if int(item) < count:
                out.append(int(item))
            continue
        if uuids is None:  # read once, only when some entry is a UUID
            uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        match = [i for i, u in enumerate(uuids) if u.startswith(item)]
        if len(match) == 1:  # CUDA refuses an ambiguous prefix too
            out.append(match[0])
    return list(dict.fromkeys(out))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class GpuSampler:
    """A background thread that samples NVML for this trial's GPUs (see the module's docstring).

    Use as a context manager (or :meth:`start` / :meth:`stop`). ``steps_since`` returns when the
    trial's steps began (a unix time) or ``None`` before; it can be set after the start, once
    the trial has its ``FirstStep``. ``visible`` defaults to ``CUDA_VISIBLE_DEVICES``.
    """

    def __init__(self, interval: float = 1.0, steps_since: Callable[[], float | None] | None = None,
                 visible: str | None = None) -> None:
        self.interval = interval
        self.steps_since = steps_since
        self._visible = visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # metrics() reads while the thread adds
        self._n = self._n_steps = 0
        self._sum = self._sum_steps = 0.0
        self._mem_max = 0.0
        self._mem_total: float | None = None  # the smallest card among its devices (GiB)

    def start(self) -> GpuSampler:
        """Open NVML and start sampling; without NVML or a visible GPU, do nothing."""
        try:
            import pynvml
        except ImportError:  # CPU install: no gpu extra
            return self
        try:
            pynvml.nvmlInit()
        except Exception:  # pynvml.NVMLError (no driver, no library) or anything the binding raises
            return self
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                             for i in visible_indices(pynvml, self._visible)]
        except Exception:
            self._handles = []
        if not self._handles:
            _shutdown(pynvml)
            return self
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._loop, name="grpo-ray-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and close NVML; the sums stay for :meth:`metrics`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
            self._thread = None
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def sample(self) -> None:
        """Take one sample now (the thread calls it every ``interval`` seconds)."""
        nvml, now = self._nvml, time.time()
        if nvml is None:
            return
        utils, mem = [], 0.0
        for h in self._handles:
            try:
                utils.append(float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
                info = nvml.nvmlDeviceGetMemoryInfo(h)
                mem = max(mem, float(info.used) / GIB)
                if getattr(info, "total", None):
                    total = float(info.total) / GIB
                    self._mem_total = total if self._mem_total is None else min(self._mem_total, total)
            except Exception:  # a GPU that fell off the bus, NotSupported: skip it this time
                continue
        if not utils:
            return
        util = sum(utils) / len(utils)  # a trial on several GPUs: their mean
        since = self.steps_since() if self.steps_since is not None else None
        with self._lock:
            self._n += 1
            self._sum += util
            self._mem_max = max(self._mem_max, mem)
            if since is not None and now >= since:
                self._n_steps += 1
                self._sum_steps += util

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # never let measuring end the trial; try again next time
                pass

    def metrics(self) -> dict[str, float]:
        """Means so far (%), the largest memory used (GiB) and sample counts; ``{}`` without samples.

        ``gpu_steps_samples`` lets views/utilization.py weight ``gpu_util_steps_mean`` across trials.
        """
        with self._lock:
            if not self._n:
                return {}
            out = {"gpu_util_mean": self._sum / self._n, "gpu_mem_used_max_gib": self._mem_max,
                   "gpu_samples": float(self._n), "gpu_steps_samples": float(self._n_steps)}
            if self._mem_total is not None:  # the card's size: views/status.py's packing advice
                out["gpu_mem_total_gib"] = self._mem_total
            if self._n_steps:
                out["gpu_util_steps_mean"] = self._sum_steps / self._n_steps
            return out


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass
