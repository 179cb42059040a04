"""A sweep whose driver dies mid-way resumes with --resume: finished trials are kept, not rerun."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO


def _recorded_finished(run) -> set[str]:
    """Trial ids that Tune's last experiment snapshot records as finished."""
    done = set()
    for f in run.glob("experiment_state-*.json"):
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):  # caught mid-write
            continue
        for entry in state["trial_data"]:
            trial = json.loads(entry[0])
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def _cmd(storage, *extra):
    return [sys.executable, "-m", "grpo_ray.cli", "sweep", "sweeps/smoke.yaml", "--storage", str(storage), *extra]


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run = tmp_path / "smoke"
    deadline = time.time() + 300
    finished: list = []
    while time.time() < deadline and not finished:
        # "Finished" means recorded so in Tune's experiment snapshot, which is what resume reads.
        done = _recorded_finished(run)
        finished = [p for p in run.glob("tune_trainable_*") if p.name.split("_")[2] in done]
        time.sleep(0.2)
    assert finished, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    proc.wait()
    assert not (run / "best" / "best.json").exists()
    first = finished[0]
    reports_before = (first / "result.json").read_text().count("\n")
    before = {p.name for p in run.glob("tune_trainable_*")}

    r = subprocess.run(_cmd(tmp_path, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 and all(t["error"] is None and t["metrics"]["step"] == 4 for t in trials)
    after = {p.name for p in run.glob("tune_trainable_*")}
    assert before <= after and len(after) == 3  # the same trial directories, none started twice
    # The finished trial was not trained again: no report was added to its results.
    assert (first / "result.json").read_text().count("\n") == reports_before == 2
    assert (run / "best" / "best.json").exists()
    # The resumed run's display counts the trials finished before the kill and hears the rest.
    resumed = re.search(r"resuming: (\d+) trial\(s\) already finished", r.stdout + r.stderr)
    assert resumed and len(finished) <= int(resumed.group(1)) < 3
    assert "3/3" in r.stderr and "step 4" in r.stderr
