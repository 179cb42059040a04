"""Start a sweep from a GGUF base model: a cached Hugging Face directory that matches llama.cpp.

A spec's ``model.source`` may point at a ``.gguf`` file (our offline Gemma 3 270M exists only
as one, and users with GGUF-only checkpoints will do the same). Training needs a Hugging Face
directory; the exported model goes back to GGUF and is served by llama.cpp. Two things must
therefore hold, and this module makes sure of both:

* **Weights**: transformers dequantizes the GGUF faithfully (next-token KL about 0.005 against
  llama.cpp on the same ids). :func:`materialize_gguf` does it once per file (keyed by the
  file's sha256), saves bf16 safetensors, and every later trial on the node reuses the directory.
* **Tokenizer**: transformers turns a SentencePiece ("llama") GGUF vocab into a *Unigram* model
  whose splits differ from llama.cpp's (" capital" -> " c","ap","it","al" instead of one token)
  and drops ``<bos>``. A model trained on one tokenization and served under the other sees
  different inputs. We instead build a ``tokenizers`` BPE that reproduces llama.cpp's
  ``llm_tokenizer_spm`` exactly (see :func:`build_llama_cpp_tokenizer` for how and why each
  piece maps), and honour the GGUF's own ``add_bos``/``add_eos`` flags.

The directory also carries ``tokenizer.gguf``, a tensor-less GGUF holding the original file's
``tokenizer.*`` metadata verbatim, so the exporter can write the very same tokenizer into the GGUF
it produces (:func:`read_tokenizer_kv`, :func:`write_tokenizer_kv`), and ``grpo_ray_source.json``
naming the source file.

Metadata is parsed here with a small reader of our own instead of ``gguf.GGUFReader``: the
reader builds a numpy view per array element, which takes ~30 s for Gemma's 262,144-token
vocab (and transformers parses the file twice), while the format itself is simple.
:func:`read_gguf_metadata` is the project's one GGUF metadata reader: the exporter reads its
sidecar tokenizer and reads back the GGUFs it writes with it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValue,
    GGUFValueType,
    TokenType,
)

if TYPE_CHECKING:  # typing only: keeps `import grpo_ray.gguf_base` free of tokenizers/transformers
    from gguf import GGUFWriter
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Bump when the layout or content of a materialized directory changes: a cached directory with
# another format is rebuilt instead of silently reused.
FORMAT_VERSION = 1

SOURCE_FILE = "grpo_ray_source.json"
TOKENIZER_SIDECAR = "tokenizer.gguf"

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # the layouts this reader knows

# Little-endian struct formats and numpy dtypes of the scalar GGUF value types.
_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NP_DTYPE: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}

# The big tokenizer arrays: stripped from the copy transformers dequantizes (it would spend
# ~60 s parsing them for nothing) and the reason the sidecar exists.
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


# --------------------------------------------------------------------------------------------
# GGUF metadata: a fast, exact reader and a key/value rewriter
# --------------------------------------------------------------------------------------------


class GGUFTensorInfo(NamedTuple):
    """One tensor info entry of a GGUF file (where the tensor is, not its data)."""

    name: str
    dims: tuple[int, ...]  # ggml order, fastest-varying first: token_embd is (n_embd, n_vocab)
    type: GGMLQuantizationType
    offset: int  # bytes from the start of the data section (GGUFMetadata.data_offset)

    @property
    def nbytes(self) -> int:
        """The size of the tensor's data in the file."""
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return math.prod(self.dims) // block_size * type_size


@dataclass
class GGUFMetadata:
    """The metadata part of a GGUF file, parsed exactly.

    ``kv`` maps each key to a :class:`gguf.GGUFValue` (value, type, sub_type for arrays) that
    ``GGUFWriter.add_key_value`` writes back byte for byte: strings are ``str`` (``bytes`` if
    not valid UTF-8), numbers keep their GGUF type, arrays are lists. ``kv_raw`` holds each
    entry's original bytes (key included) so that rewriting can copy untouched entries verbatim;
    ``tensor_info_raw`` likewise the tensor infos, which ``tensors`` holds parsed, in file order.
    """

    version: int
    kv: dict[str, GGUFValue]
    kv_raw: dict[str, bytes] = field(repr=False)
    tensors: list[GGUFTensorInfo] = field(repr=False)
    tensor_info_raw: bytes = field(repr=False)
    alignment: int
    data_offset: int  # where the data section starts (tensor offsets are relative to it)
    file_size: int

    @property
    def tensor_count(self) -> int:
        """How many tensors the file holds."""
        return len(self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        """The plain value under ``key``, or ``default``."""
        entry = self.kv.get(key)
        return default if entry is None else entry.value


def _decode_str(raw: bytes) -> str | bytes:
    # GGUF strings are meant to be UTF-8; keep anything else as bytes so nothing is lost.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _read_value(buf: Any, pos: int, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None, int]:
    """Parse one value of ``vtype`` at ``pos``: (value, array sub_type or None, new pos)."""
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is not None:
        (value,) = struct.unpack_from(fmt, buf, pos)
        return value, None, pos + struct.calcsize(fmt)
    if vtype == GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        return _decode_str(bytes(buf[pos : pos + n])), None, pos + n
    if vtype == GGUFValueType.ARRAY:
        sub = GGUFValueType(struct.unpack_from("<I", buf, pos)[0])
        (n,) = struct.unpack_from("<Q", buf, pos + 4)
        pos += 12
        if sub in _NP_DTYPE:
            dtype = np.dtype(_NP_DTYPE[sub])
            arr = np.frombuffer(buf, dtype=dtype, count=n, offset=pos)
            values = arr.astype(bool).tolist() if sub == GGUFValueType.BOOL else arr.tolist()
            return values, sub, pos + n * dtype.itemsize
        if sub == GGUFValueType.STRING:
            out: list[str | bytes] = []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(n):
                (m,) = unpack(buf, pos)
                pos += 8
                out.append(_decode_str(bytes(buf[pos : pos + m])))
                pos += m
            return out, sub, pos
        if sub == GGUFValueType.ARRAY:  # nested arrays: elements keep their own sub_type
            nested: list[GGUFValue] = []
            for _ in range(n):
                value, inner, pos = _read_value(buf, pos, GGUFValueType.ARRAY)
                nested.append(GGUFValue(value, GGUFValueType.ARRAY, inner))
            return nested, sub, pos
    raise ValueError(f"unknown GGUF value type {vtype!r}")


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Parse the header, key/values and tensor infos of a (little-endian, v2 or v3) GGUF file.

    Seconds faster than ``gguf.GGUFReader`` on a 262k-token vocab. Tensor data is not read, but
    the layout is checked: every tensor must start aligned and end inside the file. Raises
    ``ValueError`` for a file that is not such a GGUF or whose layout is broken.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {mm[:4]!r})")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", mm, 4)
        if version & 0xFFFF == 0:
            raise ValueError(f"{path}: big-endian GGUF files are not supported")
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
        pos = 24
        kv: dict[str, GGUFValue] = {}
        kv_raw: dict[str, bytes] = {}
        for _ in range(kv_count):
            start = pos
            (klen,) = struct.unpack_from("<Q", mm, pos)
            key = bytes(mm[pos + 8 : pos + 8 + klen]).decode("utf-8")
            pos += 8 + klen
            vtype = GGUFValueType(struct.unpack_from("<I", mm, pos)[0])
            value, sub, pos = _read_value(mm, pos + 4, vtype)
            kv[key] = GGUFValue(value, vtype, sub)
            kv_raw[key] = bytes(mm[start:pos])
        ti_start = pos
        tensors: list[GGUFTensorInfo] = []
        for _ in range(tensor_count):  # name, n_dims, dims, type, offset
            (nlen,) = struct.unpack_from("<Q", mm, pos)
            name = bytes(mm[pos + 8 : pos + 8 + nlen]).decode("utf-8")
            pos += 8 + nlen
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 4 + 8
            tensors.append(GGUFTensorInfo(name, dims, GGMLQuantizationType(ttype), offset))
        tensor_info_raw = bytes(mm[ti_start:pos])
        file_size = len(mm)
    align_entry = kv.get("general.alignment")
    alignment = int(align_entry.value) if align_entry is not None else GGUF_DEFAULT_ALIGNMENT
    data_offset = -(-pos // alignment) * alignment
    for t in tensors:
        if t.offset % alignment or data_offset + t.offset + t.nbytes > file_size:
            raise ValueError(f"{path}: tensor {t.name} lies outside the file or is misaligned")
    return GGUFMetadata(version, kv, kv_raw, tensors, tensor_info_raw, alignment, data_offset, file_size)


def _pack_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> bytes:
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is not None:
        return struct.pack(fmt, value)
    if vtype == GGUFValueType.STRING:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(raw)) + raw
    if vtype == GGUFValueType.ARRAY:
        if sub_type is None:
            raise ValueError("a GGUF array needs its sub_type")
        head = struct.pack("<IQ", sub_type, len(value))
        if sub_type in _NP_DTYPE:
            return head + np.asarray(value).astype(_NP_DTYPE[sub_type]).tobytes()
        if sub_type == GGUFValueType.STRING:
            return head + b"".join(_pack_value(v, GGUFValueType.STRING, None) for v in value)
        if sub_type == GGUFValueType.ARRAY:
            return head + b"".join(_pack_value(v.value, v.type, v.sub_type)[4:] for v in value)
    raise ValueError(f"cannot pack GGUF value type {vtype!r}")


def _pack_kv(key: str, entry: GGUFValue) -> bytes:
    kraw = key.encode("utf-8")
    return (
        struct.pack("<Q", len(kraw))
        + kraw
        + struct.pack("<I", entry.type)
        + _pack_value(entry.value, entry.type, entry.sub_type)
    )


def replace_gguf_kv(
    src: str | Path,
    dst: str | Path,
    set_kv: Mapping[str, GGUFValue] | None = None,
    drop: Iterable[str] = (),
) -> None:
    """Copy the GGUF ``src`` to ``dst`` with some key/values replaced, added or dropped.

    Tensor infos and tensor data are copied verbatim (their offsets are relative to the data
    section, which stays aligned), so this is an exact metadata transplant: the exporter can use
    it to put :func:`read_tokenizer_kv`'s fields into a GGUF it already wrote.
    """
    set_kv = dict(set_kv or {})
    drop = set(drop)
    if "general.alignment" in set_kv:
        raise ValueError("changing general.alignment would move the tensor data; not supported")
    meta = read_gguf_metadata(src)
    entries: list[bytes] = []
    for key, raw in meta.kv_raw.items():
        if key in drop:
            continue
        entries.append(_pack_kv(key, set_kv.pop(key)) if key in set_kv else raw)
    entries.extend(_pack_kv(key, entry) for key, entry in set_kv.items() if key not in drop)
    head = _GGUF_MAGIC + struct.pack("<IQQ", meta.version, meta.tensor_count, len(entries))
    body = head + b"".join(entries) + meta.tensor_info_raw
    body += b"\0" * (-len(body) % meta.alignment)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(body)
        fin.seek(meta.data_offset)
        shutil.copyfileobj(fin, fout, 16 << 20)


# --------------------------------------------------------------------------------------------
# Tokenizer metadata: sidecar GGUF for the exporter
# --------------------------------------------------------------------------------------------


def tokenizer_kv(meta: GGUFMetadata) -> dict[str, GGUFValue]:
    """The ``tokenizer.*`` key/values of a GGUF, in file order, exactly as stored."""
    return {k: v for k, v in meta.kv.items() if k.startswith("tokenizer.")}


def write_tokenizer_kv(writer: GGUFWriter, kv: Mapping[str, GGUFValue]) -> None:
    """Put ``kv`` (from :func:`read_tokenizer_kv`) into ``writer``, replacing existing keys.

    Call before ``writer.write_header_to_file()``. Existing ``tokenizer.*`` keys that ``kv``
    lacks are removed too, so the written file carries exactly the source's tokenizer (a stray
    ``tokenizer.ggml.merges`` from another conversion would change llama.cpp's behaviour).
    """
    store = writer.kv_data[0]
    for key in [k for k in store if k.startswith("tokenizer.")]:
        del store[key]
    for key, entry in kv.items():
        writer.add_key_value(key, entry.value, entry.type, sub_type=entry.sub_type)


def _write_tokenizer_sidecar(path: Path, meta: GGUFMetadata) -> None:
    from gguf import GGUFWriter

    arch = meta.get("general.architecture", "llama")
    # GGUFWriter always writes general.architecture; everything else is tokenizer.* only.
    writer = GGUFWriter(path, arch=arch if isinstance(arch, str) else "llama")
    write_tokenizer_kv(writer, tokenizer_kv(meta))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_tokenizer_kv(model_dir: str | Path) -> dict[str, GGUFValue] | None:
    """The source GGUF's ``tokenizer.*`` fields saved next to a materialized model, or None.

    Each value is a :class:`gguf.GGUFValue` (``value``, ``type``, ``sub_type``) that
    ``GGUFWriter.add_key_value(key, v.value, v.type, sub_type=v.sub_type)`` writes back exactly
    (arrays of tokens/scores/token types included); see :func:`write_tokenizer_kv`. None when
    ``model_dir`` was not made from a GGUF (no ``tokenizer.gguf`` sidecar).
    """
    path = Path(model_dir) / TOKENIZER_SIDECAR
    if not path.is_file():
        return None
    return tokenizer_kv(read_gguf_metadata(path))


# --------------------------------------------------------------------------------------------
# The llama.cpp-exact tokenizer (SentencePiece vocab, "llama" tokenizer model)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerFlags:
    """What llama.cpp reads from a GGUF besides the vocab (its defaults for SPM vocabs)."""

    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    special_ids: dict[str, int]  # HF special-token attribute ("bos_token", ...) -> id
    eog_ids: list[int]  # ids that end generation in llama.cpp, EOS first
    chat_template: str | None


# llama.cpp (llama-vocab.cpp, load(), vendored in llama-cpp-python 0.3.36) decides by token
# *text* which tokens end generation, and forces them to CONTROL: e.g. Gemma's user-defined
# "</s>" becomes a control token there, so detokenizing drops it and generation stops on it.
_LLAMA_CPP_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<｜end▁of▁sentence｜>", "[e~[",
    }
)  # fmt: skip
_EOG_ID_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
)


# llama.cpp's defaults for tokenizer.ggml.model == "llama" (llama-vocab.cpp, load()).
_SPM_DEFAULT_IDS = {"bos_token": 1, "eos_token": 2, "unk_token": 0}
_GGUF_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "mask_token": "tokenizer.ggml.mask_token_id",
}


def tokenizer_flags(kv: Mapping[str, GGUFValue]) -> TokenizerFlags:
    """The add_bos/add_eos/space-prefix flags and special ids llama.cpp derives from ``kv``."""

    def get(key: str, default: Any) -> Any:
        entry = kv.get(key)
        return default if entry is None else entry.value

    n_tokens = len(get("tokenizer.ggml.tokens", []))
    spm = get("tokenizer.ggml.model", None) == "llama"
    ids: dict[str, int] = {}
    for name, key in _GGUF_ID_KEYS.items():
        value = get(key, _SPM_DEFAULT_IDS.get(name) if spm else None)
        if value is not None and 0 <= int(value) < n_tokens:  # llama.cpp drops out-of-range ids
            ids[name] = int(value)
    eog: list[int] = [ids["eos_token"]] if "eos_token" in ids else []
    for key in _EOG_ID_KEYS[1:]:
        value = get(key, None)
        if value is not None and 0 <= int(value) < n_tokens and int(value) not in eog:
            eog.append(int(value))
    for i, text in enumerate(get("tokenizer.ggml.tokens", [])):
        if text in _LLAMA_CPP_EOG_TEXTS and i not in eog:
            eog.append(i)
    template = get("tokenizer.chat_template", None)
    return TokenizerFlags(
        # SPM defaults in llama.cpp: add BOS, no EOS, prefix a space (Gemma's GGUF turns it off).
        add_bos=bool(get("tokenizer.ggml.add_bos_token", spm)),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", spm)),
        special_ids=ids,
        eog_ids=eog,
        chat_template=template if isinstance(template, str) else None,
    )


def build_llama_cpp_tokenizer(kv: Mapping[str, GGUFValue]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that splits text exactly as llama.cpp does for an SPM GGUF.

    How llama.cpp tokenizes (``llama_vocab::impl::tokenize`` + ``llm_tokenizer_spm_session``),
    and the piece of ours that reproduces each step:

    1. Control, user-defined and unknown tokens are cut out of the raw text first, longest
       token text first (``tokenizer_st_partition``; user-defined ones even when
       ``special=false``). -> every such token is an ``AddedToken(normalized=False)``: HF
       extracts them from the raw text before anything else (leftmost-longest; for Gemma's
       vocab - whitespace runs, HTML tags, ``<...>`` controls - that gives the same cuts).
       Control/unknown ones are ``special`` (dropped by ``skip_special_tokens``, like llama.cpp's
       detokenize without ``special``); user-defined ones (``"\\n"``, ``"  "``, ``"<td>"``) are
       ordinary text and are not - except the end-of-generation texts llama.cpp forces to
       CONTROL (Gemma's ``"</s>"``), which are special here too. HF always parses special
       tokens written in text, which corresponds to llama.cpp's ``special=true``.
    2. Each remaining fragment gets a leading space if ``add_space_prefix`` (every fragment
       follows the start or a special token), and ``" "`` becomes ``"▁"``. -> normalizer
       ``Replace(" ", "▁")`` (plus ``Prepend("▁")``), which HF runs per fragment. No Unicode
       normalization: llama.cpp does none.
    3. The fragment is split into UTF-8 characters and adjacent symbols are merged greedily,
       highest vocab score of the merged text first, leftmost on ties; any symbol left that
       is not a token is emitted as ``<0xNN>`` byte tokens. -> a BPE whose merges are every
       split of a token's text into two vocab pieces, ranked by that token's score (HF's BPE
       also merges the best-ranked pair, leftmost first), with ``byte_fallback``. Merges are
       made for every token type llama.cpp's ``text_to_token`` can produce mid-fragment
       (normal, byte, unused), not for the tokens of step 1, which never reach this step.
       ``ignore_merges`` stays off: llama.cpp never shortcuts a fragment that is one token.

    Only llama.cpp's tie-break between *different* pairs that make the same token can differ
    from HF's (which orders them by rank); no such case turned up in 130,000 fuzzed strings on
    Gemma 3's vocab. BOS/EOS are not added here: :func:`save_hf_tokenizer` sets the
    post-processor from the GGUF's flags.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    if (kv.get("tokenizer.ggml.model") or GGUFValue(None, GGUFValueType.STRING)).value != "llama":
        raise ValueError("build_llama_cpp_tokenizer handles SentencePiece ('llama') GGUF vocabs only")
    raw_tokens = kv["tokenizer.ggml.tokens"].value
    n = len(raw_tokens)
    scores_entry = kv.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores_entry.value] if scores_entry is not None else [0.0] * n
    types_entry = kv.get("tokenizer.ggml.token_type")
    types = list(types_entry.value) if types_entry is not None else [int(TokenType.NORMAL)] * n

    tokens: list[str] = []
    for i, tok in enumerate(raw_tokens):
        if isinstance(tok, bytes):  # HF vocabularies are str; cannot be exact for such a token
            log.warning("token %d is not valid UTF-8; decoding it with replacement characters", i)
            tok = tok.decode("utf-8", errors="replace")
        tokens.append(tok or f"[EMPTY_{i}]")  # what llama.cpp names an empty token
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:  # llama.cpp asserts against this too
            raise ValueError(f"duplicate token text {tok!r} (ids {vocab[tok]} and {i})")
        vocab[tok] = i

    # Tokens llama.cpp cuts out of the raw text before SPM (step 1), and which of them it
    # treats as control tokens (EOG texts are forced to CONTROL whatever their type).
    partitioned = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)}
    cut_first = [types[i] in partitioned or tokens[i] in _LLAMA_CPP_EOG_TEXTS for i in range(n)]
    special = [types[i] != int(TokenType.USER_DEFINED) or tokens[i] in _LLAMA_CPP_EOG_TEXTS for i in range(n)]
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, tok in enumerate(tokens):
        if cut_first[i] or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()  # best score first; ties by token id, then split point (deterministic)
    merges = [(left, right) for _, _, _, left, right in ranked]

    missing_bytes = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing_bytes:
        log.warning("%d byte tokens <0xNN> missing: unknown characters may differ from llama.cpp", len(missing_bytes))
    flags = tokenizer_flags(kv)
    unk_id = flags.special_ids.get("unk_token")

    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=True,
        fuse_unk=False,
        ignore_merges=False,
    )
    tok = Tokenizer(bpe)
    norm: list[Any] = [normalizers.Replace(" ", "▁")]
    if flags.add_space_prefix:
        norm.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    dec: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if flags.add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Their ids already exist in the vocab, so adding keeps ids; only the extraction changes.
    tok.add_tokens([AddedToken(tokens[i], special=special[i], normalized=False) for i in range(n) if cut_first[i]])
    return tok


def save_hf_tokenizer(kv: Mapping[str, GGUFValue], out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Save the llama.cpp-exact tokenizer of ``kv`` as a fast tokenizer in ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` loads ``tokenizer.json`` as-is
    (``TokenizersBackend``), and ``tokenizer(text)`` adds BOS/EOS exactly when llama.cpp does
    for this GGUF: the post-processor carries them. (transformers 5 ignores ``add_bos_token``
    in tokenizer_config.json when a tokenizer.json exists, so the loaded tokenizer's
    ``add_bos_token`` attribute reads False even though BOS is added; we still record the flags
    in the config for readers and older versions.) ``clean_up_tokenization_spaces`` is off so
    that decode inverts encode.

    The files are written directly rather than through ``PreTrainedTokenizerFast(...)
    .save_pretrained``, which spends ~7 s copying the 6,400 added tokens around.
    """
    from tokenizers import processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = tokenizer_flags(kv)
    backend = build_llama_cpp_tokenizer(kv)
    names = {name: backend.id_to_token(i) for name, i in flags.special_ids.items()}
    add_bos = flags.add_bos and "bos_token" in names
    add_eos = flags.add_eos and "eos_token" in names
    specials: list[tuple[str, int]] = []
    if add_bos:
        specials.append((names["bos_token"], flags.special_ids["bos_token"]))
    if add_eos and names["eos_token"] not in dict(specials):
        specials.append((names["eos_token"], flags.special_ids["eos_token"]))

    def seq(x: str, type_id: int) -> str:  # the same template transformers' update_post_processor writes
        bos = f"{names['bos_token']}:{type_id} " if add_bos else ""
        eos = f" {names['eos_token']}:{type_id}" if add_eos else ""
        return f"{bos}${x}:{type_id}{eos}"

    backend.post_processor = processors.TemplateProcessing(
        single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}", special_tokens=specials
    )
    backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "backend": "tokenizers",
        "tokenizer_class": "TokenizersBackend",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **names,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if flags.chat_template:
        (out / "chat_template.jinja").write_text(flags.chat_template)


# --------------------------------------------------------------------------------------------
# Cache: sha256 key, file lock, atomic rename
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk_size: int = 8 << 20) -> str:
    """The hex sha256 of a file, read in chunks (GGUFs are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """``$GRPO_RAY_CACHE`` or ``~/.cache/grpo-ray`` (shared with the builtin tiny model)."""
    return Path(os.environ.get("GRPO_RAY_CACHE") or Path.home() / ".cache" / "grpo-ray")


def _cached_sha256(path: Path, gguf_root: Path) -> str:
    """sha256 of ``path``, memoized by (real path, size, mtime, inode).

    Hashing a multi-GB GGUF takes seconds; every trial resolves the model, so remember it.
    The memo is only a shortcut: a changed file has another stat and is hashed again.
    """
    st = path.stat()
    real = str(path.resolve())
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = gguf_root / ".sha256-memo" / (hashlib.sha1(real.encode()).hexdigest() + ".json")
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if all(saved.get(k) == v for k, v in stamp.items()) and len(saved.get("sha256", "")) == 64:
            return str(saved["sha256"])
    sha = file_sha256(path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": sha}))
        os.replace(tmp, memo)
    return sha


def _is_complete(target: Path, sha: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((target / SOURCE_FILE).read_text())
        return info.get("gguf_sha256") == sha and info.get("format_version") == FORMAT_VERSION
    return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path``: one builder per node, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_build(target: Path, sha: str, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` once if it is not complete.

    Concurrent callers (Ray trials on one node) serialize on a lock file next to ``target``;
    the first builds into a temporary directory beside it and renames it into place, so nobody
    ever sees a half-written directory, and the others find it complete once they get the lock.
    ``build`` must write ``SOURCE_FILE`` with ``gguf_sha256`` and ``format_version``.
    """
    if _is_complete(target, sha):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, sha):  # built by another process while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):  # a builder that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if not _is_complete(tmp, sha):
                raise RuntimeError(f"build of {target} did not write a valid {SOURCE_FILE}")
            if target.exists():  # older format or damaged: move aside, then swap in
                old = target.parent / f".tmp-{target.name}-old-{os.getpid()}"
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


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
    _write_tokenizer_sidecar(out / TOKENIZER_SIDECAR, meta)

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
    sha = _cached_sha256(path, gguf_root)
    return cached_build(gguf_root / sha[:16], sha, lambda tmp: _build_model_dir(path, sha, tmp))
