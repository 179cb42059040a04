"""``export_model``: one trained LoRA as everything a user ships, built in order: the adapter, the
merged 16-bit model, GGUF files, an Ollama ``Modelfile`` and ``export.json``, with read-back and
llama.cpp checks. Everything is built beside ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grpo_ray.export.base import (
    LLAMA_CPP_TYPES,
    NATIVE_TYPES,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_GGUF_TYPES,
    ExportError,
    dir_size,
    gguf_errors,
    hf_architecture,
    read_json,
)
from grpo_ray.export.checks import LORA_MIN_CORR, compare_with_llama_cpp, judge, read_back
from grpo_ray.export.hf_to_gguf import GGUFSource
from grpo_ray.export.llama_cpp import llama_cpp_available, quantize_gguf, require_llama_cpp
from grpo_ray.export.lora_gguf import write_lora_gguf
from grpo_ray.export.merge import copy_adapter, merge_lora
from grpo_ray.export.modelfile import write_modelfile
from grpo_ray.gguf.cache import SOURCE_FILE
from grpo_ray.gguf.reader import read_gguf_metadata
from grpo_ray.run_dir import EXPORT_JSON, LORA_DIR, MERGED_DIR, MODELFILE


@dataclass
class ExportResult:
    """What :func:`export_model` wrote (final paths under ``out_dir``) and what its checks measured."""

    out_dir: Path
    lora_dir: Path
    merged_dir: Path | None  # None: not kept (export_model(merged16=False))
    ggufs: dict[str, Path]
    modelfile: Path
    modelfile_gguf: str
    architecture: str  # gguf architecture, e.g. "qwen3"
    hf_architecture: str
    merged_dtype: str
    tokenizer_source: str  # "tokenizer.gguf" (sidecar, verbatim) or "tokenizer.json"
    sizes: dict[str, int]  # path relative to out_dir -> bytes (directories summed)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # with export_model(base_gguf=...): the base GGUF copied unchanged and the LoRA as an adapter GGUF
    base_gguf: Path | None = None
    lora_gguf: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with paths relative to ``out_dir``."""

        def rel(p: Path) -> str:
            return os.path.relpath(p, self.out_dir)

        return {
            "out_dir": str(self.out_dir),
            "lora_dir": rel(self.lora_dir),
            "merged_dir": rel(self.merged_dir) if self.merged_dir is not None else None,
            "ggufs": {k: rel(v) for k, v in self.ggufs.items()},
            "modelfile": rel(self.modelfile),
            "modelfile_gguf": self.modelfile_gguf,
            "architecture": self.architecture,
            "hf_architecture": self.hf_architecture,
            "merged_dtype": self.merged_dtype,
            "tokenizer_source": self.tokenizer_source,
            "sizes": self.sizes,
            "checks": self.checks,
            "seconds": round(self.seconds, 3),
            **({"base_gguf": rel(self.base_gguf)} if self.base_gguf is not None else {}),
            **({"lora_gguf": rel(self.lora_gguf)} if self.lora_gguf is not None else {}),
        }


def _gguf_file_type_name(path: Path) -> str:
    """``general.file_type`` of a GGUF as our type name (``q4_k_m``, ``f16`` ...), or "unknown"."""
    import gguf

    with gguf_errors():
        ft = read_gguf_metadata(path).get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(ft)).name
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _modelfile_choice(types: list[str]) -> str:
    for t in ("q4_k_m", *LLAMA_CPP_TYPES, "q8_0", "f16", "bf16", "f32"):
        if t in types:
            return t
    return types[0]


def export_model(
    base_model_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    gguf_types: list[str] = ["f16"],  # noqa: B006 - never mutated
    chat_template: str | None = None,
    system_prompt: str | None = None,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
    name: str = "model",
    base_gguf: Path | None = None,
    merged16: bool = True,
) -> ExportResult:
    """Export ``base_model_dir`` + the LoRA in ``adapter_dir`` into ``out_dir`` (local).

    Writes ``lora/`` (the adapter), ``merged16/`` (merged HF model in bf16 when the base is bf16
    or gemma3, else fp16, with tokenizer and chat template, and the base's ``tokenizer.gguf``
    sidecar if any), ``<name>-<type>.gguf`` per requested type, a ``Modelfile`` for Ollama and
    ``export.json``. Everything is built in a temporary sibling directory that is renamed to
    ``out_dir`` at the end (an existing ``out_dir`` is replaced), so an interrupted export
    leaves no partial ``out_dir``.

    ``gguf_types``: "f32", "f16", "bf16", "q8_0" (our writer) and llama.cpp quantizations such
    as "q4_k_m" (needs llama-cpp-python, ``grpo-ray[llama]``). ``chat_template`` (Jinja) goes
    into the merged tokenizer and the GGUFs (default: the base tokenizer's); ``system_prompt``
    into the Modelfile (default: the template's built-in one). With ``check``, each GGUF is read
    back, and if llama.cpp is importable a float GGUF is loaded to compare tokenization and
    next-token logits with the merged HF model; any failure raises :class:`ExportError`.

    ``base_gguf``: the GGUF the base model came from (e.g. a Q4_K_M). Re-quantizing a merged
    fine-tune of a quantized base to the same type rounds the LoRA delta away, so the export
    then also ships that file unchanged as ``<name>-base-<its type>.gguf`` (a hard link where
    possible), the LoRA as a llama.cpp adapter ``<name>-lora.gguf`` (:func:`write_lora_gguf`)
    and the chat template as ``<name>-chat_template.jinja`` (llama.cpp's ``--chat-template-file``;
    the base GGUF keeps its own); the ``Modelfile`` becomes ``FROM`` base + ``ADAPTER`` lora.
    With ``check``, llama.cpp runs the base with the adapter applied and its logits must match
    the merged HF model's. ``gguf_types`` may then be empty (no merged GGUFs).

    ``merged16=False``: ``merged16/`` is still built (the GGUF files are written from it and the
    checks compare with it) but not kept: ``out_dir`` holds the adapter, the GGUFs and the Modelfile.
    """
    t0 = time.time()
    say = progress or (lambda _msg: None)
    base_model_dir, adapter_dir, out_dir = Path(base_model_dir), Path(adapter_dir), Path(out_dir)

    types = []
    for t in gguf_types:
        t = t.lower()
        if t not in SUPPORTED_GGUF_TYPES:
            raise ExportError(f"unknown GGUF type {t!r}; supported: {', '.join(SUPPORTED_GGUF_TYPES)}")
        if t not in types:
            types.append(t)
    if not types and base_gguf is None:
        raise ExportError("gguf_types is empty")
    if any(t in LLAMA_CPP_TYPES for t in types):
        require_llama_cpp("GGUF types " + ", ".join(t for t in types if t in LLAMA_CPP_TYPES))
    hf_arch, cfg = hf_architecture(base_model_dir)
    if base_gguf is not None:
        base_gguf = Path(base_gguf)
        if not base_gguf.is_file():
            raise ExportError(f"base GGUF {base_gguf} does not exist")
        with gguf_errors():
            got = read_gguf_metadata(base_gguf).get("general.architecture")
        if got != SUPPORTED_ARCHITECTURES[hf_arch]:
            raise ExportError(f"base GGUF {base_gguf.name} is a {got!r} model, {base_model_dir} a "
                              f"{SUPPORTED_ARCHITECTURES[hf_arch]!r} one")
    if not adapter_dir.is_dir():
        raise ExportError(f"adapter directory {adapter_dir} does not exist")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        say("copying LoRA adapter")
        copy_adapter(adapter_dir, tmp / LORA_DIR)

        say("merging LoRA")
        merged_dtype, tok = merge_lora(base_model_dir, adapter_dir, tmp / MERGED_DIR, hf_arch, cfg, chat_template)

        if chat_template is None and isinstance(tok.chat_template, str):
            chat_template = tok.chat_template  # the base tokenizer's
        src = GGUFSource(tmp / MERGED_DIR, chat_template=chat_template, name=name)
        ggufs: dict[str, Path] = {}
        for t in [t for t in types if t in NATIVE_TYPES]:
            say(f"writing GGUF {t}")
            ggufs[t] = tmp / f"{name}-{t}.gguf"
            src.write(ggufs[t], t)

        # the float GGUF the K-quants start from and the llama.cpp check runs on
        ref_type = next((t for t in ("f16", "f32", "bf16") if t in ggufs), None)
        intermediate = None
        kquants = [t for t in types if t in LLAMA_CPP_TYPES]
        if ref_type is None and (kquants or (check and llama_cpp_available() and types)):
            ref_type = "bf16" if merged_dtype == "bfloat16" else "f16"
            intermediate = tmp / f".intermediate-{ref_type}.gguf"
            say(f"writing intermediate GGUF {ref_type}")
            src.write(intermediate, ref_type)
        ref_path = ggufs.get(ref_type) if ref_type else None
        ref_path = ref_path or intermediate

        for t in kquants:
            say(f"quantizing GGUF {t} (llama.cpp)")
            ggufs[t] = tmp / f"{name}-{t}.gguf"
            assert ref_path is not None
            quantize_gguf(ref_path, ggufs[t], t)

        base_copy = lora_path = None
        checks: dict[str, Any] = {}
        if base_gguf is not None:
            say("writing LoRA adapter GGUF")
            lora_path = tmp / f"{name}-lora.gguf"
            checks["lora_gguf"] = write_lora_gguf(adapter_dir, base_model_dir, lora_path, base_gguf=base_gguf)
            base_copy = tmp / f"{name}-base-{_gguf_file_type_name(base_gguf)}.gguf"
            say(f"copying base GGUF {base_gguf.name} -> {base_copy.name}")
            _link_or_copy(base_gguf, base_copy)
            if src.chat_template:
                (tmp / f"{name}-chat_template.jinja").write_text(src.chat_template, encoding="utf-8")

        say("writing Modelfile")
        if base_copy is not None and lora_path is not None:
            mf_gguf, mf_adapter = base_copy.name, lora_path.name
        else:
            mf_type = _modelfile_choice(list(ggufs))
            mf_gguf, mf_adapter = f"{name}-{mf_type}.gguf", None
        mf_info = write_modelfile(tmp / MODELFILE, mf_gguf, tok, src.chat_template,
                                   system_prompt, src.add_bos, adapter=mf_adapter)
        checks = {"modelfile": mf_info, **checks}
        if check:
            names = src.tensor_names()
            for t, p in ggufs.items():
                say(f"checking GGUF {t}")
                checks.setdefault("read_back", {})[t] = read_back(p, names, src.arch)
            if llama_cpp_available() and (ref_path is not None or base_copy is not None):
                import torch
                from transformers import AutoModelForCausalLM

                hf_model = AutoModelForCausalLM.from_pretrained(tmp / MERGED_DIR, dtype=torch.float32).eval()
                hf_cache: dict = {}
                if base_copy is not None and lora_path is not None:
                    say("checking llama.cpp base GGUF + LoRA adapter against HF")
                    r = compare_with_llama_cpp(base_copy, tmp / MERGED_DIR, chat_template=src.chat_template,
                                               system_prompt=system_prompt, tokenizer=tok, hf_model=hf_model,
                                               hf_logits_cache=hf_cache, lora_path=lora_path)
                    checks["llama_cpp_lora"] = r
                    problems = judge(r, min_corr=LORA_MIN_CORR)
                    if problems:
                        raise ExportError(f"llama.cpp check of {base_copy.name} + {lora_path.name} failed: "
                                          + "; ".join(problems))
            if llama_cpp_available() and ref_path is not None:
                say(f"checking llama.cpp against HF ({ref_type})")
                r = compare_with_llama_cpp(ref_path, tmp / MERGED_DIR, chat_template=src.chat_template,
                                           system_prompt=system_prompt, tokenizer=tok, hf_model=hf_model,
                                           hf_logits_cache=hf_cache)
                r["gguf_type"] = ref_type
                checks["llama_cpp"] = r
                problems = judge(r, min_corr=0.99)
                if problems:
                    raise ExportError(f"llama.cpp check of {ref_path.name} failed: " + "; ".join(problems))
                # the other files: they must load and run; their numbers are recorded, not judged
                # (a quantized tiny random model legitimately drifts), except the tokenizer
                for t, p in ggufs.items():
                    if p == ref_path:
                        continue
                    say(f"checking llama.cpp loads {t}")
                    q = compare_with_llama_cpp(p, tmp / MERGED_DIR, chat_template=src.chat_template,
                                               system_prompt=system_prompt, tokenizer=tok, hf_model=hf_model,
                                           hf_logits_cache=hf_cache)
                    if q["tokenization_mismatches"]:
                        raise ExportError(f"llama.cpp tokenization of {p.name} differs from HF: "
                                          f"{q['tokenization_mismatches'][0]}")
                    checks.setdefault("llama_cpp_other", {})[t] = {
                        k: q[k] for k in ("logits_max_abs_diff", "logits_min_corr", "top1_agreement")
                    }
            if llama_cpp_available() and (ref_path is not None or base_copy is not None):
                del hf_model, hf_cache
            if not llama_cpp_available():
                checks["llama_cpp"] = "skipped (llama-cpp-python not installed)"
        if intermediate is not None:
            intermediate.unlink()
        if not merged16:
            shutil.rmtree(tmp / MERGED_DIR)

        say("finalizing")
        final = {t: out_dir / p.name for t, p in ggufs.items()}
        sizes = {p.name: dir_size(p) for p in sorted(tmp.iterdir()) if not p.name.startswith(".")}
        result = ExportResult(
            out_dir=out_dir, lora_dir=out_dir / LORA_DIR, merged_dir=out_dir / MERGED_DIR if merged16 else None, ggufs=final,
            modelfile=out_dir / MODELFILE, modelfile_gguf=mf_gguf, architecture=src.arch,
            hf_architecture=hf_arch, merged_dtype=merged_dtype, tokenizer_source=src.tokenizer_source,
            sizes=sizes, checks=checks,
            base_gguf=out_dir / base_copy.name if base_copy is not None else None,
            lora_gguf=out_dir / lora_path.name if lora_path is not None else None,
        )
        src_info = base_model_dir / SOURCE_FILE
        extra = {"base_source": read_json(src_info)} if src_info.is_file() else {}
        result.seconds = time.time() - t0
        (tmp / EXPORT_JSON).write_text(json.dumps({**result.to_dict(), **extra}, indent=2, default=str))

        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say("done")
    return result
