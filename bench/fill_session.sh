#!/usr/bin/env bash
# One device lease for "Fill the GPU" (#24) and the GPU tests of the package layout (#23), after
# ../shared/device/stage.sh --model and `bash /tmp/dparts/install-on-device.sh`. Run detached
# from a copy of the repo and poll /tmp/res (bench/README.md, "Compiled or eager"):
#   cp -r . /tmp/repo && cd /tmp/repo && setsid nohup bash bench/fill_session.sh <commit> > /tmp/res.log 2>&1 &
# In order, each step's output kept under /tmp/res as it goes (a lease can end at any point):
#   1. tests/test_gpu.py: the vLLM refusal in its own process, then the rest (they also fill the
#      node's compile caches, so the compiled arm below starts as a sweep's later trials do);
#   2. bench/warm_sweep.py, MODES (default eager:3,reuse:3,pack4+eager:8) with OVERRIDES (default
#      20 GRPO steps per trial): eager against compiled, one trial per GPU, same search seed so
#      trial k is the same configuration in both; then four eager trials per GPU;
# with nvidia-smi every 2 s (smi.csv) and the busiest threads every 15 s (top.txt: host-side
# contention of packed trials).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRPO_RAY_CACHE=/tmp/grpo-cache \
  CUDA_VISIBLE_DEVICES=0 GRPO_RAY_TRIAL_LOGS=1 GRPO_RAY_COMMIT=${1:-unknown}
R=/tmp/res
mkdir -p $R
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 > $R/smi.csv 2>&1 &
(while sleep 15; do date -u +%FT%TZ; top -b -H -n 1 -w 160 | sed -n 7,22p; done) > $R/top.txt 2>&1 &
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest tests/test_gpu.py -m gpu -k vllm_share -x -s -p no:cacheprovider > $R/gpu_oom.log 2>&1
  echo "rc=$?" >> $R/gpu_oom.log
  python3 -m pytest tests/test_gpu.py -m gpu -k "not vllm_share" -x -p no:cacheprovider --durations=0 > $R/gpu_tests.log 2>&1
  echo "rc=$?" >> $R/gpu_tests.log
fi
python3 bench/warm_sweep.py --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --out $R/warm.json \
  --modes "${MODES:-eager:3,reuse:3,pack4+eager:8}" \
  --overrides "${OVERRIDES:-{\"grpo.max_steps\": 20, \"grpo.report_every\": 20\}}" > $R/warm.log 2>&1
echo "rc=$?" >> $R/warm.log
touch $R/DONE
