"""What every export step shares: the architectures and GGUF types we export, :class:`ExportError`,
and a HF model directory's architecture.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

# HF architecture -> gguf architecture name
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
}
# written by our own code
FLOAT_TYPES = ("f32", "f16", "bf16")
NATIVE_TYPES = FLOAT_TYPES + ("q8_0",)
# written by llama.cpp's quantizer (needs llama-cpp-python, the `grpo-ray[llama]` extra)
LLAMA_CPP_TYPES = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l",
    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs",
)
SUPPORTED_GGUF_TYPES = NATIVE_TYPES + LLAMA_CPP_TYPES


class ExportError(RuntimeError):
    """The export cannot be done, or a check of its output failed."""

def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_architecture(model_dir: Path) -> tuple[str, dict[str, Any]]:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{model_dir} has no config.json (not a HF model directory)")
    cfg = read_json(cfg_path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else f"<none; model_type={cfg.get('model_type')!r}>"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"unsupported architecture {arch!r} for GGUF export; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        )
    return arch, cfg


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

@contextlib.contextmanager
def gguf_errors() -> Iterator[None]:
    """Report a malformed GGUF (``ValueError`` from :mod:`grpo_ray.gguf.reader`) as an ExportError."""
    try:
        yield
    except ValueError as e:
        raise ExportError(str(e)) from e


