"""Time grpo_ray.task.rewards against the Unsloth tutorial's regex rewards on hostile completions.

Hostile completions repeat tags up to 30 KB and 300 KB; the tutorial's regexes backtrack on them
(quadratic, or cubic for repeated full blocks), so each seed call runs in a child process with a
time limit and is recorded as timed out past it. The seed code is the oracle of
``tests/test_rewards.py``, imported from there so there is one copy of it.

    python bench/rewards_speed.py [--seed-timeout 20] [--out bench/results/rewards_speed.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_rewards import QWEN_EOS, seed_rewards  # noqa: E402  (the oracle lives with the tests)

from grpo_ray.task.rewards import BUILTIN_REWARDS, make_rewards  # noqa: E402
from grpo_ray.task.template import Format  # noqa: E402

CASES = {
    "repeated_think_end": "</think>",  # seed match_format: quadratic (the 0.8 s on 30 KB)
    "repeated_solution_start": "<SOLUTION>",  # seed match_numbers: quadratic
    "repeated_blocks": "</think><SOLUTION>1</SOLUTION>x",  # seed match_format: cubic
}
SIZES = {"30KB": 30_000, "300KB": 300_000}
WELL_FORMED = "Let me think step by step. " * 40 + "</think><SOLUTION>42</SOLUTION>" + QWEN_EOS


def _best_of(fn, completions, answers, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(prompts=None, completions=completions, answer=answers)
        best = min(best, time.perf_counter() - start)
    return best


def _seed_child(name: str, text: str, conn) -> None:
    fn = seed_rewards(eos_token=QWEN_EOS)[name]
    start = time.perf_counter()
    fn(prompts=None, completions=[[{"role": "assistant", "content": text}]], answer=["1"])
    conn.send(time.perf_counter() - start)


def _seed_time(name: str, text: str, timeout: float) -> float | None:
    """Seconds the tutorial's ``name`` takes on ``text``; None past ``timeout`` (the child is killed)."""
    parent, child = mp.Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_seed_child, args=(name, text, child))
    proc.start()
    ready = parent.poll(timeout)
    result = parent.recv() if ready else None
    if proc.is_alive():
        proc.kill()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-timeout", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rewards_speed.json")
    args = parser.parse_args()

    ours = make_rewards(Format(), QWEN_EOS)
    numbers: dict[str, object] = {}
    for case, unit in CASES.items():
        timed_out: set[str] = set()  # a seed function that timed out on the smaller size is not rerun
        for size_name, size in SIZES.items():
            text = unit * (size // len(unit))
            completions, answers = [[{"role": "assistant", "content": text}]], ["1"]
            ours_s = {n: _best_of(ours[n], completions, answers, args.repeats) for n in BUILTIN_REWARDS}
            seed_s: dict[str, float | str] = {}
            for name in BUILTIN_REWARDS:
                if name in timed_out:
                    seed_s[name] = f"skipped: timed out (> {args.seed_timeout:g} s) on a smaller size"
                    continue
                took = _seed_time(name, text, args.seed_timeout)
                if took is None:
                    timed_out.add(name)
                    seed_s[name] = f"timed out (> {args.seed_timeout:g} s)"
                else:
                    seed_s[name] = took
            numbers[f"{case}/{size_name}"] = {
                "chars": len(text), "unit": unit,
                "ours_s": ours_s | {"all_four": sum(ours_s.values())},
                "seed_s": seed_s,
            }
            print(case, size_name, json.dumps(numbers[f"{case}/{size_name}"]), flush=True)

    # Ordinary output, for scale: a batch of 64 well-formed ~1 KB completions.
    batch = [[{"role": "assistant", "content": WELL_FORMED}]] * 64
    seed = seed_rewards(eos_token=QWEN_EOS)
    numbers["well_formed_batch64"] = {
        "chars": len(WELL_FORMED),
        "ours_s": {n: _best_of(ours[n], batch, ["42"] * 64, args.repeats) for n in BUILTIN_REWARDS},
        "seed_s": {n: _best_of(seed[n], batch, ["42"] * 64, args.repeats) for n in BUILTIN_REWARDS},
    }
    print("well_formed_batch64", json.dumps(numbers["well_formed_batch64"]))

    result = {
        "device": device_info(),
        "commit": commit("src/grpo_ray/task/rewards.py", "bench/rewards_speed.py"),
        "config": {"eos_token": QWEN_EOS, "format": "default (<think>, </think>, <SOLUTION>, </SOLUTION>)",
                   "sizes_chars": SIZES, "cases": CASES, "ours_timing": f"best of {args.repeats}",
                   "seed_timing": f"one run in a forked child, killed after {args.seed_timeout:g} s"},
        "numbers": numbers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
