"""How well a sweep kept its GPUs busy, from what its trials reported.

Every trial reports when it started (``trial_started_at``), when it first put its device to
work (``first_step_at``: its first training loop or evaluation), when it reported
(``reported_at``; the last report is its end), whether its model was reused from the
actor's previous trial (``model_reused``) and where it ran (``node``, ``gpus``,
``worker_pid``; trial/run.py). From those alone, so ``status`` and ``report`` can say it for
a running sweep too:

- busy time of a device: the union of its trials' ``[first_step_at, last reported_at]``
  (packed trials overlap on one GPU); everything else on it is start-up, hand-over or idle;
- ``busy_fraction``: busy time over wall time (first trial start to last report) x devices;
  ``busy_fraction_after_first``: the same from the end of each device's first trial, where
  a warm actor has nothing left to load;
- ``startup_s``: trial start to first step, cold (model loaded) and warm (reused) apart;
  ``engine_wait_s``: of a cold start, the time spent queued behind packed neighbours' vLLM
  engine starts (trial/engine_lock.py): how much of start-up is packing's queue, not loading;
- ``compile_s``: each trial's time in torch.compile (``compile_s``, its model load included),
  cold and warm apart: what warm actors save of compilation, and which warm trials recompiled;
- ``handoff_s``: from the end of the trial before it on the same actor (a reused model) or,
  for a fresh actor, on the same device, to this trial's first step;
- ``trials_per_device_max``: the most trials that ran at once on one device (2: packed two per GPU);
- ``trials_per_device_hour``: finished trials per wall hour per device;
  ``trials_per_device_hour_after_first``: the same from the end of each device's first trial
  (the steady rate a longer sweep tends to), a trial counted by the share of its own time
  that falls in that window (a packed neighbour of the first trial is partly inside it);
- ``gpu_util_mean`` / ``gpu_util_steps_mean``: the GPUs' measured load (NVML ``utilization.gpu``,
  %, sampled about once a second inside each trial: trial/gpu_sampler.py) over the trials' whole
  time and from their first step on, means weighted by samples; ``gpu_mem_used_max_gib``: the
  most memory used on a card, ``gpu_mem_total_gib`` the smallest card's size;
  ``gpu_util_per_device``: the same per device. Packed trials each sample the whole card, so a
  device's mean averages its trials' samples (never sums them); the sweep's mean counts a packed
  device's samples once per trial on it. Only present when some trial reported them (a trial on
  CPU, or without nvidia-ml-py, reports none).

A device is a (node, GPU ids) pair; trials without a GPU count their node's CPUs as one device.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class _Trial:
    started: float
    first_step: float
    end: float
    reused: bool
    device: str
    worker: str
    finished: bool
    compile_s: float | None  # None from a grpo-ray before the metric
    gpu: dict[str, float] | None = None  # NVML samples (trial/gpu_sampler.py); None without them
    engine_wait_s: float | None = None  # queued for the GPU's engine-start lock; None before the metric


def _trial(m: dict[str, Any], finished: bool) -> _Trial | None:
    try:
        started, first, end = float(m["trial_started_at"]), float(m["first_step_at"]), float(m["reported_at"])
    except (KeyError, TypeError, ValueError):
        return None  # no report yet (or from a grpo-ray before these metrics)
    node, gpus, pid = m.get("node", "?"), str(m.get("gpus") or ""), str(m.get("worker_pid", "?"))
    compile_s, wait = m.get("compile_s"), m.get("engine_wait_s")
    return _Trial(started, first, end, bool(m.get("model_reused")), f"{node}/gpu{gpus}" if gpus else f"{node}/cpu",
                  f"{node}/pid{pid}", finished, float(compile_s) if compile_s is not None else None, _gpu(m),
                  float(wait) if wait is not None else None)


def _gpu(m: dict[str, Any]) -> dict[str, float] | None:
    """A trial's NVML numbers, or None when it reported none (or none usable)."""
    try:
        n = float(m["gpu_samples"])
        out = {"n": n, "util": float(m["gpu_util_mean"]), "mem": float(m.get("gpu_mem_used_max_gib") or 0.0),
               "n_steps": float(m.get("gpu_steps_samples") or 0.0), "steps": float(m.get("gpu_util_steps_mean") or 0.0),
               "total": float(m.get("gpu_mem_total_gib") or 0.0)}  # 0: from a grpo-ray before the metric
    except (KeyError, TypeError, ValueError):
        return None
    return out if n > 0 else None


def _gpu_use(ts: list[_Trial]) -> dict[str, Any]:
    """Sample-weighted means of the trials' GPU utilization (%) and their largest memory used; {} without any."""
    g = [t.gpu for t in ts if t.gpu is not None]
    if not g:
        return {}
    n, n_steps = sum(x["n"] for x in g), sum(x["n_steps"] for x in g)
    return {"gpu_util_mean": round(sum(x["util"] * x["n"] for x in g) / n, 1),
            "gpu_util_steps_mean": round(sum(x["steps"] * x["n_steps"] for x in g) / n_steps, 1) if n_steps else None,
            "gpu_mem_used_max_gib": round(max(x["mem"] for x in g), 2),
            "gpu_mem_total_gib": round(min(totals), 2) if (totals := [x["total"] for x in g if x["total"]]) else None,
            "gpu_samples": int(n)}


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment (one ending as another starts: not overlapping).

    >>> _most_at_once([(0, 10), (5, 15), (10, 20)])
    2
    """
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])  # ends sort first
    most = cur = 0
    for _, step in events:
        cur += step
        most = max(most, cur)
    return most


def _union(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi]``."""
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            total += (cur_b - cur_a) if cur_b is not None else 0.0
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + ((cur_b - cur_a) if cur_b is not None else 0.0)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "mean": round(statistics.fmean(values), 2),
            "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def utilization(trials: Iterable[tuple[dict[str, Any], bool]]) -> dict[str, Any] | None:
    """Sweep-level numbers from ``(last metrics, finished)`` per trial; None before any report."""
    ts = [t for t in (_trial(m, fin) for m, fin in trials) if t is not None]
    if not ts:
        return None
    start, end = min(t.started for t in ts), max(t.end for t in ts)
    wall = max(end - start, 1e-9)
    devices = sorted({t.device for t in ts})
    busy = after_busy = after_wall = after_done = 0.0
    handoffs: list[float] = []
    at_once = 1
    for dev in devices:
        on = sorted((t for t in ts if t.device == dev), key=lambda t: t.first_step)
        at_once = max(at_once, _most_at_once([(t.started, t.end) for t in on]))
        busy += _union(((t.first_step, t.end) for t in on), start, end)
        first_end = min(t.end for t in on)
        after_wall += end - first_end
        after_busy += _union(((t.first_step, t.end) for t in on), first_end, end)
        after_done += sum(_union([(t.started, t.end)], first_end, end) / max(t.end - t.started, 1e-9)
                          for t in on if t.finished)
        for t in on:
            # The trial it took over from: the last to end before it started, on its actor when
            # it reused that actor's model, else on its device.
            lane = [p for p in on if p is not t and p.end <= t.started
                    and (p.worker == t.worker if t.reused else True)]
            if lane:
                handoffs.append(t.first_step - max(p.end for p in lane))
    return {
        "trials": len(ts),
        "finished": sum(t.finished for t in ts),
        "devices": len(devices),
        "wall_s": round(wall, 1),
        "busy_fraction": round(busy / (wall * len(devices)), 4),
        "busy_fraction_after_first": round(after_busy / after_wall, 4) if after_wall > 0 else None,
        "startup_s": {"cold": _stats([t.first_step - t.started for t in ts if not t.reused]),
                      "warm": _stats([t.first_step - t.started for t in ts if t.reused])},
        "engine_wait_s": _stats([t.engine_wait_s for t in ts if not t.reused and t.engine_wait_s is not None]),
        "handoff_s": _stats(handoffs),
        "compile_s": {"cold": _stats([t.compile_s for t in ts if not t.reused and t.compile_s is not None]),
                      "warm": _stats([t.compile_s for t in ts if t.reused and t.compile_s is not None])},
        "warm_compile_share": _warm_compile_share(ts),
        "trials_per_device_max": at_once,
        "trials_per_device_hour": round(sum(t.finished for t in ts) / (wall / 3600 * len(devices)), 2),
        "trials_per_device_hour_after_first": round(after_done / (after_wall / 3600), 2) if after_wall > 0 else None,
    } | _gpu_use_all(ts, devices)


def _warm_compile_share(ts: list[_Trial]) -> float | None:
    """The part of warm trials' time spent in torch.compile; None without any warm trial that reported it.

    A warm trial should compile nothing (it reuses its actor's graphs); one that does recompiled
    for something a graph was specialized on (docs/monitoring.md).

    >>> _warm_compile_share([_Trial(0, 1, 100, True, "d", "w", True, 50.0), _Trial(100, 101, 200, True, "d", "w", True, 0.0)])
    0.25
    """
    warm = [t for t in ts if t.reused and t.compile_s is not None]
    spent = sum(max(t.end - t.started, 0.0) for t in warm)
    return round(sum(t.compile_s for t in warm) / spent, 3) if warm and spent > 0 else None


def _gpu_use_all(ts: list[_Trial], devices: list[str]) -> dict[str, Any]:
    """The sweep's GPU utilization and each device's (averaged over the trials that sampled it)."""
    overall = _gpu_use(ts)
    if not overall:
        return {}
    per = {dev: use for dev in devices if (use := _gpu_use([t for t in ts if t.device == dev]))}
    return overall | {"gpu_util_per_device": per}


def summary_line(u: dict[str, Any] | None) -> str:
    """One line for the CLI and the report."""
    if not u:
        return "utilization: no trial has reported yet"
    warm = u["startup_s"]["warm"]
    cold = u["startup_s"]["cold"]
    parts = [f"busy {u['busy_fraction']:.0%} of {u['wall_s']:.0f} s on {u['devices']} device(s)"]
    if u["busy_fraction_after_first"] is not None:
        parts.append(f"{u['busy_fraction_after_first']:.0%} after each device's first trial")
    if cold:
        queued = u.get("engine_wait_s")
        parts.append(f"start-up cold {cold['median']:.1f} s (x{cold['n']})"
                     + (f", queued for an engine start up to {queued['max']:.0f} s" if queued and queued["max"] >= 1 else ""))
    if warm:
        share = u.get("warm_compile_share")  # a warm trial should reuse its actor's graphs: say when it did not
        parts.append(f"warm {warm['median']:.1f} s (x{warm['n']}"
                     + (f", compiling {share:.0%} of their time" if share is not None and share >= 0.05 else "") + ")")
    if u["handoff_s"]:
        parts.append(f"hand-over median {u['handoff_s']['median']:.1f} s")
    parts.append(f"{u['trials_per_device_hour']:.1f} trials per device-hour")
    if u.get("gpu_util_mean") is not None:  # measured by the trials (NVML), beside the timings above
        steps = u.get("gpu_util_steps_mean")
        parts.append("GPU util " + (f"{steps:.0f}% during steps, " if steps is not None else "")
                     + f"{u['gpu_util_mean']:.0f}% overall")
    return "utilization: " + ", ".join(parts)
