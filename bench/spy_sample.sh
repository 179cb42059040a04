#!/usr/bin/env bash
# Poor man's sampling profiler for a device lease: every ${SPY_PERIOD:-1} s, a py-spy stack dump
# of each Ray Tune trial actor (process title "ray::ImplicitFunc"), appended gzip'd to
# $1/spy.txt.gz with a "=== <unix time> <pid>" line before each. bench/spy_summary.py turns it
# into where start-up and GRPO steps spent their time. Needs py-spy on PATH (a PyPI wheel).
out=${1:?usage: spy_sample.sh OUT_DIR}
mkdir -p "$out"
command -v py-spy >/dev/null || { echo "spy_sample: no py-spy" > "$out/spy.err"; exit 0; }
# Each round is its own gzip member (a multi-member file is still one gzip stream to readers):
# a copy taken while the sampler runs, which is how bench/warm_poll.sh brings it back before
# the lease ends, holds every finished round. One gzip over the whole loop kept the last
# minutes in its buffer (524288 bytes came back of a 25-minute sweep at 32d5bab).
: > "$out/spy.txt.gz"
while true; do
  for pid in $(pgrep -f "^ray::ImplicitFunc|^ray::_Inner|^ray::Trainable|EngineCore" 2>/dev/null); do
    echo "=== $(date +%s.%N) $pid"
    timeout 5 py-spy dump --nonblocking --pid "$pid" 2>&1 | grep -v "^$"
  done | gzip -1 >> "$out/spy.txt.gz"
  sleep "${SPY_PERIOD:-1}"
done
