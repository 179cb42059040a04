"""Summarise the "quality" benchmark: does a sweep find a better recipe than the tutorial's?

The benchmark (google/gemma-3-270m, trained on src/grpo_ray/assets/math_mini.jsonl) has four arms,
read from up to three sweep runs' ``trials.json``:

* ``tutorial``: the tutorial recipe on 3 seeds; held-out ``eval_accuracy`` of its finished trials;
* ``sft_only``: the same trials' accuracy right after the SFT warm-up (``sft_eval_accuracy``),
  so the GRPO stage's own contribution is visible (same seeds, same data, no extra runs);
* ``sweep``: every trial of the hyperparameter sweep (config, accuracy, stopped early or failed)
  and its best finished trial, chosen on the validation set (bench/data/heldout_val.jsonl);
* ``rerun``: the sweep's best configuration on 3 fresh seeds, and ``rerun_sft_only``, the same
  trials right after SFT (the winner's SFT settings alone);
* ``paired`` (optional): the tutorial's recipe on the rerun's seeds, run beside it in the same
  lease, and ``paired_sft_only``. With it the verdict is paired: per seed, winner minus tutorial,
  measured on one machine at one commit.

tutorial, sft_only and rerun are scored on the test set (bench/data/heldout_test.jsonl), never
used for choosing, so the best-of-many selection does not inflate them (bench/heldout_math.py).

The ``verdict`` compares rerun with tutorial (with ``paired``, the paired run is the tutorial arm
it is compared with): the difference of means against the larger of the two arms' seed standard
deviations; the paired differences per seed are reported beside it. A sweep that only wins by less than the seed-to-seed spread
has not shown anything. GPU seconds per arm (sum over trials of reported_at - trial_started_at,
and the wall span first start .. last report) are recorded so the arms can be compared at equal
GPU budget: a sweep costs many tutorial runs.

Any run may be missing or lack trials.json (a lease can end mid-benchmark): that arm is marked
missing and the rest is still summarised. The plot needs matplotlib and is skipped without it.

Usage:

    python bench/quality_summary.py --tutorial RUN_DIR --sweep RUN_DIR --rerun RUN_DIR \\
        --out bench/results/quality_h200_COMMIT.json [--plot bench/results/quality_h200_COMMIT.png] \\
        [--commit C] [--device D] [--command "..."]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ACC = "eval_accuracy"
SFT_ACC = "sft_eval_accuracy"
ARMS = ("tutorial", "sft_only", "sweep", "rerun", "rerun_sft_only", "paired", "paired_sft_only")
# (arm, run it is read from, metric): the *_sft_only arms are their run's trials right after SFT.
ARM_SOURCES = (("tutorial", "tutorial", ACC), ("sft_only", "tutorial", SFT_ACC), ("sweep", "sweep", ACC),
               ("rerun", "rerun", ACC), ("rerun_sft_only", "rerun", SFT_ACC),
               ("paired", "paired", ACC), ("paired_sft_only", "paired", SFT_ACC))
RUNS = ("tutorial", "sweep", "rerun", "paired")


def _num(v: Any) -> float | None:
    """A finite number, or None: metrics may be null, a string (an error note) or NaN."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def _seed(trial: dict) -> Any:
    cfg = trial.get("config") or {}
    if "grpo.seed" in cfg:
        return cfg["grpo.seed"]
    nested = cfg.get("grpo")  # tolerate a nested config as well as the dotted one
    return nested.get("seed") if isinstance(nested, dict) else None


def _finished(trial: dict) -> bool:
    """Ran to its last step without error: only these compete (a stopped trial's accuracy is early)."""
    return not trial.get("error") and not trial.get("stopped_early")


def load_run(run_dir: str | None) -> dict[str, Any]:
    """``{"dir", "trials": list | None, "spec": dict | str | None, "missing": reason | None}``.

    ``run_dir`` is a run directory or a trials.json file itself (an earlier lease's, as committed
    under bench/results/)."""
    run: dict[str, Any] = {"dir": run_dir, "trials": None, "spec": None, "missing": None}
    if not run_dir:
        run["missing"] = "not given"
        return run
    path = Path(run_dir)
    trials_file = path if path.is_file() else path / "trials.json"
    try:
        trials = json.loads(trials_file.read_text())
        if not isinstance(trials, list):
            raise ValueError("trials.json is not a list")
        run["trials"] = [t for t in trials if isinstance(t, dict)]
    except FileNotFoundError:
        run["missing"] = f"no trials.json in {run_dir}" if path.is_dir() else f"{run_dir} does not exist"
    except (OSError, ValueError) as e:
        run["missing"] = f"unreadable trials.json in {run_dir}: {e}"
    spec_path = path / "spec.resolved.yaml"
    if spec_path.is_file():
        text = spec_path.read_text()
        try:
            import yaml  # optional: without it the spec is kept as text, which still records the recipe
            run["spec"] = yaml.safe_load(text)
        except Exception:  # ImportError or a YAML error: keep the text
            run["spec"] = text
    return run


def gpu_time(trials: list[dict]) -> dict[str, Any]:
    """Sum of each trial's reported_at - trial_started_at, and the wall span first start .. last report."""
    spans = []
    for t in trials:
        m = t.get("metrics") or {}
        a, b = _num(m.get("trial_started_at")), _num(m.get("reported_at"))
        if a is not None and b is not None and b >= a:
            spans.append((a, b))
    if not spans:
        return {"gpu_s": None, "wall_span_s": None, "trials_timed": 0}
    return {"gpu_s": round(sum(b - a for a, b in spans), 1),
            "wall_span_s": round(max(b for _, b in spans) - min(a for a, _ in spans), 1),
            "trials_timed": len(spans)}


def arm_stats(trials: list[dict], metric: str) -> dict[str, Any]:
    """n, mean, sample std, min, max, per-kind means and seeds of ``metric`` over ``trials``."""
    vals = [(t, _num((t.get("metrics") or {}).get(metric))) for t in trials]
    vals = [(t, v) for t, v in vals if v is not None]
    xs = [v for _, v in vals]
    kinds: dict[str, list[float]] = {}
    for t, _ in vals:
        for k, v in (t.get("metrics") or {}).items():
            if k.startswith(metric + "/") and _num(v) is not None:
                kinds.setdefault(k[len(metric) + 1:], []).append(_num(v))  # type: ignore[arg-type]
    return {
        "metric": metric,
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) >= 2 else None,  # sample std (n-1): 3 seeds are a sample
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "per_kind_mean": {k: statistics.fmean(v) for k, v in sorted(kinds.items())},
        "per_kind_n": {k: len(v) for k, v in sorted(kinds.items())},
        "seeds": [_seed(t) for t, _ in vals],
        "values": [{"trial_id": t.get("trial_id"), "seed": _seed(t), "value": v} for t, v in vals],
    }


def _trial_row(t: dict) -> dict[str, Any]:
    m = t.get("metrics") or {}
    return {
        "trial_id": t.get("trial_id"), "config": t.get("config") or {},
        ACC: _num(m.get(ACC)), SFT_ACC: _num(m.get(SFT_ACC)),
        "per_kind": {k[len(ACC) + 1:]: _num(v) for k, v in m.items() if k.startswith(ACC + "/")},
        "status": "error" if t.get("error") else "stopped early" if t.get("stopped_early") else "finished",
        "error": t.get("error"), "stopped_early": bool(t.get("stopped_early")),
        **{k: m.get(k) for k in ("step", "reward", "eval_format_rate", "grpo_step_s", "elapsed_s",
                                 "zero_std_groups", "truncated_rate", "trial_started_at", "reported_at")},
    }


def _by_start(trials: list[dict]) -> list[dict]:
    """Trials in launch order (trials.json's order when start times are missing): the sweep's index axis."""
    def key(it: tuple[int, dict]) -> tuple[float, int]:
        s = _num((it[1].get("metrics") or {}).get("trial_started_at"))
        return (s if s is not None else math.inf, it[0])
    return [t for _, t in sorted(enumerate(trials), key=key)]


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's arms and verdict from the loaded tutorial, sweep and rerun runs."""
    arms: dict[str, Any] = {}
    for name, source, metric in ARM_SOURCES:
        run = runs.get(source) or {"dir": None, "trials": None, "spec": None, "missing": "not given"}
        if run["trials"] is None:
            arms[name] = {"missing": run["missing"], "run_dir": run["dir"], "n": 0}
            continue
        trials = run["trials"]
        # sft_only uses exactly the tutorial arm's trials (finished ones), so the two are paired by seed
        # and their difference is what the GRPO stage added.
        pool = [t for t in trials if _finished(t)]
        arm = {"missing": None, "run_dir": run["dir"], "trials_in_run": len(trials),
               "failed": sum(1 for t in trials if t.get("error")),
               "stopped_early": sum(1 for t in trials if t.get("stopped_early") and not t.get("error")),
               **arm_stats(pool, metric),
               # sft_only is the tutorial's trials: same GPU time, not extra (reported for the table only).
               "time": gpu_time(trials), "spec": run["spec"]}
        if name.endswith("sft_only"):
            arm["note"] = f"the {source} run's finished trials, measured after SFT; its time is that run's"
        if name == "sweep":
            ordered = _by_start(trials)
            arm["trials"] = [dict(_trial_row(t), index=i) for i, t in enumerate(ordered)]
            ranked = [r for r in arm["trials"] if r["status"] == "finished" and r[ACC] is not None]
            # The product's own pick (best/best.json: Pareto front, then accuracy), which the rerun
            # re-ran; the highest accuracy only where the sweep wrote none.
            picked = _picked_trial(run["dir"])
            chosen = [r for r in ranked if r["trial_id"] == picked]
            arm["best"] = chosen[0] if chosen else (max(ranked, key=lambda r: r[ACC]) if ranked else None)
            arm["best_rule"] = "best/best.json (the sweep's pick)" if chosen else "highest eval_accuracy"
        arms[name] = arm
    return {"arms": arms, "paired": paired_differences(arms), "verdict": verdict(arms), "gpu_budget": gpu_budget(arms)}


def paired_differences(arms: dict[str, Any]) -> dict[str, Any] | None:
    """Per seed, rerun minus paired (the tutorial on the same seed, same lease), after GRPO and after SFT."""
    if arms.get("paired", {}).get("missing") or arms.get("rerun", {}).get("missing"):
        return None
    out: dict[str, Any] = {}
    for label, a, b in (("final", "rerun", "paired"), ("after_sft", "rerun_sft_only", "paired_sft_only")):
        left = {v["seed"]: v["value"] for v in arms[a].get("values", [])}
        right = {v["seed"]: v["value"] for v in arms[b].get("values", [])}
        seeds = sorted(set(left) & set(right), key=str)
        diffs = [left[s] - right[s] for s in seeds]
        out[label] = {"seeds": seeds, "differences": diffs,
                      "mean": statistics.fmean(diffs) if diffs else None,
                      "std": statistics.stdev(diffs) if len(diffs) >= 2 else None,
                      "positive": sum(d > 0 for d in diffs), "n": len(diffs)}
    return out


def _picked_trial(run_dir: str | None) -> str | None:
    try:
        return json.loads((Path(run_dir) / "best" / "best.json").read_text())["trial_id"]
    except (OSError, TypeError, ValueError, KeyError):
        return None


def verdict(arms: dict[str, Any]) -> dict[str, Any]:
    """rerun mean - tutorial mean against the larger seed std of the two arms (the paired run as
    the tutorial arm when there is one: same lease, same seeds)."""
    paired = arms.get("paired") or {}
    use_paired = not paired.get("missing") and paired.get("n")
    tut, rer = (paired, arms["rerun"]) if use_paired else (arms["tutorial"], arms["rerun"])
    sft = arms["paired_sft_only"] if use_paired else arms["sft_only"]
    out: dict[str, Any] = {"rerun_minus_tutorial": None, "seed_spread": None, "beats": None,
                           "tutorial_minus_sft_only": None,
                           "tutorial_arm": "paired (same lease, same seeds)" if use_paired else "tutorial"}
    if tut.get("mean") is not None and sft.get("mean") is not None:
        out["tutorial_minus_sft_only"] = tut["mean"] - sft["mean"]  # what GRPO adds on top of SFT
    missing = [(a, arm) for a, arm in (("tutorial", tut), ("rerun", rer)) if arm.get("missing") or not arm.get("n")]
    if missing:
        out["sentence"] = "incomplete: " + ", ".join(
            f"{a} missing" if arm.get("missing") else f"{a} has no finished trial" for a, arm in missing)
        return out
    out["rerun_minus_tutorial"] = rer["mean"] - tut["mean"]
    stds = [s for s in (tut["std"], rer["std"]) if s is not None]
    if len(stds) < 2:
        few = [a for a, arm in (("tutorial", tut), ("rerun", rer)) if arm["std"] is None]
        out["sentence"] = ("incomplete: " + ", ".join(few)
                           + " has fewer than 2 finished seeds, so the seeds' spread is unknown")
        return out
    out["seed_spread"] = max(stds)
    out["beats"] = out["rerun_minus_tutorial"] > out["seed_spread"]
    out["sentence"] = ("the sweep's best beats the tutorial's recipe by more than the seeds' spread" if out["beats"]
                       else "the sweep's best does not beat the tutorial's recipe by more than the seeds' spread")
    out["detail"] = (f"rerun {rer['mean']:.3f} - tutorial {tut['mean']:.3f} = {out['rerun_minus_tutorial']:+.3f}; "
                     f"larger seed std {out['seed_spread']:.3f}")
    return out


def gpu_budget(arms: dict[str, Any]) -> dict[str, Any]:
    """GPU seconds of each arm and what the sweep route (sweep + rerun) cost in tutorial runs."""
    g = {a: (arms[a].get("time") or {}).get("gpu_s") for a in ("tutorial", "sweep", "rerun", "paired")}
    out: dict[str, Any] = {f"{a}_gpu_s": v for a, v in g.items()}
    tut_n = arms["tutorial"].get("trials_in_run") or 0
    if g["tutorial"] and tut_n and g["sweep"] is not None:
        per_run = g["tutorial"] / tut_n
        out["tutorial_gpu_s_per_trial"] = round(per_run, 1)
        out["sweep_plus_rerun_in_tutorial_trials"] = round((g["sweep"] + (g["rerun"] or 0)) / per_run, 1)
    return out


def _fmt(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def table_md(arms: dict[str, Any]) -> str:
    """arm | n | mean ± std | min–max | per-kind means."""
    lines = ["| arm | n | mean ± std | min–max | per-kind means |", "|---|---|---|---|---|"]
    for name in ARMS:
        a = arms[name]
        if a.get("missing"):
            lines.append(f"| {name} | 0 | missing ({a['missing']}) | | |")
            continue
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in a["per_kind_mean"].items()) or "–"
        label = name + (" (finished)" if name == "sweep" else "")
        lines.append(f"| {label} | {a['n']} | {_fmt(a['mean'])} ± {_fmt(a['std'])} | "
                     f"{_fmt(a['min'])}–{_fmt(a['max'])} | {kinds} |")
    best = arms["sweep"].get("best")
    if best:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(best["per_kind"].items()) if v is not None) or "–"
        lines.append(f"| sweep best ({best['trial_id']}) | 1 | {_fmt(best[ACC])} | | {kinds} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> bool:
    """Held-out accuracy per arm (a dot per seed, a bar at the mean) and the sweep's trials in launch order."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on the bench machines
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    arms = summary["arms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.4, 1]})
    for i, name in enumerate(ARMS):
        a = arms[name]
        vals = [v["value"] for v in a.get("values", [])]
        if not vals:
            ax1.text(i, 0.02, "missing" if a.get("missing") else "no data", ha="center", fontsize=8, color="gray")
            continue
        if len(vals) >= 5:  # a box only says something with a handful of points (the sweep)
            ax1.boxplot(vals, positions=[i], widths=0.5, showfliers=False)
        # Deterministic jitter so reruns of this script give the same picture.
        xs = [i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(vals))]
        ax1.scatter(xs, vals, s=22, alpha=0.8, zorder=3)
        ax1.hlines(a["mean"], i - 0.3, i + 0.3, colors="black", linewidth=2, zorder=4)
    # "rerun_sft_only" -> "rerun\nSFT only": seven labels side by side must not overlap.
    ax1.set_xticks(range(len(ARMS)), [n.replace("_sft_only", "\nSFT only").replace("sft_only", "SFT\nonly")
                                      + f"\n(n={arms[n].get('n', 0)})" for n in ARMS], fontsize=8)
    ax1.set_xlim(-0.6, len(ARMS) - 0.4)
    ax1.set_ylabel("held-out accuracy")
    ax1.set_ylim(bottom=0)
    ax1.set_title("per arm (dots: seeds/trials, bar: mean)\nsweep: validation set; others: test set", fontsize=9)

    rows = arms["sweep"].get("trials") or []
    styles = {"finished": ("o", "tab:blue"), "stopped early": ("v", "tab:orange"), "error": ("x", "tab:red")}
    for status, (marker, color) in styles.items():
        # A failed trial has no accuracy: drawn at 0 so it is still seen; others without one are left out.
        pts = [(r["index"], 0.0 if status == "error" else r[ACC]) for r in rows
               if r["status"] == status and (status == "error" or r[ACC] is not None)]
        if pts:
            ax2.scatter(*zip(*pts), marker=marker, color=color, label=status + (" (at 0)" if status == "error" else ""))
    best = arms["sweep"].get("best")
    if best:
        ax2.scatter([best["index"]], [best[ACC]], s=160, facecolors="none", edgecolors="green", label="best")
    ax2.set_xlabel("trial index (launch order)")
    ax2.set_ylabel("eval_accuracy (validation set)")
    ax2.set_title("sweep trials" if rows else "sweep: missing", fontsize=9)
    if rows:
        ax2.legend(fontsize=8)
    fig.suptitle(summary.get("verdict", {}).get("sentence", ""), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _git_commit() -> str | None:
    try:  # read-only: names the code the numbers came from when --commit is not given
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tutorial", help="run directory of the tutorial recipe on 3 seeds")
    p.add_argument("--sweep", help="run directory of the hyperparameter sweep")
    p.add_argument("--rerun", help="run directory of the sweep's best configuration on 3 fresh seeds")
    p.add_argument("--paired", help="run directory of the tutorial's recipe on the rerun's seeds, same lease")
    p.add_argument("--out", required=True, help="JSON to write, e.g. bench/results/quality_h200_COMMIT.json")
    p.add_argument("--plot", help="PNG to write (skipped without matplotlib)")
    p.add_argument("--commit", help="code commit the runs used (default: this checkout's HEAD)")
    p.add_argument("--device", help="e.g. 'NVIDIA H200'")
    p.add_argument("--command", help="the command(s) that produced the runs, recorded verbatim")
    args = p.parse_args(argv)

    runs = {name: load_run(getattr(args, name)) for name in RUNS}
    summary = summarize(runs)
    summary["table_md"] = table_md(summary["arms"])
    result = {"benchmark": "quality", "commit": args.commit or _git_commit(), "device": args.device,
              "command": args.command,
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "runs": {k: r["dir"] for k, r in runs.items()}, **summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    print(summary["table_md"])
    v = summary["verdict"]
    print(f"\nverdict: {v['sentence']}" + (f" ({v['detail']})" if v.get("detail") else ""))
    for label, d in (summary["paired"] or {}).items():
        if d["n"]:
            print(f"paired ({label}): rerun - tutorial per seed {[round(x, 4) for x in d['differences']]}, "
                  f"mean {d['mean']:+.4f}, positive {d['positive']}/{d['n']}")
    if v.get("tutorial_minus_sft_only") is not None:
        print(f"GRPO over SFT alone (tutorial - sft_only): {v['tutorial_minus_sft_only']:+.3f}")
    print("gpu budget:", json.dumps(summary["gpu_budget"]))
    print(f"wrote {out}")
    if args.plot and plot(result, args.plot):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
