"""trial/compile_clock.py: torch.compile's graphs and seconds, read from torch's own counters.

Real torch.compile on CPU: Dynamo with the eager backend (no C compiler involved) for the
graph count, and Inductor for the backward graphs: compiled lazily at the first backward, or
eagerly, inside the frame's compile, when the backward needs a dynamic size.
"""

import os
import subprocess
import sys
import time

import torch

from grpo_ray.trial.compile_clock import CompileClock


def test_it_counts_the_graphs_built_since_it_started_and_none_reused():
    def f(x):
        return torch.sin(x) * 2

    g = torch.compile(f, backend="eager")
    clock = CompileClock()
    g(torch.randn(3))
    graphs, seconds = clock.since()
    assert graphs == 1 and seconds > 0
    again = CompileClock()
    g(torch.randn(3))  # same shape: the graph is reused
    assert again.since() == (0, 0.0)
    g(torch.randn(5))  # a new shape: Dynamo recompiles (now with a dynamic size)
    assert again.since()[0] == 1 and clock.since()[0] == 2


def test_it_counts_inductors_backward_compile_too():
    # Inductor's caches off: on a warm cache (any earlier run on this machine) the backward is
    # loaded with the forward, and there is no lazy backward compile to count.
    with torch._inductor.config.patch(force_disable_caches=True):
        model = torch.compile(torch.nn.Linear(4, 4))
        x = torch.randn(2, 4, requires_grad=True)
        clock = CompileClock()
        loss = model(x).sum()
        after_forward = clock.since()[1]
        loss.backward()
    assert clock.since()[0] >= 1 and clock.since()[1] > after_forward  # the backward's compile counted


def test_an_eagerly_compiled_backward_is_counted_once():
    # dynamic=True: the backward of a sum keeps the input's size, a symbolic int, so AOTAutograd
    # compiles the backward inside the forward's frame compile. Inductor's bw_compiler timer
    # then runs nested in Dynamo's, and adding the two would give more compile than wall time.
    with torch._inductor.config.patch(force_disable_caches=True):
        f = torch.compile(lambda x: (x * x).sum(), dynamic=True)
        x = torch.randn(3, requires_grad=True)
        clock, start = CompileClock(), time.perf_counter()
        f(x).backward()
        wall = time.perf_counter() - start
    graphs, seconds = clock.since()
    assert graphs == 1 and 0 < seconds <= wall


def test_a_dynamo_reset_never_makes_it_negative():
    g = torch.compile(lambda x: x + 1, backend="eager")
    g(torch.randn(2))
    clock = CompileClock()
    torch._dynamo.reset()
    graphs, seconds = clock.since()
    assert graphs >= 0 and seconds >= 0.0


# What importing Unsloth does to torch's logs (unsloth_zoo.patching_utils.patch_torch_compile,
# at `import unsloth`), done here by hand because Unsloth cannot be imported without a GPU.
RECOMPILE = """
import os, sys, logging, torch
from grpo_ray.trial.compile_clock import restore_torch_logs
wanted = os.environ.get("TORCH_LOGS")
os.environ.pop("TORCH_LOGS", None); torch._logging.set_logs(all=logging.CRITICAL)  # Unsloth's import
if sys.argv[1] == "restore":
    restore_torch_logs(wanted)
def double(x):
    return x * 2
f = torch.compile(double, backend="eager")
f(torch.randn(2)); f(torch.randn(3))  # a new shape: a recompile
"""


def test_torch_logs_asked_for_survive_unsloths_import():
    def run(mode: str) -> str:
        r = subprocess.run([sys.executable, "-c", RECOMPILE, mode], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TORCH_LOGS": "recompiles"})
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr

    assert "Recompiling function" not in run("unsloth-only")  # what trials had: silence
    restored = run("restore")
    assert "Recompiling function double" in restored and "tensor 'x' size mismatch" in restored


def test_a_torch_that_moved_its_private_log_api_costs_the_logs_not_the_trial(monkeypatch, capsys):
    from torch._logging import _internal

    from grpo_ray.trial.compile_clock import restore_torch_logs

    def moved(*args, **kwargs):
        raise AttributeError("_init_logs moved")

    monkeypatch.setattr(_internal, "_init_logs", moved)
    monkeypatch.setenv("TORCH_LOGS", "")  # recorded, so the variable the call sets is undone after
    restore_torch_logs("recompiles")  # no exception
    assert "could not restore TORCH_LOGS='recompiles'" in capsys.readouterr().err
