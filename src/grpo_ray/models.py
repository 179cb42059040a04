"""Where a spec's ``model.source`` points, as something ``from_pretrained`` can load.

- ``builtin:tiny-qwen3``: the tiny random Qwen3 built offline (smoke sweep, tests);
- a ``.gguf`` file: dequantized once into a cached HF directory (see :mod:`grpo_ray.gguf_base`);
- a local directory: used as is;
- anything else: a hub name, passed through to ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model source that cannot be used: names the source and what is expected."""


def resolve_model(source: str) -> str:
    """A local directory or hub name for ``source``; builds or dequantizes (cached) if needed."""
    if source.startswith("builtin:"):
        if source != "builtin:tiny-qwen3":
            raise ModelError(f"{source}: unknown builtin model (known: builtin:tiny-qwen3)")
        from grpo_ray.tiny import cached_tiny_model

        return str(cached_tiny_model())
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{source}: no such GGUF file")
        from grpo_ray.gguf_base import materialize_gguf

        return str(materialize_gguf(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{source}: a directory without config.json (expected a Hugging Face model dir)")
        return str(path)
    if source.startswith((".", "/", "~")):
        raise ModelError(f"{source}: no such file or directory")
    return source
