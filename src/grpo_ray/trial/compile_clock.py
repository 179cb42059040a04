"""How much of a trial went into torch.compile: graphs built and seconds spent.

Its own module, free of transformers, so a trial can start the clock before the model load
(the unsloth backend must be imported before transformers, trl and peft).
"""

from __future__ import annotations

import os
import sys


def compile_totals() -> tuple[int, float]:
    """Graphs torch.compile has built in this process so far, and the seconds it took.

    Seconds are Dynamo's frame compiles (which include Inductor's forward graphs, and the
    backward graphs AOTAutograd compiles eagerly, inside the frame's compile, when the backward
    needs a dynamic size) plus the backward graphs compiled lazily at the first backward, apart
    from any frame compile. Inductor's own ``bw_compiler`` timer would count an eager backward a
    second time: a dynamic-shape trial's SFT then "compiled" for longer than it ran (seen on the
    H200, b00a605: 158.8 s of compile in a 140.7 s SFT). Read from the counters
    torch keeps (``torch._dynamo.utils``) only if something already imported them: a process
    that never compiled pays nothing for asking. A warm trial that builds no graph reuses
    every compiled graph of the trials before it; one that builds some recompiled (for a new
    LoRA rank or sequence shape, say).
    """
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0, 0.0
    times = utils.compilation_time_metrics
    # Both timers are outermost: AOTAutograd's lazy backward runs at backward time, never inside
    # a frame compile (torch 2.11 and 2.13 alike).
    seconds = sum(times.get("_compile.compile_inner", ())) + sum(times.get("backward._backward_impl", ()))
    return int(utils.counters["stats"]["unique_graphs"]), float(seconds)


class CompileClock:
    """torch.compile's graphs and seconds since this clock started (never negative: a
    ``torch._dynamo.reset()`` in between clears the counters it reads)."""

    def __init__(self) -> None:
        self.graphs, self.seconds = compile_totals()

    def since(self) -> tuple[int, float]:
        graphs, seconds = compile_totals()
        return max(graphs - self.graphs, 0), max(seconds - self.seconds, 0.0)


def restore_torch_logs(wanted: str | None) -> None:
    """Put back the ``TORCH_LOGS`` a trial started with (``recompiles``, ``graph_breaks``...).

    Importing Unsloth drops the variable and sets every torch log to CRITICAL (unsloth_zoo's
    ``patch_torch_compile``), so a user's ``TORCH_LOGS=recompiles`` printed nothing: on the
    H200 a warm trial built 27 graphs and no log said why. torch reads the variable again in
    ``_init_logs``, the call it makes at its own import (private, in torch 2.11 and 2.13
    alike). Its parse is cached by the string, and Unsloth's ``set_logs`` cleared the cached
    settings object in place, so the cache goes first.
    """
    if not wanted:
        return
    os.environ["TORCH_LOGS"] = wanted
    try:
        from torch._logging import _internal

        _internal._parse_log_settings.cache_clear()
        _internal._init_logs()
    except Exception as e:  # private API: a torch that moved it costs the logs, never the trial
        print(f"grpo-ray: could not restore TORCH_LOGS={wanted!r} after importing Unsloth ({e!r})", file=sys.stderr)
