"""Print bench/warm_sweep.py's JSON as one line per trial (where its time went) and each mode's
utilization. Usage: python bench/warm_summary.py warm.json [--smi smi.csv] [--slots N]

``--smi``: nvidia-smi's samples (bench/warm_session.sh writes them every 2 s) averaged over
each trial's steps (first step to last report): how hard the GPU itself worked while the
sweep counted it busy.

Each mode also gets its GRPO step time by what else ran on the card meanwhile
(:func:`steps_by_company`, from the trials' report windows): alone, beside neighbours that were
all stepping too (the steady packed step), or beside a neighbour still starting (loading its
model and engine, compiling, SFT). Packed steps in the quality benchmark's lease 2 took 3-4
times a lone one while the card itself scaled (bench/README.md, "H200 lease at a9f965a"); this
tells the two causes apart. Give the sweep several windows per trial (``grpo.report_every``
below ``grpo.max_steps``) for it to have something to sort."""

from __future__ import annotations

import argparse
import json
import statistics

from _common import read_smi  # bench/ is on sys.path when a script here runs

COLS = ["model_reused", "load_s", "startup_s", "sft_setup_s", "sft_seconds", "eval_seconds", "grpo_setup_s",
        "grpo_step_s", "elapsed_s", "first_step_reward", "gpu_max_allocated_gib", "sft_compile_s", "compile_s",
        "compiled_graphs"]


def _f(v: object) -> str:
    return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{str(v)[:8]:>8}"


def gpu_use(smi: list[tuple[float, float, float]], trial: dict) -> str:
    a, b = trial.get("first_step_at"), trial.get("reported_at")
    util = [u for t, u, _ in smi if a and b and a <= t <= b]
    if not util:
        return "gpu util: no samples"
    return (f"gpu util in steps: mean {statistics.fmean(util):.1f}%, median {statistics.median(util):.0f}%, "
            f"max {max(util):.0f}% ({len(util)} samples)")


def windows(trial: dict) -> list[tuple[float, float, float]]:
    """(start, end, seconds per GRPO step) of each report window of ``trial``: the time between two
    reports, less the held-out evaluation in it, over the steps it covers. The first window starts
    where the trial's mean step time puts the GRPO loop's start."""
    rows = [w for w in trial.get("windows") or [] if w.get("reported_at") and w.get("step")]
    out = []
    for prev, cur in zip([None, *rows], rows):
        if prev is None:
            if cur.get("grpo_step_s") is None:
                continue
            per = float(cur["grpo_step_s"])
            out.append((cur["reported_at"] - per * cur["step"], cur["reported_at"], per))
            continue
        steps = cur["step"] - prev["step"]
        if steps <= 0:
            continue
        evals = (cur.get("eval_seconds") or 0.0) - (prev.get("eval_seconds") or 0.0)
        out.append((prev["reported_at"], cur["reported_at"], (cur["reported_at"] - prev["reported_at"] - evals) / steps))
    return out


def steps_by_company(trials: list[dict]) -> dict[str, dict]:
    """Mean GRPO step time of the mode's report windows, by what the trial's card held meanwhile:
    ``alone``, ``beside_stepping`` (every neighbour on the card in its GRPO loop) or
    ``beside_a_start`` (a neighbour between its start and its GRPO loop: load, compile, SFT)."""
    spans = []  # (gpus, trial_id, started_at, grpo_start, ended_at)
    for t in trials:
        w = windows(t)
        if t.get("trial_started_at") is not None and w:
            spans.append((t.get("gpus"), t["trial_id"], t["trial_started_at"], w[0][0], w[-1][1]))
    groups: dict[str, list[float]] = {"alone": [], "beside_stepping": [], "beside_a_start": []}
    for t in trials:
        for a, b, per in windows(t):
            company = [s for s in spans if s[0] == t.get("gpus") and s[1] != t["trial_id"] and s[2] < b and s[4] > a]
            kind = ("alone" if not company else
                    "beside_a_start" if any(s[3] > a for s in company) else "beside_stepping")
            groups[kind].append(per)
    return {k: {"windows": len(v), "step_s_mean": statistics.fmean(v) if v else None,
                "step_s_sd": statistics.stdev(v) if len(v) > 1 else None} for k, v in groups.items()}


def timeline(trials: list[dict]) -> list[dict]:
    """Each trial's milestones in seconds from the mode's first start, in order of its first step:
    the first step (SFT's, or the first evaluation's), SFT's end and the last report. Where a
    cold wave's time goes: trials that start SFT apart but end it together waited on something
    shared (a neighbour's compilation, in the lease at 0cf12c9)."""
    starts = [t["trial_started_at"] for t in trials if t.get("trial_started_at")]
    if not starts:
        return []
    t0 = min(starts)

    def at(t: dict, key: str) -> float | None:
        return round(t[key] - t0, 1) if t.get(key) else None

    rows = [{"trial_id": t["trial_id"], "reused": bool(t.get("model_reused")), "first_step": at(t, "first_step_at"),
             "sft_end": (round(t["first_step_at"] - t0 + t["sft_seconds"], 1)
                         if t.get("first_step_at") and t.get("sft_seconds") is not None else None),
             "end": at(t, "reported_at")} for t in trials]
    return sorted(rows, key=lambda r: (r["first_step"] is None, r["first_step"] or 0.0))


def warm_wave(trials: list[dict], slots: int | None) -> dict | None:
    """What the warm trials alone would give: ``slots`` of them at once, each taking its measured
    time (first report's clock start to last report, ``elapsed_s``) plus the hand-over before it
    (``startup_s``, a warm trial's wait for its actor's next config). An estimate of a long sweep's
    steady rate, free of the cold wave and of the mode's tail (a last trial running alone), which a
    benchmark of two waves measures with them: at 8d5b03e 174 trials per GPU-hour from the warm wave
    against 64.9 for the mode after its first trials (bench/README.md). Per GPU: ``slots`` is the
    mode's trials per GPU (utilization's ``trials_per_device_max``)."""
    warm = [t for t in trials if t.get("model_reused") and t.get("elapsed_s") and t.get("startup_s") is not None]
    if not warm or not slots:
        return None
    each = [t["elapsed_s"] + t["startup_s"] for t in warm]
    mean = statistics.fmean(each)
    return {"n": len(warm), "slots": slots, "trial_s_mean": round(mean, 1),
            "trial_s_sd": round(statistics.stdev(each), 1) if len(each) > 1 else None,
            "trials_per_device_hour": round(slots * 3600 / mean, 1)}


def main(path: str, smi_path: str | None = None, slots: int | None = None) -> None:
    smi = read_smi(smi_path) if smi_path else []
    result = json.load(open(path))
    for mode, m in result.get("modes", {}).items():
        print(f"== {mode}", "(partial)" if m.get("partial") else "", m.get("error", ""))
        print(f"{'trial':>9} {'status':>10} " + " ".join(f"{c[:8]:>8}" for c in COLS))
        for t in m.get("trials", []):
            cfg = t.get("config") or {}
            print(f"{t['trial_id'][-9:]:>9} {str(t.get('status') or t.get('error') or 'done')[:10]:>10} "
                  + " ".join(_f(t.get(c)) for c in COLS),
                  {k.split(".")[-1]: (round(v, 6) if isinstance(v, float) else v) for k, v in cfg.items()})
            if smi:
                print(" " * 20, gpu_use(smi, t))
        print("utilization:", json.dumps(m.get("utilization")))
        print("GRPO step by company on the card:", json.dumps(steps_by_company(m.get("trials", []))))
        wave = warm_wave(m.get("trials", []), slots or (m.get("utilization") or {}).get("trials_per_device_max"))
        print("warm trials only, as many at once as the mode ran (an estimate of a long sweep's rate):",
              json.dumps(wave))
        print("timeline (s from the first start: first step, SFT end, end):",
              " ".join(f"{r['trial_id'][-8:]}{'*' if r['reused'] else ''} {r['first_step']}/{r['sft_end']}/{r['end']}"
                       for r in timeline(m.get("trials", []))), "(* warm)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("warm_json")
    ap.add_argument("--smi")
    ap.add_argument("--slots", type=int, help="trials per GPU, for results older than utilization's "
                    "trials_per_device_max (c2ff95b's packed run: 2)")
    args = ap.parse_args()
    main(args.warm_json, args.smi, args.slots)
