"""Reward functions that misbehave on purpose, for the fault-injection suite (test_faults.py).

A user's own reward is imported by path (``rewards: [{name: "faults:hang"}]``), so these take
the same road a real broken reward would. Nothing here is a stand-in for our code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def boom(prompts=None, completions=None, **kw):
    raise RuntimeError("reward exploded (injected)")


def hang(prompts=None, completions=None, **kw):
    """A reward stuck in a Python loop: the watchdog interrupts it in place."""
    while True:
        time.sleep(0.05)


def hang_native(prompts=None, completions=None, **kw):
    """One call that never returns to Python (a stuck kernel): only ending the process helps."""
    time.sleep(10**6)


def inf(prompts=None, completions=None, **kw):
    """An infinite reward: GRPO's advantages, then its loss, become NaN."""
    return [float("inf")] * len(completions)


def oom(prompts=None, completions=None, **kw):
    """What torch raises when the GPU is full (simulated: this machine has no GPU)."""
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def config(prompts=None, completions=None, **kw):
    """A configuration error: the same on every attempt (a file the trial reads is missing), so not retried."""
    from grpo_ray.task.data import DataError

    raise DataError("answers.jsonl: no such file (injected configuration error)")


_FAULTS = {"boom": boom, "inf": inf, "hang": hang, "hang_native": hang_native, "oom": oom, "config": config}


def _claim(trial_id: str) -> tuple[int, bool]:
    """This trial's slot in the plan, claimed atomically on its first call: (slot, first attempt)."""
    d = Path(os.environ["GRPO_RAY_FAULT_DIR"])
    for p in d.glob("slot-*"):
        if (p.read_text().split() or [""])[0] == trial_id:
            return int(p.name.split("-")[1]), False
    for k in range(1000):
        try:
            fd = os.open(d / f"slot-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, trial_id.encode())
        os.close(fd)
        return k, True
    raise RuntimeError("no free slot")


def chaos(prompts=None, completions=None, **kw):
    """The fault of this trial's slot in ``$GRPO_RAY_FAULT_PLAN`` (trials take slots in the order
    they first score; ``$GRPO_RAY_FAULT_DIR/slot-<k>`` holds the trial id). ``sigkill`` and
    ``flaky`` strike the first attempt only (a retry finds its slot taken); ``none`` behaves."""
    import signal

    from ray import tune

    slot, first = _claim(tune.get_context().get_trial_id())
    plan = os.environ["GRPO_RAY_FAULT_PLAN"].split(",")
    fault = plan[slot] if slot < len(plan) else "none"
    if fault in _FAULTS:
        return _FAULTS[fault](prompts, completions, **kw)
    if fault == "sigkill" and first:
        os.kill(os.getpid(), signal.SIGKILL)  # the trial's process dies as under the OOM killer
    if fault == "flaky" and first:
        raise RuntimeError("transient failure (injected, first attempt only)")
    return [0.0] * len(completions)
