#!/usr/bin/env bash
# Redundancy benchmark (issue #9, BENCHMARKS.md): `coalesce demo` over three memory-servers on
# 127.0.0.1 with --redundancy none and replicate:2, alternated REPEAT times in one session; then one
# replicate:2 run in which a lender is killed (SIGKILL) during the random-read phase, reporting the
# fault tail during the failover and how long the background re-replication took to give every
# page its second copy back.
#
# usage: scripts/redundancy-bench.sh   (build first: cargo build --release)
# env:   BIN (target/release), SIZE (1GiB), LOCAL (256MiB), READS (786432), REPEAT (2),
#        KILL_AT (seconds into the failover run, default 12), BASE_PORT (17480)
set -euo pipefail

BIN=${BIN:-target/release}
SIZE=${SIZE:-1GiB}
LOCAL=${LOCAL:-256MiB}
READS=${READS:-786432}
REPEAT=${REPEAT:-2}
KILL_AT=${KILL_AT:-12}
BASE_PORT=${BASE_PORT:-17480}
WORK=$(mktemp -d /tmp/coalesce-redundancy-bench.XXXXXX)
PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
SERVERS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
LENDER_ARGS=(--capacity 4GiB --slab-size 64MiB)
# shellcheck source=scripts/lenders.sh
source "$(dirname "$0")/lenders.sh"

# Prints: fill_s seq_s random_s p50_us p99_us p999_us remote_pages
summarize() {
  local log=$1
  local fill seq random lat pages
  fill=$(sed -n 's/^fill (write pattern) *\([0-9.]*\) s.*/\1/p' "$log")
  seq=$(sed -n 's/^sequential read pass [0-9]* *\([0-9.]*\) s.*/\1/p' "$log" | paste -sd+ | bc)
  random=$(sed -n 's/^random 8-byte reads *\([0-9.]*\) s.*/\1/p' "$log")
  lat=$(sed -n 's/.*latency p50 \([0-9.]*\) us, p99 \([0-9.]*\) us, p99.9 \([0-9.]*\) us.*/\1 \2 \3/p' "$log")
  pages=$(sed -n 's/^server .*: \([0-9]*\) pages.*/\1/p' "$log" | paste -sd+ | bc)
  echo "$fill $seq $random $lat $pages"
}

demo() {
  "$BIN/coalesce" demo --servers "$SERVERS" --redundancy "$1" --size "$SIZE" --local "$LOCAL" \
    --passes 3 --random-reads "$READS"
}

for i in 0 1 2; do start_lender "$i"; done
echo "mode fill_s sequential_s random_s fault_p50_us fault_p99_us fault_p999_us remote_pages"
for r in $(seq "$REPEAT"); do
  for mode in none replicate:2; do
    demo "$mode" >"$WORK/$mode-$r.log" 2>&1
    echo "$mode $(summarize "$WORK/$mode-$r.log")"
  done
done

# Failover: kill lender 1 during the random reads.
log="$WORK/failover.log"
RUST_LOG=coalesce_pager=info demo replicate:2 >"$log" 2>&1 &
run=$!
sleep "$KILL_AT"
kill -9 "${PIDS[1]}"
wait "$run"
echo "replicate:2+kill $(summarize "$log")"
clean=$(sed 's/\x1b\[[0-9;]*m//g' "$log")
t0=$(grep -m1 "memory-server failed" <<<"$clean" | cut -d' ' -f1)
t1=$(grep "slab group whole again" <<<"$clean" | tail -1 | cut -d' ' -f1)
copied=$(sed -n 's/^re-replication: \([0-9]*\) pages copied.*/\1/p' "$log")
if [ -n "$t0" ] && [ -n "$t1" ]; then
  secs=$(echo "$(date -d "$t1" +%s.%N) - $(date -d "$t0" +%s.%N)" | bc)
  echo "re-replication: $copied pages ($(echo "scale=1; $copied * 4 / 1024" | bc) MiB) in $secs s after the loss was noticed"
else
  echo "re-replication: no complete repair seen in the log ($log)"
fi
grep "^failures:" "$log"
echo "logs in $WORK"
