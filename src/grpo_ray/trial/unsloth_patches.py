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
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import textwrap
from types import ModuleType

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


def reuse_graphs_across_temperatures(modules: list[ModuleType] | None = None) -> list[str]:
    """Keep Unsloth's compiled GRPO log-prob functions from recompiling for each trial's temperature.

    ``modules``: where the functions live; by default ``unsloth_zoo.rl_replacements`` and any
    generated GRPO trainer module already imported. Returns ``module.function`` for each one
    replaced; an empty list (and one log line) when this Unsloth has none of them in the form
    this expects. Idempotent: a function already replaced is left as it is (building it again
    would give Dynamo new code to compile), so call it before each GRPO trainer is built.
    """
    if modules is None:
        zoo = sys.modules.get("unsloth_zoo.rl_replacements")
        if zoo is None:
            try:
                import unsloth_zoo.rl_replacements as zoo
            except ImportError:
                return []
        modules = [zoo] + [m for n, m in list(sys.modules.items())
                           if n.rsplit(".", 1)[-1] == "UnslothGRPOTrainer" and m is not None]
    done = [f"{m.__name__}.{name}" for m in modules for name in LOGPROB_FUNCTIONS
            if getattr(m, name, None) is not None and _recompile_without_branch(m, name)]
    before = any(getattr(getattr(m, name, None), _PATCHED, False) for m in modules for name in LOGPROB_FUNCTIONS)
    if not done and not before:  # said once per process, not at every trainer after the first
        log.info("Unsloth's GRPO log-prob functions are not in the form this patch expects; warm trials "
                 "with a new temperature may recompile them (trial/unsloth_patches.py)")
    return done
