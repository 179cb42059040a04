"""bench/share_gpu.py, the GPU-sharing benchmark of "Fill the GPU": its mechanics on CPU with the
tiny model (K processes loaded, started together, every step timed, scaling against K=1). The
GPU numbers, with and without CUDA MPS, come from the device (bench/README.md)."""

import json
import subprocess
import sys

from conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "share_gpu.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_k_processes_step_together_and_each_step_is_timed(tiny_model_dir, tmp_path):
    out = tmp_path / "share.json"
    r = _run("--device", "cpu", "--model-dir", str(tiny_model_dir), "--procs", "1,2", "--steps", "3",
             "--warmup", "1", "--generations", "2", "--new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bench"] == "share_gpu" and "command" in result and "commit" in result
    assert [(run["k"], run["mps"]) for run in result["runs"]] == [(1, "off"), (2, "off")]
    one, two = result["runs"]
    assert one["scaling"] == 1.0 and one["gpu_util_mean"] is None  # no NVML on CPU
    for run in (one, two):
        assert len(run["processes"]) == run["k"] == len(run["per_process_step_s"])
        assert len({p["pid"] for p in run["processes"]}) == run["k"]  # K separate processes
        for p in run["processes"]:
            assert len(p["steps"]) == 3
            for s in p["steps"]:
                assert s["step_s"] > 0 and abs(s["step_s"] - s["generate_s"] - s["train_s"]) < 1e-6
        # the card's rate is the sum of the processes' rates; scaling is it against K=1's one process
        assert abs(run["steps_per_s"] - sum(1 / x for x in run["per_process_step_s"])) < 1e-9
    assert abs(two["scaling"] - two["steps_per_s"] / one["steps_per_s"]) < 1e-9


def test_bad_arguments_exit_2_with_what_to_change(tmp_path):
    r = _run("--device", "cpu", "--model-dir", str(tmp_path), "--steps", "2", "--warmup", "2",
             "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--steps (2) must exceed --warmup (2)" in r.stderr
    r = _run("--device", "cpu", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--gguf / --model-dir" in r.stderr

