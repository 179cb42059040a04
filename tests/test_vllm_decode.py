"""bench/vllm_decode.py (the 1.7B decode, with and without the LoRA, on a GPU): its arithmetic on
known numbers here, and that the script parses its arguments without a GPU stack."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import vllm_decode  # noqa: E402


def test_doctests():
    assert doctest.testmod(vllm_decode).failed == 0


def test_lora_share_of_a_step():
    assert vllm_decode.lora_share(3.0, 3.0) == 0.0
    assert vllm_decode.lora_share(1.0, 4.0) == 0.75
    assert vllm_decode.per_token_ms([0.512], 256) == {"ms_per_token_step": 2.0, "sd": 0.0, "runs": 1}


def test_help_needs_no_gpu_stack():
    out = subprocess.run([sys.executable, str(BENCH / "vllm_decode.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--profile" in out.stdout
