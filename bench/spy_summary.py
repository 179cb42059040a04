"""Where a trial actor's time went, from bench/spy_sample.sh's py-spy dumps (one sample per second).

    python bench/spy_summary.py spy.txt.gz [--warm warm.json] [--top 25]
    python bench/spy_summary.py spy.txt.gz --warm warm.json --per-trial

Prints, per sampled process, the functions most often on the active threads' stacks (inclusive:
a sample counts for every function on its stack). With ``--warm`` (bench/warm_sweep.py's JSON),
samples are split by trial phase: ``startup`` (a trial's start to its first step), ``steps``
(first step to its last report) and ``between`` (last report to the next trial's start on that
process), which is what the hand-over target is about. ``--per-trial`` prints, per trial, the
share of its readable samples spent in torch.compile (Dynamo tracing or Inductor), SFT, GRPO,
autograd's backward and vLLM generation. ``--steps-breakdown`` sorts the warm trials' GRPO-step
samples (model reused, after their first step) into one bucket each, by what their active
threads were in: compilation, the checkpointed backward (Unsloth's recomputing
``CheckpointFunction.backward``), other backward, vLLM generation, the loss forward, the
optimizer, or other. py-spy's non-blocking dumps fail on a share of samples
(a stack changing while read); those are counted apart, not guessed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

FRAME = re.compile(r"^\s+(\S.*) \((.+?):\d+\)$")
THREAD = re.compile(r'^Thread \S+ \(([\w+]+)\)')  # (idle), (active), (active+gil)


# --per-trial: what a sample is doing, by a function on any of its threads' stacks (active or not).
MARKS = {
    "compile": ("convert_frame.py", "compile_fx", "async_compile"),
    "sft": ("UnslothBackend.sft", "HFBackend.sft"),
    "grpo": ("UnslothBackend.grpo", "HFBackend.grpo"),
    "backward": ("_engine_run_backward",),
    "vllm_generate": ("LLMEngine.step", "_run_engine"),
    "eval": ("evaluate (grpo_ray",),
}


def raw_samples(path: str):
    """(time, pid, the dump's text) per sample."""
    with gzip.open(path, "rt", errors="replace") as f:
        text = []
        try:
            for line in f:
                text.append(line)
        except EOFError:  # copied while the sampler was still writing it
            pass
    for block in "".join(text).split("=== ")[1:]:
        head, _, body = block.partition("\n")
        ts, pid = head.split()
        yield float(ts), int(pid), body


def trial_at(t: float, pid: int, trials: list[dict]) -> dict | None:
    """The trial that process ``pid`` was running at time ``t`` (its start to its last report)."""
    for x in trials:
        if x.get("worker_pid") == pid and x.get("trial_started_at") and \
                x["trial_started_at"] <= t <= (x.get("reported_at") or float("inf")):
            return x
    return None


def per_trial(path: str, trials: list[dict]) -> None:
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for t, pid, body in raw_samples(path):
        x = trial_at(t, pid, trials)
        if x is None:
            continue
        c = rows[x["trial_id"]]
        c["samples"] += 1
        if "Error:" in body:
            c["unreadable"] += 1
            continue
        c["read"] += 1
        for mark, needles in MARKS.items():
            c[mark] += any(n in body for n in needles)
    cols = ["samples", "unreadable", *MARKS]
    print(f"{'trial':>9} " + " ".join(f"{c:>13}" for c in cols), "(shares of the readable samples)")
    for tid, c in rows.items():
        print(f"{tid:>9} {c['samples']:13d} {c['unreadable']:13d} "
              + " ".join(f"{100 * c[m] / max(c['read'], 1):12.0f}%" for m in MARKS))


# --steps-breakdown: the first bucket whose needles a sample's active stacks hold (order matters:
# a recomputing backward runs forward code, generation is under the trainer's step).
BUCKETS = [
    ("compile", ("convert_frame", "compile_fx")),
    ("checkpointed backward", ("CheckpointFunction.backward",)),
    ("other backward", ("_engine_run_backward", "backward (")),
    ("vllm generate", ("LLMEngine.step", "_run_engine")),
    ("loss forward", ("compute_loss",)),
    ("optimizer", ("Optimizer", "optimizer")),
]


def bucket_of(stacks: list[list[str]]) -> str:
    """The --steps-breakdown bucket of one sample's active stacks (innermost frame first).

    >>> bucket_of([["forward (m.py)", "CheckpointFunction.backward (torch/utils/checkpoint.py)"]])
    'checkpointed backward'
    >>> bucket_of([["step (x.py)", "LLMEngine.step (vllm/v1/engine/llm_engine.py)", "compute_loss (t.py)"]])
    'vllm generate'
    >>> bucket_of([]), bucket_of([["Printer._print (sympy/printing/printer.py)"]])
    ('idle', 'other')
    """
    if not stacks:
        return "idle"
    frames = " | ".join(f for s in stacks for f in s)
    return next((name for name, needles in BUCKETS if any(n in frames for n in needles)), "other")


def steps_breakdown(path: str, trials: list[dict]) -> dict[str, int]:
    """--steps-breakdown: samples of warm trials' GRPO steps per bucket (``idle``: no active thread)."""
    counts: collections.Counter = collections.Counter()
    for t, pid, stacks in samples(path):
        x = trial_at(t, pid, trials)
        if x and x.get("model_reused") and t >= (x.get("first_step_at") or float("inf")):
            counts[bucket_of(stacks)] += 1
    return dict(counts.most_common())


def samples(path: str):
    """(time, pid, [stack of 'func (file)' innermost first] per active thread)."""
    for t, pid, body in raw_samples(path):
        stacks: list[list[str]] = []
        cur: list[str] | None = None
        for line in body.splitlines():
            m = THREAD.match(line)
            if m:
                cur = [] if m.group(1).startswith("active") else None
                if cur is not None:
                    stacks.append(cur)
                continue
            m = FRAME.match(line)
            if m and cur is not None:
                func, file = m.groups()
                cur.append(f"{func} ({_short(file)})")
        yield t, pid, stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", "dist-packages/", "/src/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def phase_of(t: float, pid: int, trials: list[dict]) -> str:
    x = trial_at(t, pid, trials)
    if x is None:
        return "between"
    if t < (x.get("first_step_at") or float("inf")):
        return f"startup{'-warm' if x.get('model_reused') else '-cold'}"
    return "steps"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spy")
    ap.add_argument("--warm")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--per-trial", action="store_true")
    ap.add_argument("--steps-breakdown", action="store_true")
    args = ap.parse_args()
    trials = []
    if args.warm:
        for mode in json.load(open(args.warm)).get("modes", {}).values():
            trials += mode.get("trials", [])
    if args.per_trial:
        per_trial(args.spy, trials)
        return
    if args.steps_breakdown:
        counts = steps_breakdown(args.spy, trials)
        active = sum(v for k, v in counts.items() if k not in ("idle", "compile"))
        print(f"warm trials' GRPO steps: {sum(counts.values())} samples; shares of the {active} active outside compilation:")
        for name, c in counts.items():
            share = f"{100 * c / active:5.1f}%" if name not in ("idle", "compile") and active else "     "
            print(f"{c:6d} {share}  {name}")
        return
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
