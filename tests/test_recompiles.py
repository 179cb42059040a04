"""bench/recompiles.py: Dynamo's recompiles in a sweep's log, per function and process, from lines in
the format a trial process logs them with TORCH_LOGS=recompiles (copied from the H200 log at ffe34b9)."""

from __future__ import annotations

import doctest
import gzip
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import recompiles  # noqa: E402

HEAD = "\x1b[36m(tune_trainable pid={pid})\x1b[0m [rank0]:V1203 {t}.995000 {pid} torch/_dynamo/guards.py:4760] [{k}] [__recompiles] "


def line(pid: int, t: str, k: str, text: str) -> str:
    return HEAD.format(pid=pid, t=t, k=k) + text + "\n"


def test_counts_recompiles_by_function_and_process_and_lists_their_guards(tmp_path):
    log = "".join([
        line(7, "21:09:12", "1/1", "Recompiling function create_block_mask in /opt/x/flex_attention.py:1207"),
        line(7, "21:09:12", "1/1", "    triggered by the following guard failure(s):"),
        line(7, "21:09:12", "1/1", "    - 1/0: GLOBAL_STATE changed: grad_mode "),
        line(7, "21:09:12", "1/1", "    - User stack trace:"),
        line(7, "21:09:12", "1/1", '    -   File "/opt/x/flex_attention.py", line 1275, in create_block_mask'),
        "Capturing CUDA graphs (PIECEWISE):  41%|\n",   # other output between the lines
        line(8, "21:09:40", "3/2", "Recompiling function forward in /opt/x/modeling_gemma3.py:399"),
        line(8, "21:09:40", "3/2", "    - 3/1: GLOBAL_STATE changed: grad_mode "),
        line(8, "21:09:40", "3/2", "    - 3/0: Q_LEN == 381"),
        line(8, "21:27:00", "3/3", "Recompiling function forward in /opt/x/modeling_gemma3.py:399"),
    ])
    path = tmp_path / "warm.log.gz"
    with gzip.open(path, "wt") as f:
        f.write(log)
    with gzip.open(path, "rt") as f:
        r = recompiles.count(f)
    assert r.by_function == {"create_block_mask (flex_attention.py:1207)": 1, "forward (modeling_gemma3.py:399)": 2}
    assert r.by_process == {"7": 1, "8": 2}
    assert r.reasons == {"GLOBAL_STATE changed: grad_mode": 2, "Q_LEN == 381": 1}  # stack lines are not guards
    out = subprocess.run([sys.executable, str(BENCH / "recompiles.py"), str(path), "--after", "21:20:00"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("1 recompiles in 1 process(es), 1.0 each")
    assert "forward (modeling_gemma3.py:399)" in out and "create_block_mask" not in out


def test_doctests():
    assert doctest.testmod(recompiles).failed == 0
