"""Do trials packed on one GPU serialize there? A GRPO-shaped step in K processes at once.

The question behind "Fill the GPU" (#24): one trial's GRPO step is host-bound (its Python thread
at 92-100% of a core, the GPU at 4-8%: bench/README.md, "Compiled or eager"), yet four trials on
one H200 each stepped 3-4 times slower than one alone. Either the host is short (cores, memory
bandwidth) or the GPU time-slices between processes: without MPS, kernels of different processes
never run at once, and every process waits for its turn at each of its many small kernels and
synchronisations. CUDA MPS (``nvidia-cuda-mps-control -d``) lets them share the card at kernel
granularity. This measures it without a sweep or an engine start (seconds, not minutes):

    K processes start together (a file barrier after loading); each runs ``--steps`` GRPO-shaped
    steps on the real model with a LoRA: ``generate`` (G sampled completions of T new tokens, the
    eager decode loop: many small kernels, like a small model's generation), then a forward and
    backward over the completions and an optimizer step. Each step's phases are timed with the
    device synchronised.

For each K in ``--procs`` and each MPS setting in ``--mps`` (on: the daemon is started before the
K processes and stopped after; root on the device machine), the JSON has every process's steady
step time (the first ``--warmup`` steps left out), the mean, and the card's throughput (steps per
second over all K) against K=1: linear scaling means the card was free to share.

Usage (device, after ../shared/device/stage.sh --model):
    python3 bench/share_gpu.py --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --procs 1,2,4,8 \\
        --mps off,on --out $OUT/share.json
CPU check of the mechanics (tests/test_share_gpu.py): --device cpu --model-dir <tiny model>.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, device_info, under_mps  # bench/ is on sys.path when a script here runs

from grpo_ray.trial.gpu_sampler import GpuSampler

PROMPT = "Question: What is 17 times 23? Think step by step, then give the answer.\nAnswer:"


# ------------------------------------------------------------------------------ one process
def child(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)  # the process's share of the host, as Ray gives a trial its CPUs
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(args.rank)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(dev)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    Path(args.ready).touch()
    while not Path(args.go).exists():  # all K start stepping together
        time.sleep(0.01)
    steps = []
    for _ in range(args.steps):
        t0 = sync()
        model.eval()
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, num_return_sequences=args.generations,
                                 pad_token_id=pad)
        t1 = sync()
        model.train()
        logits = model(out).logits[:, ids.shape[1] - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, out[:, ids.shape[1]:, None]).squeeze(-1)
        advantages = torch.randn(out.shape[0], 1, device=dev)  # a GRPO-shaped loss; the values do not matter
        (-(advantages * logp).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = sync()
        steps.append({"generate_s": t1 - t0, "train_s": t2 - t1, "step_s": t2 - t0})
    Path(args.result).write_text(json.dumps({"rank": args.rank, "pid": os.getpid(), "steps": steps}))


# ------------------------------------------------------------------------------ K at once
def run_k(args: argparse.Namespace, k: int, work: Path) -> dict:
    """K child processes, started together after all have loaded; their steady step times."""
    go = work / f"go-{k}"
    procs, results = [], []
    for i in range(k):
        cmd = [sys.executable, __file__, "child", "--model-dir", args.model_dir, "--device", args.device,
               "--steps", str(args.steps), "--generations", str(args.generations),
               "--new-tokens", str(args.new_tokens), "--rank", str(i),
               "--threads", str(max(1, (os.cpu_count() or 1) // k)), "--ready", str(work / f"ready-{k}-{i}"),
               "--go", str(go), "--result", str(work / f"result-{k}-{i}.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"log-{k}-{i}.txt", "w")))
    deadline = time.time() + args.load_timeout
    while not all((work / f"ready-{k}-{i}").exists() for i in range(k)):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            logs = "\n".join((work / f"log-{k}-{i}.txt").read_text()[-1500:] for i in range(k))
            raise SystemExit(f"K={k}: a process failed or did not load in {args.load_timeout} s:\n{logs}")
        time.sleep(0.1)
    t0 = time.perf_counter()
    go.touch()
    # How busy the card is while the K processes step: the trials' own NVML sampler (nothing
    # without nvidia-ml-py or a driver; the step times are the measurement either way).
    with GpuSampler(interval=0.5) if args.device == "cuda" else contextlib.nullcontext() as load:
        for i, p in enumerate(procs):
            if p.wait() != 0:
                raise SystemExit(f"K={k}: process {i} failed:\n{(work / f'log-{k}-{i}.txt').read_text()[-3000:]}")
            results.append(json.loads((work / f"result-{k}-{i}.json").read_text()))
    wall = time.perf_counter() - t0
    card = load.metrics() if load is not None else {}
    steady = [s for r in results for s in r["steps"][args.warmup:]]
    mean = {key: statistics.fmean(s[key] for s in steady) for key in ("step_s", "generate_s", "train_s")}
    per_proc = [statistics.fmean(s["step_s"] for s in r["steps"][args.warmup:]) for r in results]
    return {"k": k, "wall_s": wall, "mean": mean, "per_process_step_s": per_proc,
            "gpu_util_mean": card.get("gpu_util_mean"),
            "steps_per_s": sum(1.0 / x for x in per_proc), "processes": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    for name, kind in (("--model-dir", str), ("--device", str), ("--steps", int), ("--generations", int),
                       ("--new-tokens", int), ("--rank", int), ("--threads", int), ("--ready", str), ("--go", str), ("--result", str)):
        c.add_argument(name, type=kind, required=True)
    ap.add_argument("--gguf", help="a GGUF base model (materialized once into the node's cache)")
    ap.add_argument("--model-dir", help="a Hugging Face model directory (instead of --gguf)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--procs", default="1,2,4,8", help="how many processes at once, comma-separated")
    ap.add_argument("--mps", default="off", help="off, on or off,on (on: CUDA MPS daemon during those runs)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each process left out")
    ap.add_argument("--generations", type=int, default=8, help="completions per step (grpo.num_generations)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per completion")
    ap.add_argument("--load-timeout", type=float, default=600)
    ap.add_argument("--out", required=False)
    args = ap.parse_args()
    if args.cmd == "child":
        return child(args)
    if not args.out or not (args.gguf or args.model_dir):
        ap.error("--out and one of --gguf / --model-dir are required")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.gguf:
        from grpo_ray.gguf.hf_dir import materialize_gguf

        args.model_dir = str(materialize_gguf(Path(args.gguf)))
    result = {"bench": "share_gpu", "device": device_info(), "commit": commit("bench/share_gpu.py"),
              "command": "python bench/share_gpu.py " + " ".join(sys.argv[1:]),
              "config": {k: v for k, v in vars(args).items() if k not in ("cmd", "out")}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="share-gpu-") as tmp:
        for mps in args.mps.split(","):
            with under_mps(mps == "on"):
                base = None
                for k in (int(x) for x in args.procs.split(",")):
                    run = run_k(args, k, Path(tmp)) | {"mps": mps}
                    base = base or run["steps_per_s"] / k
                    run["scaling"] = run["steps_per_s"] / base  # K for a card that shares perfectly
                    result["runs"].append(run)
                    busy = f", GPU {run['gpu_util_mean']:.0f}% busy" if run["gpu_util_mean"] is not None else ""
                    print(f"mps {mps} K={k}: step {run['mean']['step_s']:.3f} s (generate {run['mean']['generate_s']:.3f},"
                          f" train {run['mean']['train_s']:.3f}); card {run['steps_per_s']:.2f} steps/s,"
                          f" {run['scaling']:.2f}x one process{busy}", flush=True)
                    Path(args.out).write_text(json.dumps(result, indent=1))  # a lease can end at any point
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
