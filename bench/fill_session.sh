#!/usr/bin/env bash
# One device lease for "Fill the GPU" (#24) and the GPU tests of the package layout (#23), after
# ../shared/device/stage.sh --model and `bash /tmp/dparts/install-on-device.sh`. Run detached
# from a copy of the repo and poll /tmp/res (bench/README.md, "Compiled or eager"):
#   cp -r . /tmp/repo && cd /tmp/repo && setsid nohup bash bench/fill_session.sh <commit> > /tmp/res.log 2>&1 &
# In order, each step's output kept under /tmp/res as it goes (a lease can end at any point):
#   1. with SHARE (e.g. 1,2,4,8): bench/share_gpu.py, K processes stepping on one GPU at once,
#      without and with CUDA MPS (minutes; no engine start);
#   2. with SPEED (e.g. plain,plain:2 or phases): bench/trial_gpu.py speed on the random Qwen3-1.7B
#      shape, ours against the bare Unsloth script, without or with the phase clock, at 1 or N
#      prompts per step (about 6 minutes each: two engine starts);
#   3. with PACKED (e.g. 1,2,4): bench/trial_gpu.py speed --procs, K of our 1.7B-shape trials at
#      once on the GPU for each K in that order, stepping together after their first step (the
#      card's completions per second against one); PACKED_MPS=off,on: then again under CUDA MPS;
#   4. with GEMMA_CKPT (e.g. unsloth,false): gemma-3-270m's trial (bench/warm_sweep.yaml), its plain
#      GRPO step with each lora.gradient_checkpointing (the recomputing backward was the largest
#      share of its warm trials' py-spy samples at c2ff95b); with GEMMA_PHASES=1: the phase clock on it;
#   5. with TESTS (a pytest -k expression): those of tests/test_gpu.py (all of them took 870 s of
#      the lease at 5446a99, most of it compilation on a cold machine; after the benchmarks, which
#      leave the node's compile caches warm);
#   6. unless MODES=none, bench/warm_sweep.py (WARM_MODEL=qwen3: on the 1.7B shape), MODES (default eager:3,reuse:3,pack4+eager:8) with OVERRIDES (default
#      20 GRPO steps per trial, a report every 5: bench/warm_summary.py times each window); a mode
#      part "+mps" runs that mode under CUDA MPS (auto4+mps:8). The lease at 5446a99 ran the
#      default until its time ran out in the second mode;
# ORDER (default "share speed packed gemma_ckpt gemma_phases tests modes") runs the steps in another
# order or fewer of them, e.g. ORDER="modes decode gemma_ckpt tests": what matters most first; the
# step "decode" (only when named) is bench/vllm_decode.py --profile: the 1.7B's vLLM decode with and
# without its LoRA.
# with nvidia-smi every 2 s (smi.csv) and the busiest threads every 15 s (top.txt: host-side
# contention of packed trials).
set -u
# MPS= ran every mode under CUDA MPS; a mode's "+mps" part does the same per mode. Refused at once,
# not after the steps before the modes have spent the lease.
[ -n "${MPS:-}" ] && { echo "fill_session: MPS= is gone; add +mps to the modes instead (MODES=auto4+mps:8)" >&2; exit 2; }
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRPO_RAY_CACHE=/tmp/grpo-cache \
  CUDA_VISIBLE_DEVICES=0 GRPO_RAY_TRIAL_LOGS=1 GRPO_RAY_COMMIT=${1:-unknown}
R=${FILL_RES:-/tmp/res}  # where each step's output goes (the polls copy it to $OUT)
mkdir -p $R
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 > $R/smi.csv 2>&1 &
SMI=$!
(while sleep 15; do date -u +%FT%TZ; top -b -H -n 1 -w 160 | sed -n 7,22p; done) > $R/top.txt 2>&1 &
TOP=$!
echo "$SMI $TOP" > $R/samplers.pid
trap 'kill $SMI $TOP 2>/dev/null; wait $SMI $TOP 2>/dev/null' EXIT  # the samplers end with the session, not with the machine
step_share() {
if [ -n "${SHARE:-}" ]; then  # do packed processes serialize on the GPU? (bench/share_gpu.py), e.g. SHARE=1,2,4,8
  python3 bench/share_gpu.py --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf --procs "$SHARE" --mps off,on --steps 8 \
    --out $R/share.json > $R/share.log 2>&1
  echo "rc=$?" >> $R/share.log
fi
}
step_speed() {
SPEED=${SPEED:-}
for run in ${SPEED//,/ }; do  # the 1.7B step: plain (the speed comparison), phases (the profile); :N prompts per step
  how=${run%%:*}; prompts=1; [ "$how" != "$run" ] && prompts=${run#*:}
  python3 bench/trial_gpu.py speed $([ "$how" = phases ] && echo --phases) --prompts $prompts \
    --out $R/speed_${how}_p$prompts.json > $R/speed_${how}_p$prompts.log 2>&1
  echo "rc=$?" >> $R/speed_${how}_p$prompts.log
done
}
step_packed() {
if [ -n "${PACKED:-}" ]; then  # is the 1.7B step's card shareable? (auto packs it two per H200 since 85f0640)
  python3 bench/trial_gpu.py speed --procs "$PACKED" --mps "${PACKED_MPS:-off}" --out $R/packed.json > $R/packed.log 2>&1
  echo "rc=$?" >> $R/packed.log
fi
}
step_decode() {  # the 1.7B decode with and without the LoRA (bench/vllm_decode.py): what stands between the step and 0.7 s
  python3 bench/vllm_decode.py --profile --out $R/decode.json > $R/decode.log 2>&1
  echo "rc=$?" >> $R/decode.log
}
step_gemma_ckpt() {
GEMMA_CKPT=${GEMMA_CKPT:-}
for ckpt in ${GEMMA_CKPT//,/ }; do  # gemma-3-270m's plain step with lora.gradient_checkpointing unsloth / false
  [ "$ckpt" = unsloth ] && v='"unsloth"' || v=$ckpt
  python3 bench/trial_gpu.py speed --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf \
    --overrides "{\"lora.gradient_checkpointing\": $v}" --out $R/speed_gemma_ckpt_$ckpt.json > $R/speed_gemma_ckpt_$ckpt.log 2>&1
  echo "rc=$?" >> $R/speed_gemma_ckpt_$ckpt.log
done
}
step_gemma_phases() {
if [ -n "${GEMMA_PHASES:-}" ]; then  # where gemma-3-270m's ~2 s GRPO step goes (bench/warm_sweep.yaml's trial)
  python3 bench/trial_gpu.py speed --phases --gguf /tmp/models/gemma-3-270m-q4_k_m.gguf \
    --out $R/speed_gemma_phases.json > $R/speed_gemma_phases.log 2>&1
  echo "rc=$?" >> $R/speed_gemma_phases.log
fi
}
step_tests() {
if [ -n "${TESTS:-}" ]; then  # a pytest -k expression, e.g. TESTS=in_place (on a cold machine they compile for minutes)
  python3 -m pytest tests/test_gpu.py -m gpu -k "$TESTS" -x -p no:cacheprovider --durations=0 > $R/gpu_tests.log 2>&1
  echo "rc=$?" >> $R/gpu_tests.log
fi
}
step_modes() {
[ "${MODES:-}" = none ] && return
# a mode under CUDA MPS: its "+mps" part (MODES=auto4:8,auto4+mps:8; bench/_common.py under_mps)
# WARM_MODEL=qwen3: the tutorial's model shape (random Qwen3-1.7B, bench/warm_sweep_qwen3.yaml) instead of gemma
if [ "${WARM_MODEL:-gemma}" = qwen3 ]; then WARM_ARGS="--model random-qwen3 --spec bench/warm_sweep_qwen3.yaml"
else WARM_ARGS="--model /tmp/models/gemma-3-270m-q4_k_m.gguf"; fi
python3 bench/warm_sweep.py $WARM_ARGS --out $R/warm.json \
  --modes "${MODES:-eager:3,reuse:3,pack4+eager:8}" \
  --overrides "${OVERRIDES:-{\"grpo.max_steps\": 20, \"grpo.report_every\": 5\}}" > $R/warm.log 2>&1
echo "rc=$?" >> $R/warm.log
}
# ORDER: which steps run, in that order (a lease can end at any point: put first what matters most)
for step in ${ORDER:-share speed packed gemma_ckpt gemma_phases tests modes}; do
  declare -F step_$step > /dev/null || { echo "fill_session: no step '$step' in ORDER" >&2; continue; }
  step_$step
done
touch $R/DONE
