"""bench/trial_gpu.py speed --procs: the steps K packed trials took while all K were stepping
(the 1.7B shape packed on one GPU), on made-up step times with known answers."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import trial_gpu  # noqa: E402
from trial_gpu import steps_together  # noqa: E402


def test_only_steps_inside_the_window_where_all_step_count():
    # b starts stepping at 100 (a was alone before: its fast steps must not count) and a
    # finishes at 130 (b's last steps, alone again, must not count either)
    a = [0, 1, 2, 3, 100, 110, 120, 130]
    b = [100, 112, 124, 136, 140]
    r = steps_together([a, b])
    assert r["window_s"] == (100, 130)
    assert r["steps_per_proc"] == [3, 2]
    assert r["step_s"] == (10 + 10 + 10 + 12 + 12) / 5


def test_no_overlap_or_too_few_steps_gives_no_step_time():
    assert steps_together([[0, 1, 2], [5, 6, 7]])["step_s"] is None  # one ended before the other began
    assert steps_together([[0, 1, 2], [1]])["step_s"] is None  # one never took a whole step
    assert steps_together([])["step_s"] is None


def test_doctests():
    assert doctest.testmod(trial_gpu).failed == 0


def test_mps_mode_runs_its_sweep_between_the_daemons_start_and_quit(tmp_path, monkeypatch):
    # nvidia-cuda-mps-control is a GPU node's binary: a stand-in on PATH records how it was called
    log = tmp_path / "calls"
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text(f'#!/bin/sh\necho "args=$* stdin=$(cat)" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr("time.sleep", lambda s: None)
    import warm_sweep

    assert warm_sweep.mode_overrides("auto4+mps") == warm_sweep.mode_overrides("auto4")
    with warm_sweep.under_mps(False):
        pass
    assert not log.exists()
    try:
        with warm_sweep.under_mps(True):
            assert log.read_text().splitlines() == ["args=-d stdin="]
            raise RuntimeError("the sweep failed")
    except RuntimeError:
        pass
    assert log.read_text().splitlines() == ["args=-d stdin=", "args= stdin=quit"]  # stopped all the same
