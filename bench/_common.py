"""What every benchmark records beside its numbers: the device and the commit measured."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_info() -> dict[str, object]:
    """Platform, CPU model, core count, Python; and the GPU when nvidia-smi answers."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, object] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                               "python": platform.python_version()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            info["gpu"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def commit(*measured: str) -> str:
    """HEAD, unless the measured files differ from it (then the numbers belong to no commit).

    ``GRPO_RAY_COMMIT`` wins: the device machine's copy of the tree has no .git.
    """
    if os.environ.get("GRPO_RAY_COMMIT"):
        return os.environ["GRPO_RAY_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", *measured], cwd=REPO, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return "uncommitted" if dirty.stdout.strip() else head.stdout.strip()


@contextmanager
def under_mps(on: bool):
    """Run the block with the CUDA MPS control daemon up (when ``on``): processes that create
    their CUDA context meanwhile (the sweep's trials) share the GPU through it, their kernels
    running side by side instead of time-sliced (bench/share_gpu.py measured both)."""
    if not on:
        yield
        return
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True, stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, check=False)
        time.sleep(2)  # the daemon and its server exit before the next mode's processes start


def read_smi(path: str) -> list[tuple[float, float, float]]:
    """(unix time, GPU utilization %, memory used MiB) per line of the benchmarks' nvidia-smi CSV
    (``--query-gpu=timestamp,utilization.gpu,memory.used``); header and error lines are skipped."""
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            rows.append((t.timestamp(), float(parts[1].rstrip(" %")), float(parts[2].split()[0])))
        except (ValueError, IndexError):
            continue  # a header or an error line
    return rows
