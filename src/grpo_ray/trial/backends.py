"""Choosing and building a trial's backend: ``auto`` picks unsloth on CUDA, hf elsewhere.

Apart from base.py (the interface) because building one imports its module, and the backends
import what they share (common.py) which imports the interface: base -> hf -> common -> base
would be a cycle.
"""

from __future__ import annotations

import importlib.util
import os

from grpo_ray.trial.base import Backend, BackendError


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    """``auto`` -> ``unsloth`` when CUDA is present, else ``hf``."""
    if requested != "auto":
        return requested
    return "unsloth" if cuda_available() else "hf"


def share_compile_caches() -> dict[str, str]:
    """Point Unsloth's compiled-module cache at one directory per node and user.

    Unsloth writes it to ``./unsloth_compiled_cache`` by default, and Ray Tune runs each trial
    in its own working directory, so every trial would compile it again. Triton, TorchInductor
    and vLLM already keep theirs per node (``~/.triton``, ``/tmp/torchinductor_<user>``,
    ``~/.cache/vllm``). A value the user set wins. Returns what was set.
    """
    from grpo_ray.gguf.cache import default_cache_root

    wanted = {"UNSLOTH_COMPILE_LOCATION": str(default_cache_root() / "unsloth_compiled_cache")}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in wanted}


def eager_training(compile: bool) -> dict[str, str]:
    """Turn Unsloth's torch.compile of the training model off when ``model.compile`` is false.

    Unsloth reads ``UNSLOTH_COMPILE_DISABLE`` when it is imported, so this must run before the
    first import in the process; a value the user set wins. Returns what was set.
    """
    if compile:
        return {}
    os.environ.setdefault("UNSLOTH_COMPILE_DISABLE", "1")
    return {"UNSLOTH_COMPILE_DISABLE": os.environ["UNSLOTH_COMPILE_DISABLE"]}


def import_backend_first(requested: str, compile: bool = True) -> str:
    """Import the backend's module before anything else of the trial; returns the backend's name.

    Unsloth patches transformers, peft and trl as it is imported, and only warns ("Unsloth
    should be imported before [transformers, peft] ... may run slower") when they came first.
    A trial imports them from many places (its watchdog's TRL callback, the trainers), so the
    trial's entry point calls this first: the order then does not depend on who imports what.
    On the H200 at 5446a99 every trial process printed that warning, because the watchdog's
    module was imported first. For the unsloth backend the compile settings Unsloth reads at
    import are set before it (the shared cache location, ``model.compile``).
    """
    name = choose_backend(requested)
    if name == "unsloth":
        if not cuda_available():
            raise BackendError("backend 'unsloth' needs a CUDA GPU; use backend: hf (or auto) on CPU")
        missing = [p for p in ("unsloth", "vllm") if importlib.util.find_spec(p) is None]
        if missing:  # not a bare ImportError in every trial: what to install, or the slower backend
            raise BackendError(
                f"backend '{requested}' runs unsloth on this CUDA machine, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed here: pip install 'grpo-ray[gpu]' on every "
                "GPU node (the pinned Unsloth + vLLM stack), or set backend: hf (transformers generation, "
                "about 10x slower GRPO steps)")
        share_compile_caches()  # before unsloth is imported: it reads the location at import
        eager_training(compile)  # likewise
        import grpo_ray.trial.unsloth  # noqa: F401  (imports unsloth before trl/transformers)
    return name


def make_backend(requested: str, compile: bool = True) -> Backend:
    """The backend ``requested`` names (``auto``: by the hardware); ``compile`` is the spec's
    ``model.compile``, which the unsloth backend needs before it imports Unsloth."""
    if import_backend_first(requested, compile) == "unsloth":
        from grpo_ray.trial.unsloth import UnslothBackend

        return UnslothBackend()
    from grpo_ray.trial.hf import HFBackend

    return HFBackend()
