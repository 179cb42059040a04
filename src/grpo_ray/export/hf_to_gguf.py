"""The HF -> GGUF writer: a merged HF model directory as GGUF files (f32, f16, bf16, q8_0).

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
(see :mod:`grpo_ray.gguf.tokenizer`), else from the HF ``tokenizer.json`` (byte-level BPE, "gpt2").
K-quants (``q4_k_m`` ...) go through llama.cpp's own quantizer (:mod:`grpo_ray.export.llama_cpp`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grpo_ray.export.base import (
    NATIVE_TYPES,
    SUPPORTED_ARCHITECTURES,
    ExportError,
    gguf_errors,
    hf_architecture,
    read_json,
)
from grpo_ray.export.vocab import detect_pre, looks_special
from grpo_ray.gguf.tokenizer import TOKENIZER_SIDECAR, read_tokenizer_kv, tokenizer_flags, write_tokenizer_kv

if TYPE_CHECKING:
    from gguf import GGUFValue

log = logging.getLogger(__name__)


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


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF (NEOX halves) -> llama.cpp (interleaved) rows for llama Q/K; same as convert's permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        self.hf_arch, self.cfg = hf_architecture(self.model_dir)
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
        with gguf_errors():
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
        """Take the tokenizer verbatim from the ``tokenizer.gguf`` sidecar's ``kv`` (see grpo_ray.gguf.tokenizer)."""
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
        tj = read_json(tj_path)
        model_type = (tj.get("model") or {}).get("type")
        text = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
        if model_type != "BPE" or '"ByteLevel"' not in text:
            raise ExportError(
                f"tokenizer.json of {self.model_dir} is {model_type!r} without byte-level pre-tokenization; only "
                f"byte-level BPE is converted from tokenizer.json (SentencePiece models such as Gemma need the "
                f"{TOKENIZER_SIDECAR} sidecar that grpo_ray.gguf.hf_dir writes)"
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
                if (i in added_dec and added_dec[i].special) or looks_special(token):
                    toktypes.append(gguf.TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    toktypes.append(gguf.TokenType.USER_DEFINED)
            else:
                toktypes.append(gguf.TokenType.NORMAL)
            tokens.append(token)
        self.n_vocab = len(tokens)
        self.tokenizer_pre = detect_pre(tj, self.arch)
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
                data = permute_qk(data, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, n_head, n_kv)
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


