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
    import warm_sweep  # parse_modes: the whole --modes list is checked before the first sweep starts

    assert doctest.testmod(warm_sweep).failed == 0


def test_a_mode_with_its_own_environment_runs_on_a_ray_of_its_own(monkeypatch):
    # noflex: the trials' environment says so, which Ray's workers take from the Ray started for
    # the sweep: that Ray is started for the mode, with the variable set, and gone after it
    import os

    import ray
    import warm_sweep

    monkeypatch.delenv("UNSLOTH_ENABLE_FLEX_ATTENTION", raising=False)
    assert warm_sweep.mode_overrides("auto+noflex") == warm_sweep.mode_overrides("auto")  # no spec change
    ray.init(num_cpus=1, include_dashboard=False)  # the Ray of the modes before
    try:
        with warm_sweep.under_env(warm_sweep.env_of("auto+noflex")):
            assert not ray.is_initialized()  # the sweep starts its own, with the variable set
            ray.init(num_cpus=1, include_dashboard=False)

            @ray.remote(num_cpus=0)
            def worker_env() -> str | None:
                return os.environ.get("UNSLOTH_ENABLE_FLEX_ATTENTION")

            assert ray.get(worker_env.remote()) == "0"  # a trial process sees it
        assert not ray.is_initialized() and "UNSLOTH_ENABLE_FLEX_ATTENTION" not in os.environ
    finally:
        ray.shutdown()


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
    # lora.pad_rank on top of any mode, and a spec the benchmark's own validates with
    assert warm_sweep.mode_overrides("auto4+pad") == warm_sweep.mode_overrides("auto4") | {"lora.pad_rank": True}
    from grpo_ray.config.load import load_spec
    from grpo_ray.config.overrides import apply_overrides

    bench = load_spec(Path(warm_sweep.__file__).parent / "warm_sweep.yaml")
    assert apply_overrides(bench, warm_sweep.mode_overrides("auto4+pad")).lora.pad_rank is True
    # The benchmark's warm modes search lora.rank, so the default (auto) pads them; nopad compares
    assert apply_overrides(bench, warm_sweep.mode_overrides("auto4")).pads_lora_rank()
    assert not apply_overrides(bench, warm_sweep.mode_overrides("auto4+nopad")).pads_lora_rank()
    # groups8 fixes the group size: it leaves the search space, the rest of the space stays
    fixed = apply_overrides(bench, warm_sweep.fixed_by_mode(bench, warm_sweep.mode_overrides("auto8+groups8")))
    assert fixed.grpo.num_generations == 8 and "grpo.num_generations" not in fixed.search.space
    assert set(fixed.search.space) == set(bench.search.space) - {"grpo.num_generations"}
    assert warm_sweep.fixed_by_mode(bench, warm_sweep.mode_overrides("auto8")) == warm_sweep.mode_overrides("auto8")
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


def test_packed_trials_leave_the_barrier_together_after_the_last_arrives(tmp_path):
    # real processes arriving 0, 1 and 2 s apart, as packed trials finish their first steps
    import json
    import subprocess
    import time

    bench = Path(__file__).resolve().parents[1] / "bench"
    code = ("import sys, time, json; sys.path.insert(0, {b!r}); from trial_gpu import wait_at_barrier; "
            "time.sleep({d}); a = time.time(); w = wait_at_barrier({f!r}, 3, poll_s=0.05); "
            "print(json.dumps([a, time.time(), w]))")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(b=str(bench), d=d, f=str(tmp_path / "b"))],
                              stdout=subprocess.PIPE, text=True) for d in (0, 1, 2)]
    out = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    last_arrival = max(a for a, _, _ in out)
    assert all(left >= last_arrival for _, left, _ in out)  # nobody left before the last came
    assert max(left for _, left, _ in out) - last_arrival < 1.0  # and all left soon after it
    assert out[0][2] > out[2][2] + 1.0  # the first waited longest

    t0 = time.time()  # a neighbour that never comes (a trial that died) does not hang the others
    waited = trial_gpu.wait_at_barrier(tmp_path / "lonely", 2, timeout_s=0.5, poll_s=0.05)
    assert 0.5 <= waited < 5 and time.time() - t0 < 5


def test_steps_are_grouped_by_how_many_trials_stepped_meanwhile():
    # a: alone from 0 to 10, then with b until 20; b then alone until 31; c never stepped
    a = [0, 5, 10, 14, 20]
    b = [10, 14, 18, 25, 31]
    r = trial_gpu.steps_by_concurrency([a, b, []], completions_per_step=8)
    assert r[1]["steps"] == 4 and r[1]["step_s"] == (5 + 5 + 7 + 6) / 4  # a's first two, b's last two
    assert r[2]["steps"] == 4 and r[2]["step_s"] == (4 + 6 + 4 + 4) / 4  # both in 10..20
    assert r[2]["card_completions_per_s"] == 2 * 8 / r[2]["step_s"]
    assert trial_gpu.level_windows([a, b]) == {1: [(0, 10), (20, 31)], 2: [(10, 20)]}


def test_packed_summary_joins_levels_with_the_cards_samples(tmp_path):
    # nvidia-smi's CSV as fill_session.sh writes it, with a line that is not a sample
    from datetime import datetime, timezone

    def stamp(t):
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]

    base = 1_796_290_000
    smi = tmp_path / "smi.csv"
    smi.write_text("".join(f"{stamp(base + t)}, {u} %, {m} MiB\n" for t, u, m in
                           [(1, 60, 1000), (5, 60, 1000), (12, 90, 3000), (18, 92, 3100), (25, 50, 2000)])
                   + "Unable to determine the device handle\n")
    one = {"completions_per_step": 8, "step_at": [base + t for t in (0, 2, 4, 6)]}
    a = {"completions_per_step": 8, "step_at": [base + t for t in (0, 4, 10, 13, 16, 19)]}
    b = {"completions_per_step": 8, "step_at": [base + t for t in (10, 13, 16, 19, 22, 30)]}
    numbers = {"k1": {"runs": [one]}, "k2": {"runs": [a, b]}, "k4": {"runs": []}}
    r = trial_gpu.packed_summary(numbers, trial_gpu.read_smi(str(smi)))
    assert set(r) == {"k1", "k2"}  # a run that left no trial's numbers is left out
    assert r["k1"]["levels"][1]["vs_alone"] == 1.0
    two = r["k2"]["levels"][2]
    assert two["step_s"] == 3 and two["nvml_util_pct"] == 91 and two["peak_mib"] == 3100
    assert two["vs_alone"] == (2 * 8 / 3) / (8 / 2)


def test_packed_trials_step_together_after_the_barrier_on_cpu(tmp_path):
    # The whole --procs path on real trials (the smoke spec's tiny model, hf backend, TRL's
    # GRPOTrainer on CPU): K processes, the barrier hooked into the trial's step logging, their
    # numbers embedded for packed-summary. On the GPU the same path packs the 1.7B shape.
    import json
    import subprocess

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml").read_text())
    spec["sft"]["max_steps"] = 2
    spec["data"]["eval"].update(size=4, max_new_tokens=8)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "packed.json"
    bench = Path(__file__).resolve().parents[1] / "bench"
    r = subprocess.run([sys.executable, str(bench / "trial_gpu.py"), "speed", "--procs", "1,2", "--steps", "6",
                        "--spec", str(tmp_path / "spec.yaml"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    two = result["numbers"]["k2"]
    assert two["finished"] == 2 and len(two["runs"]) == 2
    # after the barrier both step from (nearly) the same moment, so all their later steps count together
    starts = [run["step_at"][0] for run in two["runs"]]
    assert abs(starts[0] - starts[1]) < 0.5
    assert all(n >= 3 for n in two["together"]["steps_per_proc"]) and two["card_completions_per_s"] > 0
    assert two["vs_k1"] is not None and result["config"]["spec"] == str(tmp_path / "spec.yaml")
    summary = trial_gpu.packed_summary(result["numbers"])
    assert summary["k2"]["levels"][2]["steps"] >= 6


def test_the_density_benchmark_runs_its_modes_end_to_end_on_cpu(tmp_path):
    # bench/warm_sweep.py as a lease runs it (real Ray Tune sweeps, one per mode), on the smoke
    # spec's tiny model with --spec/--model: a crash in the driver would otherwise cost a lease.
    import json
    import subprocess

    out = tmp_path / "warm.json"
    overrides = {"storage": str(tmp_path / "runs"), "grpo.max_steps": 2, "sft.max_steps": 2,
                 "export.enabled": False, "data.eval.size": 4}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "warm_sweep.py"),
                        "--model", "builtin:tiny-qwen3", "--spec", "sweeps/smoke.yaml", "--out", str(out),
                        "--modes", "reuse:2,auto:1", "--overrides", json.dumps(overrides)],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "--model builtin:tiny-qwen3" in result["command"]
    assert [len(m["trials"]) for m in result["modes"].values()] == [2, 1]
    assert all(t["error"] is None for m in result["modes"].values() for t in m["trials"])
    assert result["modes"]["auto"]["overrides"]["resources.gpu"] == "auto"
