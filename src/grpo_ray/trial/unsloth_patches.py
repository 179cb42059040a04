"""What we change in Unsloth's code at run time, and why: each change one function here.

:func:`reuse_graphs_across_temperatures`: a warm actor's next trial (trial/warm.py) reuses every
graph torch.compile made for the trials before it, unless something a graph was guarded on
changed. On the H200 at 55e4f1e every warm trial of the tutorial's model shape recompiled one
graph for 42-67 s, half or more of an 81-116 s trial, with the rank and shapes unchanged
(bench/results/warm_sweep_qwen3_h200_55e4f1e.json). The graph is unsloth_zoo's GRPO log-prob
function (``chunked_hidden_states_selective_log_softmax``, compiled ``dynamic=True,
fullgraph=True``), and the guard is the sampling temperature, which sweeps search
(sweeps/rewards.yaml): the function body branches on it,

    if temperature != 1.0:
        chunk_logits = chunk_logits / temperature

and Dynamo, which first traces the float as a symbol (``specialize_float`` is off in torch 2.11),
specializes it to a constant to decide the branch, so the graph holds only for that exact value
(``temperature == 0.879`` in ``TORCH_LOGS=recompiles``). Dividing by 1.0 is exact, so the branch
only saves a division; without it the temperature stays a symbol and one graph serves every
value. We recompile the two log-prob functions from their own source without the branch, once
per process: the same decorator (so the same compile options), the same signature and defaults,
the same results (bit for bit at 1.0, the same division elsewhere).

Unsloth's GRPO trainer imports these functions from ``unsloth_zoo.rl_replacements`` at every
loss call, so replacing the module's attributes is enough; its generated trainer module keeps
copies of its own for old and reference log-probs (``grpo.beta`` > 0 and the like), which are
replaced too where present. A version of Unsloth whose source differs is left as it is, with one
log line: the patch only ever saves compile time, it never changes what a trial computes.

:func:`one_chunk_count`: the same functions split their rows into ``chunks`` ranges in a Python
loop, which Dynamo unrolls, so each chunk count is a graph of its own. Unsloth passes rows x 4
(16, 24 or 32 for 4, 6 or 8 completions per prompt), and on the H200 at 8d5b03e every warm gemma
trial whose ``grpo.num_generations`` differed from its actor's last compiled again for 41-57 s
(bench/README.md). Rows are scored independently (a row of the head's product, its log-sum-exp,
the gather), so the chunk count only regroups them: raising it to the most the search can ask
for gives one graph per process, the same results up to rounding in the head's product, and no
more memory per chunk than Unsloth's own count would take. That holds for batches of at least two
rows (completion tokens) per range. A shorter one kept Unsloth's count at first, and on the H200
at 920d3f9 two of 16 warm trials still compiled the function again (54 s and 11 s), the guard
``(1 + max(1, min(hidden_states.size()[1], chunks))) == 33`` failing: a batch of fewer than 64
tokens came with the count of the trial's new group size, so its unrolled loop had another length
than the graph the process held (bench/results/warm_sweep_density_h200_920d3f9.log.gz). Such a
batch now goes in one range whatever its group size: a loop of length 1, so a process compiles
two graphs of the function (per grad mode, which Dynamo guards on anyway), one for long batches
and one for short ones, instead of one more per group size that meets a short batch. One range
holds fewer than 2 x count rows x vocabulary logits, in the head's dtype and a float32 copy: for
gemma-3-270m (count 32, 262,144 tokens, bf16) 64 x 262,144 x (2 + 4) bytes, about 0.1 GB, against
the 2.0-4.9 GiB a trial allocated at its peak in that run.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sys
import textwrap
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# The two log-prob functions of unsloth_zoo 2026.10.7 that branch on the temperature.
LOGPROB_FUNCTIONS = ("chunked_hidden_states_selective_log_softmax", "chunked_selective_log_softmax")
# `if temperature != 1.0:` and the division under it, at any indentation: the division alone stays.
_BRANCH = re.compile(r"^(?P<indent>[ \t]*)if temperature != 1\.0:\n(?P=indent)[ \t]+(?P<div>chunk_logits = chunk_logits / temperature)\n",
                     re.MULTILINE)


def without_temperature_branch(source: str) -> tuple[str, int]:
    """``source`` with every ``if temperature != 1.0:`` around the logits' division removed
    (the division kept, one level out), and how many were removed.

    >>> src = "def f(x, temperature):\\n    if temperature != 1.0:\\n        chunk_logits = chunk_logits / temperature\\n    return x\\n"
    >>> new, n = without_temperature_branch(src)
    >>> n
    1
    >>> print(new)
    def f(x, temperature):
        chunk_logits = chunk_logits / temperature
        return x
    <BLANKLINE>
    """
    return _BRANCH.subn(lambda m: f"{m['indent']}{m['div']}\n", source)


_PATCHED = "_grpo_ray_no_temperature_branch"  # set on what we built: never rebuilt, which would recompile


def _recompile_without_branch(module: ModuleType, name: str) -> bool:
    """Replace ``module.name`` by the same function built from its source without the branch."""
    fn = getattr(module, name, None)
    if fn is None or getattr(fn, _PATCHED, False):
        return False
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))  # the decorator lines included
    except (OSError, TypeError):
        return False
    new_source, n = without_temperature_branch(source)
    if n == 0:
        return False
    # Run in the module's own namespace, as its import did: the same decorator and options, the same
    # helpers (looked up when called, as the original's are), and the def replaces the attribute.
    exec(compile(new_source, f"<{module.__name__}.{name} without the temperature branch (grpo-ray)>", "exec"),
         vars(module))
    setattr(getattr(module, name), _PATCHED, True)
    return True


def _logprob_modules(modules: list[ModuleType] | None) -> list[ModuleType]:
    """``modules``, or where Unsloth's GRPO log-prob functions live: ``unsloth_zoo.rl_replacements``
    and any generated GRPO trainer module already imported (none without Unsloth)."""
    if modules is not None:
        return modules
    zoo = sys.modules.get("unsloth_zoo.rl_replacements")
    if zoo is None:
        try:
            import unsloth_zoo.rl_replacements as zoo
        except ImportError:
            return []
    return [zoo] + [m for n, m in list(sys.modules.items())
                    if n.rsplit(".", 1)[-1] == "UnslothGRPOTrainer" and m is not None]


def reuse_graphs_across_temperatures(modules: list[ModuleType] | None = None) -> list[str]:
    """Keep Unsloth's compiled GRPO log-prob functions from recompiling for each trial's temperature.

    ``modules``: where the functions live; by default ``unsloth_zoo.rl_replacements`` and any
    generated GRPO trainer module already imported. Returns ``module.function`` for each one
    replaced; an empty list (and one log line) when this Unsloth has none of them in the form
    this expects. Idempotent: a function already replaced is left as it is (building it again
    would give Dynamo new code to compile), so call it before each GRPO trainer is built.
    """
    modules = _logprob_modules(modules)
    if not modules:  # no Unsloth here
        return []
    done = [f"{m.__name__}.{name}" for m in modules for name in LOGPROB_FUNCTIONS
            if getattr(m, name, None) is not None and _recompile_without_branch(m, name)]
    before = any(getattr(getattr(m, name, None), _PATCHED, False) for m in modules for name in LOGPROB_FUNCTIONS)
    if not done and not before:  # said once per process, not at every trainer after the first
        log.info("Unsloth's GRPO log-prob functions are not in the form this patch expects; warm trials "
                 "with a new temperature may recompile them (trial/unsloth_patches.py)")
    return done


CHUNKS_ARG = 3  # `chunks` is the fourth parameter of both log-prob functions (hidden states or logits)
_CHUNKED = "_grpo_ray_fixed_chunks"  # set on our wrapper: never wrapped twice
_chunks: int | None = None  # k: what the wrapper raises a long call's chunk count to (set by one_chunk_count)
_told: set[str] = set()  # functions one_chunk_count found in another form, said once


def _with_fixed_chunks(fn: Any) -> Any:
    """``fn`` with every chunk count it is given fixed by the rows it is called on, not by the
    group size: raised to ``_chunks`` (the search's largest, k) when the rows fill at least two per
    range, and 1 (the whole batch as one range) below 2k rows. A long batch's count is never
    lowered (fewer rows per range than Unsloth chose, so no more memory); a call given 1, or no
    count (the function's own default), or made before :func:`one_chunk_count` set k, is left as
    it is.

    Why 1 for short batches: Unsloth's count there is rows x 4 of the trial's group size (16, 24
    or 32), and each count is a loop of its own length, so each group size that met a short batch
    compiled the function again (54 s and 11 s on the H200 at 920d3f9: the module's docstring).
    Raising them to k instead would not do: the function lowers a count above the rows
    (``min(chunks, n_rows)``), so a batch of fewer than k rows would get a loop as long as its
    rows, a graph per row count (and every batch under 2k, to ``rows // 2``, when the head
    trains: its rule for ``rows < 2 * chunks``). At 1 neither rule changes anything
    (``min(1, rows)`` is 1 for any rows, ``rows < 2`` only for a one-row batch), nor does the
    ``max_rows_per_chunk`` cap, off (0) unless ``UNSLOTH_GRPO_MAX_ROWS_PER_CHUNK`` is set
    (unsloth_zoo 2026.10.7's rl_replacements.py). The memory of one range is bounded by 2k rows:
    fewer than 12 x k x vocabulary bytes in bf16 (the logits and their float32 copy), about 0.1 GB
    at k = 32 with Gemma's 262,144 tokens. The result differs only by rounding, as rows are
    scored independently."""

    @functools.wraps(fn)  # also carries _PATCHED over: the temperature patch leaves it alone
    def call(*args: Any, **kwargs: Any) -> Any:
        k = _chunks
        shape = getattr(args[0], "shape", None) if args else None
        if k and shape is not None:
            positional = len(args) > CHUNKS_ARG
            given = args[CHUNKS_ARG] if positional else kwargs.get("chunks")
            if given is not None and given > 1:
                # Below 2k rows the range count is 1 for every group size; above, at least k.
                chunks = 1 if math.prod(shape[:-1]) < 2 * k else max(given, k)
                if positional:
                    args = (*args[:CHUNKS_ARG], chunks, *args[CHUNKS_ARG + 1:])
                else:
                    kwargs["chunks"] = chunks
        return fn(*args, **kwargs)

    setattr(call, _CHUNKED, True)
    return call


def one_chunk_count(chunks: int, modules: list[ModuleType] | None = None) -> list[str]:
    """Make every call of Unsloth's GRPO log-prob functions use at least ``chunks`` row ranges
    when it has at least 2 x ``chunks`` rows, and one range when it has fewer, so that two
    compiled graphs (long and short batches) serve every group size the search samples
    (``chunks``: 4 x the largest ``grpo.batch_size`` x ``grpo.num_generations``: trial/unsloth.py).

    Call it after :func:`reuse_graphs_across_temperatures` (which rebuilds the functions this
    wraps) before each GRPO trainer, as :func:`prepare_grpo_logprobs` does: a function already wrapped keeps its wrapper and takes the
    new count. Returns ``module.function`` for each one wrapped now; a function whose fourth
    parameter is not ``chunks`` is left as it is, with one log line.
    """
    global _chunks
    _chunks = chunks
    done = []
    for m in _logprob_modules(modules):
        for name in LOGPROB_FUNCTIONS:
            fn = getattr(m, name, None)
            if fn is None or getattr(fn, _CHUNKED, False):
                continue
            try:
                params = list(inspect.signature(inspect.unwrap(fn)).parameters)
            except (TypeError, ValueError):
                params = []
            if params[CHUNKS_ARG:CHUNKS_ARG + 1] != ["chunks"]:
                if f"{m.__name__}.{name}" in _told:
                    continue
                _told.add(f"{m.__name__}.{name}")  # once per process, not at every trainer
                log.info("%s.%s has no chunks parameter where this patch expects it; warm trials with a new "
                         "grpo.num_generations may recompile it (trial/unsloth_patches.py)", m.__name__, name)
                continue
            setattr(m, name, _with_fixed_chunks(fn))
            done.append(f"{m.__name__}.{name}")
    return done


def prepare_grpo_logprobs(chunks: int) -> None:
    """Both patches, in the order they need, before each GRPO trainer is built: the functions
    rebuilt without the temperature branch (once per process), then wrapped with ``chunks``
    as their least chunk count for batches of at least 2 x ``chunks`` rows, and one range for
    shorter ones (the wrapper keeps the rebuilt function's mark, so the first patch finds its
    work done at the next trainer)."""
    reuse_graphs_across_temperatures()
    one_chunk_count(chunks)
