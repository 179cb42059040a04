#!/usr/bin/env bash
# One device lease's GPU work for issues #3 and #6, after ../shared/device/stage.sh --model and
# `bash /tmp/dparts/install-on-device.sh`. Run detached (setsid nohup) and poll /tmp/res/DONE:
#   1. the real vLLM refusal (its own process: one vLLM engine per process),
#   2. the unsloth trial GPU test,
#   3. a short gemma-3-270m trial (75 SFT + 30 GRPO steps, r=16) whose LoRA is kept for
#      bench/export_gemma.py (run on CPU afterwards).
# Usage: bash bench/gpu_session.sh <commit>
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRPO_RAY_CACHE=/tmp/grpo-cache GRPO_RAY_COMMIT=${1:-unknown}
R=/tmp/res
mkdir -p $R
python3 -m pytest tests/test_gpu.py -m gpu -k vllm_share -x -s -p no:cacheprovider > $R/gpu_oom.log 2>&1; echo "rc=$?" >> $R/gpu_oom.log
python3 -m pytest tests/test_gpu.py -m gpu -k "not vllm_share" -x -p no:cacheprovider > $R/gpu_tests.log 2>&1; echo "rc=$?" >> $R/gpu_tests.log
python3 bench/trial_gpu.py learn --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf \
  --overrides '{"sft.max_steps": 75, "grpo.max_steps": 30, "grpo.report_every": 15, "data.eval.size": 100, "data.eval.before_sft": false, "lora.rank": 16}' \
  --out $R/learn_short.json --save-adapter $R/adapter > $R/learn_short.log 2>&1; echo "rc=$?" >> $R/learn_short.log
touch $R/DONE
