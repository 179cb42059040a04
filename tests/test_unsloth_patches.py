"""trial/unsloth_patches.py: Unsloth's compiled GRPO log-prob function no longer recompiles for
each trial's temperature, nor for each group size (its chunk count).

unsloth_zoo needs a CUDA machine to import, so the function here is a stand-in written to a real
module file: the same shape as unsloth_zoo 2026.10.7's ``chunked_selective_log_softmax`` (its
``if temperature != 1.0:`` branch around the division, compiled ``dynamic=True,
fullgraph=True`` through a decorator of the module's own), compiled by the real torch.compile.
The ``aot_eager`` backend goes through AOTAutograd, where the temperature is specialized as it is
on the GPU (one graph per temperature, 42-67 s each for the 1.7B at 55e4f1e); tests/test_gpu.py
checks the real function on a GPU.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import grpo_ray.trial.unsloth_patches as patches
from grpo_ray.trial.unsloth_patches import reuse_graphs_across_temperatures

STANDIN = '''import torch


def _maybe_compile(**kwargs):
    return lambda fn: torch.compile(fn, **kwargs)


@_maybe_compile(dynamic=True, fullgraph=True, backend="aot_eager")
def chunked_selective_log_softmax(logits, index, temperature: float = 1.0, chunks: int = 2):
    out = []
    for chunk_logits, chunk_index in zip(logits.chunk(chunks), index.chunk(chunks)):
        chunk_logits = chunk_logits.to(torch.float32)
        if temperature != 1.0:
            chunk_logits = chunk_logits / temperature
        selected = torch.gather(chunk_logits, -1, chunk_index.unsqueeze(-1)).squeeze(-1)
        out.append(selected - torch.logsumexp(chunk_logits, -1))
    return torch.cat(out)


def unrelated(x):
    return x
'''
TEMPERATURES = (1.0, 0.879, 1.113, 0.7)  # the first three: the trials of the 55e4f1e lease, in order


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A fresh stand-in module (its own file, so inspect finds its source) and a fresh Dynamo."""
    name = f"standin_zoo_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(STANDIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch._dynamo.reset()
    yield importlib.import_module(name)
    sys.modules.pop(name, None)
    torch._dynamo.reset()


def _graphs_per_call(fn) -> tuple[list[int], list[torch.Tensor]]:
    new, outs = [], []
    gen = torch.Generator().manual_seed(0)
    logits, index = torch.randn(8, 50, generator=gen), torch.randint(0, 50, (8,), generator=gen)
    for t in TEMPERATURES:
        before = counters["stats"]["unique_graphs"]
        outs.append(fn(logits, index, t))
        new.append(counters["stats"]["unique_graphs"] - before)
    return new, outs


def test_unpatched_function_recompiles_for_every_temperature(zoo):
    # The premise: if torch stopped specializing the branch, the patch would have nothing to do.
    new, _ = _graphs_per_call(zoo.chunked_selective_log_softmax)
    assert new == [1, 1, 1, 1]


def test_patched_function_compiles_once_and_computes_the_same(zoo):
    eager = [inspect.unwrap(zoo.chunked_selective_log_softmax)]  # the original, uncompiled
    assert reuse_graphs_across_temperatures([zoo]) == [f"{zoo.__name__}.chunked_selective_log_softmax"]
    new, outs = _graphs_per_call(zoo.chunked_selective_log_softmax)
    assert new == [1, 0, 0, 0]
    _, want = _graphs_per_call(eager[0])
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_patching_twice_changes_nothing_the_second_time(zoo, caplog):
    # Building the function again would hand Dynamo new code, and it would compile it again.
    assert reuse_graphs_across_temperatures([zoo])
    first = zoo.chunked_selective_log_softmax
    with caplog.at_level("INFO", logger=patches.__name__):
        assert reuse_graphs_across_temperatures([zoo]) == []
    assert zoo.chunked_selective_log_softmax is first
    assert "not in the form" not in caplog.text  # done before, not missing: nothing to say


def test_a_source_without_the_branch_is_left_alone(zoo, tmp_path, monkeypatch, caplog):
    (tmp_path / "other_zoo.py").write_text(STANDIN.replace("if temperature != 1.0:", "if temperature > 0:"))
    monkeypatch.syspath_prepend(str(tmp_path))
    other = importlib.import_module("other_zoo")
    before = other.chunked_selective_log_softmax
    with caplog.at_level("INFO", logger=patches.__name__):
        assert reuse_graphs_across_temperatures([other]) == []
    assert other.chunked_selective_log_softmax is before
    assert "trial/unsloth_patches.py" in caplog.text
    sys.modules.pop("other_zoo", None)


def test_without_unsloth_installed_it_does_nothing(monkeypatch):
    if importlib.util.find_spec("unsloth_zoo") is not None:
        pytest.skip("unsloth_zoo is installed here")
    assert reuse_graphs_across_temperatures() == []
    monkeypatch.setattr(patches, "_chunks", None)
    patches.prepare_grpo_logprobs(32)  # what the backend calls: nothing to patch, no error


def test_doctests():
    assert doctest.testmod(patches).failed == 0


# The hidden-states function's shape in unsloth_zoo 2026.10.7: `chunks` row ranges from a Python
# loop over bounds, which Dynamo unrolls (one graph per count), and the temperature branch.
STANDIN_CHUNKS = '''import torch


def _maybe_compile(**kwargs):
    return lambda fn: torch.compile(fn, **kwargs)


@_maybe_compile(dynamic=True, fullgraph=True, backend="aot_eager")
def chunked_hidden_states_selective_log_softmax(hidden_states, lm_head, index, chunks: int = 4,
                                                temperature: float = 1.0):
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_index = index.reshape(-1)
    chunks = max(1, min(chunks, flat.shape[0]))
    bounds = [(i * flat.shape[0]) // chunks for i in range(chunks + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk_logits = (flat[a:b] @ lm_head.t()).to(torch.float32)
        if temperature != 1.0:
            chunk_logits = chunk_logits / temperature
        selected = torch.gather(chunk_logits, -1, flat_index[a:b].unsqueeze(-1)).squeeze(-1)
        out.append(selected - torch.logsumexp(chunk_logits, -1))
    return torch.cat(out).reshape(index.shape)
'''
# Unsloth's counts for 4, 6 and 8 completions per prompt are 16, 24 and 32; a quarter of them here
# (then the first again), as each count unrolls into a graph that takes the CPU seconds to compile.
GROUP_CHUNKS = (4, 6, 8, 4)


@pytest.fixture
def zoo_chunks(tmp_path, monkeypatch):
    name = f"standin_chunks_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(STANDIN_CHUNKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(patches, "_chunks", None)
    torch._dynamo.reset()
    yield importlib.import_module(name)
    sys.modules.pop(name, None)
    torch._dynamo.reset()


def _graphs_per_group_size(zoo_module) -> tuple[list[int], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.randn(50, 16, generator=gen)
    new, outs = [], []
    for chunks in GROUP_CHUNKS:
        rows = chunks * 20  # the group's completions, 20 tokens each
        hidden, index = torch.randn(1, rows, 16, generator=gen), torch.randint(0, 50, (1, rows), generator=gen)
        fn = zoo_module.chunked_hidden_states_selective_log_softmax
        before = counters["stats"]["unique_graphs"]
        got = fn(hidden, lm_head, index, chunks, 0.9)  # positional, as Unsloth's packed path calls it
        new.append(counters["stats"]["unique_graphs"] - before)
        outs.append((got, inspect.unwrap(fn)(hidden, lm_head, index, chunks, 0.9)))
    return new, outs


def test_a_new_group_size_compiles_again_unpatched(zoo_chunks):
    new, _ = _graphs_per_group_size(zoo_chunks)
    assert new == [1, 1, 1, 0]  # the premise: each chunk count its own graph (the first was compiled first)


def test_one_chunk_count_compiles_once_for_every_group_size(zoo_chunks):
    from grpo_ray.trial.unsloth_patches import one_chunk_count

    name = f"{zoo_chunks.__name__}.chunked_hidden_states_selective_log_softmax"
    assert reuse_graphs_across_temperatures([zoo_chunks]) == [name]  # as the backend calls them: first
    assert one_chunk_count(8, [zoo_chunks]) == [name]  # the search's largest count
    new, outs = _graphs_per_group_size(zoo_chunks)
    assert new == [1, 0, 0, 0]
    for got, eager in outs:  # rows are scored independently: regrouping them changes only rounding
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # The next trainer: both patches find their work done, and the wrapper stays in place.
    wrapped = zoo_chunks.chunked_hidden_states_selective_log_softmax
    assert reuse_graphs_across_temperatures([zoo_chunks]) == [] and one_chunk_count(8, [zoo_chunks]) == []
    assert zoo_chunks.chunked_hidden_states_selective_log_softmax is wrapped


def test_one_chunk_count_never_lowers_a_long_count_and_gives_short_batches_one_range(zoo_chunks, monkeypatch):
    from grpo_ray.trial.unsloth_patches import one_chunk_count

    seen = []
    monkeypatch.setattr(zoo_chunks, "chunked_hidden_states_selective_log_softmax",
                        lambda hidden, head, index, chunks=4, temperature=1.0: seen.append(chunks))
    f = zoo_chunks.chunked_hidden_states_selective_log_softmax
    monkeypatch.setattr(zoo_chunks, "chunked_hidden_states_selective_log_softmax", patches._with_fixed_chunks(f))
    rows64, rows63 = torch.zeros(1, 64, 8), torch.zeros(1, 63, 8)  # [batch, tokens, hidden]
    zoo_chunks.chunked_hidden_states_selective_log_softmax(rows63, None, None, 16)  # no k set yet: untouched
    one_chunk_count(32, [zoo_chunks])  # finds the wrapper in place: keeps it, takes the new k
    f = zoo_chunks.chunked_hidden_states_selective_log_softmax
    f(rows64, None, None, 16), f(rows64, None, None, 64), f(rows64, None, None, 1), f(rows64, None, None, chunks=24)
    f(rows64, None, None)  # no count given: the function's own default, untouched
    # Fewer than two rows per range at 32: one range, whatever the group size's count (or 1 already).
    f(rows63, None, None, 16), f(rows63, None, None, chunks=24), f(rows63, None, None, 64), f(rows63, None, None, 1)
    assert seen == [16, 32, 64, 1, 32, 4, 1, 1, 1, 1]


# Short batches (fewer than 2k rows) of several group sizes, between long ones: Unsloth's counts 16,
# 24 and 32 with rows under 64 on the GPU, a quarter of them here (k = 8, so under 16 rows), rows of
# each count both above and below it. With Unsloth's count kept for short batches (the wrapper as of
# eef4552) every short batch here compiled a graph of its own, 6 graphs in all against 2: each
# count and each row count under it is a loop of another length (on the H200 at 920d3f9: 54 s and
# 11 s, guard `... == 33`), and the long batches' guards held for no short one.
MIXED_BATCHES = ((4, 80), (4, 13), (6, 10), (8, 15), (6, 5), (8, 7), (8, 160), (4, 9))  # (count, rows)


def test_short_batches_of_every_group_size_compile_one_graph(zoo_chunks):
    from grpo_ray.trial.unsloth_patches import one_chunk_count

    reuse_graphs_across_temperatures([zoo_chunks])
    one_chunk_count(8, [zoo_chunks])
    fn = zoo_chunks.chunked_hidden_states_selective_log_softmax
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.randn(50, 16, generator=gen)
    new = []
    for chunks, rows in MIXED_BATCHES:
        hidden, index = torch.randn(1, rows, 16, generator=gen), torch.randint(0, 50, (1, rows), generator=gen)
        before = counters["stats"]["unique_graphs"]
        got = fn(hidden, lm_head, index, chunks, 0.9)
        new.append(counters["stats"]["unique_graphs"] - before)
        # Rows are scored independently: one range or Unsloth's count, the same up to rounding.
        torch.testing.assert_close(got, inspect.unwrap(fn)(hidden, lm_head, index, chunks, 0.9), rtol=1e-5, atol=1e-5)
    assert new == [1, 1, 0, 0, 0, 0, 0, 0]  # the long batches' graph, then one for every short batch
