"""Export a trained LoRA adapter: the adapter itself, a merged 16-bit HF model, GGUF files and
an Ollama ``Modelfile``, with read-back and llama.cpp checks.

The GGUF conversion is our own (``gguf.GGUFWriter``), written after what llama.cpp's
``convert_hf_to_gguf.py`` does for the supported architectures (qwen3, qwen2, llama, gemma3):

* tensor names through ``gguf.get_tensor_name_map``; 1-D tensors and ``*_norm.weight`` stay F32;
* llama: Q/K rows are permuted back to llama.cpp's interleaved RoPE layout (HF uses NEOX);
  llama3 RoPE scaling becomes a ``rope_freqs`` tensor;
* gemma3: every ``*norm.weight`` gets +1 (HF's ``Gemma3RMSNorm`` computes ``x * (1 + w)``,
  llama.cpp multiplies by the stored weight), rows of the embedding beyond the tokenizer's
  vocabulary are dropped, sliding window and the local RoPE base are written;
* tied embeddings: no ``output.weight`` (llama.cpp reuses ``token_embd``).

The tokenizer comes verbatim from a ``tokenizer.gguf`` sidecar when the base model has one
(see :mod:`grpo_ray.gguf_base`), else from the HF ``tokenizer.json`` (byte-level BPE, "gpt2").
K-quants (``q4_k_m`` ...) go through llama.cpp's own quantizer via llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from grpo_ray.gguf_base import (
    SOURCE_FILE,
    TOKENIZER_SIDECAR,
    read_gguf_metadata,
    read_tokenizer_kv,
    tokenizer_flags,
    write_tokenizer_kv,
)

if TYPE_CHECKING:
    from gguf import GGUFValue

log = logging.getLogger(__name__)

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
# llama.cpp's base GGUF + LoRA adapter against the merged HF model: the base may be quantized
# (its matmuls then also quantize activations), so less strict than the 0.99 of a float GGUF
LORA_MIN_CORR = 0.98


class ExportError(RuntimeError):
    """The export cannot be done, or a check of its output failed."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote (final paths under ``out_dir``) and what its checks measured."""

    out_dir: Path
    lora_dir: Path
    merged_dir: Path
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
            "merged_dir": rel(self.merged_dir),
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


# --------------------------------------------------------------------------------------------
# small helpers


def _llama_cpp():
    """The llama_cpp module, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        return None
    return llama_cpp


def llama_cpp_available() -> bool:
    return _llama_cpp() is not None


def _require_llama_cpp(what: str):
    mod = _llama_cpp()
    if mod is None:
        raise ExportError(
            f"{what} needs llama.cpp's Python bindings (llama-cpp-python), which are not installed; "
            "install the extra: pip install 'grpo-ray[llama]'"
        )
    return mod


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_architecture(model_dir: Path) -> tuple[str, dict[str, Any]]:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{model_dir} has no config.json (not a HF model directory)")
    cfg = _read_json(cfg_path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else f"<none; model_type={cfg.get('model_type')!r}>"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"unsupported architecture {arch!r} for GGUF export; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        )
    return arch, cfg


def _dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@contextlib.contextmanager
def _capture_fd2() -> Iterator[Callable[[], str]]:
    """Redirect the C-level stderr (llama.cpp's logs) to a temp file; yield a reader of it."""
    import sys

    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            tmp.flush()
            tmp.seek(0)
            return tmp.read().decode("utf-8", "replace")

        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@contextlib.contextmanager
def _gguf_errors() -> Iterator[None]:
    """Report a malformed GGUF (``ValueError`` from :mod:`grpo_ray.gguf_base`'s reader) as an ExportError."""
    try:
        yield
    except ValueError as e:
        raise ExportError(str(e)) from e


# --------------------------------------------------------------------------------------------
# HF -> GGUF conversion


def _gguf_types(name: str):
    """(tensor quantization type, file type) that llama.cpp expects for a float/q8_0 export."""
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    }[name]


def _rope(h: dict[str, Any], default_theta: float) -> tuple[dict[str, Any], float, float | None]:
    """(full-attention rope params, rope theta, sliding-attention rope theta) for old and new configs."""
    rp = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        full = dict(rp.get("full_attention") or {})
        swa = dict(rp.get("sliding_attention") or {})
    else:
        full, swa = rp, {}
    theta = full.get("rope_theta", h.get("rope_theta", default_theta))
    swa_theta = swa.get("rope_theta", h.get("rope_local_base_freq"))
    if "rope_type" not in full and "type" in full:
        full["rope_type"] = full["type"]
    return full, float(theta), (float(swa_theta) if swa_theta is not None else None)


def _llama3_rope_factors(rp: dict[str, Any], theta: float, dim: int) -> np.ndarray:
    """Port of convert_hf_to_gguf's LlamaModel.generate_extra_tensors (llama3 RoPE scaling)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rp.get("factor", 8.0)
    low = rp.get("low_freq_factor", 1.0)
    high = rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF (NEOX halves) -> llama.cpp (interleaved) rows for llama Q/K; same as convert's permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _detect_pre(tok_json: dict[str, Any], arch: str) -> str:
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


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


@dataclass
class _TensorPlan:
    hf_name: str | None  # None: generated tensor
    gguf_name: str
    shape: tuple[int, ...]  # logical (numpy order) after the transform
    qtype: Any
    rows: int | None = None  # keep only the first rows (vocab trim)
    generated: np.ndarray | None = None


class GGUFSource:
    """A merged HF model directory prepared for writing GGUF files of one or more types."""

    def __init__(self, model_dir: Path, *, chat_template: str | None = None, name: str = "model"):
        import gguf
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        self.hf_arch, self.cfg = _hf_architecture(self.model_dir)
        self.arch = SUPPORTED_ARCHITECTURES[self.hf_arch]
        self.name = name
        h = self.hparams = {**self.cfg, **(self.cfg.get("text_config") or {})}
        self.gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch)
        self.n_layer = int(h["num_hidden_layers"])
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layer)

        # tensors -> file
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"no *.safetensors in {self.model_dir}")
        self.index: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.index[k] = f
                    self.shapes[k] = tuple(st.get_slice(k).get_shape())
        emb = next((k for k in self.index if k.endswith("embed_tokens.weight")), None)
        if emb is None:
            raise ExportError(f"no embed_tokens.weight among the tensors of {self.model_dir}")
        self.embed_rows = self.shapes[emb][0]

        # tokenizer
        self.chat_template = chat_template
        with _gguf_errors():
            sidecar_kv = read_tokenizer_kv(self.model_dir)
        if sidecar_kv is not None:
            self._use_sidecar_tokenizer(sidecar_kv)
        else:
            self._load_hf_tokenizer()
        if self.n_vocab > self.embed_rows:
            raise ExportError(
                f"tokenizer has {self.n_vocab} tokens but the embedding only {self.embed_rows} rows"
            )
        self.plan_base = self._plan()

    # ---- tokenizer ----
    def _use_sidecar_tokenizer(self, kv: dict[str, GGUFValue]) -> None:
        """Take the tokenizer verbatim from the ``tokenizer.gguf`` sidecar's ``kv`` (see gguf_base)."""
        import gguf

        if gguf.Keys.Tokenizer.LIST not in kv:
            raise ExportError(f"{self.model_dir / TOKENIZER_SIDECAR} has no {gguf.Keys.Tokenizer.LIST}")
        self.n_vocab = len(kv[gguf.Keys.Tokenizer.LIST].value)
        # every tokenizer.* field but the chat template(s): ours replaces them (see _add_kv)
        self.tokenizer_kvs = {k: v for k, v in kv.items() if not k.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE)}
        self.special_vocab = None
        self.tokenizer_source = TOKENIZER_SIDECAR
        model = kv.get(gguf.Keys.Tokenizer.MODEL)
        self.tokenizer_model = model.value if model is not None else "?"
        if self.chat_template is None:
            self.chat_template = self._hf_chat_template() or tokenizer_flags(kv).chat_template

    def _hf_chat_template(self) -> str | None:
        try:
            from transformers import AutoTokenizer

            t = AutoTokenizer.from_pretrained(self.model_dir).chat_template
            return t if isinstance(t, str) else None
        except Exception:  # pragma: no cover - tokenizer-less dir
            return None

    def _load_hf_tokenizer(self) -> None:
        import gguf
        from transformers import AutoTokenizer

        tj_path = self.model_dir / "tokenizer.json"
        if not tj_path.is_file():
            raise ExportError(
                f"{self.model_dir} has neither {TOKENIZER_SIDECAR} nor tokenizer.json; cannot write the GGUF tokenizer"
            )
        tj = _read_json(tj_path)
        model_type = (tj.get("model") or {}).get("type")
        text = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
        if model_type != "BPE" or '"ByteLevel"' not in text:
            raise ExportError(
                f"tokenizer.json of {self.model_dir} is {model_type!r} without byte-level pre-tokenization; only "
                f"byte-level BPE is converted from tokenizer.json (SentencePiece models such as Gemma need the "
                f"{TOKENIZER_SIDECAR} sidecar that grpo_ray.gguf_base writes)"
            )
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        vocab: dict[str, int] = tok.get_vocab()
        n_rows = self.embed_rows
        if max(vocab.values()) >= n_rows:
            raise ExportError(f"tokenizer ids go up to {max(vocab.values())} but the embedding has {n_rows} rows")
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        added_dec = tok.added_tokens_decoder
        tokens: list[str] = []
        toktypes: list[int] = []
        for i in range(n_rows):  # pad like convert_hf_to_gguf to the embedding rows
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                toktypes.append(gguf.TokenType.UNUSED)
                continue
            token = reverse[i]
            if token in added:
                if i in added_dec and not added_dec[i].normalized:
                    token = tok.decode(tok.encode(token, add_special_tokens=False))
                if (i in added_dec and added_dec[i].special) or _looks_special(token):
                    toktypes.append(gguf.TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    toktypes.append(gguf.TokenType.USER_DEFINED)
            else:
                toktypes.append(gguf.TokenType.NORMAL)
            tokens.append(token)
        self.n_vocab = len(tokens)
        self.tokenizer_pre = _detect_pre(tj, self.arch)
        VT = gguf.GGUFValueType
        self.tokenizer_kvs = {
            gguf.Keys.Tokenizer.MODEL: gguf.GGUFValue("gpt2", VT.STRING),
            gguf.Keys.Tokenizer.PRE: gguf.GGUFValue(self.tokenizer_pre, VT.STRING),
            gguf.Keys.Tokenizer.LIST: gguf.GGUFValue(tokens, VT.ARRAY, VT.STRING),
            gguf.Keys.Tokenizer.TOKEN_TYPE: gguf.GGUFValue([int(t) for t in toktypes], VT.ARRAY, VT.INT32),
        }
        sv = gguf.SpecialVocab(self.model_dir, load_merges=True, n_vocab=len(tokens))
        if not sv.merges:
            raise ExportError(f"no BPE merges found in {tj_path}")
        # what the HF tokenizer really does when asked to add special tokens
        plain = tok("a", add_special_tokens=False)["input_ids"]
        full = tok("a", add_special_tokens=True)["input_ids"]
        bos, eos = tok.bos_token_id, tok.eos_token_id
        sv.add_special_token["bos"] = bool(bos is not None and len(full) > len(plain) and full[0] == bos)
        sv.add_special_token["eos"] = bool(eos is not None and full[-1] == eos and (not plain or plain[-1] != eos))
        for typ, tid in (("bos", bos), ("eos", eos), ("pad", tok.pad_token_id), ("unk", tok.unk_token_id)):
            if tid is not None:
                sv.special_token_ids.setdefault(typ, int(tid))
        sv.chat_template = None  # ours is written separately
        self.special_vocab = sv
        self.tokenizer_source = "tokenizer.json"
        self.tokenizer_model = "gpt2"
        if self.chat_template is None and isinstance(tok.chat_template, str):
            self.chat_template = tok.chat_template

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp adds BOS for the GGUFs written from this source."""
        if self.special_vocab is not None:
            return bool(self.special_vocab.add_special_token.get("bos"))
        return tokenizer_flags(self.tokenizer_kvs).add_bos

    # ---- tensors ----
    def _plan(self) -> list[_TensorPlan]:
        import gguf

        h = self.hparams
        allowed = set(gguf.MODEL_TENSORS[self.gguf_arch])
        tied = bool(h.get("tie_word_embeddings", self.arch == "gemma3"))
        plans: list[_TensorPlan] = []
        for name, shape in self.shapes.items():
            if name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
                continue
            if name == "lm_head.weight" and tied:
                continue
            mapped = self.tensor_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is None or mapped[0] not in allowed:
                raise ExportError(
                    f"tensor {name!r} has no {self.arch} GGUF counterpart (is this a plain "
                    f"{self.hf_arch} checkpoint? vision towers / extra heads are not exported)"
                )
            ttype, gname = mapped
            rows = None
            shape = tuple(shape)
            if ttype in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT) and shape[0] > self.n_vocab:
                rows = self.n_vocab  # drop rows the tokenizer never produces (gemma3 convert does this)
                shape = (rows,) + shape[1:]
            plans.append(_TensorPlan(hf_name=name, gguf_name=gname, shape=shape, qtype=None, rows=rows))

        if self.arch == "llama":
            rp, theta, _ = _rope(h, 10000.0)
            if str(rp.get("rope_type", "")).lower() == "llama3":
                dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
                fac = _llama3_rope_factors(rp, theta, int(dim))
                gname = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
                plans.append(_TensorPlan(None, gname, fac.shape, None, generated=fac))

        def order(p: _TensorPlan) -> tuple[int, str]:
            parts = p.gguf_name.split(".")
            bid = int(parts[1]) if parts[0] == "blk" else (-1 if p.gguf_name.startswith("token_embd") else 10**6)
            return bid, p.gguf_name

        plans.sort(key=order)
        names = [p.gguf_name for p in plans]
        if len(set(names)) != len(names):
            raise ExportError("duplicate GGUF tensor names after mapping")
        return plans

    def tensor_names(self) -> list[str]:
        return [p.gguf_name for p in self.plan_base]

    def _qtype_for(self, p: _TensorPlan, gguf_type: str):
        import gguf

        if len(p.shape) <= 1 or p.gguf_name.endswith("_norm.weight"):
            return gguf.GGMLQuantizationType.F32
        qt = _gguf_types(gguf_type)[0]
        if qt not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            block = gguf.GGML_QUANT_SIZES[qt][0]
            if p.shape[-1] % block != 0:  # like convert: QuantError -> F16
                return gguf.GGMLQuantizationType.F16
        return qt

    def _load(self, p: _TensorPlan) -> np.ndarray:
        from safetensors import safe_open

        if p.generated is not None:
            return p.generated.astype(np.float32)
        assert p.hf_name is not None
        with safe_open(str(self.index[p.hf_name]), framework="pt") as st:
            t = st.get_tensor(p.hf_name)
        data = t.float().numpy()
        if p.rows is not None:
            data = data[: p.rows]
        name = p.hf_name
        h = self.hparams
        if self.arch == "llama":
            n_head = int(h["num_attention_heads"])
            n_kv = int(h.get("num_key_value_heads") or n_head)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, n_head, n_kv)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm: x * (1 + w)
        return np.ascontiguousarray(data, dtype=np.float32)

    # ---- KV ----
    def _add_kv(self, w, gguf_type: str) -> None:
        import gguf

        h = self.hparams
        arch = self.arch
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(self.name)
        w.add_file_type(_gguf_types(gguf_type)[1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        n_head = int(h["num_attention_heads"])
        n_kv = int(h.get("num_key_value_heads") or n_head)
        head_dim = int(h.get("head_dim") or (256 if arch == "gemma3" else h["hidden_size"] // n_head))
        w.add_block_count(self.n_layer)
        w.add_context_length(int(h.get("max_position_embeddings", 131072 if arch == "gemma3" else 4096)))
        w.add_embedding_length(int(h["hidden_size"]))
        w.add_feed_forward_length(int(h["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(float(h.get("rms_norm_eps", 1e-6)))

        rp, theta, swa_theta = _rope(h, 1_000_000.0 if arch == "gemma3" else 10000.0)
        w.add_rope_freq_base(theta)
        rope_type = rp.get("rope_type")
        factor = rp.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
            if (v := rp.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(float(v))
            if (v := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(float(v))
            if (v := rp.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(float(v))
            if (v := rp.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(float(v))
        elif rope_type not in (None, "default") and not (rope_type == "llama3" and arch == "llama"):
            raise ExportError(f"RoPE scaling {rope_type!r} of {self.hf_arch} is not supported by this exporter")

        if arch == "llama":
            w.add_vocab_size(self.n_vocab)
            w.add_rope_dimension_count(head_dim)
        if arch == "gemma3":
            if h.get("attn_logit_softcapping") is not None:
                raise ExportError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")
            if fsc := h.get("final_logit_softcapping"):
                w.add_final_logit_softcapping(float(fsc))
            # llama.cpp's gemma3 scales queries by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for 27B)
            expect = (h["hidden_size"] // n_head) if self.n_layer == 62 else head_dim
            qpas = h.get("query_pre_attn_scalar", expect)
            if qpas is not None and int(qpas) != int(expect):
                raise ExportError(
                    f"gemma3 query_pre_attn_scalar={qpas} differs from what llama.cpp uses ({expect}); "
                    "the GGUF would compute different attention"
                )
            layer_types = h.get("layer_types")
            pattern = h.get("sliding_window_pattern")
            if h.get("sliding_window") and pattern != 1 and (
                layer_types is None or "sliding_attention" in layer_types
            ):
                w.add_sliding_window(int(h["sliding_window"]))
                if swa_theta is not None:
                    w.add_rope_freq_base_swa(swa_theta)
                if layer_types:
                    is_swa = [t == "sliding_attention" for t in layer_types]
                    default = [(i % 6) < 5 for i in range(self.n_layer)]  # llama.cpp's default pattern 6
                    if is_swa != default:
                        w.add_sliding_window_pattern(is_swa)
        # tokenizer
        write_tokenizer_kv(w, self.tokenizer_kvs)
        if self.special_vocab is not None:
            self.special_vocab.add_to_gguf(w, quiet=True)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    def write(self, out_path: Path, gguf_type: str) -> dict[str, Any]:
        """Write one GGUF (f32 / f16 / bf16 / q8_0), streaming tensor by tensor."""
        import gguf

        if gguf_type not in NATIVE_TYPES:
            raise ExportError(f"write() handles {NATIVE_TYPES}, not {gguf_type!r}")
        out_path = Path(out_path)
        w = gguf.GGUFWriter(out_path, self.arch)
        try:
            self._add_kv(w, gguf_type)
            plans = []
            for p in self.plan_base:
                qt = self._qtype_for(p, gguf_type)
                if qt == gguf.GGMLQuantizationType.F32:
                    dtype, shape, nbytes = np.float32, p.shape, int(np.prod(p.shape)) * 4
                elif qt == gguf.GGMLQuantizationType.F16:
                    dtype, shape, nbytes = np.float16, p.shape, int(np.prod(p.shape)) * 2
                else:
                    shape = tuple(gguf.quant_shape_to_byte_shape(p.shape, qt))
                    dtype, nbytes = np.uint8, int(np.prod(shape))
                w.add_tensor_info(p.gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=qt)
                plans.append((p, qt))
            w.write_header_to_file(path=out_path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p, qt in plans:
                data = self._load(p)
                if tuple(data.shape) != tuple(p.shape):
                    raise ExportError(f"{p.hf_name}: shape {data.shape} != planned {p.shape}")
                w.write_tensor_data(gguf.quants.quantize(data, qt))
        finally:
            w.close()
        return {"n_tensors": len(self.plan_base), "bytes": out_path.stat().st_size}


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
    hf_arch, cfg = _hf_architecture(Path(base_model_dir))
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    h = {**cfg, **(cfg.get("text_config") or {})}
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tensor_map = gguf.get_tensor_name_map(gguf_arch, int(h["num_hidden_layers"]))
    allowed = set(gguf.MODEL_TENSORS[gguf_arch])

    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise ExportError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    lc = _read_json(cfg_path)
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
        with _gguf_errors():
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
                b = _permute(b, n_head, n_head)
            elif arch == "llama" and module.endswith("k_proj"):
                b = _permute(b, n_head, n_kv)
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
    with _gguf_errors():  # read back
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


def quantize_gguf(src: Path, dst: Path, gguf_type: str, nthread: int | None = None) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from a float GGUF to ``gguf_type`` (e.g. q4_k_m)."""
    lc = _require_llama_cpp(f"GGUF type {gguf_type!r}")
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if ftype is None:
        raise ExportError(f"llama.cpp has no file type for {gguf_type!r}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread or os.cpu_count() or 1
    with _capture_fd2() as read:
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ExportError(f"llama.cpp failed to quantize {src.name} to {gguf_type} (rc={rc}):\n{_tail(read())}")


# --------------------------------------------------------------------------------------------
# checks


_REQUIRED_ARCH_KV = (
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base",
)


def read_back(path: Path, expected_tensors: list[str], arch: str, *, gguf_reader_max_tokens: int = 65536
              ) -> dict[str, Any]:
    """Read ``path`` back and verify its tensors, layout and required KV fields.

    The file is parsed by :func:`grpo_ray.gguf_base.read_gguf_metadata`, which also checks the
    layout; when its vocabulary is small (the reference reader needs ~30 s for a 262k
    vocabulary) ``gguf.GGUFReader`` parses it too and must agree.
    """
    import gguf

    with _gguf_errors():
        meta = read_gguf_metadata(path)
    names = [t.name for t in meta.tensors]
    if sorted(names) != sorted(expected_tensors):
        missing = sorted(set(expected_tensors) - set(names))
        extra = sorted(set(names) - set(expected_tensors))
        raise ExportError(f"{path.name}: tensors differ from those written; missing {missing}, extra {extra}")
    got_arch = meta.get("general.architecture")
    if got_arch != arch:
        raise ExportError(f"{path.name}: general.architecture is {got_arch!r}, expected {arch!r}")
    required = ["general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.tokens"] + [
        f"{arch}.{k}" for k in _REQUIRED_ARCH_KV
    ]
    missing_kv = [k for k in required if k not in meta.kv]
    if missing_kv:
        raise ExportError(f"{path.name}: missing KV fields {missing_kv}")
    n_tok = len(meta.get("tokenizer.ggml.tokens"))
    emb = next(t for t in meta.tensors if t.name == "token_embd.weight")
    if emb.dims[-1] != n_tok:  # ggml order: (n_embd, n_vocab)
        raise ExportError(f"{path.name}: token_embd has {emb.dims[-1]} rows for {n_tok} tokens")
    out = {"n_tensors": len(names), "n_kv": len(meta.kv), "n_tokens": n_tok,
           "tensor_types": sorted({t.type.name for t in meta.tensors}), "reader": "read_gguf_metadata"}
    if n_tok <= gguf_reader_max_tokens:
        r = gguf.GGUFReader(path)
        r_tensors = [(t.name, t.tensor_type, int(t.data_offset)) for t in r.tensors]
        ours = [(t.name, t.type, meta.data_offset + t.offset) for t in meta.tensors]
        r_keys = [k for k in r.fields if not k.startswith("GGUF.")]
        if r_tensors != ours or r_keys != list(meta.kv):
            raise ExportError(f"{path.name}: gguf.GGUFReader and read_gguf_metadata disagree")
        out["reader"] += "+gguf.GGUFReader"
    return out


def _sample_texts(tokenizer, chat_template: str | None, system_prompt: str | None) -> list[str]:
    texts = [
        "What is 12 + 30?\n<think>Let me add: 12 + 30 = 42.</think><SOLUTION>42</SOLUTION>",
        "  two spaces, a tab\tand\n\nnew lines\r\n; 3.14159 1234567 -17 x^2",
        "Unicode: café naïve Übermaß 日本語 Привет 🚀 — ∑ x² ≤ ∞",
        "it's don't I'll 'quoted' \"double\" (parens) [brackets] {braces} <tags>",
    ]
    if chat_template:
        try:
            msgs = [{"role": "user", "content": "Compute 7 * 6 and show your working."}]
            if system_prompt:
                msgs.insert(0, {"role": "system", "content": system_prompt})
            texts.insert(
                0, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                 chat_template=chat_template)
            )
        except Exception as e:  # pragma: no cover - exotic templates
            log.warning("could not render the chat template for the checks: %s", e)
    return texts


def greedy_agreement(reference: Path, candidate: Path, prompts: list[str], max_tokens: int = 32,
                     candidate_lora: Path | None = None) -> dict[str, Any]:
    """How often ``candidate`` (a quantized GGUF) answers exactly as ``reference`` (16-bit) does.

    ``candidate_lora``: an adapter GGUF llama.cpp applies to ``candidate`` (base GGUF + LoRA).

    Both run greedily in llama.cpp on the same prompts; the rate is the share of prompts whose
    completions are identical, a strict, deployment-level measure of what quantization changed.
    """
    llama_cpp = _require_llama_cpp("the quantization agreement check")

    def answers(path: Path, lora: Path | None = None) -> list[str]:
        with _capture_fd2():  # llama.cpp prints its load log to fd 2
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, verbose=False, seed=0,
                                  lora_path=str(lora) if lora is not None else None)
        try:
            return [llm(p, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"] for p in prompts]
        finally:
            llm.close()

    ref, cand = answers(reference), answers(candidate, candidate_lora)
    same = sum(a == b for a, b in zip(ref, cand))
    return {"prompts": len(prompts), "identical": same, "rate": same / len(prompts) if prompts else None,
            "max_tokens": max_tokens, "reference": reference.name, "candidate": candidate.name,
            **({"candidate_lora": candidate_lora.name} if candidate_lora is not None else {})}


def compare_with_llama_cpp(
    gguf_path: Path, hf_dir: Path, *, chat_template: str | None = None, system_prompt: str | None = None,
    texts: list[str] | None = None, max_tokens: int = 96, hf_model=None, tokenizer=None,
    hf_logits_cache: dict | None = None, lora_path: Path | None = None,
) -> dict[str, Any]:
    """Load ``gguf_path`` in llama.cpp; compare its tokenization and logits with the HF model in ``hf_dir``.

    With ``lora_path`` (an adapter GGUF, see :func:`write_lora_gguf`) llama.cpp applies it to
    ``gguf_path`` at load, as ``--lora`` does.

    Returns numbers only; :func:`_judge` decides pass/fail.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc = _require_llama_cpp("the llama.cpp check")
    tok = tokenizer or AutoTokenizer.from_pretrained(hf_dir)
    texts = texts or _sample_texts(tok, chat_template, system_prompt)
    with _capture_fd2() as read:
        try:
            llm = lc.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=True, n_threads=None,
                           lora_path=str(lora_path) if lora_path is not None else None)
        except Exception as e:
            raise ExportError(f"llama.cpp could not load {gguf_path.name}: {e}\n{_tail(read())}") from e
        try:
            tok_mismatch = []
            n_cases = 0
            for text in texts:
                for special in (False, True):
                    n_cases += 1
                    hf_ids = tok(text, add_special_tokens=special)["input_ids"]
                    ll_ids = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)
                    if list(hf_ids) != list(ll_ids):
                        tok_mismatch.append(
                            {"text": text, "add_special": special, "hf": hf_ids[:40], "llama": ll_ids[:40]}
                        )

            # the same ids go to both models (the rendered template carries its own BOS, if any)
            ids = list(tok(texts[0], add_special_tokens=False)["input_ids"])[:max_tokens]
            llm.reset()
            llm.eval(ids)
            ll = np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()
    cache = hf_logits_cache if hf_logits_cache is not None else {}
    hf = cache.get(tuple(ids))
    if hf is None:
        model = hf_model
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            model.eval()
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits[0].float().numpy()
        cache[tuple(ids)] = hf
    n = min(hf.shape[-1], ll.shape[-1])
    hf, ll = hf[:, :n], ll[:, :n]
    diff = np.abs(hf - ll)
    corrs = [float(np.corrcoef(hf[i], ll[i])[0, 1]) for i in range(len(ids))]
    top_hf, top_ll = hf.argmax(-1), ll.argmax(-1)
    # a top-1 disagreement counts only when llama.cpp's pick is clearly worse on the HF logits
    tol = 2.0 * float(diff.max())
    top1_ok = [bool(a == b or hf[i, a] - hf[i, b] <= tol) for i, (a, b) in enumerate(zip(top_hf, top_ll))]
    return {
        "gguf": gguf_path.name,
        **({"lora": Path(lora_path).name} if lora_path is not None else {}),
        "tokenization_cases": n_cases,
        "tokenization_mismatches": tok_mismatch,
        "n_positions": len(ids),
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "logits_scale": float(np.abs(hf).max()),
        "logits_min_corr": float(min(corrs)),
        "top1_agreement": float(np.mean(top_hf == top_ll)),
        "top1_last_equal": bool(top_hf[-1] == top_ll[-1]),
        "top1_ok": bool(all(top1_ok)),
    }


def _judge(r: dict[str, Any], min_corr: float) -> list[str]:
    problems = []
    if r["tokenization_mismatches"]:
        m = r["tokenization_mismatches"][0]
        problems.append(
            f"llama.cpp tokenization differs from the HF tokenizer in {len(r['tokenization_mismatches'])}/"
            f"{r['tokenization_cases']} cases, e.g. {m['text']!r} (add_special={m['add_special']}): "
            f"hf={m['hf']} llama={m['llama']}"
        )
    if r["logits_min_corr"] < min_corr:
        problems.append(f"logits correlation {r['logits_min_corr']:.4f} < {min_corr}")
    if not r["top1_ok"]:
        problems.append(f"top-1 next token differs (agreement {r['top1_agreement']:.2f})")
    return problems


# --------------------------------------------------------------------------------------------
# Ollama Modelfile


def _go_lit(s: str) -> str:
    return "" if not s else "{{ " + json.dumps(s, ensure_ascii=False) + " }}"


def _template_segments(tok, chat_template: str) -> dict[str, Any] | None:
    """Split the Jinja chat template's output into literal pieces around system/user/assistant turns."""
    S, U1, A1, U2 = "QXSYSQX", "QXU1QX", "QXA1QX", "QXU2QX"

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=chat_template)

    def pieces(text: str, marks: list[str]) -> list[str] | None:
        out, pos = [], 0
        for m in marks:
            j = text.find(m, pos)
            if j < 0:
                return None
            out.append(text[pos:j])
            pos = j + len(m)
        out.append(text[pos:])
        return out

    sys_m = {"role": "system", "content": S}
    u1, a1, u2 = ({"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                  {"role": "user", "content": U2})
    try:
        r1 = pieces(render([sys_m, u1, a1, u2], False), [S, U1, A1, U2])
        r2 = render([sys_m, u1, a1, u2], True)
        r4 = pieces(render([sys_m, u1, a1], False), [S, U1, A1])
        r5 = pieces(render([{"role": "user", "content": U1}], True), [U1])
    except Exception as e:  # noqa: BLE001
        log.warning("chat template could not be rendered for the Modelfile: %s", e)
        return None
    if r1 is None or r4 is None:
        return None
    pre, s1, s2, s3, s4 = r1
    u_post = s4
    full1 = render([sys_m, u1, a1, u2], False)
    if not r2.startswith(full1):
        return None
    gen = r2[len(full1):]
    a_post = r4[-1]
    if not s2.startswith(u_post) or not s3.startswith(a_post):
        return None
    a_pre = s2[len(u_post):]
    u_pre = s3[len(a_post):]
    if not s1.endswith(u_pre):
        return None
    sys_end = s1[: len(s1) - len(u_pre)] if u_pre else s1
    default_system = None
    if r5 is not None:
        head = r5[0]
        if head.startswith(pre) and head.endswith(sys_end + u_pre) and len(head) > len(pre) + len(sys_end + u_pre):
            default_system = head[len(pre): len(head) - len(sys_end + u_pre)]
    return {"pre": pre, "sys_end": sys_end, "u_pre": u_pre, "u_post": u_post, "a_pre": a_pre,
            "a_post": a_post, "gen": gen, "default_system": default_system}


def ollama_template(seg: dict[str, Any], strip_bos: str | None = None) -> str:
    """Go template (Ollama) equivalent of the segmented chat template."""
    pre = seg["pre"]
    if strip_bos and pre.startswith(strip_bos):
        pre = pre[len(strip_bos):]  # llama.cpp adds BOS itself when the GGUF says add_bos
    d = seg["default_system"]
    if d is not None:
        system = (
            f"{_go_lit(pre)}{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{_go_lit(d)}{{{{ end }}}}"
            f"{_go_lit(seg['sys_end'])}"
        )
    else:
        system = f"{{{{ if .System }}}}{_go_lit(pre)}{{{{ .System }}}}{_go_lit(seg['sys_end'])}{{{{ end }}}}"
    up, upo, ap, apo, gen = (_go_lit(seg[k]) for k in ("u_pre", "u_post", "a_pre", "a_post", "gen"))
    return (
        "{{- if .Messages }}\n"
        f"{{{{- /* system */ -}}}}{system}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f"{{{{- if eq .Role \"user\" }}}}{up}{{{{ .Content }}}}{upo}{{{{ if $last }}}}{gen}{{{{ end }}}}\n"
        f"{{{{- else if eq .Role \"assistant\" }}}}{ap}{{{{ .Content }}}}{{{{ if not $last }}}}{apo}{{{{ end }}}}\n"
        "{{- end }}\n"
        "{{- end }}\n"
        "{{- else }}\n"
        f"{{{{- /* legacy prompt */ -}}}}{system}{up}{{{{ .Prompt }}}}{upo}{gen}\n"
        "{{- end }}{{ .Response }}"
    )


def _modelfile(gguf_name: str, template: str | None, system: str | None, stop: list[str],
               adapter: str | None = None) -> str:
    for label, text in (("TEMPLATE", template), ("SYSTEM", system)):
        if text and '"""' in text:
            raise ExportError(f'the Modelfile {label} cannot contain """ (Ollama\'s quoting)')
    lines = ["# Ollama Modelfile written by grpo-ray export", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in stop:
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _write_modelfile(path: Path, gguf_name: str, tok, chat_template: str | None, system_prompt: str | None,
                     add_bos: bool, adapter: str | None = None) -> dict[str, Any]:
    seg = _template_segments(tok, chat_template) if chat_template else None
    if seg is not None:
        template = ollama_template(seg, strip_bos=tok.bos_token if add_bos and tok.bos_token else None)
        system = system_prompt if system_prompt is not None else seg["default_system"]
        exact = True
    else:
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}{{ .Response }}"
        system = system_prompt
        exact = False
    stop = [tok.eos_token] if tok.eos_token else []
    path.write_text(_modelfile(gguf_name, template, system, stop, adapter), encoding="utf-8")
    info: dict[str, Any] = {"template_mirrors_chat_template": exact, "stop": stop}
    if adapter:
        info.update({"from": gguf_name, "adapter": adapter})
    return info


# --------------------------------------------------------------------------------------------
# the export


def _merge(base_model_dir: Path, adapter_dir: Path, merged_dir: Path, hf_arch: str, cfg: dict[str, Any],
           chat_template: str | None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "")
    # gemma3 activations overflow fp16; it is always bf16
    is_bf16 = "bfloat16" in base_dtype or SUPPORTED_ARCHITECTURES[hf_arch] == "gemma3"
    dtype = torch.bfloat16 if is_bf16 else torch.float16
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged_dir.mkdir(parents=True)
    merged.save_pretrained(merged_dir)
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(merged_dir)
    sidecar = base_model_dir / TOKENIZER_SIDECAR
    if sidecar.is_file():
        shutil.copy2(sidecar, merged_dir / TOKENIZER_SIDECAR)
    del merged, peft_model, model
    return ("bfloat16" if dtype == torch.bfloat16 else "float16"), tok


def _copy_adapter(adapter_dir: Path, lora_dir: Path) -> None:
    lora_dir.mkdir(parents=True)
    need = ["adapter_config.json"]
    weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / n).is_file()]
    if not (adapter_dir / "adapter_config.json").is_file() or not weights:
        raise ExportError(f"{adapter_dir} is not a PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    for n in need + weights[:1]:
        shutil.copy2(adapter_dir / n, lora_dir / n)


def _gguf_file_type_name(path: Path) -> str:
    """``general.file_type`` of a GGUF as our type name (``q4_k_m``, ``f16`` ...), or "unknown"."""
    import gguf

    with _gguf_errors():
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
        _require_llama_cpp("GGUF types " + ", ".join(t for t in types if t in LLAMA_CPP_TYPES))
    hf_arch, cfg = _hf_architecture(base_model_dir)
    if base_gguf is not None:
        base_gguf = Path(base_gguf)
        if not base_gguf.is_file():
            raise ExportError(f"base GGUF {base_gguf} does not exist")
        with _gguf_errors():
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
        _copy_adapter(adapter_dir, tmp / "lora")

        say("merging LoRA")
        merged_dtype, tok = _merge(base_model_dir, adapter_dir, tmp / "merged16", hf_arch, cfg, chat_template)

        if chat_template is None and isinstance(tok.chat_template, str):
            chat_template = tok.chat_template  # the base tokenizer's
        src = GGUFSource(tmp / "merged16", chat_template=chat_template, name=name)
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
        mf_info = _write_modelfile(tmp / "Modelfile", mf_gguf, tok, src.chat_template,
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

                hf_model = AutoModelForCausalLM.from_pretrained(tmp / "merged16", dtype=torch.float32).eval()
                hf_cache: dict = {}
                if base_copy is not None and lora_path is not None:
                    say("checking llama.cpp base GGUF + LoRA adapter against HF")
                    r = compare_with_llama_cpp(base_copy, tmp / "merged16", chat_template=src.chat_template,
                                               system_prompt=system_prompt, tokenizer=tok, hf_model=hf_model,
                                               hf_logits_cache=hf_cache, lora_path=lora_path)
                    checks["llama_cpp_lora"] = r
                    problems = _judge(r, min_corr=LORA_MIN_CORR)
                    if problems:
                        raise ExportError(f"llama.cpp check of {base_copy.name} + {lora_path.name} failed: "
                                          + "; ".join(problems))
            if llama_cpp_available() and ref_path is not None:
                say(f"checking llama.cpp against HF ({ref_type})")
                r = compare_with_llama_cpp(ref_path, tmp / "merged16", chat_template=src.chat_template,
                                           system_prompt=system_prompt, tokenizer=tok, hf_model=hf_model,
                                           hf_logits_cache=hf_cache)
                r["gguf_type"] = ref_type
                checks["llama_cpp"] = r
                problems = _judge(r, min_corr=0.99)
                if problems:
                    raise ExportError(f"llama.cpp check of {ref_path.name} failed: " + "; ".join(problems))
                # the other files: they must load and run; their numbers are recorded, not judged
                # (a quantized tiny random model legitimately drifts), except the tokenizer
                for t, p in ggufs.items():
                    if p == ref_path:
                        continue
                    say(f"checking llama.cpp loads {t}")
                    q = compare_with_llama_cpp(p, tmp / "merged16", chat_template=src.chat_template,
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

        say("finalizing")
        final = {t: out_dir / p.name for t, p in ggufs.items()}
        sizes = {p.name: _dir_size(p) for p in sorted(tmp.iterdir()) if not p.name.startswith(".")}
        result = ExportResult(
            out_dir=out_dir, lora_dir=out_dir / "lora", merged_dir=out_dir / "merged16", ggufs=final,
            modelfile=out_dir / "Modelfile", modelfile_gguf=mf_gguf, architecture=src.arch,
            hf_architecture=hf_arch, merged_dtype=merged_dtype, tokenizer_source=src.tokenizer_source,
            sizes=sizes, checks=checks,
            base_gguf=out_dir / base_copy.name if base_copy is not None else None,
            lora_gguf=out_dir / lora_path.name if lora_path is not None else None,
        )
        src_info = base_model_dir / SOURCE_FILE
        extra = {"base_source": _read_json(src_info)} if src_info.is_file() else {}
        result.seconds = time.time() - t0
        (tmp / "export.json").write_text(json.dumps({**result.to_dict(), **extra}, indent=2, default=str))

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
