"""`grpo-ray report RUN`: an HTML page with PNG plots, from a real sweep's storage.

The sweep is conftest.asha_run (real Ray, Optuna, ASHA): two finished trials, one stopped
early, one failed inside its trial.
"""

import base64
import io
import json
import re
import subprocess
import sys

from conftest import REPO
from PIL import Image

from grpo_ray.config.load import parse_spec
from grpo_ray.views.html_report import RunData, TrialView, importances, importances_png

CLI = [sys.executable, "-m", "grpo_ray.cli"]


def _pngs(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()  # decodes the whole image, not just the header
        images.append(img)
    return images


def test_report_shows_every_trial_the_plots_and_why_trials_ended(asha_run, tmp_path):
    run_dir, _ = asha_run
    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    r = subprocess.run([*CLI, "report", str(run_dir)], capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (run_dir / "report.html").read_text()
    assert all(tid in page for tid in trials)
    images = _pngs(page)
    # Curves (reward, eval accuracy, and ASHA's reward_weighted) and the Pareto front; the two
    # finished trials of the tiny model reach identical objectives, so importances are a note.
    assert len(images) == 2 and all(i.format == "PNG" and i.width > 300 and i.height > 200 for i in images)
    assert "same objective values" in page
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert f"Trial <b>{best['trial_id']}</b>" in page
    for tid, t in trials.items():
        if t["error"]:
            assert "no GRPO prompt fits grpo.max_prompt_length=8 tokens" in page
        if t["stopped_early"]:
            row = rf"<td>{tid}</td><td>stopped early</td><td>ASHA stopped it at step 2: reward_weighted"
            assert re.search(row, page)
    assert "early stopping: ASHA on reward_weighted (max), grace period 2 steps" in page
    # GPU use (here: the node's CPUs), from the trials' reported timings.
    use = json.loads((run_dir / "utilization.json").read_text())
    assert "<h2>GPU use</h2>" in page and f"<td>trials per device-hour</td><td>{use['trials_per_device_hour']:.4g}" in page
    # Every reporting trial's torch.compile time reached the sweep's numbers (none compiles on the hf backend).
    compiled = [use["compile_s"][k] for k in ("cold", "warm") if use["compile_s"][k]]
    assert sum(c["n"] for c in compiled) == use["trials"] and all(c["max"] == 0 for c in compiled)
    assert "<td>torch.compile per trial, cold (s)</td>" in page

    out = tmp_path / "elsewhere" / "r.html"
    r = subprocess.run([*CLI, "report", str(run_dir), "-o", str(out)], capture_output=True, text=True, cwd=REPO,
                       check=False)
    assert r.returncode == 0 and str(out) in r.stdout and len(_pngs(out.read_text())) == 2


def test_report_of_no_sweep_is_a_one_line_error(tmp_path):
    r = subprocess.run([*CLI, "report", str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO,
                       check=False)
    assert r.returncode == 2 and "no sweep here" in r.stderr and "Traceback" not in r.stderr


def _run(values: list[tuple[str, float, float]]) -> RunData:
    spec = parse_spec("name: x\nsearch:\n  space:\n    lora.rank: {choice: [8, 16, 32]}\n"
                      "    grpo.temperature: {uniform: [0.5, 1.5]}\n    grpo.max_steps: {int: [10, 50]}\n")
    trials = [TrialView(f"t{i}", state, {"lora.rank": [8, 16, 32][i % 3], "grpo.temperature": 0.5 + i / 20,
                                         "grpo.max_steps": 10 + (7 * i) % 13}, {"reward": rew, "eval_accuracy": acc})
              for i, (state, rew, acc) in enumerate(values)]
    return RunData(run_dir="x", search=spec.search, spec=spec, trials=trials, best=None)


def test_importances_from_a_study_rebuilt_from_trial_records():
    # Accuracy follows the temperature: Optuna's PED-ANOVA must rank it first.
    run = _run([("finished", 1.0, 0.1 * i) for i in range(12)] + [("stopped early", 0.5, 0.0), ("failed", 0, 0)])
    imp, note = importances(run)
    assert set(imp) == {"lora.rank", "grpo.temperature", "grpo.max_steps"} and "12 finished trials" in note
    assert next(iter(imp)) == "grpo.temperature", imp
    assert Image.open(io.BytesIO(base64.b64decode(importances_png(imp).split(",", 1)[1]))).format == "PNG"
    imp, note = importances(_run([("finished", 1.0, 0.5), ("stopped early", 2.0, 0.9)]))
    assert imp is None and "at least 2 finished trials" in note and "has 1" in note


def test_status_advises_when_grpo_wastes_its_steps():
    """The status caption names the shared problem and the field to change; healthy trials get none."""
    import doctest

    from grpo_ray.views import status
    from grpo_ray.views.status import TrialStatus, advice, status_table

    assert doctest.testmod(status).failed == 0
    sick = [TrialStatus(f"t{i}", "RUNNING", {}, {"step": 20, "zero_std_groups": z, "truncated_rate": c,
                                                "format_rate": fr}, 0)
            for i, (z, c, fr) in enumerate([(0.6, 0.5, 0.2), (0.5, 0.3, 0.4)])]
    lines = advice(sick)
    assert len(lines) == 3
    assert "no-grad 55%" in lines[0] and "grpo.num_generations" in lines[0]
    assert "cut 40%" in lines[1] and "grpo.max_completion_length" in lines[1]
    assert "format 30%" in lines[2] and "sft.max_steps" in lines[2]
    assert "grpo.num_generations" in str(status_table(sick).caption)
    healthy = [TrialStatus("h", "TERMINATED", {}, {"step": 40, "zero_std_groups": 0.3, "truncated_rate": 0.0,
                                                   "format_rate": 1.0}, 0),
               TrialStatus("p", "PENDING", {}, {}, 0)]  # not reported yet: not counted
    assert advice(healthy) == []


def _timed(i: int, started: float, ended: float | None) -> "object":
    from grpo_ray.views.status import TrialStatus

    last = {"step": 4, "trial_started_at": started} | ({"reported_at": ended} if ended is not None else {})
    return TrialStatus(f"t{i}", "TERMINATED" if ended is not None else "RUNNING", {}, last, 0)


def test_status_says_when_too_many_trials_at_once_left_tpe_nothing_to_learn_from():
    """search_advice counts the trials that started after the sampler's first startup_trials had
    finished; it speaks only when concurrency, not the sweep's length, kept most from learning."""
    from grpo_ray.config.search import SearchSpec
    from grpo_ray.views.status import advice, search_advice, status_table

    search = SearchSpec(startup_trials=4, num_samples=12, space={"grpo.learning_rate": {"loguniform": [1e-6, 1e-5]}})
    # Eight at once: trials 0-7 start together and end at 100-107; trials 8-11 take their slots as
    # they free up (100-103). The 4th end is at 103, so only trial 11 started after 4 had finished.
    packed = [_timed(i, 0.0, 100.0 + i) for i in range(8)] + [_timed(8 + i, 100.0 + i, 200.0 + i) for i in range(4)]
    line = search_advice(packed, search)
    assert line and line.startswith("search: tpe drew 1 of 12 started trials from finished results"), line
    assert "search.max_concurrent_trials" in line and line in advice(packed, search=search)
    assert line in str(status_table(packed, None, search).caption)
    # One at a time: each starts as the last ends, so trials 4-11 (8 of 12) learned from the rest.
    serial = [_timed(i, 10.0 * i, 10.0 * (i + 1)) for i in range(12)]
    assert search_advice(serial, search) is None
    # Nothing to say for a sampler that does not learn, without the run's search section, or for a
    # sweep too short to learn even one at a time (3 trials, 4 random ones first).
    assert search_advice(packed, search.model_copy(update={"sampler": "random"})) is None
    assert search_advice(packed, None) is None and advice(packed) == []
    assert search_advice(packed[:3], search) is None
    # A running sweep: a trial that has not reported yet is not counted; a running one counts as started.
    from grpo_ray.views.status import TrialStatus

    running = packed[:11] + [_timed(11, 103.0, None), TrialStatus("p", "PENDING", {}, {}, 0)]
    assert search_advice(running, search).startswith("search: tpe drew 1 of 12 started trials")


def test_status_reads_the_runs_memory_share_and_search_from_its_resolved_spec(asha_run, tmp_path):
    import doctest

    from grpo_ray.config import search as search_module
    from grpo_ray.views.status import resolved_settings

    assert doctest.testmod(search_module).failed == 0
    run_dir, _ = asha_run
    share, search = resolved_settings(str(run_dir))
    spec = parse_spec((run_dir / "spec.resolved.yaml").read_text())
    assert share == spec.model.gpu_memory_utilization and search == spec.search
    assert resolved_settings(str(tmp_path)) == (None, None)  # no spec.resolved.yaml: no advice lines from it
