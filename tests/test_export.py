"""grpo_ray.export: LoRA merge, GGUF writer (qwen3/qwen2/llama/gemma3), llama.cpp checks, Modelfile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from grpo_ray.config.sections import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from grpo_ray.task import template  # noqa: E402
from grpo_ray.export import llama_cpp as export_llama_cpp  # noqa: E402
from grpo_ray.export import pipeline  # noqa: E402
from grpo_ray.export.checks import compare_with_llama_cpp, greedy_agreement, judge  # noqa: E402
from grpo_ray.export.hf_to_gguf import GGUFSource  # noqa: E402
from grpo_ray.export.lora_gguf import write_lora_gguf  # noqa: E402
from grpo_ray.export.modelfile import _template_segments, ollama_template  # noqa: E402
from grpo_ray.export.base import ExportError
from grpo_ray.export.pipeline import export_model  # noqa: E402
from grpo_ray.gguf.reader import read_gguf_metadata  # noqa: E402
from grpo_ray.tiny import build_tiny_model, build_tokenizer  # noqa: E402

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except ImportError:  # pragma: no cover - CI installs grpo-ray[llama]
    HAVE_LLAMA = False

needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python (grpo-ray[llama]) not installed")

CHAT_TEMPLATE = template.chat_template()
TOKENIZE_TEXTS = [
    "<think>Let me add 12 and 30.</think><SOLUTION>42</SOLUTION>",
    "What is 1234567 * 89?\n\nAnswer:\t3.14159 -17 x^2",
    "  leading spaces, trailing spaces   \r\n and 'quotes' don't I'll",
    "Unicode: café naïve Übermaß 日本語 Привет 🚀 ∑ x² ≤ ∞",
    "<|endoftext|>a special token in the middle<|endoftext|>",
]


def _make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # default init is zero: make the merge change the weights
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return _make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def exported(tiny_base, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "best"
    types = ["f16", "q8_0"] + (["q4_k_m"] if HAVE_LLAMA else [])
    messages: list[str] = []
    result = export_model(
        tiny_base, adapter, out, gguf_types=types, chat_template=CHAT_TEMPLATE,
        system_prompt=DEFAULT_SYSTEM_PROMPT, progress=messages.append,
    )
    return result, messages


@pytest.fixture(scope="module")
def merged_hf(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = exported
    model = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(result.merged_dir)


# ---------------------------------------------------------------------------------------------


def test_layout_and_export_json(exported):
    result, messages = exported
    out = result.out_dir
    assert (out / "lora" / "adapter_config.json").is_file()
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (result.merged_dir / f).is_file(), f
    assert set(result.ggufs) == {"f16", "q8_0"} | ({"q4_k_m"} if HAVE_LLAMA else set())
    for t, p in result.ggufs.items():
        assert p == out / f"model-{t}.gguf" and p.is_file()
    assert result.modelfile.is_file()
    assert result.architecture == "qwen3" and result.hf_architecture == "Qwen3ForCausalLM"
    assert result.merged_dtype == "float16"  # the tiny base is fp32 -> fp16
    assert result.tokenizer_source == "tokenizer.json"

    data = json.loads((out / "export.json").read_text())
    assert data["ggufs"] == {t: p.name for t, p in result.ggufs.items()}
    assert data["sizes"]["model-f16.gguf"] == result.ggufs["f16"].stat().st_size
    assert data["checks"]["read_back"]["f16"]["n_tensors"] == result.checks["read_back"]["f16"]["n_tensors"]

    assert "merging LoRA" in messages and "writing GGUF f16" in messages and "writing GGUF q8_0" in messages
    # nothing temporary left beside out_dir
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_merged_matches_peft_and_differs_from_base(exported, merged_hf, tiny_base, adapter):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, _ = exported
    merged, tok = merged_hf
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([tok("What is 7 * 6?<think>", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = peft_model(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)

    m = load_file(result.merged_dir / "model.safetensors")
    b = load_file(tiny_base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert m[key].dtype == torch.float16
    assert (m[key].float() - b[key].float()).abs().max() > 1e-2
    assert tok.chat_template == CHAT_TEMPLATE


def test_gguf_read_back(exported):
    result, _ = exported
    blk = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
           "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in blk
    }  # tied embeddings: no output.weight
    for t, p in result.ggufs.items():
        r = gguf.GGUFReader(p)
        assert {x.name for x in r.tensors} == expected, t
        assert r.fields["general.architecture"].contents() == "qwen3"
        assert r.fields["qwen3.block_count"].contents() == 2
        assert r.fields["qwen3.attention.head_count_kv"].contents() == 2
        assert r.fields["qwen3.attention.key_length"].contents() == 16
        assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
        assert r.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
        assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 0
        assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
        norms = [x for x in r.tensors if x.name.endswith("norm.weight")]
        assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in norms)
    q8 = gguf.GGUFReader(result.ggufs["q8_0"])
    assert any(x.tensor_type == gguf.GGMLQuantizationType.Q8_0 for x in q8.tensors)
    f16 = result.ggufs["f16"].stat().st_size
    assert result.ggufs["q8_0"].stat().st_size < f16
    if "q4_k_m" in result.ggufs:
        assert result.ggufs["q4_k_m"].stat().st_size < result.ggufs["q8_0"].stat().st_size


def test_fast_reader_agrees_with_gguf_reader(exported):
    result, _ = exported
    for t in ("f16", "q8_0"):
        path = result.ggufs[t]
        meta = read_gguf_metadata(path)
        r = gguf.GGUFReader(path)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        assert keys == list(meta.kv)
        for k in keys:
            f = r.fields[k]
            entry = meta.kv[k]
            val, vtype, sub = entry.value, entry.type, entry.sub_type  # strings come decoded
            assert vtype == f.types[0], k
            if vtype == gguf.GGUFValueType.ARRAY:
                assert sub == f.types[-1], k
            assert val == f.contents(), k
        assert [(n, qt) for n, _, qt, _ in meta.tensors] == [(x.name, x.tensor_type) for x in r.tensors]
        assert [d for _, d, _, _ in meta.tensors] == [tuple(int(v) for v in x.shape) for x in r.tensors]
        assert [meta.data_offset + t.offset for t in meta.tensors] == [int(x.data_offset) for x in r.tensors]
        assert meta.file_size == path.stat().st_size
        assert "gguf.GGUFReader" in result.checks["read_back"][t]["reader"]


def test_gguf_f16_weights_equal_merged(exported):
    """The f16 GGUF holds exactly the merged16 weights (norms in f32)."""
    from safetensors.torch import load_file

    result, _ = exported
    m = load_file(result.merged_dir / "model.safetensors")
    r = gguf.GGUFReader(result.ggufs["f16"])
    t = {x.name: x for x in r.tensors}
    q = np.asarray(t["blk.1.attn_q.weight"].data)
    assert np.array_equal(q, m["model.layers.1.self_attn.q_proj.weight"].numpy())
    kn = np.asarray(t["blk.0.attn_k_norm.weight"].data)
    assert np.allclose(kn, m["model.layers.0.self_attn.k_norm.weight"].float().numpy())


def test_modelfile(exported):
    result, _ = exported
    text = result.modelfile.read_text()
    expect = "q4_k_m" if HAVE_LLAMA else "q8_0"
    assert f"FROM ./model-{expect}.gguf" in text and result.modelfile_gguf == f"model-{expect}.gguf"
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text
    assert 'TEMPLATE """' in text and '"<think>"' in text and ".Messages" in text
    assert result.checks["modelfile"]["template_mirrors_chat_template"] is True


def test_template_segments_mirror_chat_template(merged_hf):
    _, tok = merged_hf
    seg = _template_segments(tok, CHAT_TEMPLATE)
    assert seg == {
        "pre": "", "sys_end": "<|endoftext|>", "u_pre": "", "u_post": "", "a_pre": "",
        "a_post": "<|endoftext|>", "gen": "<think>", "default_system": DEFAULT_SYSTEM_PROMPT,
    }
    go = ollama_template(seg)
    assert '"<think>"' in go and ".System" in go and "slice $.Messages $i" in go
    # gemma-style template with BOS: BOS is dropped from the Go template (llama.cpp adds it)
    go = ollama_template({**seg, "pre": "<bos>"}, strip_bos="<bos>")
    assert "<bos>" not in go
    assert "<bos>" in ollama_template({**seg, "pre": "<bos>"})


@needs_llama
def test_llama_cpp_tokenization_matches_hf(exported, merged_hf):
    from llama_cpp import Llama

    result, _ = exported
    _, tok = merged_hf
    llm = Llama(model_path=str(result.ggufs["f16"]), n_ctx=256, verbose=False)
    try:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "What is 12 + 30?"}], tokenize=False, add_generation_prompt=True
        )
        for text in TOKENIZE_TEXTS + [prompt]:
            for special in (False, True):
                hf_ids = tok(text, add_special_tokens=special)["input_ids"]
                assert llm.tokenize(text.encode(), add_bos=special, special=True) == hf_ids, text
            # and back
            assert llm.detokenize(tok(text, add_special_tokens=False)["input_ids"], special=True).decode() == text
    finally:
        llm.close()
    assert result.checks["llama_cpp"]["tokenization_mismatches"] == []


@needs_llama
def test_llama_cpp_logits_and_generation(exported, merged_hf):
    from llama_cpp import Llama

    result, _ = exported
    model, tok = merged_hf
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 7 * 6."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0, -1].numpy()
    llm = Llama(model_path=str(result.ggufs["f16"]), n_ctx=256, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        ll = np.asarray(llm.scores[len(ids) - 1])
        assert ll.shape == hf.shape
        assert np.abs(ll - hf).max() < 2e-2, np.abs(ll - hf).max()
        assert int(ll.argmax()) == int(hf.argmax())
        llm.reset()
        out = llm(prompt, max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
    c = result.checks["llama_cpp"]
    assert c["gguf_type"] == "f16" and c["top1_ok"] and c["logits_min_corr"] > 0.999


@needs_llama
def test_quantized_files_load_and_generate(exported):
    from llama_cpp import Llama

    result, _ = exported
    for t in ("q8_0", "q4_k_m"):
        r = gguf.GGUFReader(result.ggufs[t])
        assert r.fields["general.architecture"].contents() == "qwen3"
        llm = Llama(model_path=str(result.ggufs[t]), n_ctx=128, verbose=False)
        try:
            out = llm("What is 2 + 2?<think>", max_tokens=3, temperature=0.0)
            assert out["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()
        assert t in result.checks["llama_cpp_other"]


# ---------------------------------------------------------------------------------------------
# errors and atomicity


def test_unsupported_architecture(tmp_path, adapter):
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*Qwen3ForCausalLM"):
        export_model(base, adapter, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2"]


def test_unknown_type_and_missing_llama_cpp(tmp_path, tiny_base, adapter, monkeypatch):
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_model(tiny_base, adapter, tmp_path / "o", gguf_types=["q3_weird"])
    monkeypatch.setattr(export_llama_cpp, "_llama_cpp", lambda: None)
    with pytest.raises(ExportError, match=r"grpo-ray\[llama\]"):
        export_model(tiny_base, adapter, tmp_path / "o", gguf_types=["f16", "q4_k_m"])
    assert not (tmp_path / "o").exists()


def test_merged16_false_ships_no_merged_model(tmp_path, tiny_base, adapter, exported):
    """export.merged16: false: the GGUF is still written from the merged model, which is then not kept."""
    result = export_model(tiny_base, adapter, tmp_path / "best", gguf_types=["f16"], chat_template=CHAT_TEMPLATE,
                          check=True, merged16=False)
    out = result.out_dir
    assert result.merged_dir is None and not (out / "merged16").exists()
    assert (out / "lora" / "adapter_config.json").is_file() and result.modelfile.is_file()
    assert result.ggufs["f16"].read_bytes() == exported[0].ggufs["f16"].read_bytes()  # the same GGUF either way
    data = json.loads((out / "export.json").read_text())
    assert data["merged_dir"] is None and "merged16" not in data["sizes"]
    assert data["checks"]["read_back"]["f16"]["n_tensors"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "best"]  # nothing left beside it


def test_interrupted_export_leaves_no_out_dir(tmp_path, tiny_base, adapter, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted while writing the Modelfile")

    monkeypatch.setattr(pipeline, "write_modelfile", boom)
    out = tmp_path / "best"
    with pytest.raises(RuntimeError, match="interrupted"):
        export_model(tiny_base, adapter, out, gguf_types=["f16"], check=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # an earlier export in out_dir survives a failed re-export untouched
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(RuntimeError):
        export_model(tiny_base, adapter, out, gguf_types=["f16"], check=False)
    assert [p.name for p in out.iterdir()] == ["marker"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


# ---------------------------------------------------------------------------------------------
# the other architectures: tiny random models with peaked attention (large init) so that a wrong
# RoPE layout, norm offset or sliding window shows up in the logits


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _tiny_arch(kind: str, out: Path, tokenizer, extra_vocab: int = 0) -> Path:
    from transformers import (
        Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed(1)
    common = dict(
        vocab_size=len(tokenizer) + extra_vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.25,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_hidden_layers=2, tie_word_embeddings=False))
    elif kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**common, num_hidden_layers=2, rope_parameters=rope,
                                             tie_word_embeddings=False))
    else:  # gemma3: sliding window 8 over ~60-token prompts, a non-default 3-layer pattern
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            sliding_window_pattern=3,
        ))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@needs_llama
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_other_architectures_match_llama_cpp(kind, tmp_path, tokenizer):
    d = _tiny_arch(kind, tmp_path / kind, tokenizer)
    src = GGUFSource(d, chat_template=CHAT_TEMPLATE)
    assert src.arch == kind
    src.write(tmp_path / "m.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" in names  # untied
    if kind == "qwen2":
        assert "blk.0.attn_q.bias" in names
    else:
        assert "rope_freqs.weight" in names  # llama3 rope scaling
    r = compare_with_llama_cpp(tmp_path / "m.gguf", d, chat_template=CHAT_TEMPLATE)
    assert judge(r, min_corr=0.999) == [], r
    assert r["logits_scale"] > 3  # the check is meaningful only with non-trivial logits


def _write_sidecar(src_gguf: Path, out: Path) -> dict:
    """A tensor-less tokenizer.gguf, as grpo_ray.gguf.hf_dir writes it (here from our own GGUF)."""
    r = gguf.GGUFReader(src_gguf)
    w = gguf.GGUFWriter(out, "gemma3")
    copied = {}
    for f in r.fields.values():
        if f.name.startswith("tokenizer.") and f.name != "tokenizer.chat_template":
            vt = f.types[0]
            sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vt, sub_type=sub)
            copied[f.name] = f.contents()
    w.add_bool("tokenizer.ggml.add_space_prefix", False)  # a field the HF path never writes
    w.add_chat_template("{{ 'the source GGUF template' }}")
    copied["tokenizer.ggml.add_space_prefix"] = False
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return copied


def test_gemma3_export_with_sidecar_tokenizer(tmp_path, tokenizer, exported):
    """gemma3 path end to end: bf16 merge, +1 norms, sliding window, sidecar tokenizer copied verbatim."""
    result_qwen, _ = exported
    base = _tiny_arch("gemma3", tmp_path / "gemma-base", tokenizer, extra_vocab=5)
    sidecar = _write_sidecar(result_qwen.ggufs["f16"], base / "tokenizer.gguf")
    (base / "grpo_ray_source.json").write_text(json.dumps({"source": "test"}))
    adapter = _make_adapter(base, tmp_path / "lora", seed=1)
    tpl = template.chat_template(bos_token=True)
    res = export_model(base, adapter, tmp_path / "out", gguf_types=["bf16", "q8_0"], chat_template=tpl)

    assert res.architecture == "gemma3" and res.merged_dtype == "bfloat16"
    assert res.tokenizer_source == "tokenizer.gguf"
    assert (res.merged_dir / "tokenizer.gguf").is_file()
    assert json.loads((res.out_dir / "export.json").read_text())["base_source"] == {"source": "test"}
    r = gguf.GGUFReader(res.ggufs["bf16"])
    for k, v in sidecar.items():
        assert r.fields[k].contents() == v, k
    assert r.fields["tokenizer.chat_template"].contents() == tpl
    assert r.fields["gemma3.attention.sliding_window"].contents() == 8
    assert r.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0
    assert r.fields["gemma3.attention.sliding_window_pattern"].contents() == [True, True, False, True]
    t = {x.name: x for x in r.tensors}
    assert int(t["token_embd.weight"].shape[-1]) == len(tokenizer)  # extra rows trimmed to the tokenizer
    assert "output.weight" not in t and "blk.0.post_ffw_norm.weight" in t

    from safetensors.torch import load_file

    merged = load_file(res.merged_dir / "model.safetensors")
    hf_norm = merged["model.layers.0.input_layernorm.weight"].float().numpy()
    assert np.allclose(np.asarray(t["blk.0.attn_norm.weight"].data), hf_norm + 1.0, atol=1e-6)

    if not HAVE_LLAMA:
        return
    c = res.checks["llama_cpp"]
    assert c["gguf_type"] == "bf16" and c["tokenization_mismatches"] == [] and c["logits_min_corr"] > 0.999
    assert c["logits_scale"] > 3


# ---------------------------------------------------------------------------------------------
# base GGUF + LoRA adapter GGUF (export_model(base_gguf=...)): llama.cpp applies the adapter at load


@needs_llama
@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "llama"])
def test_lora_gguf_on_base_gguf_matches_merged(kind, tmp_path, tiny_base, tokenizer):
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "qwen3":
        base = tiny_base
    else:
        base = _tiny_arch(kind, tmp_path / f"{kind}-base", tokenizer)
    tpl = template.chat_template(bos_token=kind == "gemma3")
    if kind == "gemma3":  # gemma's tokenizer reaches the GGUF through the sidecar (as from grpo_ray.gguf)
        GGUFSource(tiny_base, chat_template=CHAT_TEMPLATE).write(tmp_path / "tok-src.gguf", "f16")
        _write_sidecar(tmp_path / "tok-src.gguf", base / "tokenizer.gguf")
    base_gguf = tmp_path / f"{kind}-orig.gguf"
    GGUFSource(base, chat_template=tpl).write(base_gguf, "f16")
    adapter = _make_adapter(base, tmp_path / "lora", seed=2)

    types = ["f16"] if kind == "qwen3" else []  # merged GGUFs beside the pair, or none
    res = export_model(base, adapter, tmp_path / "out", gguf_types=types, chat_template=tpl, base_gguf=base_gguf)
    out = res.out_dir
    assert set(res.ggufs) == set(types) and res.lora_gguf == out / "model-lora.gguf" and res.base_gguf == out / "model-base-f16.gguf"
    assert res.base_gguf.read_bytes() == base_gguf.read_bytes()
    assert (out / "model-chat_template.jinja").read_text() == tpl
    mf = res.modelfile.read_text()
    assert "FROM ./model-base-f16.gguf\nADAPTER ./model-lora.gguf\n" in mf and res.modelfile_gguf == "model-base-f16.gguf"
    data = json.loads((out / "export.json").read_text())
    assert data["lora_gguf"] == "model-lora.gguf" and data["base_gguf"] == "model-base-f16.gguf"
    assert data["sizes"]["model-lora.gguf"] == res.lora_gguf.stat().st_size
    info = res.checks["lora_gguf"]
    n_layers = {"qwen3": 2, "llama": 2, "gemma3": 4}[kind]
    assert info["n_pairs"] == 7 * n_layers and info["ranks"] == [4] and info["alpha"] == 8.0
    c = res.checks["llama_cpp_lora"]
    assert c["lora"] == "model-lora.gguf" and c["tokenization_mismatches"] == [] and c["top1_ok"]
    assert c["logits_min_corr"] > 0.999, c
    if kind != "qwen3":  # the tiny qwen3 has small logits; the arch models are built peaked
        assert c["logits_scale"] > 3, c

    # the format llama.cpp's convert_lora_to_gguf.py writes
    r = gguf.GGUFReader(res.lora_gguf)
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    assert r.fields["adapter.lora.alpha"].types[0] == gguf.GGUFValueType.FLOAT32
    assert r.fields["general.architecture"].contents() == kind
    t = {x.name: x for x in r.tensors}
    q_a, q_b = t["blk.0.attn_q.weight.lora_a"], t["blk.0.attn_q.weight.lora_b"]
    base_q = next(x for x in gguf.GGUFReader(base_gguf).tensors if x.name == "blk.0.attn_q.weight")
    assert int(q_a.shape[0]) == int(base_q.shape[0]) and int(q_b.shape[1]) == int(base_q.shape[1])
    assert int(q_a.shape[1]) == int(q_b.shape[0]) == 4  # ggml ne: a = [in, r], b = [r, out]
    assert q_a.tensor_type == gguf.GGMLQuantizationType.F16

    # independently: llama.cpp base + --lora against the merged HF model, and without the LoRA
    tok = AutoTokenizer.from_pretrained(res.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(res.merged_dir, dtype=torch.float32).eval()
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Compute 7 * 6."}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()

    def llama_logits(**kw) -> np.ndarray:
        llm = Llama(model_path=str(res.base_gguf), n_ctx=256, logits_all=True, verbose=False, **kw)
        try:
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)])
        finally:
            llm.close()

    with_lora = llama_logits(lora_path=str(res.lora_gguf))
    without = llama_logits()
    corr = min(float(np.corrcoef(hf[i], with_lora[i])[0, 1]) for i in range(len(ids)))
    corr_base = min(float(np.corrcoef(hf[i], without[i])[0, 1]) for i in range(len(ids)))
    assert corr > 0.999 and int(with_lora[-1].argmax()) == int(hf[-1].argmax()), corr
    assert corr_base < 0.99, corr_base  # the adapter does change the model
    if kind == "qwen3":  # the deployment-level check the sweep runs on quantized files
        prompts = ["What is 2 + 2?<think>", "Compute 7 * 6.<think>", "12 + 30 =", "Hello"]
        g = greedy_agreement(res.ggufs["f16"], res.base_gguf, prompts, max_tokens=8,
                                    candidate_lora=res.lora_gguf)
        assert g["candidate_lora"] == "model-lora.gguf" and g["rate"] >= 0.75, g


def test_lora_gguf_rejects_what_llama_cpp_cannot_apply(tmp_path, tiny_base, adapter):
    import shutil

    bad = tmp_path / "dora"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ExportError, match="use_dora"):
        write_lora_gguf(bad, tiny_base, tmp_path / "x.gguf")
    other = tmp_path / "llama.gguf"
    GGUFSource(_tiny_arch("llama", tmp_path / "llama", build_tokenizer())).write(other, "f16")
    with pytest.raises(ExportError, match="'llama' model"):
        export_model(tiny_base, adapter, tmp_path / "out", gguf_types=[], base_gguf=other, check=False)
    assert not (tmp_path / "out").exists()
