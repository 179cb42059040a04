"""Where a trial actor's time went, from bench/spy_sample.sh's py-spy dumps (one sample per second).

    python bench/spy_summary.py spy.txt.gz [--warm warm.json] [--top 25]

Prints, per sampled process, the functions most often on the active threads' stacks (inclusive:
a sample counts for every function on its stack). With ``--warm`` (bench/warm_sweep.py's JSON),
samples are split by trial phase: ``startup`` (a trial's start to its first step), ``steps``
(first step to its last report) and ``between`` (last report to the next trial's start on that
process), which is what the hand-over target is about.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

FRAME = re.compile(r"^\s+(\S.*) \((.+?):\d+\)$")
THREAD = re.compile(r'^Thread \S+ \(([\w+]+)\)')  # (idle), (active), (active+gil)


def samples(path: str):
    """(time, pid, [stack of 'func (file)' innermost first] per active thread)."""
    t = pid = None
    stacks: list[list[str]] = []
    cur: list[str] | None = None
    active = False
    with gzip.open(path, "rt", errors="replace") as f:
        try:
            for line in f:
                if line.startswith("=== "):
                    if t is not None:
                        yield t, pid, stacks
                    _, ts, p = line.split()
                    t, pid, stacks, cur, active = float(ts), int(p), [], None, False
                    continue
                m = THREAD.match(line)
                if m:
                    active = m.group(1).startswith("active")
                    cur = [] if active else None
                    if active:
                        stacks.append(cur)
                    continue
                m = FRAME.match(line)
                if m and cur is not None:
                    func, file = m.groups()
                    cur.append(f"{func} ({_short(file)})")
        except EOFError:  # copied while the sampler was still writing it
            pass
    if t is not None:
        yield t, pid, stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", "dist-packages/", "/src/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def phase_of(t: float, pid: int, trials: list[dict]) -> str:
    mine = sorted((x for x in trials if x.get("worker_pid") == pid and x.get("trial_started_at")),
                  key=lambda x: x["trial_started_at"])
    for x in mine:
        start, first, end = x["trial_started_at"], x.get("first_step_at") or float("inf"), x.get("reported_at") or float("inf")
        if start <= t < first:
            return f"startup{'-warm' if x.get('model_reused') else '-cold'}"
        if first <= t <= end:
            return "steps"
    return "between"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spy")
    ap.add_argument("--warm")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    trials = []
    if args.warm:
        for mode in json.load(open(args.warm)).get("modes", {}).values():
            trials += mode.get("trials", [])
    counts: dict[tuple[int, str], collections.Counter] = collections.defaultdict(collections.Counter)
    n: collections.Counter = collections.Counter()
    for t, pid, stacks in samples(args.spy):
        key = (pid, phase_of(t, pid, trials) if trials else "all")
        n[key] += 1
        seen = {f for s in stacks for f in s}
        counts[key].update(seen)
    for key in sorted(counts):
        print(f"== pid {key[0]} {key[1]}: {n[key]} samples")
        for func, c in counts[key].most_common(args.top):
            print(f"{c:6d} {100 * c / n[key]:5.1f}%  {func}")


if __name__ == "__main__":
    main()
