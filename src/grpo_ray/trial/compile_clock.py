"""How much of a trial went into torch.compile: graphs built and seconds spent.

Its own module, free of transformers, so a trial can start the clock before the model load
(the unsloth backend must be imported before transformers, trl and peft).
"""

from __future__ import annotations

import sys


def compile_totals() -> tuple[int, float]:
    """Graphs torch.compile has built in this process so far, and the seconds it took.

    Seconds are Dynamo's frame compiles (which include Inductor's forward graphs) plus
    Inductor's backward graphs, compiled lazily at the first backward. Read from the counters
    torch keeps (``torch._dynamo.utils``) only if something already imported them: a process
    that never compiled pays nothing for asking. A warm trial that builds no graph reuses
    every compiled graph of the trials before it; one that builds some recompiled (for a new
    LoRA rank or sequence shape, say).
    """
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0, 0.0
    times = utils.compilation_time_metrics
    seconds = sum(times.get("_compile.compile_inner", ())) + sum(times.get("compile_fx.<locals>.bw_compiler", ()))
    return int(utils.counters["stats"]["unique_graphs"]), float(seconds)


class CompileClock:
    """torch.compile's graphs and seconds since this clock started (never negative: a
    ``torch._dynamo.reset()`` in between clears the counters it reads)."""

    def __init__(self) -> None:
        self.graphs, self.seconds = compile_totals()

    def since(self) -> tuple[int, float]:
        graphs, seconds = compile_totals()
        return max(graphs - self.graphs, 0), max(seconds - self.seconds, 0.0)
