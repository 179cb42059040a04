"""What both backends share: tokenizer set-up, LoRA set-up, the out-of-memory advice, the trainer callbacks
(the step reporter). The TRL arguments built from the spec are in :mod:`grpo_ray.trial.trl_args`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from transformers import TrainerCallback

from grpo_ray.config.spec import SweepSpec
from grpo_ray.task import template
from grpo_ray.trial.base import StepCallback

T = TypeVar("T")


class TrialDoesNotFitError(RuntimeError):
    """A GPU out-of-memory, translated into the spec settings that would make the trial fit."""


def fit_hint(spec: SweepSpec) -> str:
    """What to change when training (or generation) runs out of GPU memory."""
    kv = spec.model.kv_cache_gib
    return (
        "the trial ran out of GPU memory: lower "
        + (f"model.kv_cache_gib (now {kv} GiB; vLLM's KV cache), " if kv is not None else
           f"model.gpu_memory_utilization (now {spec.model.gpu_memory_utilization}; vLLM keeps that share of the GPU "
           "for itself), ") +
        f"grpo.max_completion_length ({spec.grpo.max_completion_length}), grpo.num_generations "
        f"({spec.grpo.num_generations}), the largest lora.rank in the search space "
        f"({spec.max_lora_rank()}) or model.max_seq_length ({spec.model.max_seq_length}); "
        "or set model.load_in_4bit: true"
    )


def kv_cache_hint(spec: SweepSpec) -> str:
    """What to change when vLLM's share of the GPU cannot hold the weights and one sequence's KV cache.

    The opposite advice to :func:`fit_hint`: here vLLM was given too *little*.
    """
    if spec.model.kv_cache_gib is not None:
        return (f"vLLM's KV cache of model.kv_cache_gib ({spec.model.kv_cache_gib} GiB) cannot hold one sequence "
                f"of model.max_seq_length ({spec.model.max_seq_length}) tokens: raise the one or lower the other")
    return (
        "vLLM's share of the GPU cannot hold the model and its KV cache: raise "
        f"model.gpu_memory_utilization (now {spec.model.gpu_memory_utilization}), or lower "
        f"model.max_seq_length ({spec.model.max_seq_length}) or set model.load_in_4bit: true"
    )


# vLLM's words when its memory budget is too small for the weights plus the KV cache.
_VLLM_TOO_SMALL = ("No available memory for the cache blocks", "KV cache is needed", "larger than the available KV cache")


class TrialCompileError(RuntimeError):
    """torch.compile failed inside the trial (Dynamo, AOTAutograd or Inductor), with the setting that avoids it."""


def compile_hint(error: BaseException) -> str:
    """What to change when the model's compilation fails: train and generate eager instead."""
    # Dynamo's first line only names the backend ("backend='inductor' raised:"); the cause follows.
    first = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
    return (f"compiling the model failed ({type(error).__name__}: {first}); set model.compile: false to "
            "train and generate without torch.compile (slower generation: bench/README.md, \"Compiled or eager\")")


def guard_errors(fn: Callable[[], T], spec: SweepSpec) -> T:
    """Run ``fn``; an error the spec can avoid says which setting to change: a CUDA or vLLM
    out-of-memory becomes :class:`TrialDoesNotFitError`, a failed torch.compile (while
    ``model.compile`` is on) :class:`TrialCompileError`."""
    import torch
    from torch._dynamo.exc import TorchDynamoException

    try:
        return fn()
    except torch.OutOfMemoryError as e:
        raise TrialDoesNotFitError(fit_hint(spec)) from e
    except TorchDynamoException as e:  # BackendCompilerFailed (Inductor, Triton), unsupported graphs
        if not spec.model.compile:
            raise
        raise TrialCompileError(compile_hint(e)) from e
    except (RuntimeError, ValueError) as e:
        text = str(e)
        first = text.splitlines()[0][:200] if text else ""
        if any(k in text for k in _VLLM_TOO_SMALL):
            raise TrialDoesNotFitError(f"{kv_cache_hint(spec)} [{first}]") from e
        if "out of memory" in text.lower():
            raise TrialDoesNotFitError(f"{fit_hint(spec)} [{first}]") from e
        raise


def load_lora_weights(model: Any, adapter_dir: Path) -> None:
    """Put a saved adapter's LoRA weights into ``model`` (a PEFT model with the same targets).

    A checkpoint holds the trial's own rank (:func:`save_lora_adapter`); a model built with
    ``lora.pad_rank`` is wider: the saved A fills the first rows, B the first columns, the rest
    is zero, as :func:`init_lora` leaves it.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir, "adapter_model.safetensors")))
    own = get_peft_model_state_dict(model)  # the same keys save_pretrained wrote
    for key, t in weights.items():
        want = own.get(key)
        if want is None or want.shape == t.shape or t.dim() != 2:
            continue  # a size mismatch left here is set_peft_model_state_dict's to report
        pad_a = ".lora_A." in key and t.shape[1] == want.shape[1] and t.shape[0] < want.shape[0]
        pad_b = ".lora_B." in key and t.shape[0] == want.shape[0] and t.shape[1] < want.shape[1]
        if pad_a or pad_b:
            wide = torch.zeros(want.shape, dtype=t.dtype)
            wide[: t.shape[0], : t.shape[1]] = t
            weights[key] = wide
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{adapter_dir}: adapter weights this model has no place for: {unexpected[:3]}")


def save_lora_adapter(model: Any, out_dir: Path, spec: SweepSpec) -> None:
    """``model.save_pretrained(out_dir)``, at the trial's own rank and alpha.

    With ``lora.pad_rank`` the model's adapter is :func:`adapter_rank` wide and PEFT writes it
    so. Everything saved (every checkpoint, the best adapter, what export merges and converts)
    must be the trial's real adapter, so that it loads into an unpadded model, merges, converts
    to GGUF and reads back like any other, and no reader ever sees the padding: A is cut to its
    first ``rank`` rows, B to its first ``rank`` columns, and adapter_config.json gets the
    trial's rank and alpha. The cut-off part must be zero (training keeps it so:
    tests/test_pad_rank.py); if it is not, cutting would change the adapter, and this refuses.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save_pretrained(str(out_dir))
    r, width = spec.lora.rank, adapter_rank(spec)
    if width == r:
        return
    path = Path(out_dir, "adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    for key, t in weights.items():
        if ".lora_A." in key or ".lora_B." in key:
            keep, rest = (t[:r], t[r:]) if ".lora_A." in key else (t[:, :r], t[:, r:])
            if rest.count_nonzero():
                raise RuntimeError(f"{key}: the padding past rank {r} (lora.pad_rank) is not zero; the adapter "
                                   "cannot be cut to its rank without changing it")
            weights[key] = keep.contiguous()
    save_file(weights, str(path), metadata=metadata)
    config_path = Path(out_dir, "adapter_config.json")
    config = json.loads(config_path.read_text())
    config["r"], config["lora_alpha"] = r, lora_alpha(spec)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_tokenizer(tokenizer: Any, out_dir: Path, cache_dir: Path) -> None:
    """``tokenizer.save_pretrained(out_dir)``, serialized once per state of the tokenizer.

    Every report's checkpoint carries the tokenizer, so that it loads on its own; Gemma's
    tokenizer.json is 32 MB and about a second to write, at every report of every trial. The
    files are written once into ``cache_dir`` and hard-linked (copied across file systems).
    """
    import hashlib
    import os
    import shutil

    # What our trials and TRL's trainers change on a tokenizer: template, pad token, sides, added tokens.
    state = "\0".join(str(getattr(tokenizer, a, None)) for a in (
        "chat_template", "pad_token", "padding_side", "truncation_side", "model_max_length"))
    state += f"\0{id(tokenizer)}\0{len(tokenizer)}"
    src = cache_dir / hashlib.sha256(state.encode()).hexdigest()[:16]
    if not src.is_dir():
        tmp = cache_dir / f".{src.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(src)
    for f in src.iterdir():
        try:
            os.link(f, out_dir / f.name)
        except OSError:
            shutil.copy2(f, out_dir / f.name)


def seed_adapter_init(spec: SweepSpec) -> None:
    """Seed every RNG a new LoRA's initialisation draws from, so that a trial's adapter starts
    the same whether its process is fresh or reused from an earlier trial (trial/warm.py)."""
    from transformers import set_seed

    set_seed(spec.grpo.seed)


ADAPTER = "default"  # the one adapter a trial trains; saved, exported and served under this name


def adapter_rank(spec: SweepSpec) -> int:
    """The rank of the adapter's tensors: the trial's ``lora.rank``, or where ``lora.pad_rank``
    resolves to padding (SweepSpec.pads_lora_rank) the largest the search can sample (what vLLM
    reserves), so every trial's adapter has one shape."""
    r = spec.lora.rank
    return max(spec.max_lora_rank(), r) if spec.pads_lora_rank() else r


def peft_lora_alpha(spec: SweepSpec) -> int | float:
    """The ``lora_alpha`` PEFT gets for an adapter :func:`adapter_rank` wide.

    PEFT scales by lora_alpha / r, and so does vLLM (Unsloth hands it the PEFT config), so a
    padded adapter gets alpha x width / rank: the same scaling, alpha / rank, as the trial's own.
    An int where it divides (the default alpha, 2 x rank, always does), else a float.
    """
    r, width = spec.lora.rank, adapter_rank(spec)
    q, rem = divmod(lora_alpha(spec) * width, r)
    return q if rem == 0 else lora_alpha(spec) * width / r


def init_lora(model: Any, spec: SweepSpec) -> None:
    """Initialise every LoRA weight of ``model`` from ``spec``'s seed alone, and set its scaling.

    PEFT's init (A: kaiming-uniform, B: zero), drawn from a generator of our own in module
    order, so a trial's adapter starts the same whichever way it was made: a fresh
    ``get_peft_model``, or :func:`resize_lora` on a warm actor's model (trial/warm.py).

    An adapter wider than the trial's rank (``lora.pad_rank``) gets the same draw in its first
    ``rank`` rows of A, and zeros in the rest of A and in B: the same function and the same
    numbers as the unpadded adapter. The padding then stays zero in training: the gradient of
    A's padded rows is B_pad^T g x^T and B's padded columns are zero; that of B's padded
    columns is g (A_pad x)^T and A's padded rows are zero; AdamW moves a zero weight with a
    zero gradient nowhere. The scaling is set to alpha / rank, not left to PEFT's
    lora_alpha / width (:func:`peft_lora_alpha`), which could differ in the last bit.
    """
    import math

    import torch
    from peft.tuners.lora import LoraLayer

    r, width = spec.lora.rank, adapter_rank(spec)
    scaling = lora_alpha(spec) / r
    gen = torch.Generator().manual_seed(spec.grpo.seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.r:
                continue
            # Padding is for Linear layers' LoRA: an embedding's (PEFT's own init, left as it is)
            # starts with A zero and B drawn, and its padded rows of A would train.
            if width != r and (ADAPTER not in module.lora_A or type(module.lora_A[ADAPTER]) is not torch.nn.Linear):
                why = (" (lora.pad_rank auto pads: trial.reuse_model is on and search.space samples lora.rank)"
                       if spec.lora.pad_rank == "auto" else "")  # the user may never have set it
                raise ValueError(f"lora.pad_rank: the LoRA of a {type(module).__name__} layer (from "
                                 f"lora.target_modules) cannot be padded{why}; set lora.pad_rank: false or drop "
                                 "that module from lora.target_modules")
            if ADAPTER not in module.lora_A:
                continue
            a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            if a.shape[0] != width or b.shape[1] != width:
                raise RuntimeError(f"a LoRA of rank {a.shape[0]} where {width} was built")
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
            a[:r].copy_(torch.empty(r, *a.shape[1:]).uniform_(-bound, bound, generator=gen))
            a[r:].zero_()
            b.zero_()
            a.grad = b.grad = None
            module.scaling[ADAPTER] = scaling


def lora_norm(model: Any) -> float:
    """L2 norm of the adapter's weights, summed in float64: a fingerprint of where training left it.

    Reported after SFT (``sft_lora_norm``): two trials of one configuration that differ later
    (a warm actor's and a fresh one's first GRPO rewards) show here whether SFT already differed.
    """
    import torch

    total = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                total += float(p.detach().double().pow(2).sum())
    return total ** 0.5


def resize_lora(model: Any, spec: SweepSpec, made_for: SweepSpec | None) -> bool:
    """Give ``model``'s adapter ``spec``'s rank and alpha in place, keeping the PEFT (and Unsloth)
    wrapping around it; weights are left for :func:`init_lora`.

    A warm actor's next trial would otherwise unload the LoRA and wrap the model again, which
    on Unsloth costs seconds of patching per trial. ``made_for``: the spec the model's current
    adapter was made for. Returns False, changing nothing, when there is none or its LoRA
    settings differ from ``spec``'s in more than rank, alpha and padding (targets, dropout), or
    the adapter is of a kind this does not resize (DoRA, rsLoRA, bias, embeddings...): the
    caller then builds it afresh.

    An adapter already :func:`adapter_rank` wide (``lora.pad_rank``: every trial's is the
    search's largest rank) keeps its Parameter objects; :func:`init_lora` copies into them.

    The targets are compared in the two specs, not in the PEFT config: Unsloth hands PEFT a
    regex of its own for an explicit module list (its vision-model path, which Gemma 3 takes),
    so the config no longer shows the list, while the same list through the same code wraps
    the same modules.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if made_for is None or not isinstance(model, PeftModel) or list(model.peft_config) != [ADAPTER]:
        return False
    own = {"rank", "alpha", "pad_rank"}  # a padded and an unpadded trial differ only in the adapter's shape
    if made_for.lora.model_dump(exclude=own) != spec.lora.model_dump(exclude=own):
        return False
    cfg = model.peft_config[ADAPTER]
    if cfg.use_dora or cfg.use_rslora or cfg.lora_bias:
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(list(m.lora_A) != [ADAPTER] or len(m.lora_embedding_A)
                         or type(m.lora_A[ADAPTER]) is not torch.nn.Linear for m in layers):
        return False
    width, alpha = adapter_rank(spec), peft_lora_alpha(spec)
    for m in layers:
        a, b = m.lora_A[ADAPTER], m.lora_B[ADAPTER]
        if a.weight.shape[0] != width or b.weight.shape[1] != width:
            # New weights of the new shape inside the same Linear modules: the graphs
            # torch.compile made of the decoder blocks (Unsloth compiles them) are guarded on the
            # modules they saw, and a rank (shape) seen before is served from the compile cache.
            # torch.empty: no draw from the global RNG, which a fresh actor would not make either.
            a.weight = torch.nn.Parameter(torch.empty(width, a.in_features, device=a.weight.device,
                                                      dtype=a.weight.dtype))
            b.weight = torch.nn.Parameter(torch.empty(b.out_features, width, device=b.weight.device,
                                                      dtype=b.weight.dtype))
            a.out_features = b.in_features = width
        # PEFT's r is the tensors' width; the scaling is the trial's alpha / rank (as init_lora sets it).
        m.r[ADAPTER], m.lora_alpha[ADAPTER], m.scaling[ADAPTER] = width, alpha, lora_alpha(spec) / spec.lora.rank
    # A new config object, not the old one edited: unsloth_zoo caches the vLLM LoRA config it
    # derives from it by identity (vllm_utils._live_lora_config), and would otherwise serve
    # GRPO's generation the previous trial's rank and alpha.
    # A shallow copy: dataclasses.replace would run LoraConfig's checks again on what Unsloth set.
    new = copy.copy(cfg)
    new.r, new.lora_alpha = width, alpha
    model.peft_config[ADAPTER] = new
    return True


def applied_lora(model: Any, spec: SweepSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA ``model`` trains, read back from its layers: ``({spec field: value}, details)``.

    By spec field (reported as ``effective/lora.rank``...): the trial's rank, the alpha its
    layers' scaling gives at that rank, and ``lora.pad_rank`` resolved (true or false, never
    auto: SweepSpec.pads_lora_rank). A padded trial's rank is its
    own, not the tensors' width: the update B A it trains has rank at most ``rank`` (the
    padding is zero). The details (``effective_config.json``) say what it was trained as: the
    tensors' width, and the r and lora_alpha PEFT (and vLLM) were given.
    """
    import math

    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    widths = sorted({m.lora_A[ADAPTER].weight.shape[0] for m in layers})
    scalings = sorted({m.scaling[ADAPTER] for m in layers})
    r = spec.lora.rank
    alpha = scalings[0] * r if len(scalings) == 1 else None
    if alpha is not None and math.isclose(alpha, round(alpha), rel_tol=1e-9):
        alpha = round(alpha)
    cfg = model.peft_config[ADAPTER]
    pad = spec.pads_lora_rank()  # what "auto" resolved to: whether this trial's adapter was padded
    ran = {"lora.rank": r, "lora.alpha": alpha, "lora.pad_rank": pad}
    details = {"rank": r, "alpha": alpha, "pad_rank": pad,
               "tensor_rank": widths[0] if len(widths) == 1 else widths,
               "scaling": scalings[0] if len(scalings) == 1 else scalings,
               "peft_r": cfg.r, "peft_lora_alpha": cfg.lora_alpha}
    return ran, details


def instance_forward(model: Any) -> Any:
    """The ``forward`` set on ``model`` itself (not its class), to put back with :func:`restore_forward`."""
    return model.__dict__.get("forward")


def restore_forward(model: Any, forward: Any) -> None:
    """Undo what trainers left on a model, so that the next trial's trainers prepare it as on a
    fresh load: Accelerate wraps ``forward`` in autocast (bf16) at a trainer's ``prepare``, and
    marks the model ``_is_accelerate_prepared``, after which every later ``prepare`` returns it
    as it is. Kept, the mark left a warm trial's SFT without autocast once GRPO had unwrapped the
    forward (Unsloth's ``unwrap_model``): another loss than on a fresh process (rank 16: 2.4630
    against 2.4855) and about 25 graphs compiled again on an H200 at 8d5b03e."""
    model.__dict__.pop("_original_forward", None)
    model.__dict__.pop("_is_accelerate_prepared", None)
    if forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = forward


def gradient_checkpointing(spec: SweepSpec, backend: str) -> str | bool:
    """``lora.gradient_checkpointing`` as ``backend`` takes it: "unsloth" (Unsloth's offloaded mode), True or False."""
    value = spec.lora.gradient_checkpointing
    if value == "unsloth" and backend != "unsloth":
        return True  # no offloaded mode without Unsloth: the nearest is plain checkpointing
    return value


def lora_alpha(spec: SweepSpec) -> int:
    return spec.lora.alpha or 2 * spec.lora.rank  # the tutorial's alpha = 2 x rank


def needs_bos(tokenizer: Any, spec: SweepSpec) -> bool:
    """Whether the chat template must print BOS.

    TRL tokenizes templated text without special tokens, so a model that needs BOS (Gemma
    produces garbage without it) only gets it if the template writes it.
    """
    if spec.model.add_bos == "always":
        return True
    if spec.model.add_bos == "never":
        return False
    return tokenizer.bos_token is not None


def prepare_tokenizer(tokenizer: Any, spec: SweepSpec) -> Any:
    """Install the spec's chat template and a pad token distinct from EOS where possible."""
    tokenizer.chat_template = template.chat_template(template.format_of(spec.format), bos_token=needs_bos(tokenizer, spec))
    if tokenizer.pad_token is None:
        # Padding with EOS would mask the EOS the model must learn to emit; unk is harmless.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


class EffectiveConfig(TrainerCallback):
    """At the start of a trainer's loop, when Unsloth and TRL have had every say: hands the
    arguments the trainer really runs with to ``check(stage, requested, args, table)`` (the
    trial's EffectiveRecord.check: records them, refuses a change to a sampled value)."""

    def __init__(self, stage: str, requested: dict[str, Any], table: dict[str, str | None],
                 check: Callable[[str, dict[str, Any], Any, dict[str, str | None]], Any]) -> None:
        self.stage, self.requested, self.table, self.check = stage, requested, table, check

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.check(self.stage, self.requested, args, self.table)


class StepReporter(TrainerCallback):
    """Hands TRL's per-step logs (reward, rewards/<name>/mean, completion length...) to the trial."""

    def __init__(self, on_step: StepCallback) -> None:
        self.on_step = on_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "reward" in logs:
            self.on_step(int(state.global_step), dict(logs))


class FirstStep(TrainerCallback):
    """Remembers when a trial first put the GPU to work: its first training loop or evaluation."""

    def __init__(self) -> None:
        self.at: float | None = None

    def mark(self) -> None:
        if self.at is None:
            self.at = time.time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.mark()

    def metrics(self, started_at: float) -> dict[str, float]:
        """``first_step_at`` (unix time) and ``startup_s`` (from the trial's start to it)."""
        if self.at is None:
            return {}
        return {"first_step_at": self.at, "startup_s": self.at - started_at}


class LoopStart(TrainerCallback):
    """When a trainer's loop began: everything before it in ``train()`` is the trainer's set-up."""

    def __init__(self) -> None:
        self.at: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.at = time.time()
