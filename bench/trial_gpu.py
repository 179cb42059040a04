"""GPU trial benchmark (issue #3), run on the lent H100 through the device tool.

    learn: one trial of bench/gemma_learn.yaml on google/gemma-3-270m (base) from the GGUF:
           format rate and held-out accuracy before SFT, after SFT and after GRPO, the mean
           reward per report window, timings and peak GPU memory.
    speed: the steady-state GRPO step of our trial vs a bare Unsloth + vLLM GRPOTrainer script
           on a randomly initialised Qwen3-1.7B-shaped model (1 prompt x 8 generations x 256
           tokens per step, LoRA r=32), each in its own process, start-up recorded separately.
           With --procs K: K of our trials at once on the one GPU, each with a 1/K share
           (resources.gpu), as a packed sweep runs them: the card's completions per second
           against one trial alone, from the steps all K took while all K were stepping (they
           wait for each other after their first step), without or with CUDA MPS.

Usage (device, after ../shared/device/stage.sh --model):
    python bench/trial_gpu.py learn --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --out $OUT/learn.json
    python bench/trial_gpu.py speed --out $OUT/speed.json
    python bench/trial_gpu.py speed --phases --out $OUT/phases.json   # where each step's time goes
    python bench/trial_gpu.py speed --procs 1,2,4 [--mps off,on] --out $OUT/packed.json  # the 1.7B shape packed
    python bench/trial_gpu.py packed-summary bench/results/RESULT.json --smi RESULT.smi.csv  # here, after
    python bench/trial_gpu.py speed --phases --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --out $OUT/g.json
Results are committed under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import commit, device_info, read_smi  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def _gpu_used_mib() -> float | None:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        return float(q.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------- learn
def learn(args: argparse.Namespace) -> dict:
    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.trial.run import run_trial

    spec = load_spec(REPO / "bench" / "gemma_learn.yaml")
    spec = apply_overrides(spec, {"model.source": args.gguf} | json.loads(args.overrides))
    windows: list[dict] = []
    peak = {"mib": 0.0}

    def report(metrics: dict, ckpt_dir: str) -> None:
        used = _gpu_used_mib()
        if used:
            peak["mib"] = max(peak["mib"], used)
        windows.append({k: metrics[k] for k in metrics if isinstance(metrics[k], (int, float))})
        if args.save_adapter:  # keep the latest LoRA (e.g. for bench/export_gemma.py)
            import shutil

            shutil.copytree(ckpt_dir, args.save_adapter, dirs_exist_ok=True)
        print("REPORT", json.dumps(windows[-1]), flush=True)

    t0 = time.time()
    final = run_trial({}, spec, report=report)
    import torch

    first, last = windows[0], windows[-1]
    return {
        "bench": "trial_gpu.learn",
        "config": spec.model_dump(mode="json", include={"model", "data", "lora", "sft", "grpo", "rewards"}),
        "numbers": {
            "before_sft": {"format_rate": final.get("base_format_rate"), "accuracy": final.get("base_eval_accuracy")},
            "after_sft": {"format_rate": final["sft_format_rate"], "accuracy": final["sft_eval_accuracy"]},
            "after_grpo": {"format_rate": final["eval_format_rate"], "accuracy": final["eval_accuracy"]},
            "reward_first_window": first["reward"],
            "reward_last_window": last["reward"],
            "reward_by_window": [w["reward"] for w in windows],
            "eval_accuracy_by_window": [w["eval_accuracy"] for w in windows],
            "format_rate_by_window": [w["format_rate"] for w in windows],
            "eval_size": final["eval_size"],
            "sft_seconds": final.get("sft_seconds"),
            "trial_seconds": time.time() - t0,
            "peak_gpu_used_mib_nvidia_smi": peak["mib"],
            "torch_max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        },
    }


# ----------------------------------------------------------------------------------- speed
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
                  rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def make_random_qwen3(out: Path) -> Path:
    """A randomly initialised Qwen3-1.7B-shaped model with a word-level tokenizer of the same vocab."""
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {f"w{i}": i for i in range(QWEN3_1_7B["vocab_size"] - 2)}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<|pad|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = Qwen3Config(**QWEN3_1_7B, eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|pad|>"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


SPEED = dict(steps=12, num_generations=8, max_completion_length=256, rank=32, gpu_memory_utilization=0.5)


def wait_at_barrier(folder: str | Path, parties: int, timeout_s: float = 900.0, poll_s: float = 0.02) -> float:
    """Check in at a file barrier in ``folder`` and wait until ``parties`` processes have: packed
    trials start one engine at a time (trial/engine_lock.py), minutes apart, so without it the
    first has finished its steps before the last begins and none step together (the lease at
    85f0640). Returns the seconds waited; past ``timeout_s`` it goes on (a neighbour that died
    must not hang the others: their steps still count, alone).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> wait_at_barrier(d, 1) < 1.0
    True
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}").touch()
    t0 = time.time()
    while len(list(folder.iterdir())) < parties and time.time() - t0 < timeout_s:
        time.sleep(poll_s)
    return time.time() - t0


def speed_child(which: str, model_dir: str, out: str, prompts: int = 1, gpu_share: float = 1.0,
                steps: int | None = None, barrier: str | None = None, parties: int = 1,
                spec_path: str | None = None, overrides: str = "{}") -> None:
    """One process: ours (run_trial) or bare (the tutorial's GRPOTrainer script), ``prompts`` prompts
    of SPEED["num_generations"] completions per step (the tutorial: 1); ours with ``gpu_share`` of
    the card (resources.gpu: a packed trial's share) and ``steps`` GRPO steps where given; with
    ``barrier``, ours waits there after its first GRPO step until ``parties`` trials have taken
    theirs (:func:`wait_at_barrier`), so the steps after it are taken together. ``spec_path``: ours
    runs that spec's trial instead (``model_dir`` "-": on the spec's own model), as the CPU test does;
    ``overrides``: JSON {dotted.path: value} applied last to ours (e.g. lora.gradient_checkpointing)."""
    t0 = time.time()
    step_times: list[float] = []
    waited: list[float] = []
    first_end: list[float] = []  # with a barrier: when the first step really ended
    # --phases: where each step's time goes (bench/phase_clock.py); it synchronises the GPU around
    # each phase, so step times of such a run are a profile, not the speed comparison.
    phases = os.environ.get("GRPO_BENCH_PHASES") == "1"
    if phases:
        import unsloth  # noqa: F401 - patches trl's GRPOTrainer, the class the clock must wrap
        import phase_clock

        phase_clock.install()
    if which == "ours":
        from grpo_ray.config.load import load_spec
        from grpo_ray.config.overrides import apply_overrides
        from grpo_ray.trial.run import run_trial

        # A .gguf (--gguf): the density benchmark's gemma-3-270m trial (bench/warm_sweep.yaml: 10 SFT
        # steps, then GRPO with its 4 completions of 64 tokens), for where a small model's step goes.
        gemma = model_dir.endswith(".gguf")
        spec = load_spec(spec_path or REPO / "bench" / ("warm_sweep.yaml" if gemma else "speed_qwen3.yaml"))
        steps = steps or (SPEED["steps"] if gemma else None)
        spec = apply_overrides(spec, ({"model.source": model_dir} if model_dir != "-" else {})
                               | {"grpo.batch_size": prompts, "resources.gpu": gpu_share}
                               | ({"grpo.max_steps": steps, "grpo.report_every": steps} if steps else {})
                               | json.loads(overrides))
        generations = spec.grpo.num_generations
        from grpo_ray.trial.backends import import_backend_first

        # Unsloth before the module below imports transformers, as run_trial would have it: the
        # packed runs at 85f0640 printed "Unsloth should be imported before [transformers, peft]".
        import_backend_first(spec.backend, spec.model.compile)
        import grpo_ray.trial.common as common

        orig = common.StepReporter.on_log

        def on_log(self, args, state, control, logs=None, **kw):  # timestamp every optimizer step
            if logs and "reward" in logs:
                step_times.append(time.time())
                if barrier and not waited:
                    first_end.append(step_times[-1])
                    waited.append(wait_at_barrier(barrier, parties))
                    step_times[-1] = time.time()  # the next step is timed from the barrier, not from before it
            return orig(self, args, state, control, logs=logs, **kw)

        common.StepReporter.on_log = on_log
        run_trial({}, spec, report=lambda m, d: None)
        init_s = None
    else:
        generations = SPEED["num_generations"]
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
        from vllm import SamplingParams
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        model, tok = FastLanguageModel.from_pretrained(
            model_name=model_dir, max_seq_length=1024, load_in_4bit=False, fast_inference=True,
            max_lora_rank=SPEED["rank"], gpu_memory_utilization=SPEED["gpu_memory_utilization"])
        model = FastLanguageModel.get_peft_model(
            model, r=SPEED["rank"], lora_alpha=2 * SPEED["rank"], use_gradient_checkpointing="unsloth",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            random_state=3407)
        init_s = time.time() - t0

        class Tick(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                step_times.append(time.time())

        def reward(prompts, completions, **kw):
            return [float(len(str(c))) / 1000 for c in completions]

        prompt = " ".join(f"w{i}" for i in range(10, 60))
        ds = Dataset.from_list([{"prompt": prompt}] * 64)
        args = GRPOConfig(
            vllm_sampling_params=SamplingParams(min_p=0.1, top_p=1.0, top_k=-1, seed=3407, ignore_eos=True),
            temperature=1.0, learning_rate=5e-6, optim="adamw_8bit", logging_steps=1,
            per_device_train_batch_size=prompts * SPEED["num_generations"], num_generations=SPEED["num_generations"],
            # The tutorial's one prompt per step, as ours: left unset, Unsloth's GRPOConfig accumulated two
            # batches, so the H200 profile at a9f965a compared 16 completions per step with our 8.
            gradient_accumulation_steps=1,
            max_completion_length=SPEED["max_completion_length"], max_steps=SPEED["steps"], report_to="none",
            output_dir="/tmp/bare_out", save_strategy="no", bf16=True)
        GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=args, train_dataset=ds,
                    callbacks=[Tick()]).train()
    total = time.time() - t0
    deltas = [b - a for a, b in zip(step_times, step_times[1:])]
    steady = deltas[len(deltas) // 3:]  # skip compilation / warm-up steps
    completions = prompts * generations
    Path(out).write_text(json.dumps({
        "which": which, "total_s": total, "init_s": init_s, "completions_per_step": completions,
        "s_per_completion": (sum(steady) / len(steady) / completions) if steady else None,
        "first_step_end_s": ((first_end or step_times)[0] - t0) if step_times else None,
        "step_s": deltas, "steady_step_s": sum(steady) / len(steady) if steady else None,
        "step_at": step_times,  # when each step ended (unix s): --procs lines packed processes up by it
        "barrier_waited_s": waited[0] if waited else None,
    } | ({"phases": __import__("phase_clock").CLOCK.summary()} if phases else {})))


def steps_together(step_at: list[list[float]]) -> dict:
    """Packed processes' steps taken while every one of them was stepping.

    ``step_at``: per process, when each of its steps ended. The window runs from the latest
    first step to the earliest last one (before it a neighbour was still starting, compiling,
    or not yet there; after it one had finished); a step counts when it began and ended inside
    it. Returns the mean step over those steps and their count per process.

    >>> r = steps_together([[0, 10, 12, 14, 16, 18], [9, 11.5, 14, 16.5, 19]])
    >>> r["window_s"], r["steps_per_proc"], round(r["step_s"], 3)
    ((9, 18), [4, 3], 2.214)
    """
    if not step_at or any(len(t) < 2 for t in step_at):
        return {"window_s": None, "steps_per_proc": [0] * len(step_at), "step_s": None}
    lo, hi = max(t[0] for t in step_at), min(t[-1] for t in step_at)
    per = [[b - a for a, b in zip(t, t[1:]) if a >= lo and b <= hi] for t in step_at]
    flat = [d for p in per for d in p]
    return {"window_s": (lo, hi), "steps_per_proc": [len(p) for p in per],
            "step_s": sum(flat) / len(flat) if flat else None}


def steps_by_concurrency(step_at: list[list[float]], completions_per_step: int = 1) -> dict[int, dict]:
    """Every step of packed processes, grouped by how many of them were stepping meanwhile.

    A process counts as stepping from its first step's end to its last's; a step (a pair of
    consecutive ends) is at level c when c processes stepped over the whole of it. For each
    level: the steps, their mean and standard deviation, and the card's completions per second
    at that level (c x completions per step / mean step). Used where the processes' steps did
    not all overlap (no barrier: the lease at 85f0640), or to see the tails of a run that did.

    >>> r = steps_by_concurrency([[0, 2, 4, 6, 9, 12], [6, 9, 12]], completions_per_step=8)
    >>> r[1]["steps"], r[1]["step_s"], r[2]["steps"], r[2]["step_s"], round(r[2]["card_completions_per_s"], 2)
    (3, 2.0, 4, 3.0, 5.33)
    """
    spans = [(t[0], t[-1]) for t in step_at if t]
    levels: dict[int, list[float]] = {}
    for t in step_at:
        for a, b in zip(t, t[1:]):
            c = sum(1 for lo, hi in spans if lo <= a and hi >= b)
            levels.setdefault(c, []).append(b - a)
    out = {}
    for c, v in sorted(levels.items()):
        mean = sum(v) / len(v)
        out[c] = {"steps": len(v), "step_s": mean, "step_sd_s": (sum((x - mean) ** 2 for x in v) / len(v)) ** 0.5,
                  "card_completions_per_s": c * completions_per_step / mean}
    return out


def level_windows(step_at: list[list[float]]) -> dict[int, list[tuple[float, float]]]:
    """The spans of time during which exactly c processes were stepping, per c (for the card's
    utilization at each level, from nvidia-smi's samples).

    >>> level_windows([[0, 5, 10], [4, 8, 20]])
    {1: [(0, 4), (10, 20)], 2: [(4, 10)]}
    """
    spans = [(t[0], t[-1]) for t in step_at if t]
    edges = sorted({e for s in spans for e in s})
    out: dict[int, list[tuple[float, float]]] = {}
    for a, b in zip(edges, edges[1:]):
        c = sum(1 for lo, hi in spans if lo <= a and hi >= b)
        if c:
            out.setdefault(c, []).append((a, b))
    return dict(sorted(out.items()))


def packed_summary(numbers: dict, smi: list[tuple[float, float, float]] | None = None) -> dict:
    """For each packed run (k1, k2, ...) of a --procs result: steps by concurrency (with the card's
    mean NVML utilization and peak memory at each level when ``smi`` samples are given), and the
    card's completions per second at each level against one trial alone in the same file."""
    out: dict = {}
    alone = None
    for key, run in numbers.items():
        runs = run.get("runs") or []
        if not runs:
            continue
        step_at = [r["step_at"] for r in runs]
        levels = steps_by_concurrency(step_at, runs[0]["completions_per_step"])
        if smi:
            for c, spans in level_windows(step_at).items():
                inside = [(u, m) for t, u, m in smi if any(a <= t <= b for a, b in spans)]
                if c in levels and inside:
                    levels[c] |= {"nvml_util_pct": sum(u for u, _ in inside) / len(inside),
                                  "peak_mib": max(m for _, m in inside), "smi_samples": len(inside)}
        if 1 in levels and alone is None:
            alone = levels[1]["card_completions_per_s"]
        out[key] = {"mps": run.get("mps", False), "levels": levels}
    for v in out.values():
        for lv in v["levels"].values():
            lv["vs_alone"] = lv["card_completions_per_s"] / alone if alone else None
    return out


def speed_packed(args: argparse.Namespace, model_dir: str) -> dict:
    """--procs: for each MPS setting and each K, K of our trials started together on the GPU (each
    with share_of(K); their engines start one at a time, trial/engine_lock.py), meeting at a
    barrier after their first GRPO step so that the steps after it are taken together."""
    from _common import under_mps
    from grpo_ray.config.sections import share_of

    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    out: dict = {}
    for mps in args.mps.split(","):
        for k in [int(x) for x in args.procs.split(",")]:
            key = f"k{k}" + ("_mps" if mps == "on" else "")
            files = [f"/tmp/speed_packed_{key}_{i}.json" for i in range(k)]
            for f in files:  # a child that fails writes nothing: no earlier run's file may stand in for it
                Path(f).unlink(missing_ok=True)
            barrier = Path(f"/tmp/speed_packed_{key}_barrier")
            shutil.rmtree(barrier, ignore_errors=True)
            with under_mps(mps == "on"):
                procs = [subprocess.Popen([sys.executable, __file__, "speed-child", "ours", model_dir, f, "--prompts",
                                           str(args.prompts), "--gpu-share", str(share_of(k)), "--steps",
                                           str(args.steps), "--barrier", str(barrier), "--parties", str(k)]
                                          + (["--spec", args.spec] if args.spec else [])
                                          + ["--overrides", args.overrides],
                                          env=env) for f in files]
                deadline = time.time() + args.child_timeout
                for p in procs:
                    try:
                        p.wait(timeout=max(1.0, deadline - time.time()))
                    except subprocess.TimeoutExpired:  # a stuck trial: the others' numbers still count
                        p.kill()
            runs = [json.loads(Path(f).read_text()) for f in files if Path(f).exists()]
            together = steps_together([r["step_at"] for r in runs]) if len(runs) == k else None
            completions = runs[0]["completions_per_step"] if runs else 0
            step = together["step_s"] if together else None
            out[key] = {"procs": k, "mps": mps == "on", "gpu_share": share_of(k), "finished": len(runs),
                        "first_step_end_s": [r["first_step_end_s"] for r in runs],
                        "barrier_waited_s": [r.get("barrier_waited_s") for r in runs],
                        "steady_step_s_each": [r["steady_step_s"] for r in runs], "together": together,
                        "card_completions_per_s": k * completions / step if step else None,
                        "runs": runs}  # each child's own numbers, step_at included: packed-summary reads them
            print(key, json.dumps({k2: v for k2, v in out[key].items() if k2 != "runs"}), flush=True)
            Path(args.out).write_text(json.dumps({"partial": True, "numbers": out}, indent=2))  # a lease can end
    for mps in (False, True):
        base = next((v["card_completions_per_s"] for v in out.values() if v["procs"] == 1 and v["mps"] == mps), None)
        for v in out.values():
            if v["mps"] == mps:
                v["vs_k1"] = v["card_completions_per_s"] / base if base and v["card_completions_per_s"] else None
    return out


def speed(args: argparse.Namespace) -> dict:
    if args.gguf:  # ours only: the bare script is the 1.7B comparison
        args.order = "ours"
    if args.spec and not args.procs:
        raise SystemExit("--spec is for --procs (the bare script's side is the 1.7B shape's)")
    model_dir = args.gguf or ("-" if args.spec else str(make_random_qwen3(Path(args.model_dir))))
    if args.procs:
        config = {"model": args.gguf or ("the spec's" if args.spec else "random Qwen3-1.7B shape"),
                  "spec": args.spec or "bench/speed_qwen3.yaml", "overrides": json.loads(args.overrides),
                  "procs": args.procs, "mps": args.mps,
                  "steps": args.steps, "prompts": args.prompts}
        return {"bench": "trial_gpu.speed", "config": SPEED | config,
                "numbers": speed_packed(args, model_dir)}
    results = {}
    for which in args.order.split(","):
        out = f"/tmp/speed_{which}_p{args.prompts}.json"
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"GRPO_BENCH_PHASES": "1"} if args.phases else {})
        subprocess.run([sys.executable, __file__, "speed-child", which, model_dir, out, "--prompts",
                        str(args.prompts), "--overrides", args.overrides], check=True, env=env,
                       timeout=args.child_timeout)
        results[which] = json.loads(Path(out).read_text())
        print(which, json.dumps(results[which]), flush=True)
    ratio = None
    if "ours" in results and "bare" in results and results["bare"]["steady_step_s"]:
        ratio = results["ours"]["steady_step_s"] / results["bare"]["steady_step_s"]
    return {"bench": "trial_gpu.speed", "config": SPEED | {"model": args.gguf or "random Qwen3-1.7B shape", "order": args.order,
                                                           "overrides": json.loads(args.overrides),
                                                           "phases": args.phases, "prompts": args.prompts},
            "numbers": results | {"ours_over_bare_steady_step": ratio}}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("learn")
    a.add_argument("--gguf", required=True)
    a.add_argument("--overrides", default="{}", help="JSON {dotted.path: value} applied to gemma_learn.yaml")
    a.add_argument("--out", required=True)
    a.add_argument("--save-adapter", help="copy the last reported LoRA checkpoint to this directory")
    b = sub.add_parser("speed")
    b.add_argument("--model-dir", default="/tmp/qwen3-1.7b-random")
    b.add_argument("--gguf", help="ours only, on this GGUF with bench/warm_sweep.yaml's trial (gemma-3-270m), "
                   "e.g. with --phases: where a small model's step goes")
    b.add_argument("--order", default="bare,ours")
    b.add_argument("--child-timeout", type=int, default=900)
    b.add_argument("--phases", action="store_true",
                   help="clock each step's phases (bench/phase_clock.py): a profile, slower than the plain run")
    b.add_argument("--prompts", type=int, default=1,
                   help="prompts per step, each with num_generations completions (the tutorial: 1)")
    b.add_argument("--procs", default="",
                   help="e.g. 1,2,4: K of our trials at once on the GPU for each K (packed), instead of ours vs bare")
    b.add_argument("--steps", type=int, default=20,
                   help="with --procs: GRPO steps per trial; all but the first are taken together (a barrier)")
    b.add_argument("--overrides", default="{}", help="JSON {dotted.path: value} for ours' spec, e.g. "
                   "'{\"lora.gradient_checkpointing\": false}'")
    b.add_argument("--spec", help="with --procs: pack this spec's trial on its own model instead of the 1.7B shape")
    b.add_argument("--mps", default="off", help="with --procs: off, on or off,on (on: CUDA MPS daemon during those runs)")
    b.add_argument("--out", required=True)
    c = sub.add_parser("speed-child")
    c.add_argument("which")
    c.add_argument("model_dir")
    c.add_argument("out")
    c.add_argument("--prompts", type=int, default=1)
    c.add_argument("--gpu-share", type=float, default=1.0)
    c.add_argument("--steps", type=int)
    c.add_argument("--barrier", help="a folder: wait there after the first GRPO step for --parties trials")
    c.add_argument("--parties", type=int, default=1)
    c.add_argument("--spec")
    c.add_argument("--overrides", default="{}")
    d = sub.add_parser("packed-summary", help="steps by how many packed trials stepped meanwhile, from a --procs result")
    d.add_argument("result")
    d.add_argument("--smi", help="fill_session.sh's nvidia-smi CSV of the same lease: utilization at each level")
    args = ap.parse_args()
    if args.cmd == "speed-child":
        speed_child(args.which, args.model_dir, args.out, args.prompts, args.gpu_share, args.steps,
                    args.barrier, args.parties, args.spec, args.overrides)
        return
    if args.cmd == "packed-summary":
        numbers = json.loads(Path(args.result).read_text())["numbers"]
        print(json.dumps(packed_summary(numbers, read_smi(args.smi) if args.smi else None), indent=2))
        return
    t0 = time.time()
    result = learn(args) if args.cmd == "learn" else speed(args)
    result |= {"device": device_info(), "commit": commit("src", "bench"), "wall_s": time.time() - t0,
               "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["numbers"], indent=2))


if __name__ == "__main__":
    main()
