"""Where a GRPO step's time goes, measured inside the trainer ("Fill the GPU": the 1.7B step, profiled).

``install()`` wraps methods of the GRPOTrainer class that ``from trl import GRPOTrainer`` returns
*now* (after ``import unsloth`` that is Unsloth's patched class; without it, TRL's own), so call
it after the backend is imported and before the trainer is built. Each wrapped call is timed
with the GPU synchronised on both sides, so asynchronous kernels are charged to the phase that
launched them:

- ``generate_and_score``: ``_generate_and_score_completions``: prompts -> completions (vLLM or
  ``generate``), rewards, advantages, and the old / reference log-probs when they are needed;
- ``generate``: ``_generate``, the part of the above that produces completions;
- ``loss_forward``: ``compute_loss``, the policy's forward pass and the loss;
- ``training_step``: ``Trainer.training_step``: inputs (the two above) plus the backward pass;
- ``step``: optimizer step to optimizer step (``on_step_end``), everything included.

``backward = training_step - generate_and_score - loss_forward`` and
``optimizer_and_rest = step - training_step`` (optimizer, scheduler, logging, our callbacks).
TRL's own ``profiling_context`` timings (``vLLM.generate``, ``sync_weights``, each reward
function) are recorded too, under ``trl/<name>``. ``summary()`` gives per-phase means over the
steady steps (the first third, compilation and warm-up, left out).

Usage: ``python bench/trial_gpu.py speed --phases ...`` (the device), or on CPU
``python bench/phase_clock.py`` (the smoke recipe on the hf backend: checks the plumbing).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Callable

WRAPPED = {"_generate_and_score_completions": "generate_and_score", "_generate": "generate",
           "compute_loss": "loss_forward", "training_step": "training_step"}


class PhaseClock:
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []  # one dict per optimizer step: phase -> seconds
        self._current: dict[str, float] = defaultdict(float)
        self._last_step_end: float | None = None
        self._depth = 0  # only the outermost call of a phase counts (compute_loss may call itself)

    @staticmethod
    def _sync() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - timing must never fail the run
            pass

    def wrap(self, fn: Callable, phase: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self._current[phase] += time.perf_counter() - t
        timed.__wrapped_by_phase_clock__ = True  # type: ignore[attr-defined]
        return timed

    def trl_metric(self, name: str, seconds: float) -> None:
        self._current[f"trl/{name}"] += seconds

    def step_end(self) -> None:
        self._sync()
        now = time.perf_counter()
        if self._last_step_end is not None:
            self._current["step"] = now - self._last_step_end
            self.steps.append(dict(self._current))
        self._current = defaultdict(float)
        self._last_step_end = now

    def summary(self) -> dict[str, Any]:
        steady = self.steps[len(self.steps) // 3:]
        if not steady:
            return {"steps": 0}
        keys = sorted({k for s in steady for k in s})
        mean = {k: statistics.fmean(s.get(k, 0.0) for s in steady) for k in keys}
        derived = {"backward": mean.get("training_step", 0.0) - mean.get("generate_and_score", 0.0)
                   - mean.get("loss_forward", 0.0),
                   "optimizer_and_rest": mean.get("step", 0.0) - mean.get("training_step", 0.0)}
        return {"steps": len(self.steps), "steady_steps": len(steady),
                "mean_s": {k: round(v, 4) for k, v in (mean | derived).items()},
                "share_of_step": {k: round(v / mean["step"], 3) for k, v in (mean | derived).items()
                                  if mean.get("step") and k != "step"}}


CLOCK = PhaseClock()


def install(clock: PhaseClock = CLOCK) -> PhaseClock:
    """Wrap the current GRPOTrainer class's phases, TRL's profiling timings and the step end."""
    import trl
    from transformers import TrainerCallback

    cls = trl.GRPOTrainer
    for method, phase in WRAPPED.items():
        fn = getattr(cls, method, None)
        if fn is not None and not getattr(fn, "__wrapped_by_phase_clock__", False):
            setattr(cls, method, clock.wrap(fn, phase))
    try:
        from trl.extras import profiling

        original = profiling.ProfilingContext._log_metrics

        def log_metrics(self: Any, duration: float) -> None:
            clock.trl_metric(self.name, duration)
            return original(self, duration)

        profiling.ProfilingContext._log_metrics = log_metrics
    except (ImportError, AttributeError):
        pass

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            clock.step_end()

    init = cls.__init__

    @functools.wraps(init)
    def with_callback(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [StepEnd()]
        init(self, *args, **kwargs)

    if not getattr(init, "__wrapped_by_phase_clock__", False):
        with_callback.__wrapped_by_phase_clock__ = True  # type: ignore[attr-defined]
        cls.__init__ = with_callback
    return clock


def _cpu_check() -> dict[str, Any]:
    """The smoke recipe's first trial on the hf backend, phases clocked: the plumbing, not a measurement."""
    from pathlib import Path

    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides
    from grpo_ray.trial.run import run_trial

    repo = Path(__file__).resolve().parents[1]
    spec = apply_overrides(load_spec(repo / "sweeps" / "smoke.yaml"),
                           {"backend": "hf", "grpo.max_steps": 6, "grpo.report_every": 6, "sft.max_steps": 1})
    import grpo_ray.trial.hf  # noqa: F401 - the backend first, as a trial imports it
    install()
    run_trial({}, spec, report=lambda m, d: None)
    return CLOCK.summary()


if __name__ == "__main__":
    json.dump(_cpu_check(), sys.stdout, indent=2)
    print()
