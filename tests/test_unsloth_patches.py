"""trial/unsloth_patches.py: Unsloth's compiled GRPO log-prob function no longer recompiles for
each trial's temperature.

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


def test_without_unsloth_installed_it_does_nothing():
    if importlib.util.find_spec("unsloth_zoo") is not None:
        pytest.skip("unsloth_zoo is installed here")
    assert reuse_graphs_across_temperatures() == []


def test_doctests():
    assert doctest.testmod(patches).failed == 0
