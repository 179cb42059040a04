#!/usr/bin/env bash
# Keep a device call busy for up to $1 seconds while bench/quality_session.sh runs detached, copying
# what exists into $OUT every 20 s (a call cut off by the lease still returns it).
Q=${Q:-/tmp/q}
end=$((SECONDS + ${1:-560}))
STORE=/tmp/grpo-quality
keep() {  # at most 8 files come back: trials.json (the runs that exist), statuses, logs, quality.json/png
  for r in tutorial sweep rerun paired; do
    cp "$STORE/quality-$r/trials.json" "$OUT/$r.trials.json" 2>/dev/null
  done
  # the running sweeps' trials, as status sees them (trials.json comes only at a sweep's end)
  for r in tutorial sweep rerun paired; do
    [ -d "$STORE/quality-$r" ] || continue
    echo "== $r"; timeout 15 python3 -m grpo_ray.cli status "$STORE/quality-$r" 2>&1 | tail -40
  done > "$OUT/status.txt"
  cp $Q/quality.json $Q/quality.png "$OUT"/ 2>/dev/null
  { tail -c 300000 $Q/sweep.log; tail -c 100000 $Q/tutorial.log; tail -c 100000 $Q/rerun.log; tail -c 100000 $Q/paired.log
    tail -c 20000 /tmp/q.log; tail -3 $Q/smi.csv; } > "$OUT/logs.tail" 2>/dev/null
  cp $Q/smi.csv "$OUT"/ 2>/dev/null  # the card's utilization every 5 s: the lease's #24 evidence
}
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench COLUMNS=250
while [ $SECONDS -lt $end ] && [ ! -f $Q/DONE ]; do sleep 20; keep; done
keep
tail -25 /tmp/q.log
grep -E "^== |TERMINATED|RUNNING|ERROR|PENDING|trials" "$OUT/status.txt" | cut -c1-200 | head -40
