"""bench/phase_clock.py, the step profiler of the 1.7B benchmark: its arithmetic on a made-up
trainer (the real trainer's run: `python bench/phase_clock.py`, the smoke recipe on CPU)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from phase_clock import PhaseClock  # noqa: E402


def test_phases_nest_and_the_derived_ones_are_what_is_left():
    clock = PhaseClock()
    gen = clock.wrap(lambda: time.sleep(0.03), "generate_and_score")
    loss = clock.wrap(lambda: time.sleep(0.01), "loss_forward")

    def training_step():
        gen()
        loss()
        time.sleep(0.02)  # the backward pass

    step = clock.wrap(training_step, "training_step")
    clock.step_end()  # the loop's start: no step yet
    for _ in range(6):
        step()
        time.sleep(0.005)  # optimizer and callbacks
        clock.step_end()
    s = clock.summary()
    assert s["steps"] == 6 and s["steady_steps"] == 4  # the first third left out
    m = s["mean_s"]
    # sleep() only overshoots: firm lower bounds, loose upper ones (a busy 2-core machine)
    assert 0.019 < m["backward"] < 0.5 and 0.004 < m["optimizer_and_rest"] < 0.5
    assert abs(m["step"] - (m["training_step"] + m["optimizer_and_rest"])) <= 1.5e-4  # each rounded to 4 places
    assert 0.1 < s["share_of_step"]["generate_and_score"] < 0.9


def test_no_step_no_numbers():
    assert PhaseClock().summary() == {"steps": 0}
