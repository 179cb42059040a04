"""Issue #4 benchmark: how busy a sweep keeps its GPU, with and without warm trial actors.

Runs bench/warm_sweep.yaml (gemma-3-270m, short SFT + 50 GRPO steps per trial, Unsloth + vLLM)
as real sweeps through ``grpo_ray.sweep.driver.run_sweep`` (Ray Tune + Optuna), one per mode:

    reuse   trial.reuse_model: true, one trial per GPU (the default)
    cold    trial.reuse_model: false: a fresh process, model load and vLLM start per trial
    packed  two trials per GPU (resources.gpu: 0.5), models reused
    packed+nockpt  the same without gradient checkpointing (lora.gradient_checkpointing: false;
                   "packed-nockpt" in result files before ffe34b9)
    pack4, pack8   four or eight trials per GPU (resources.gpu 0.25 / 0.125; 3 / 2 CPUs each, so
                   that 8 fit a 16-core node): the density benchmark of "Fill the GPU"
    auto    resources.gpu: auto and search.max_concurrent_trials: auto with the spec's defaults (max_trials_per_gpu
            unset: eight per GPU for gemma-3-270m on an H200, two for the 1.7B shape; resources.cpu 2)
    auto2   resources.gpu: auto with max_trials_per_gpu 2 (2 CPUs each, like auto8: density the only
            difference; auto2:8,auto8:16)
    auto4, auto8   resources.gpu: auto with max_trials_per_gpu 4 / 8 (3 / 2 CPUs each): the
                   sweep's own rule picks the density on the real card (sweep/packing.py); on the
                   lent H200 it should pick what pack4 / pack8 set by hand
    eager   one per GPU with model.compile: false (no torch.compile, no CUDA graphs)
    fixedkv model.kv_cache_gib: 1.0, a fixed KV cache per engine (auto8+fixedkv: eight per GPU)
    noflex  (a part: auto+noflex) Gemma 3 trained on eager attention, not flex attention
            (UNSLOTH_ENABLE_FLEX_ATTENTION=0 in the trials' environment, on a Ray started for the mode)
    pad     lora.pad_rank: true, every trial's LoRA the search's largest rank wide, so a warm trial
            of another rank reuses the compiled graphs (auto4:8,auto4+pad:8: its compile_s against none)
    nopad   lora.pad_rank: false, every trial's LoRA its own rank wide: what the default (auto, which
            pads warm trials of a searched rank) saves (auto4+nopad:8,auto4:8)
    groups8 grpo.num_generations fixed at 8 (out of search.space): no warm trial recompiles for a new
            group size (auto8:16,auto8+groups8:16)
    mps     no spec change: the mode runs under CUDA MPS (the daemon started before its sweep
            and stopped after), so auto4 and auto4+mps compare in one lease
    a+b     modes merged left to right: pack4+eager is four per GPU, eager

and writes, after each mode, the sweep's utilization (utilization.py: busy fraction, start-up,
hand-over, trials per GPU-hour) and every trial's timings and first GRPO step reward. The
modes use the same search seed, so trial k samples the same configuration in each: a warm
trial's first-step reward can be compared with the same configuration on a fresh process. A
mode may come more than once (``cold:2,cold:2,reuse:2``: the same configurations on fresh
processes twice, for run-to-run noise, then warm); the second runs and is recorded as cold-2.

Usage (device, after ../shared/device/stage.sh --model; run detached, it outlasts one call):
    python bench/warm_sweep.py --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --out /tmp/res/warm.json \
        --modes reuse:12,cold:3,packed:4
    python bench/warm_sweep.py --model random-qwen3 --spec bench/warm_sweep_qwen3.yaml \
        --out /tmp/res/warm_qwen3.json --modes reuse:3,auto:4    # the tutorial's model shape
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import commit, device_info, under_mps  # bench/ is on sys.path when a script here runs
from dump_run import KEEP, snapshot

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "reuse": {"trial.reuse_model": True},
    "cold": {"trial.reuse_model": False},
    "packed": {"trial.reuse_model": True, "resources.gpu": 0.5, "search.max_concurrent_trials": 2},
    "pack4": {"trial.reuse_model": True, "resources.gpu": 0.25, "resources.cpu": 3, "search.max_concurrent_trials": 4},
    "pack8": {"trial.reuse_model": True, "resources.gpu": 0.125, "resources.cpu": 2,
              "search.max_concurrent_trials": 8},
    "auto": {"trial.reuse_model": True, "resources.gpu": "auto", "search.max_concurrent_trials": "auto"},
    # two per GPU with auto8's CPUs per trial: a side-by-side of two and eight per GPU
    "auto2": {"trial.reuse_model": True, "resources.gpu": "auto", "resources.max_trials_per_gpu": 2,
              "resources.cpu": 2, "search.max_concurrent_trials": "auto"},
    "auto4": {"trial.reuse_model": True, "resources.gpu": "auto", "resources.max_trials_per_gpu": 4,
              "resources.cpu": 3, "search.max_concurrent_trials": "auto"},
    "auto8": {"trial.reuse_model": True, "resources.gpu": "auto", "resources.max_trials_per_gpu": 8,
              "resources.cpu": 2, "search.max_concurrent_trials": "auto"},
    # a part to add to any mode (auto4+nockpt): activations kept, no recomputation in the backward
    "nockpt": {"lora.gradient_checkpointing": False},
    # model.compile: false on top of reuse (one per GPU): eager training and an eager vLLM engine
    "eager": {"trial.reuse_model": True, "model.compile": False},
    "mps": {},  # the sweep under CUDA MPS (under_mps); the spec as it is
    # a fixed 1 GiB KV cache per engine (model.kv_cache_gib): no profiling of the card, packed engines
    # start without queueing for each other's sizing. gemma-3-270m needs 18 KiB per token (18 layers,
    # one KV head of 256), 16 sequences of 320 tokens: 90 MiB
    "fixedkv": {"model.kv_cache_gib": 1.0},
    # a part to add to any mode (auto4+pad): the trials' LoRA padded to the search's largest rank
    # (lora.pad_rank), so warm trials that change rank keep the adapter's shapes and compile nothing
    "pad": {"lora.pad_rank": True},
    # its opposite (auto4+nopad): unpadded, to compare with the default, which pads these modes' trials
    "nopad": {"lora.pad_rank": False},
    # a part to add to any mode (auto8+groups8): every trial's group size 8, so no warm trial
    # recompiles for a new one (41-57 s each at 8d5b03e); the search samples the rest (fixed_by_mode)
    "groups8": {"grpo.num_generations": 8},
    # a part to add to any mode (auto+noflex): Gemma 3's training forward on eager attention instead
    # of flex attention, whose mask and kernel wrappers were 18 of a cold trial's ~50 recompiles at
    # ffe34b9 (Unsloth refuses SDPA for Gemma 3); an environment variable of the trial processes (MODE_ENV)
    "noflex": {},
}
# Environment of a mode's trial processes, by mode part. Ray's workers take the environment of the
# Ray started for the sweep, so a mode with its own runs on a Ray started for it (under_env).
MODE_ENV = {"noflex": {"UNSLOTH_ENABLE_FLEX_ATTENTION": "0"}}


def env_of(mode: str) -> dict[str, str]:
    """The environment a mode's trials need (MODE_ENV, merged over its parts).

    >>> env_of("auto+noflex"), env_of("auto8")
    ({'UNSLOTH_ENABLE_FLEX_ATTENTION': '0'}, {})
    """
    out: dict[str, str] = {}
    for part in mode.split("+"):
        out |= MODE_ENV.get(part, {})
    return out


@contextmanager
def under_env(env: dict[str, str]):
    """Run the block (a mode's sweep) with ``env`` set on a Ray of its own: the Ray of the modes
    before is shut down first, and this one after, so no mode's trials get another's environment."""
    if not env:
        yield
        return
    import ray

    ray.shutdown()
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fixed_by_mode(spec: Any, overrides: dict) -> dict:
    """``overrides`` plus ``search.space`` without the fields they set: a mode that sets a searched
    field fixes it (the search would otherwise sample over it). The search then samples other
    configurations than a mode that keeps the field, so compare such modes by rate, not trial by trial."""
    space = spec.model_dump(mode="json")["search"]["space"]
    kept = {k: v for k, v in space.items() if k not in overrides}
    return overrides | ({"search.space": kept} if kept != space else {})


def mode_overrides(mode: str) -> dict:
    """A mode's overrides; ``a+b`` merges modes left to right (``pack4+eager``: four per GPU, eager)."""
    out: dict = {}
    for part in mode.split("+"):
        if part not in MODES:
            raise SystemExit(f"unknown mode {part!r} in {mode!r}; known: {', '.join(MODES)}")
        out |= MODES[part]
    return out


def parse_modes(text: str) -> list[tuple[str, int]]:
    """``mode:trials,...`` checked whole before any sweep starts.

    >>> parse_modes("auto8:24,auto2:8")
    [('auto8', 24), ('auto2', 8)]
    >>> parse_modes("auto8:24,auto3:8")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    SystemExit: unknown mode 'auto3' in 'auto3'; known: ...
    """
    plan = []
    for item in text.split(","):
        mode, sep, n = item.strip().partition(":")
        if not sep or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--modes: {item!r} is not mode:trials (e.g. auto8:24)")
        mode_overrides(mode)
        plan.append((mode, int(n)))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", "--gguf", dest="model", required=True,
                    help="model.source: a GGUF or model folder, or random-qwen3 (a random Qwen3-1.7B shape built "
                    "here by bench/trial_gpu.py, for --spec bench/warm_sweep_qwen3.yaml)")
    ap.add_argument("--spec", default=str(REPO / "bench" / "warm_sweep.yaml"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="reuse:12,cold:3,packed:4", help="mode:trials, comma-separated, in order")
    ap.add_argument("--overrides", default="{}", help="JSON {dotted.path: value} applied to every mode")
    args = ap.parse_args()

    from grpo_ray.config.load import dump_spec, load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.sweep.driver import run_sweep
    from grpo_ray.trial.phases import phase_of

    command = "python bench/warm_sweep.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    if args.model == "random-qwen3":
        from trial_gpu import make_random_qwen3

        args.model = str(make_random_qwen3(Path("/tmp/qwen3-1.7b-random")))
    base = apply_overrides(load_spec(args.spec), {"model.source": args.model} | json.loads(args.overrides))
    result = {"bench": "warm_sweep", "device": device_info(), "commit": commit("src", "bench"),
              "command": command,
              "config": json.loads(json.dumps(base.model_dump(mode="json", by_alias=True))), "modes": {}}
    plan = parse_modes(args.modes)  # a typo in the last mode must not cost the lease the modes before it
    runs_of: dict[str, int] = {}
    for mode, n in plan:
        # A mode may come twice (cold:2,cold:2: the same configurations on fresh processes again,
        # for run-to-run noise); the second is recorded, and runs, as cold-2.
        runs_of[mode] = runs_of.get(mode, 0) + 1
        label = mode if runs_of[mode] == 1 else f"{mode}-{runs_of[mode]}"
        spec = apply_overrides(base, fixed_by_mode(base, mode_overrides(mode)) | {
            "name": f"warm-{label.replace('+', '-')}", "search.num_samples": int(n)})
        t0 = time.time()
        print(f"== {label}: {n} trials", flush=True)
        run_dir = f"{spec.storage}/{spec.name}"

        phases: dict[str, str] = {}

        def on_event(kind: str, data: dict, mode: str = label, run_dir: str = run_dir, phases: dict = phases) -> None:
            if kind == "phase":  # a trial posts its step every few seconds: log it when its phase changes
                if phase_of(data["phase"]) == phases.get(data["trial_id"]):
                    return
                phases[data["trial_id"]] = phase_of(data["phase"])
            print(f"[{time.time() - t0:7.1f}s] {kind}", {k: v for k, v in data.items() if k != "config"}, flush=True)
            if kind in ("complete", "error"):  # a lease can end mid-sweep: keep what is done so far
                try:
                    result["modes"][mode] = {"partial": True, **snapshot(run_dir)}
                except FileNotFoundError:  # Tune has not written its first snapshot yet
                    return
                Path(args.out).write_text(json.dumps(result, indent=1, default=str))

        try:
            with under_mps("mps" in mode.split("+")), under_env(env_of(mode)):
                out = run_sweep(spec, progress=print, on_event=on_event)
        except Exception as e:  # record it and go on to the next mode: the lease is short
            result["modes"][label] = {"error": f"{type(e).__name__}: {e}"[-2000:], "wall_s": time.time() - t0}
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
            continue
        try:  # each trial's report windows, from its result.json (bench/warm_summary.py --overlap)
            windows = {t["trial_id"]: t["windows"] for t in snapshot(run_dir)["trials"]}
        except FileNotFoundError:
            windows = {}
        trials = [{"trial_id": t.trial_id, "config": t.config, "error": (t.error or "")[-300:] or None,
                   **{k: t.metrics.get(k) for k in KEEP}, "windows": windows.get(t.trial_id, [])}
                  for t in out.trials]
        trials.sort(key=lambda t: t["trial_started_at"] or 0)
        result["modes"][label] = {"overrides": mode_overrides(mode), "trials_requested": int(n), "wall_s": time.time() - t0,
                                 "utilization": out.utilization, "trials": trials}
        print(json.dumps(out.utilization), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    result["spec"] = dump_spec(base)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
