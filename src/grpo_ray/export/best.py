"""The sweep's winner as shipped files: its checkpoint out of storage through
:func:`~grpo_ray.export.pipeline.export_model` into ``<run>/best``, the quantized GGUFs' greedy
agreement with the 16-bit one on held-out prompts, and the model card (``best/README.md``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from grpo_ray import storage
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.spec import SweepSpec
from grpo_ray.errors import SweepError
from grpo_ray.run_dir import EXPORT_JSON
from grpo_ray.select import TrialRecord


def export_trial(spec: SweepSpec, best: TrialRecord, dest: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """Export ``best``'s adapter (merged 16-bit + GGUF) to ``dest`` (local dir or URI)."""
    from transformers import AutoTokenizer

    from grpo_ray.export.pipeline import export_model
    from grpo_ray.models import resolve_model

    trial_spec = apply_overrides(spec, best.config)
    with tempfile.TemporaryDirectory(prefix="grpo-ray-export-") as tmp:
        adapter = Path(tmp, "adapter")
        ckpt = best.extra.get("checkpoint_obj")
        if ckpt is not None:
            ckpt.to_directory(str(adapter))
        elif best.checkpoint:
            storage.copy_dir(best.checkpoint, str(adapter))
        else:
            raise SweepError(f"trial {best.trial_id} has no checkpoint to export")
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))  # the trial's, with its chat template
        out = Path(tmp, "best")
        # A quantized GGUF base ships as itself plus a LoRA adapter GGUF: re-quantizing a merge
        # would round the fine-tune away (bench/results/export_gemma_cpu.json).
        src = str(trial_spec.model.source)
        base_gguf = Path(src) if src.lower().endswith(".gguf") and Path(src).is_file() else None
        result = export_model(
            Path(resolve_model(trial_spec.model.source)),
            adapter,
            out,
            gguf_types=list(spec.export.gguf),
            chat_template=tokenizer.chat_template,
            system_prompt=trial_spec.format.system_prompt,
            check=spec.export.check,
            progress=progress,
            name=spec.name,
            base_gguf=base_gguf,
            merged16=spec.export.merged16,
        )
        summary = json.loads((out / EXPORT_JSON).read_text())
        agreement = quantized_agreement(spec, trial_spec, tokenizer, result.ggufs, progress)
        if agreement:
            summary["quantized_agreement"] = agreement
            (out / EXPORT_JSON).write_text(json.dumps(summary, indent=2))
        progress(f"copying export to {dest}")
        storage.copy_dir(str(out), dest)
    return summary


def quantized_agreement(spec: SweepSpec, trial_spec: SweepSpec, tok: Any, ggufs: dict[str, Path],
                        progress: Callable[[str], None]) -> dict[str, Any]:
    """Greedy agreement of each quantized GGUF with the 16-bit one on held-out prompts."""
    from grpo_ray.export.base import ExportError
    from grpo_ray.export.checks import greedy_agreement
    from grpo_ray.export.llama_cpp import llama_cpp_available
    from grpo_ray.task import template
    from grpo_ray.task.data import load_datasets

    reference = next((ggufs[t] for t in ("f16", "bf16", "f32") if t in ggufs), None)
    quantized = {t: p for t, p in ggufs.items() if t not in ("f16", "bf16", "f32")}
    n = spec.export.agreement_prompts
    if reference is None or not quantized or n == 0 or not llama_cpp_available():
        return {}
    fmt = template.format_of(trial_spec.format)
    examples = load_datasets(trial_spec.data).eval[:n]
    prompts = [tok.apply_chat_template(template.prompt_messages(e.question, fmt), tokenize=False,
                                       add_generation_prompt=True) for e in examples]
    if tok.bos_token and prompts and prompts[0].startswith(tok.bos_token):
        prompts = [p[len(tok.bos_token):] for p in prompts]  # llama.cpp adds BOS itself
    out = {}
    for gguf_type, path in quantized.items():
        progress(f"greedy agreement of {gguf_type} with {reference.name} on {len(prompts)} held-out prompts")
        out[gguf_type] = r = greedy_agreement(reference, path, prompts)
        floor = spec.export.min_agreement
        if floor is not None and r["rate"] < floor:
            raise ExportError(f"{path.name} answers like {reference.name} on {r['rate']:.0%} of held-out prompts, "
                              f"below export.min_agreement={floor}: the quantization erased what training changed. Re-export "
                              f"with a larger type: grpo-ray export <run> --gguf f16,q8_0")
    return out


def model_card(spec: SweepSpec, info: dict[str, Any]) -> str:
    """A model card for the exported trial: base, data, rewards, hyperparameters, metrics."""
    trial_spec = apply_overrides(spec, info["hyperparameters"])
    d = trial_spec.data
    m = info["metrics"]

    def ds(x: Any) -> str:
        return "none" if x is None else f"`{x.source}`" + (f" ({x.subset})" if x.subset else "") + f", split `{x.split}`"

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# {spec.name}: best trial {info['trial_id']}",
        "",
        f"Base model: `{spec.model.source}`, LoRA rank {trial_spec.lora.rank}, trained by grpo-ray "
        f"(SFT format warm-up, then GRPO), chosen from {info['trials']['total']} trials.",
        "",
        f"- SFT data: {ds(d.sft)}; GRPO data: {ds(d.grpo)}; held-out eval: {int(m.get('eval_size') or 0)} problems "
        + ("from a separate set" if d.eval.source else "held out from the GRPO set, disjoint from training"),
        "- Rewards (weight): " + ", ".join(f"`{r.name}` ({num(r.weight)})" for r in trial_spec.rewards),
        f"- Output format: reasoning between `{spec.format.reasoning_start}` and `{spec.format.reasoning_end}`, "
        f"answer between `{spec.format.solution_start}` and `{spec.format.solution_end}`",
        f"- Selection: {info['rule']}",
        "",
        "## Hyperparameters",
        "",
        *[f"- `{k}`: {num(v)}" for k, v in info["hyperparameters"].items()],
        "",
        "## Metrics (last report)",
        "",
        *[f"- `{k}`: {num(m[k])}" for k in ["eval_accuracy", "eval_format_rate", "sft_eval_accuracy", "reward",
                                           "format_rate", "completion_length", "step"] if k in m],
        "",
        "## Files",
        "",
        "`lora/` adapter, " + ("`merged16/` merged 16-bit model, " if spec.export.merged16 else "")
        + "`*.gguf` for llama.cpp, `Modelfile` for "
        "Ollama (`ollama create NAME -f Modelfile`), `best.json` the full record.",
        "",
    ]
    return "\n".join(lines)
