#!/usr/bin/env bash
# The quality benchmark's device lease (bench/quality.py), after ../shared/device/stage.sh --model and
# `bash /tmp/dparts/install-on-device.sh`. Run detached from the repo copy, then poll:
#   setsid nohup bash bench/quality_session.sh COMMIT > /tmp/q.log 2>&1 &
#   bash bench/quality_poll.sh 560        (back to back until /tmp/q/DONE)
# One Ray cluster on the machine; the tutorial's 3 seeds and the sweep run side by side on it (each
# trial a quarter of the GPU), then the sweep's winner on 3 fresh seeds, then the summary.
# CPU=1 runs the same pipeline on the tiny model here (the plumbing; nothing is learned).
# SWEEP_TRIALS (default 6) sizes the sweep. WINNER='{"dotted.path": value, ...}' runs the re-run arm
# alone, for a winner an earlier lease found (bench/README.md): results of several leases combine.
# PAIRED=1 runs the tutorial's recipe on the re-run's seeds beside it (bench/quality.py rerun --paired).
set -u
cd "$(dirname "$0")/.."
Q=${Q:-/tmp/q}
COMMIT=${1:-unknown}
mkdir -p $Q
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  GRPO_RAY_CACHE=${GRPO_RAY_CACHE:-/tmp/grpo-cache} GRPO_RAY_COMMIT=$COMMIT
CPUFLAG=""; [ "${CPU:-0}" = 1 ] && CPUFLAG="--cpu"
if [ -z "$CPUFLAG" ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > $Q/smi.csv 2>&1 &
fi
python3 bench/quality.py specs --out $Q $CPUFLAG --sweep-trials ${SWEEP_TRIALS:-6} || exit 1
STORE=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('$Q/sweep.yaml'))['storage'])")
rm -rf "$STORE"
# One cluster for both drivers, so the tutorial's trials and the sweep's share the GPU's slots.
python3 -m ray.scripts.scripts start --head --disable-usage-stats --include-dashboard=false \
  --num-cpus=$(nproc) ${CPUFLAG:+--num-gpus=0} > $Q/ray_start.log 2>&1 || { echo "ray start failed"; exit 1; }
export RAY_ADDRESS=auto
if [ -z "${WINNER:-}" ]; then
  echo "== $(date +%T) tutorial + sweep"
  python3 -m grpo_ray.cli sweep $Q/tutorial.yaml > $Q/tutorial.log 2>&1 &
  TUT=$!
  python3 -m grpo_ray.cli sweep $Q/sweep.yaml > $Q/sweep.log 2>&1
  echo "sweep rc=$?"
  wait $TUT; echo "tutorial rc=$?"
  WHICH=(--sweep-run "$STORE/quality-sweep")
else
  WHICH=(--winner "$WINNER")
fi
echo "== $(date +%T) rerun"
PAIRFLAG=""; [ "${PAIRED:-0}" = 1 ] && PAIRFLAG="--paired"
if python3 bench/quality.py rerun --out $Q "${WHICH[@]}" $CPUFLAG $PAIRFLAG; then
  PAIR=""
  if [ -n "$PAIRFLAG" ]; then
    python3 -m grpo_ray.cli sweep $Q/paired.yaml > $Q/paired.log 2>&1 &
    PAIR=$!
  fi
  python3 -m grpo_ray.cli sweep $Q/rerun.yaml > $Q/rerun.log 2>&1; echo "rerun rc=$?"
  [ -n "$PAIR" ] && { wait $PAIR; echo "paired rc=$?"; }
fi
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
echo "== $(date +%T) summary"
for r in tutorial sweep rerun paired; do cp "$STORE/quality-$r/trials.json" $Q/$r.trials.json 2>/dev/null; done
python3 bench/quality_summary.py --tutorial "$STORE/quality-tutorial" --sweep "$STORE/quality-sweep" \
  --rerun "$STORE/quality-rerun" ${PAIRFLAG:+--paired "$STORE/quality-paired"} --out $Q/quality.json --plot $Q/quality.png --commit $COMMIT \
  --command "bash bench/quality_session.sh $COMMIT" 2>&1 | tail -20
touch $Q/DONE
