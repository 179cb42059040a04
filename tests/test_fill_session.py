"""bench/fill_session.sh, the script a GPU lease runs detached: its ORDER runs the named steps in
that order, names a step it does not know, and the session ends with DONE and its samplers
stopped. Run here with no step that needs a GPU (nvidia-smi's absence lands in smi.csv)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_order_runs_known_steps_names_unknown_ones_and_stops_its_samplers(tmp_path):
    env = os.environ | {"FILL_RES": str(tmp_path), "ORDER": "bogus modes tests", "MODES": "none"}
    env.pop("TESTS", None)
    out = subprocess.run(["bash", str(REPO / "bench" / "fill_session.sh"), "abc1234"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "no step 'bogus' in ORDER" in out.stderr
    assert (tmp_path / "DONE").exists() and (tmp_path / "smi.csv").exists()
    assert not (tmp_path / "warm.log").exists() and not (tmp_path / "gpu_tests.log").exists()  # MODES=none, no TESTS
    # the samplers (nvidia-smi, the top loop) end with the session, not with the machine
    pids = (tmp_path / "samplers.pid").read_text().split()
    assert len(pids) == 2
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z", f"sampler {pid} still running"


def test_the_retired_session_wide_mps_switch_is_refused_before_any_step(tmp_path):
    # MPS= and a mode's "+mps" part were two ways to one thing; the switch is refused at once, so a
    # lease learns of it in its first poll, not after the steps before the modes
    env = os.environ | {"FILL_RES": str(tmp_path), "ORDER": "modes", "MODES": "none", "MPS": "1"}
    out = subprocess.run(["bash", str(REPO / "bench" / "fill_session.sh"), "abc1234"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "add +mps to the modes" in out.stderr
    assert not (tmp_path / "DONE").exists() and not (tmp_path / "smi.csv").exists()
