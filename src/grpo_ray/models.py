"""Where a spec's ``model.source`` points, as something ``from_pretrained`` can load.

- ``builtin:tiny-qwen3``: the tiny random Qwen3 built offline (smoke sweep, tests);
- a ``.gguf`` file: dequantized once into a cached HF directory (see :mod:`grpo_ray.gguf.hf_dir`);
- a local directory: used as is;
- anything else: a hub name, passed through to ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model source that cannot be used: names the source and what is expected."""


def check_model_source(source: str) -> None:
    """Raise :class:`ModelError` for a source that cannot work, without building or loading it."""
    if source.startswith("builtin:") and source != "builtin:tiny-qwen3":
        raise ModelError(f"{source}: unknown builtin model (known: builtin:tiny-qwen3)")
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_file():
        raise ModelError(f"{source}: no such GGUF file")
    if path.exists() and path.is_dir() and not (path / "config.json").exists():
        raise ModelError(f"{source}: a directory without config.json (expected a Hugging Face model dir)")
    if not path.exists() and source.startswith((".", "/", "~")):
        raise ModelError(f"{source}: no such file or directory")


def resolve_model(source: str) -> str:
    """A local directory or hub name for ``source``; builds or dequantizes (cached) if needed."""
    check_model_source(source)
    if source.startswith("builtin:"):
        from grpo_ray.tiny import cached_tiny_model

        return str(cached_tiny_model())
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        from grpo_ray.gguf.hf_dir import materialize_gguf

        return str(materialize_gguf(path))
    return str(path) if path.exists() else source
