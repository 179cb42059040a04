"""The LoRA-adapter GGUF writer: a PEFT adapter as a llama.cpp adapter GGUF (``--lora``, Ollama
``ADAPTER``), for a base that ships as its own (quantized) GGUF.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from grpo_ray.export.base import SUPPORTED_ARCHITECTURES, ExportError, gguf_errors, hf_architecture, read_json
from grpo_ray.export.hf_to_gguf import permute_qk
from grpo_ray.gguf.reader import read_gguf_metadata


def write_lora_gguf(
    adapter_dir: Path, base_model_dir: Path, out_path: Path, *, dtype: str = "f16", base_gguf: Path | None = None,
) -> dict[str, Any]:
    """Write the PEFT LoRA in ``adapter_dir`` as a llama.cpp adapter GGUF (``--lora``, Ollama ``ADAPTER``).

    The format is that of llama.cpp's ``convert_lora_to_gguf.py``: ``general.type=adapter``,
    ``adapter.type=lora``, ``adapter.lora.alpha`` (float32) and ``general.architecture`` of the
    base; per adapted matrix ``<gguf name>.lora_a`` (numpy ``(r, in)``, PEFT's ``lora_A``) and
    ``<gguf name>.lora_b`` (``(out, r)``), where ``<gguf name>`` is the base tensor's GGUF name
    (e.g. ``blk.0.attn_q.weight``) through the same ``gguf.get_tensor_name_map`` as
    :class:`GGUFSource`; for llama the rows of ``lora_b`` of Q/K get the same RoPE permutation
    as the merged weights. llama.cpp scales ``B @ A`` by ``alpha / r`` (``r`` read from each
    tensor's shape); per-module ``alpha_pattern`` and rsLoRA scales are folded into ``lora_b``
    so every pair ends up with PEFT's own scale. ``base_model_dir`` (the HF base) gives the
    architecture and head counts; with ``base_gguf`` every target tensor must exist there with
    matching dimensions. DoRA, LoRA biases, embedding LoRAs and ``modules_to_save`` cannot be
    expressed in llama.cpp's adapter format and raise :class:`ExportError`.
    """
    import re

    import gguf
    from safetensors.numpy import load_file

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    if dtype not in ("f16", "f32"):
        raise ExportError(f"LoRA GGUF dtype must be f16 or f32, not {dtype!r}")
    hf_arch, cfg = hf_architecture(Path(base_model_dir))
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    h = {**cfg, **(cfg.get("text_config") or {})}
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tensor_map = gguf.get_tensor_name_map(gguf_arch, int(h["num_hidden_layers"]))
    allowed = set(gguf.MODEL_TENSORS[gguf_arch])

    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise ExportError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    lc = read_json(cfg_path)
    unsupported = {"peft_type": lc.get("peft_type", "LORA") != "LORA", "use_dora": bool(lc.get("use_dora")),
                   "lora_bias": bool(lc.get("lora_bias")), "modules_to_save": bool(lc.get("modules_to_save"))}
    if any(unsupported.values()):
        raise ExportError(f"{adapter_dir}: {[k for k, v in unsupported.items() if v]} cannot be written as a "
                          "llama.cpp LoRA adapter")
    alpha = float(lc.get("lora_alpha") or lc.get("r") or 8)
    rslora = bool(lc.get("use_rslora"))
    alpha_pattern: dict[str, float] = lc.get("alpha_pattern") or {}

    def module_alpha(module: str) -> float:  # PEFT's get_pattern_key: a key matches a name suffix
        for pat, a in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", module):
                return float(a)
        return alpha

    tensors = load_file(str(st_path))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ExportError(f"{adapter_dir}: tensor {key!r} is not a lora_A/lora_B weight (embedding LoRAs and "
                              "extra trained modules cannot be written as a llama.cpp adapter)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = arr
    if not pairs:
        raise ExportError(f"{adapter_dir}: no LoRA tensors")

    base_dims: dict[str, tuple[int, ...]] | None = None
    if base_gguf is not None:
        with gguf_errors():
            meta = read_gguf_metadata(Path(base_gguf))
        if meta.get("general.architecture") != arch:
            raise ExportError(f"{Path(base_gguf).name} is a {meta.get('general.architecture')!r} model, the "
                              f"adapter's base is {arch!r}")
        base_dims = {t.name: tuple(int(d) for d in t.dims) for t in meta.tensors}

    n_head = int(h["num_attention_heads"])
    n_kv = int(h.get("num_key_value_heads") or n_head)
    qt = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.F32
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out_path, arch)
    ranks: set[int] = set()
    written: list[str] = []
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        plan = []
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ExportError(f"{adapter_dir}: {module} has lora_{''.join(ab)} only")
            mapped = tensor_map.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
            if mapped is None or mapped[0] not in allowed:
                raise ExportError(f"LoRA target {module!r} has no {arch} GGUF counterpart")
            ttype, gname = mapped
            if ttype in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
                raise ExportError(f"LoRA on {module!r} (embedding / output head) is not written as a llama.cpp adapter")
            a = ab["A"].astype(np.float32)
            b = ab["B"].astype(np.float32)
            r = a.shape[0]
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
                raise ExportError(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not form a LoRA pair")
            want = module_alpha(module) / (math.sqrt(r) if rslora else r)
            b = b * (want / (alpha / r))  # llama.cpp applies alpha / r
            if arch == "llama" and module.endswith("q_proj"):
                b = permute_qk(b, n_head, n_head)
            elif arch == "llama" and module.endswith("k_proj"):
                b = permute_qk(b, n_head, n_kv)
            if base_dims is not None:
                dims = base_dims.get(gname)
                if dims is None:
                    raise ExportError(f"{Path(base_gguf).name} has no tensor {gname} for the LoRA on {module}")
                if dims[:2] != (a.shape[1], b.shape[0]):
                    raise ExportError(f"{gname}: base GGUF dims {dims} do not fit the LoRA ({a.shape[1]} in, "
                                      f"{b.shape[0]} out)")
            ranks.add(r)
            plan.append((gname, a, b))
        plan.sort(key=lambda x: (int(x[0].split(".")[1]) if x[0].startswith("blk.") else -1, x[0]))
        for gname, a, b in plan:
            w.add_tensor(gname + ".lora_a", gguf.quants.quantize(a, qt), raw_dtype=qt)
            w.add_tensor(gname + ".lora_b", gguf.quants.quantize(b, qt), raw_dtype=qt)
            written.append(gname)
        w.write_header_to_file(path=out_path)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    with gguf_errors():  # read back
        meta = read_gguf_metadata(out_path)
    got = [t.name for t in meta.tensors]
    if (meta.get("general.type"), meta.get(gguf.Keys.Adapter.TYPE)) != ("adapter", "lora") or sorted(got) != sorted(
        g + s for g in written for s in (".lora_a", ".lora_b")
    ):
        raise ExportError(f"{out_path.name}: read-back differs from what was written")
    return {"architecture": arch, "n_pairs": len(written), "ranks": sorted(ranks), "alpha": alpha,
            "dtype": dtype, "bytes": out_path.stat().st_size,
            "base_gguf_checked": base_gguf is not None, "targets": sorted({g.split(".")[2] for g in written
                                                                          if g.startswith("blk.")})}


