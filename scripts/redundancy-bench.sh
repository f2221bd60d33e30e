#!/usr/bin/env bash
# Redundancy benchmark (issue #9, BENCHMARKS.md): `coalesce demo` over LENDERS memory-servers on
# 127.0.0.1 with each of MODES, alternated REPEAT times in one session; then, for each mode with
# redundancy, one run in which a lender is killed (SIGKILL) during the random-read phase,
# reporting the fault tail during the failover and how long the background repair took to give
# every page its lost copy (or shard) back.
#
# usage: scripts/redundancy-bench.sh   (build first: cargo build --release)
# env:   BIN (target/release), SIZE (1GiB), LOCAL (256MiB), READS (786432), REPEAT (2),
#        LENDERS (6), MODES ("none replicate:2 ec:4+2"),
#        KILL_AT (seconds into the failover run, default 12), BASE_PORT (17480)
set -euo pipefail

BIN=${BIN:-target/release}
SIZE=${SIZE:-1GiB}
LOCAL=${LOCAL:-256MiB}
READS=${READS:-786432}
REPEAT=${REPEAT:-2}
KILL_AT=${KILL_AT:-12}
BASE_PORT=${BASE_PORT:-17480}
LENDERS=${LENDERS:-6}
read -r -a MODE_LIST <<<"${MODES:-none replicate:2 ec:4+2}"
WORK=$(mktemp -d /tmp/coalesce-redundancy-bench.XXXXXX)
PORTS=()
for i in $(seq 0 $((LENDERS - 1))); do PORTS+=("$((BASE_PORT + i))"); done
SERVERS=$(printf '127.0.0.1:%s,' "${PORTS[@]}")
SERVERS=${SERVERS%,}
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

for i in $(seq 0 $((LENDERS - 1))); do start_lender "$i"; done
echo "mode fill_s sequential_s random_s fault_p50_us fault_p99_us fault_p999_us remote_records"
for r in $(seq "$REPEAT"); do
  for mode in "${MODE_LIST[@]}"; do
    demo "$mode" >"$WORK/$mode-$r.log" 2>&1
    echo "$mode $(summarize "$WORK/$mode-$r.log")"
  done
done

# Failover: kill lender 1 during the random reads, once per mode with redundancy (lender 1 is
# started again, empty, before the next mode).
for mode in "${MODE_LIST[@]}"; do
  [ "$mode" = none ] && continue
  log="$WORK/failover-$mode.log"
  RUST_LOG=coalesce_pager=info demo "$mode" >"$log" 2>&1 &
  run=$!
  sleep "$KILL_AT"
  kill -9 "${PIDS[1]}"
  wait "$run"
  echo "$mode+kill $(summarize "$log")"
  clean=$(sed 's/\x1b\[[0-9;]*m//g' "$log")
  t0=$(grep -m1 "memory-server failed" <<<"$clean" | cut -d' ' -f1 || true)
  t1=$(grep "slab group whole again" <<<"$clean" | tail -1 | cut -d' ' -f1 || true)
  copied=$(sed -n 's/^re-replication: \([0-9]*\) pages copied.*/\1/p' "$log")
  if [ -n "$t0" ] && [ -n "$t1" ]; then
    secs=$(echo "$(date -d "$t1" +%s.%N) - $(date -d "$t0" +%s.%N)" | bc)
    echo "$mode repair: $copied records in $secs s after the loss was noticed"
  else
    echo "$mode repair: no complete repair seen in the log ($log; with K+M lenders, none is outside a group)"
  fi
  grep "^failures:" "$log" || echo "$mode: no statistics in $log (the run failed)"
  start_lender 1
done
echo "logs in $WORK"
