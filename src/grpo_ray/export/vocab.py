"""A HF tokenizer's vocabulary as llama.cpp names it: the pre-tokenizer (``tokenizer.ggml.pre``)
and which tokens count as special, as llama.cpp's ``convert_hf_to_gguf.py`` decides them.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def detect_pre(tok_json: dict[str, Any], arch: str) -> str:
    """``tokenizer.ggml.pre`` from the HF pre-tokenizer's split regex (arch default otherwise)."""

    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            yield node
            for v in node.get("pretokenizers", []) or []:
                yield from walk(v)

    regexes = []
    bytelevel_regex = False
    for n in walk(tok_json.get("pre_tokenizer")):
        if n.get("type") == "Split":
            pat = n.get("pattern", {})
            regexes.append(pat.get("Regex") or pat.get("String"))
        if n.get("type") == "ByteLevel" and n.get("use_regex", True):
            bytelevel_regex = True
    if regexes == [_QWEN2_SPLIT]:
        return "qwen2"
    if regexes == [_LLAMA3_SPLIT]:
        return "llama-bpe"
    if not regexes and bytelevel_regex:
        return "gpt-2"
    fallback = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}.get(arch, "default")
    log.warning("unrecognised pre-tokenizer %r; using tokenizer.ggml.pre=%s", regexes, fallback)
    return fallback


def looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


