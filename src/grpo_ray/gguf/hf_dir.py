"""Start a sweep from a GGUF base model: a cached Hugging Face directory that matches llama.cpp.

A spec's ``model.source`` may point at a ``.gguf`` file (our offline Gemma 3 270M exists only
as one, and users with GGUF-only checkpoints will do the same). Training needs a Hugging Face
directory; the exported model goes back to GGUF and is served by llama.cpp. Two things must
therefore hold, and this module makes sure of both:

* **Weights**: transformers dequantizes the GGUF faithfully (next-token KL about 0.005 against
  llama.cpp on the same ids). :func:`materialize_gguf` does it once per file (keyed by the
  file's sha256, :mod:`grpo_ray.gguf.cache`), saves bf16 safetensors, and every later trial on
  the node reuses the directory.
* **Tokenizer**: the directory's tokenizer tokenizes exactly as llama.cpp does
  (:mod:`grpo_ray.gguf.tokenizer`).

The directory also carries ``tokenizer.gguf`` (the original ``tokenizer.*`` metadata, for the
exporter) and ``grpo_ray_source.json`` naming the source file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from gguf import GGUFValue, GGUFValueType

from grpo_ray.gguf.cache import FORMAT_VERSION, SOURCE_FILE, cached_build, cached_sha256, default_cache_root
from grpo_ray.gguf.reader import GGUFMetadata, read_gguf_metadata, replace_gguf_kv
from grpo_ray.gguf.tokenizer import (
    TOKENIZER_SIDECAR,
    save_hf_tokenizer,
    tokenizer_flags,
    tokenizer_kv,
    write_tokenizer_sidecar,
)

log = logging.getLogger(__name__)


# The big tokenizer arrays: stripped from the copy transformers dequantizes (it would spend
# ~60 s parsing them for nothing) and the reason the sidecar exists.
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)

# --------------------------------------------------------------------------------------------
# Materialize: GGUF -> cached HF directory
# --------------------------------------------------------------------------------------------


def _strip_for_transformers(gguf_path: Path, meta: GGUFMetadata, out: Path) -> bool:
    """Write a copy of the GGUF without the big tokenizer arrays, for transformers to load.

    transformers parses every array element with GGUFReader (about 60 s for Gemma's vocab,
    twice) only to learn ``vocab_size``, so we give it ``<arch>.vocab_size`` instead. Returns
    False (load the original) when transformers does not map that key for the architecture.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = meta.get("general.architecture")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(arch, str) or tokens is None or "vocab_size" not in GGUF_CONFIG_MAPPING.get(arch, {}):
        return False
    extra = {}
    if f"{arch}.vocab_size" not in meta.kv:
        extra[f"{arch}.vocab_size"] = GGUFValue(len(tokens), GGUFValueType.UINT32)
    replace_gguf_kv(gguf_path, out, set_kv=extra, drop=_TOKENIZER_ARRAYS)
    return True


def _build_model_dir(gguf_path: Path, sha: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    meta = read_gguf_metadata(gguf_path)
    arch = meta.get("general.architecture")
    kv = tokenizer_kv(meta)

    # 1. Weights, dequantized by transformers from a tokenizer-less copy (same tensors, bytes).
    stripped = out / "weights-only.gguf"
    if not _strip_for_transformers(gguf_path, meta, stripped):
        os.symlink(gguf_path.resolve(), stripped)  # slow path: transformers reads the original
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=stripped.name, dtype=torch.bfloat16)
    stripped.unlink()
    # save_pretrained refuses a model "quantized with GGUF"; the weights are plain bf16 now.
    model.config.quantization_config = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.hf_quantizer = None
    # generate() (and vLLM, which reads generation_config) stop where llama.cpp stops: on every
    # end-of-generation id it derives (Gemma 3: <eos>, <end_of_turn>, </s>), EOS first.
    eog = tokenizer_flags(kv).eog_ids
    if len(eog) > 1:
        model.generation_config.eos_token_id = eog
    model.save_pretrained(str(out))
    del model
    t_model = time.perf_counter() - t0

    # 2. Tokenizer: exact for SentencePiece vocabs; others fall back to transformers' converter.
    context = meta.get(f"{arch}.context_length") if isinstance(arch, str) else None
    exact = meta.get("tokenizer.ggml.model") == "llama"
    if exact:
        save_hf_tokenizer(kv, out, model_max_length=int(context) if context else None)
    else:
        log.warning(
            "%s: tokenizer model %r is not SentencePiece; using transformers' GGUF tokenizer, "
            "which is NOT verified to match llama.cpp",
            gguf_path,
            meta.get("tokenizer.ggml.model"),
        )
        os.symlink(gguf_path.resolve(), stripped)
        hf = AutoTokenizer.from_pretrained(str(out), gguf_file=stripped.name)
        stripped.unlink()
        flags = tokenizer_flags(kv)
        hf.add_bos_token, hf.add_eos_token = flags.add_bos, flags.add_eos
        hf.clean_up_tokenization_spaces = False
        hf.save_pretrained(str(out))
    write_tokenizer_sidecar(out / TOKENIZER_SIDECAR, meta)

    info = {
        "gguf_sha256": sha,
        "gguf_path": str(gguf_path.resolve()),
        "architecture": arch,
        "format_version": FORMAT_VERSION,
        "tokenizer": "llama.cpp-spm-exact" if exact else "transformers-gguf-unverified",
        "seconds": {"model": round(t_model, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    (out / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    # mkdtemp and some writers create owner-only modes; the cache is meant to be shared.
    umask = _current_umask()
    out.chmod(0o777 & ~umask)
    for f in out.iterdir():
        f.chmod(0o666 & ~umask)


def _current_umask() -> int:
    # Read, not os.umask(0)+restore: that briefly changes the mask for every thread.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    return 0o022


def materialize_gguf(gguf_path: str | Path, cache_root: Path | None = None) -> Path:
    """A Hugging Face model directory for a GGUF file, dequantized once and cached.

    The directory is ``<cache_root>/gguf/<first 16 hex of the file's sha256>`` (``cache_root``
    defaults to :func:`default_cache_root`) and holds bf16 safetensors, ``config.json``,
    ``generation_config.json``, a fast tokenizer that tokenizes exactly as llama.cpp does for
    this GGUF (BOS/EOS added per the GGUF's flags), ``tokenizer.gguf`` (the original
    ``tokenizer.*`` metadata, for the exporter) and ``grpo_ray_source.json``
    (``gguf_sha256``, ``gguf_path``, ``architecture``). Safe to call from several processes at
    once: one builds, the others wait and reuse. A cache hit costs a stat and a small JSON read.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    gguf_root = Path(cache_root if cache_root is not None else default_cache_root()) / "gguf"
    sha = cached_sha256(path, gguf_root)
    return cached_build(gguf_root / sha[:16], sha, lambda tmp: _build_model_dir(path, sha, tmp))
