"""Issue #5 benchmark: our search (Optuna TPE + ASHA) against random search, at an equal number of trials.

    python bench/search_compare.py --check --trials 16   # as bench/results/search_compare_cpu.json (16 min here)
    python bench/search_compare.py --seeds 0,1 --trials 6 --out /tmp/sc.json

For each search seed it runs bench/search_compare.yaml twice through the real
``grpo_ray.sweep.driver.run_sweep`` (Ray Tune + Optuna, one trial at a time on one CPU core, storage
in a temporary directory, export off):

    tpe_asha   search.sampler: tpe, search.early_stopping: ASHA on `reward` (rungs at GRPO steps 4, 8 of 12)
    random     search.sampler: random, no early stopping

and records, per method and seed, every trial in start order (config, final `reward`,
held-out `eval_format_rate` / `eval_accuracy`, GRPO step reached, `elapsed_s`, stopped
early or not) and: the best objective value over trials that finished (a trial stopped
early never wins a sweep, select.py), the trial index and cumulative trial-seconds at
which it was first reached, total trial-seconds, trials stopped early, and the held-out
format rate of the trial the sweep picked. Trial-seconds are the trials' own ``elapsed_s``
(start to last report, model load included when not reused; torch on one thread), and
``cpu_s``, the CPU time the trial's Ray worker process used (read from /proc at each report,
see CpuMeter): on this shared 2-core machine wall time also counts other people's load, CPU
time much less so. Ray start-up and the driver's bookkeeping are only in ``wall_s``.

Why this objective. On sweeps/smoke.yaml the tiny random Qwen3 learns nothing: held-out
accuracy is 0 for every configuration and the reward is its floor (-7.5) whatever the
hyperparameters, so comparing searches on it would compare noise. Single trials run
in-process (``run_trial``; ``--check`` reruns them into the result's "objective_check")
showed what does vary: a long enough SFT warm-up teaches the output format, and whether it
does depends on the hyperparameters (held-out greedy format rate 0 or 1.0: rank 64 at lr 3e-3
for 300 SFT steps learns it, rank 4 for 100 steps or 8 steps do not; a GRPO learning rate
of 3e-3 wipes it out within 8 steps). ``eval_format_rate`` cannot be a search objective
(spec.Objective allows reward, eval_accuracy, format_rate, reward_weighted), and at the
default GRPO temperature 1.0 this model's samples are noise, so the GRPO ``reward`` stays at
-7.5 even when its greedy output is well formatted. At ``grpo.temperature: 0.1`` the GRPO
samples are near-greedy and ``reward`` (the four rule-based rewards; two of them, with
partial credit, reward the format) follows what SFT taught. So: a single objective,
``reward`` (max), one number to rank trials by (with two objectives "best" is a Pareto
front, and the second default, eval_accuracy, is 0 everywhere here); the held-out format
rate is recorded beside it as the held-out check. ``reward`` is a mean over the last
window's 16 sampled completions of 4 training prompts, so it is noisier than the held-out
rate; the objective check records that noise (same configuration, two GRPO seeds: final
reward 0.41 and 0.25, against -5.5/-6.6 for the rank-4 configuration and -7.5 for 8 SFT steps).
A trial is deterministic on CPU: a configuration both sweeps ran gave the same numbers in both.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "bench" / "search_compare.yaml"
OBJECTIVE = "reward"
HELD_OUT = "eval_format_rate"
METHODS: dict[str, dict[str, Any]] = {
    # early_stopping stays as the YAML sets it (ASHA on reward)
    "tpe_asha": {"search.sampler": "tpe"},
    "random": {"search.sampler": "random", "search.early_stopping": None},
}
KEEP = ["step", OBJECTIVE, HELD_OUT, "eval_accuracy", "sft_format_rate", "format_rate", "elapsed_s",
        "sft_seconds", "model_reused", "trial_started_at"]


def _round(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v  # 4 significant digits: learning rates are small


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process on this machine (a local Ray worker)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """At each trial report, the CPU time its Ray worker process has used so far.

    A trial's CPU-seconds: its worker's CPU time at the trial's last report minus the same
    worker's at the previous trial's last report (0 for a fresh worker: its start-up, imports
    and model load count toward its first trial). Work after a trial's last report (saving
    the last checkpoint, tear-down) lands on the worker's next trial.
    """

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "result":
            return
        pid = data["result"].get("worker_pid")
        cpu = _cpu_seconds(int(pid)) if pid else None
        if cpu is not None:
            self.last[data["trial_id"]] = (int(pid), cpu)

    def per_trial(self, ordered_ids: list[str]) -> dict[str, float | None]:
        prev: dict[int, float] = {}
        out: dict[str, float | None] = {}
        for tid in ordered_ids:
            if tid not in self.last:
                out[tid] = None
                continue
            pid, cpu = self.last[tid]
            out[tid] = round(cpu - prev.get(pid, 0.0), 2)
            prev[pid] = cpu
        return out


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Best objective among finished trials, when it was first reached, and what the sweep spent."""
    cum = cpu = 0.0
    best, at, held_best, held_at = None, None, None, None
    for i, t in enumerate(trials, 1):
        cum += t["elapsed_s"] or 0.0
        cpu += t["cpu_s"] or 0.0
        if t["error"] or t["stopped_early"] or t[OBJECTIVE] is None:
            continue
        where = {"trial": i, "trial_seconds": round(cum, 1), "cpu_seconds": round(cpu, 1)}
        if best is None or t[OBJECTIVE] > best:
            best, at = t[OBJECTIVE], where
        if t[HELD_OUT] is not None and (held_best is None or t[HELD_OUT] > held_best):
            held_best, held_at = t[HELD_OUT], where
    return {
        f"best_{OBJECTIVE}": _round(best),
        "best_reached_at": at,
        f"best_{HELD_OUT}_finished": _round(held_best),
        f"best_{HELD_OUT}_reached_at": held_at,
        "total_trial_seconds": round(cum, 1),
        "total_cpu_seconds": round(cpu, 1),
        "trials": len(trials),
        "stopped_early": sum(1 for t in trials if t["stopped_early"]),
        "errored": sum(1 for t in trials if t["error"]),
    }


def run_method(base, method: str, seed: int, n: int, storage: str) -> dict[str, Any]:
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.sweep.driver import run_sweep

    spec = apply_overrides(base, METHODS[method] | {"name": f"sc-{method}-s{seed}", "search.seed": seed,
                                                    "search.num_samples": n})
    meter = CpuMeter()
    t0 = time.time()
    out = run_sweep(spec, storage_root=storage, on_event=meter)
    wall = time.time() - t0
    trials = []
    for t in out.trials:
        row = {"trial_id": t.trial_id, "config": {k: _round(v) for k, v in t.config.items()},
               "stopped_early": t.stopped_early, "error": (t.error or "")[-300:] or None}
        row |= {k: _round(t.metrics.get(k)) for k in KEEP}
        trials.append(row)
    trials.sort(key=lambda r: r["trial_started_at"] or float("inf"))
    cpu = meter.per_trial([t["trial_id"] for t in trials])
    for t in trials:
        t["cpu_s"] = cpu[t["trial_id"]]
    picked = out.best.metrics if out.best else {}
    return {"overrides": {k: v for k, v in METHODS[method].items()}, "wall_s": round(wall, 1),
            **summarize(trials),
            "picked": {"trial_id": out.best.trial_id if out.best else None,
                       **{k: _round(picked.get(k)) for k in (OBJECTIVE, HELD_OUT, "eval_accuracy")}},
            "trial_list": trials}


def aggregate(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per method, means over the seeds that finished; and per seed, which method reached the higher best."""
    agg: dict[str, Any] = {}
    for method in METHODS:
        done = [r[method] for r in runs.values() if method in r and "error" not in r[method]]
        if not done:
            continue

        def mean(key: str, sub: str | None = None) -> float | None:
            vals = [(d[key] or {}).get(sub) if sub else d[key] for d in done]
            vals = [v for v in vals if v is not None]
            return round(sum(vals) / len(vals), 3) if vals else None

        agg[method] = {"seeds": len(done), f"mean_best_{OBJECTIVE}": mean(f"best_{OBJECTIVE}"),
                       "mean_trial_seconds_to_best": mean("best_reached_at", "trial_seconds"),
                       "mean_cpu_seconds_to_best": mean("best_reached_at", "cpu_seconds"),
                       "mean_total_trial_seconds": mean("total_trial_seconds"),
                       "mean_total_cpu_seconds": mean("total_cpu_seconds"),
                       f"mean_picked_{HELD_OUT}": round(sum(d["picked"][HELD_OUT] or 0 for d in done) / len(done), 3),
                       f"mean_best_{HELD_OUT}_finished": mean(f"best_{HELD_OUT}_finished"),
                       "mean_stopped_early": mean("stopped_early"), "mean_wall_s": mean("wall_s")}
    # "When was the best reached" favours a method whose best is poor (reached early, never bettered);
    # the CPU-seconds until a finished trial first reaches a fixed reward compares like with like.
    reach: dict[str, dict[str, Any]] = {}
    for seed, r in runs.items():
        for method in METHODS:
            if method in r and "error" not in r[method]:
                reach.setdefault(method, {})[seed] = {str(x): first_reaching(r[method]["trial_list"], x)
                                                      for x in TARGETS}
    agg["cpu_seconds_to_reach_reward"] = reach
    wins = {}
    for seed, r in runs.items():
        if all(m in r and "error" not in r[m] for m in METHODS):
            a, b = r["tpe_asha"][f"best_{OBJECTIVE}"], r["random"][f"best_{OBJECTIVE}"]
            wins[seed] = "tie" if a == b else ("tpe_asha" if (a if a is not None else -1e9) > (
                b if b is not None else -1e9) else "random")
            r["paired"] = paired(r["tpe_asha"]["trial_list"], r["random"]["trial_list"])
    agg["higher_best_by_seed"] = wins
    return agg


TARGETS = (-3.0, -2.0, -1.5)  # reward; about -2 and up, the held-out format rate of these trials is 0.7 to 1


def first_reaching(trials: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first finished trial whose objective reaches ``target``, and the CPU-seconds spent up to it."""
    cpu = 0.0
    for i, t in enumerate(trials, 1):
        cpu += t.get("cpu_s") or 0.0
        if not t["stopped_early"] and not t["error"] and t[OBJECTIVE] is not None and t[OBJECTIVE] >= target:
            return {"trial": i, "cpu_seconds": round(cpu, 1)}
    return None


def paired(ours: list[dict[str, Any]], rand: list[dict[str, Any]]) -> dict[str, Any]:
    """What one seed's two sweeps share, and what ASHA's stops cost.

    TPE draws its first n_startup_trials (Optuna's default: 10) from the same seeded random
    sampler as ``search.sampler: random``, so both methods start with the same configurations;
    a trial is deterministic on CPU (same configuration, same numbers), so the random sweep
    shows the final reward each trial ASHA stopped would have reached.
    """
    same = 0
    for a, b in zip(ours, rand):
        if a["config"] != b["config"]:
            break
        same += 1
    stopped = [{"trial": i + 1, "reward_at_stop": ours[i][OBJECTIVE], "step": ours[i]["step"],
                "final_reward_in_random_sweep": rand[i][OBJECTIVE]}
               for i in range(same) if ours[i]["stopped_early"]]
    best_ours = max((t[OBJECTIVE] for t in ours if not t["stopped_early"] and not t["error"]
                     and t[OBJECTIVE] is not None), default=None)
    lost = [s for s in stopped if best_ours is not None and s["final_reward_in_random_sweep"] is not None
            and s["final_reward_in_random_sweep"] > best_ours]
    identical = sum(1 for i in range(same) if not ours[i]["stopped_early"]
                    and ours[i][OBJECTIVE] == rand[i][OBJECTIVE])

    def finished_mean(ts: list[dict[str, Any]]) -> float | None:
        vals = [t[OBJECTIVE] for t in ts if not t["stopped_early"] and not t["error"] and t[OBJECTIVE] is not None]
        return round(sum(vals) / len(vals), 3) if vals else None

    cpu_ours = sum(t.get("cpu_s") or 0.0 for t in ours[:same])
    cpu_rand = sum(t.get("cpu_s") or 0.0 for t in rand[:same])
    return {"same_config_trials": same,
            "shared_trials_cpu_seconds": {"tpe_asha": round(cpu_ours, 1), "random": round(cpu_rand, 1),
                                          "asha_saved_share": round(1 - cpu_ours / cpu_rand, 3) if cpu_rand else None},
            "finished_in_both_same_reward": identical,
            "stopped_early_in_shared_trials": stopped,
            "stopped_would_have_beaten_our_best": len(lost),
            # after the shared start: TPE's model-guided draws against more random ones
            "after_shared": {"trials": len(ours) - same,
                             "tpe_asha_mean_finished_reward": finished_mean(ours[same:]),
                             "tpe_asha_finished": sum(1 for t in ours[same:] if not t["stopped_early"]),
                             "random_mean_reward": finished_mean(rand[same:])}}


# Single trials (run_trial in-process, no Ray) behind the choice of objective: a configuration
# that learns the format, one that does not, one whose GRPO learning rate undoes it; the first
# two under a second GRPO seed as well (noise), and the smoke sweep's own short SFT.
CHECK = [
    {"sft.learning_rate": 3e-3, "sft.max_steps": 300, "lora.rank": 64, "grpo.learning_rate": 5e-5},
    {"sft.learning_rate": 3e-3, "sft.max_steps": 300, "lora.rank": 64, "grpo.learning_rate": 5e-5, "grpo.seed": 1},
    {"sft.learning_rate": 1e-2, "sft.max_steps": 100, "lora.rank": 4, "grpo.learning_rate": 5e-5},
    {"sft.learning_rate": 1e-2, "sft.max_steps": 100, "lora.rank": 4, "grpo.learning_rate": 5e-5, "grpo.seed": 1},
    {"sft.learning_rate": 3e-3, "sft.max_steps": 300, "lora.rank": 64, "grpo.learning_rate": 3e-3},
    {"sft.learning_rate": 2e-3, "sft.max_steps": 8, "lora.rank": 8, "grpo.learning_rate": 5e-5},
]


def objective_check(base) -> list[dict[str, Any]]:
    """Run each CHECK configuration as one real trial; its reports by GRPO step."""
    from grpo_ray.trial.run import run_trial

    rows = []
    for cfg in CHECK:
        reports: list[dict[str, Any]] = []
        t0 = time.time()
        run_trial(cfg, base, report=lambda m, d: reports.append(dict(m)))
        rows.append({"config": cfg, "wall_s": round(time.time() - t0, 1), "reports": [
            {k: _round(m.get(k)) for k in ("step", OBJECTIVE, "format_rate", HELD_OUT, "eval_accuracy",
                                            "sft_format_rate", "sft_loss")} for m in reports]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "search_compare_cpu.json"))
    ap.add_argument("--check", action="store_true", help="first run the single trials of CHECK (a few minutes)")
    ap.add_argument("--reaggregate", metavar="RESULT_JSON",
                    help="recompute 'aggregate' and 'paired' of a finished result file in place (no trials run)")
    args = ap.parse_args()
    if args.reaggregate:
        result = json.loads(Path(args.reaggregate).read_text())
        result["aggregate"] = aggregate(result["runs"])
        result["aggregated_by"] = f"python bench/search_compare.py --reaggregate at commit {commit('bench/search_compare.py')}"
        Path(args.reaggregate).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(json.dumps(result["aggregate"], indent=1))
        return

    from grpo_ray.config.load import dump_spec, load_spec

    base = load_spec(SPEC)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = f"python bench/search_compare.py --seeds {args.seeds} --trials {args.trials}"
    if args.check:
        command += " --check"
    result: dict[str, Any] = {
        "bench": "search_compare", "command": command, "device": device_info(),
        "commit": commit("src", "bench/search_compare.py", "bench/search_compare.yaml"),
        "config": "bench/search_compare.yaml", "spec": dump_spec(base), "objective": OBJECTIVE,
        "held_out_check": HELD_OUT, "methods": {m: v for m, v in METHODS.items()},
        "trials_per_sweep": args.trials, "seeds": seeds, "runs": {},
    }
    if args.check:
        result["objective_check"] = objective_check(base)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="search-compare-") as storage:
        for seed in seeds:
            for method in METHODS:
                print(f"== seed {seed} {method}", flush=True)
                try:
                    r = run_method(base, method, seed, args.trials, storage)
                except Exception as e:  # keep what the other sweeps measured
                    r = {"error": f"{type(e).__name__}: {e}"[-2000:]}
                result["runs"].setdefault(str(seed), {})[method] = r
                print(json.dumps({k: v for k, v in r.items() if k != "trial_list"}), flush=True)
                result["aggregate"] = aggregate(result["runs"])
                result["wall_s"] = round(time.time() - t_all, 1)
                Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result["aggregate"], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
