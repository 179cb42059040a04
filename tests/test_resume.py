"""A sweep whose driver dies mid-way resumes with --resume: finished trials are kept, not rerun;
the seed recipe does not run twice; `status` meanwhile shows the unfinished trials as INTERRUPTED.
The finished run then serves `pull` (a non-empty destination refused unless --force)."""

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
    assert json.loads((run / "driver.lock.json").read_text())["pid"] == proc.pid  # left by the dead driver
    st = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "status", str(run)], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert st.returncode == 0 and "INTERRUPTED" in st.stdout and "RUNNING" not in st.stdout, st.stdout + st.stderr
    first = finished[0]
    reports_before = (first / "result.json").read_text().count("\n")
    before = {p.name for p in run.glob("tune_trainable_*")}

    # A private temporary directory for the trials' work directories (Ray's own stays in /tmp).
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": "/tmp"}
    r = subprocess.run(_cmd(tmp_path, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 and all(t["error"] is None and t["metrics"]["step"] == 4 for t in trials)
    configs = [json.dumps(t["config"], sort_keys=True) for t in trials]
    assert len(set(configs)) == 3, configs  # the baseline was not queued again by the second driver
    assert not (run / "driver.lock.json").exists()  # taken over from the dead driver, then released
    assert not list(tmp.glob("grpo-ray-*")), list(tmp.iterdir())  # the trials' work directories are gone
    # The final line names the winner's metrics, not a bare number.
    assert re.search(r"best trial \w+: reward [-\d.e]+, eval_accuracy [-\d.e]+", r.stdout), r.stdout[-2000:]
    after = {p.name for p in run.glob("tune_trainable_*")}
    assert before <= after and len(after) == 3  # the same trial directories, none started twice
    # The finished trial was not trained again: no report was added to its results.
    assert (first / "result.json").read_text().count("\n") == reports_before == 2
    assert (run / "best" / "best.json").exists()
    # The resumed run's display counts the trials finished before the kill and hears the rest.
    resumed = re.search(r"resuming: (\d+) trial\(s\) already finished", r.stdout + r.stderr)
    assert resumed and len(finished) <= int(resumed.group(1)) < 3
    assert "3/3" in r.stderr and "step 4: reward" in r.stderr  # a report line, not a phase line


    # The finished run serves `pull`: a non-empty destination is refused unless --force, which replaces it whole.
    def pull(*args):
        return subprocess.run([sys.executable, "-m", "grpo_ray.cli", "pull", str(run), *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    dest = tmp_path / "dest"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "stale-q4_k_m.gguf").write_text("an older export")
    for args, needle in [((a_file,), "not a directory"), ((dest,), "not empty; pass --force")]:
        p = pull(*args)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (dest / "old" / "stale-q4_k_m.gguf").exists()  # refused: untouched
    p = pull(dest, "--force")
    assert p.returncode == 0, p.stderr
    assert (dest / "best.json").exists() and not (dest / "old").exists()  # replaced whole
    assert not [x for x in tmp_path.iterdir() if ".pull-" in x.name]  # no staging left
