#!/usr/bin/env bash
# Keep a device call busy for up to $1 seconds while bench/warm_session.sh runs detached,
# copying its results into $OUT every 20 s (a call cut off by the lease still returns them).
end=$((SECONDS + ${1:-560}))
keep() {
  cp /tmp/res/warm.json /tmp/res/smi.csv /tmp/res/spy.txt.gz /tmp/res/gpu_tests.log "$OUT"/ 2>/dev/null
  tail -c 3000000 /tmp/res/warm.log > "$OUT"/warm.log.tail 2>/dev/null
}
while [ $SECONDS -lt $end ] && [ ! -f /tmp/res/DONE ]; do sleep 20; keep; done
keep
grep -E "Recompiling" /tmp/res/warm.log | sed -E 's/^.*(Recompiling function [^ ]+ in [^ ]+).*/\1/' \
  | sort | uniq -c | sort -rn | head -60 > "$OUT"/recompiles.txt
grep -E "^== |\] (complete|error|note)|rc=|Error|error:" /tmp/res/warm.log | cut -c1-300 | tail -30
PYTHONPATH=bench python3 bench/warm_summary.py /tmp/res/warm.json --smi /tmp/res/smi.csv 2>&1 | tail -60
