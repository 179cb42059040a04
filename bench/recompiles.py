"""Which functions torch.compile compiled again, in a sweep's log, per trial process.

A sweep run with ``TORCH_LOGS=recompiles`` and ``GRPO_RAY_TRIAL_LOGS=1`` (bench/fill_session.sh)
logs a "Recompiling function NAME in FILE" line, and the guards that failed, each time Dynamo
compiles a function again. A cold trial's compile time (``compile_s`` in utilization.json) is
mostly these: this counts them per function and per process, and the guard failures that
triggered them, so a lease's write-up can say where a cold trial's compilation goes. Run over a
warm wave's window (``--after``) it shows what warm trials still compile.

Usage: python bench/recompiles.py bench/results/warm_sweep_density_h200_ffe34b9.log.gz
       python bench/recompiles.py RUN.log.gz --after 21:26:30   # only lines at or after that time

>>> lines = [
...     "(tune_trainable pid=11) [rank0]:V1203 21:09:12.99 11 torch/_dynamo/guards.py:4760] [1/1] "
...     "[__recompiles] Recompiling function create_block_mask in /x/flex_attention.py:1207",
...     "(tune_trainable pid=11) [rank0]:V1203 21:09:12.99 11 torch/_dynamo/guards.py:4760] [1/1] "
...     "[__recompiles]     - 1/0: GLOBAL_STATE changed: grad_mode ",
...     "(tune_trainable pid=12) [rank0]:V1203 21:30:00.00 12 torch/_dynamo/guards.py:4760] [3/2] "
...     "[__recompiles] Recompiling function forward in /x/modeling_gemma3.py:399",
... ]
>>> r = count(lines)
>>> r.by_function.most_common()
[('create_block_mask (flex_attention.py:1207)', 1), ('forward (modeling_gemma3.py:399)', 1)]
>>> dict(r.by_process), r.reasons.most_common(1)
({'11': 1, '12': 1}, [('GLOBAL_STATE changed: grad_mode', 1)])
>>> count(lines, after="21:10:00").by_process
Counter({'12': 1})
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

_RECOMPILE = re.compile(r"pid=(\d+).*?V\d{4} (\d\d:\d\d:\d\d)\S*.*Recompiling function (\S+) in (\S+)")
_GUARD = re.compile(r"pid=(\d+).*?V\d{4} (\d\d:\d\d:\d\d)\S*.*\[__recompiles\]\s+- \d+/\d+: (.*)$")


@dataclass
class Recompiles:
    by_function: Counter = field(default_factory=Counter)  # "name (file:line)" -> recompiles
    by_process: Counter = field(default_factory=Counter)   # pid -> recompiles
    reasons: Counter = field(default_factory=Counter)      # a failed guard's first 80 characters -> lines


def count(lines: Iterable[str], after: str | None = None) -> Recompiles:
    """Recompiles in ``lines`` (a sweep's log), at or after the clock time ``after`` (HH:MM:SS)."""
    out = Recompiles()
    for line in lines:
        m = _RECOMPILE.search(line)
        if m:
            pid, clock, name, where = m.groups()
            if after is None or clock >= after:
                out.by_function[f"{name} ({where.rsplit('/', 1)[-1]})"] += 1
                out.by_process[pid] += 1
            continue
        g = _GUARD.search(line)
        if g and (after is None or g.group(2) >= after):  # "- 1/0: <guard>"; stack lines have no "1/0:"
            out.reasons[g.group(3).strip()[:80]] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", help="the sweep's log, plain or .gz (warm.log.gz beside a warm_sweep result)")
    ap.add_argument("--after", help="only lines at or after this clock time, HH:MM:SS (a warm wave)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    opener = gzip.open if args.log.endswith(".gz") else open
    with opener(args.log, "rt", errors="replace") as f:
        r = count(f, args.after)
    n, procs = sum(r.by_process.values()), len(r.by_process)
    print(f"{n} recompiles in {procs} process(es)" + (f", {n / procs:.1f} each" if procs else ""))
    print("by function:")
    for name, k in r.by_function.most_common(args.top):
        print(f"  {k:5d}  {name}")
    print("by process:", " ".join(f"{pid}:{k}" for pid, k in sorted(r.by_process.items())))
    # a recompile lists one failed guard per graph already cached for the function, so these
    # count guard failures, not recompiles
    print("failed guards, as listed under the recompiles (most common):")
    for reason, k in r.reasons.most_common(args.top):
        print(f"  {k:5d}  {reason}")


if __name__ == "__main__":
    main()
