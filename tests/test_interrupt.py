"""Ctrl-C, SIGTERM and a second driver on a real sweep (issue #26).

One small sweep, driven as a user would from a terminal, in four real driver processes:

1. it runs; a second ``sweep`` of the same run is refused (exit 2, naming the holder);
2. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once a trial finished:
   exit 130, the resume command printed, nothing exported, finished trials and checkpoints
   kept, ``status`` shows the unfinished trials as INTERRUPTED;
3. ``--resume``, then SIGTERM and a second signal: it stops at once (exit 143), nothing exported;
4. ``--resume`` to the end: every trial finished once, no configuration run twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

SUMMARY: dict[str, int] = {}  # for the fault-injection line (conftest.py)


def _states(run: Path) -> dict[str, str]:
    """trial id -> status in Tune's newest experiment snapshot (what resume and status read)."""
    snaps = sorted(run.glob("experiment_state-*.json"))
    if not snaps:
        return {}
    try:
        state = json.loads(snaps[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    return {json.loads(e[0])["trial_id"]: json.loads(e[0])["status"] for e in state["trial_data"]}


def _wait(what: str, cond, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "intr"
    spec["sft"]["max_steps"] = 2
    spec["data"]["eval"]["size"] = 4
    spec["search"].update(num_samples=3, max_concurrent_trials=2, max_failures=0)
    spec["export"] = {"enabled": False}  # this test is about the search; test_resume exports
    root = tmp_path_factory.mktemp("intr")
    (root / "intr.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "intr.yaml"


def _driver(spec: Path, storage: Path, log: Path, *extra: str) -> subprocess.Popen:
    # Its own session, as a terminal's foreground job: Ctrl-C reaches the driver and Ray's processes.
    return subprocess.Popen([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec), "--storage", str(storage),
                             *extra], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_interrupt_concurrent_driver_and_resume(spec_file, tmp_path):
    storage, run = tmp_path / "runs", tmp_path / "runs" / "intr"
    a = _driver(spec_file, storage, tmp_path / "a.log")
    try:
        # 1. a second driver of the same run, while the first runs
        _wait("the first driver's lock", lambda: (run / "driver.lock.json").exists(), a, 120)
        b = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec_file), "--storage", str(storage)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        said = " ".join(b.stderr.split())
        assert f"held by another sweep (pid {a.pid} on host " in said and "Traceback" not in said

        # 2. Ctrl-C once a trial finished
        _wait("a finished trial", lambda: "TERMINATED" in _states(run).values(), a)
        os.killpg(a.pid, signal.SIGINT)
        rc = a.wait(timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    out = (tmp_path / "a.log").read_text()
    assert rc == 130, out[-3000:]
    assert f"grpo-ray sweep {spec_file} --storage {storage} --resume" in " ".join(out.split())
    assert not (run / "best").exists() and not (run / "trials.json").exists()  # nothing selected or exported
    SUMMARY.update(second_drivers=1, interrupts=1)
    assert not (run / "driver.lock.json").exists()  # released
    states = _states(run)
    finished = {t for t, s in states.items() if s == "TERMINATED"}
    assert finished and len(states) >= 2, states
    for tid in finished:  # their results and checkpoints are kept
        (trial_dir,) = run.glob(f"tune_trainable_{tid}_*")
        assert list(trial_dir.glob("checkpoint_*")), trial_dir
    st = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "status", str(run)], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert st.returncode == 0, st.stderr
    if len(finished) < 3:
        assert "INTERRUPTED" in st.stdout and "RUNNING" not in st.stdout, st.stdout

    # 3. resume, then SIGTERM and a second signal: stops at once
    c = _driver(spec_file, storage, tmp_path / "c.log", "--resume")
    try:
        _wait("the resumed sweep's trials", lambda: "started:" in (tmp_path / "c.log").read_text(), c)
        os.kill(c.pid, signal.SIGTERM)
        time.sleep(0.2)  # while Tune stops the trials and saves its state
        t0 = time.time()
        os.kill(c.pid, signal.SIGINT)
        rc = c.wait(timeout=120)
        at_once = time.time() - t0
    finally:
        if c.poll() is None:
            os.killpg(c.pid, signal.SIGKILL)
    out = (tmp_path / "c.log").read_text()
    assert rc == 143, out[-3000:]
    assert at_once < 30, at_once
    assert not (run / "best").exists()
    assert finished <= {t for t, s in _states(run).items() if s == "TERMINATED"}  # nothing already written lost
    SUMMARY["interrupts"] = 2

    # 4. resume to the end
    d = _driver(spec_file, storage, tmp_path / "d.log", "--resume")
    rc = d.wait(timeout=600)
    out = (tmp_path / "d.log").read_text()
    assert rc == 0, out[-3000:]
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 and all(t["error"] is None and t["metrics"]["step"] == 4 for t in trials), trials
    configs = [json.dumps(t["config"], sort_keys=True) for t in trials]
    assert len(set(configs)) == 3, configs  # the baseline (or any configuration) ran once
    SUMMARY.update(clean_resumes=1, lost=len(finished - {t["trial_id"] for t in trials}))
    assert (run / "best" / "best.json").exists()
    assert "best trial" in out and "reward " in out and "eval_accuracy " in out

    # 5. --resume of a run saved by a grpo-ray whose modules have moved (an upgrade between two
    # nights): Tune pickled our callbacks by module path. Simulated by renaming one module path in
    # a copy's tuner.pkl to a same-length one that does not exist (the pickle stays well-formed).
    old = tmp_path / "old" / "intr"
    shutil.copytree(run, old)
    pkl = (old / "tuner.pkl").read_bytes()
    assert b"grpo_ray.sweep.tune_progress" in pkl
    (old / "tuner.pkl").write_bytes(pkl.replace(b"grpo_ray.sweep.tune_progress", b"grpo_ray.xxxxx.tune_progress"))
    e = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "sweep", str(spec_file), "--storage",
                        str(tmp_path / "old"), "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    said = " ".join(e.stderr.split())
    assert e.returncode == 2 and "Traceback" not in said, e.stderr[-3000:]
    assert "saved by another version of grpo-ray" in said and f"search.warm_start: ['{old}']" in said, said
    assert (old / "best" / "best.json").exists() and not (old / "driver.lock.json").exists()  # nothing lost, lock freed
