"""GGUF metadata: a fast, exact reader and a key/value rewriter.

Metadata is parsed here with a small reader of our own instead of ``gguf.GGUFReader``: the
reader builds a numpy view per array element, which takes ~30 s for Gemma's 262,144-token
vocab (and transformers parses the file twice), while the format itself is simple.
:func:`read_gguf_metadata` is the project's one GGUF metadata reader: the exporter reads its
sidecar tokenizer and reads back the GGUFs it writes with it too.
"""

from __future__ import annotations

import math
import mmap
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValue, GGUFValueType

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


