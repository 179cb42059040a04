"""Faults inside a trial, turned into a recorded cause instead of a GPU held all night.

- :class:`Watchdog`: a trial that makes no progress (no SFT or GRPO step, no evaluation)
  for ``trial.step_timeout_s`` is ended. A hang in Python code (a reward function in a loop)
  gets :class:`TrialHungError` raised in the trial's thread; a hang in native code (a stuck
  generation kernel) cannot be interrupted, so after a grace period the process exits and
  Ray retries or fails the trial. Either way the cause is written first (``fault.txt`` in
  the trial's directory), so ``status`` and the report can say why.
- :class:`TrialGuard`: a TRL/transformers callback that beats the watchdog every optimizer
  step and stops a run whose loss, gradient norm or a reward is NaN or infinite
  (:class:`TrialDivergedError`, naming the setting or the reward function to change).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import time
from typing import Any, Callable

from transformers import TrainerCallback

from grpo_ray.config.spec import SweepSpec

EXIT_HUNG = 75  # the process's exit status when a native-code hang forces it down


class TrialHungError(RuntimeError):
    """The trial made no progress for longer than ``trial.step_timeout_s``."""


class TrialDivergedError(RuntimeError):
    """The training loss (or gradient norm) became NaN or infinite."""


def diverged_hint(spec: SweepSpec, phase: str) -> str:
    lr = spec.sft.learning_rate if phase == "SFT" else spec.grpo.learning_rate
    hint = (f"lower {'sft' if phase == 'SFT' else 'grpo'}.learning_rate (now {lr:g}) or the largest lora.rank "
            f"({spec.max_lora_rank()})")
    return hint if phase == "SFT" else hint + "; check that custom reward functions return finite numbers"


class Watchdog:
    """Ends the trial when :meth:`beat` has not been called for ``timeout_s`` seconds.

    ``on_beat`` gets every beat's text too: the trial's phase for the sweep's display (trial/phases.py)."""

    def __init__(self, timeout_s: float | None, write_cause: Callable[[str], None] | None = None,
                 grace_s: float | None = None, poll_s: float | None = None,
                 on_beat: Callable[[str], None] | None = None) -> None:
        self.timeout_s, self.write_cause, self.on_beat = timeout_s, write_cause, on_beat
        # How long a Python-level interrupt may take before the process is ended.
        self.grace_s = grace_s if grace_s is not None else min(10.0, timeout_s or 10.0)
        self.poll_s = poll_s or (min(5.0, timeout_s / 4) if timeout_s else 5.0)
        self.cause: str | None = None
        self._last, self._what = time.monotonic(), "start"
        self._target = threading.get_ident()  # the thread that runs the trial
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout_s:
            self._thread = threading.Thread(target=self._watch, name="grpo-ray-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()

    def beat(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what
        if self.on_beat is not None:
            self.on_beat(what)

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        self.cause = (
            f"no progress for {idle:.0f} s after {self._what} (trial.step_timeout_s={self.timeout_s:g}): "
            "a hung generation or reward function; if the first steps only compile slowly, raise "
            "trial.step_timeout_s"
        )
        print(f"grpo-ray: {self.cause}", file=sys.stderr, flush=True)
        if self.write_cause:
            try:
                self.write_cause(self.cause)
            except OSError as e:
                print(f"grpo-ray: could not record the cause: {e}", file=sys.stderr, flush=True)
        # Python code stops at its next bytecode; native code ignores this until it returns.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(TrialHungError))
        if not self._done.wait(self.grace_s):
            print("grpo-ray: the trial is stuck in native code; ending its process", file=sys.stderr, flush=True)
            os._exit(EXIT_HUNG)


class TrialGuard(TrainerCallback):
    """Beats the watchdog every optimizer step; stops a run whose loss is not finite."""

    def __init__(self, watchdog: Watchdog, spec: SweepSpec, phase: str, steps_before: int = 0) -> None:
        # steps_before: steps an earlier attempt of this trial took (a retry from its checkpoint
        # trains the rest), so a beat counts the trial's steps, not this trainer's
        self.watchdog, self.spec, self.phase, self.steps_before = watchdog, spec, phase, steps_before

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        done, total = self.steps_before + state.global_step, self.steps_before + state.max_steps
        self.watchdog.beat(f"{self.phase} step {done}/{total}")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        for key in ("loss", "grad_norm"):
            v = logs.get(key)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise TrialDivergedError(
                    f"the {self.phase} {key.replace('_', ' ')} is {v} at step {state.global_step}: training "
                    f"diverged; {diverged_hint(self.spec, self.phase)}"
                )
        # TRL survives a non-finite reward (its advantages go NaN and the step is wasted), but the
        # trial's objective would be inf or NaN: name the reward function instead.
        for key, v in logs.items():
            if key.startswith("rewards/") and key.endswith("/mean") and isinstance(v, float) and not math.isfinite(v):
                name = key[len("rewards/"):-len("/mean")]
                raise TrialDivergedError(
                    f"reward function {name!r} returned {v} at GRPO step {state.global_step}: rewards must be "
                    "finite numbers"
                )
