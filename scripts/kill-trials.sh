#!/usr/bin/env bash
# Kill trials (issue #9): TRIALS runs of `coalesce demo` over three memory-servers on 127.0.0.1
# with two copies of every page (replicate:2). In each run one lender, chosen at random, is killed
# with SIGKILL at a random moment (fill, sequential passes or random reads), and restarted on its
# port before the next run. Every run must exit 0: every word verified, no page lost (no SIGBUS,
# "0 pages could not be fetched"). Prints one line per trial and a summary; exit status 1 if any
# trial failed (its log is kept in the work directory).
#
# usage: scripts/kill-trials.sh [TRIALS] (default 100; build first: cargo build --release)
# env:   BIN (default target/release), BASE_PORT (default 17470), WORK (default a temp dir)
set -euo pipefail

TRIALS=${1:-100}
BIN=${BIN:-target/release}
BASE_PORT=${BASE_PORT:-17470}
WORK=${WORK:-$(mktemp -d /tmp/coalesce-kill-trials.XXXXXX)}
PORTS=("$BASE_PORT" "$((BASE_PORT + 1))" "$((BASE_PORT + 2))")
SERVERS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
LENDER_ARGS=(--capacity 512MiB --slab-size 16MiB --lease 5s)
# shellcheck source=scripts/lenders.sh
source "$(dirname "$0")/lenders.sh"

for i in 0 1 2; do start_lender "$i"; done

failed=0
checks=0
during=0
for t in $(seq "$TRIALS"); do
  victim=$((RANDOM % 3))
  delay_ms=$((RANDOM % 3500))
  log="$WORK/trial-$t.log"
  "$BIN/coalesce" demo --servers "$SERVERS" --redundancy replicate:2 --size 96MiB --local 16MiB \
    --passes 2 --random-reads 50000 --fault-threads 2 >"$log" 2>&1 &
  demo=$!
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  when="during the run"
  kill -0 "$demo" 2>/dev/null || when="after the run ended"
  kill -9 "${PIDS[$victim]}" 2>/dev/null || true
  wait "${PIDS[$victim]}" 2>/dev/null || true
  rc=0
  wait "$demo" || rc=$?
  lost=$(sed -n 's/.*failures: \([0-9]*\) pages could not be fetched.*/\1/p' "$log" | tail -1)
  if [ "$rc" -ne 0 ] || [ "${lost:-x}" != "0" ]; then
    failed=$((failed + 1))
    echo "trial $t: lender $victim killed at ${delay_ms} ms: FAILED (exit $rc, pages lost: ${lost:-unknown}; log $log)"
  else
    checks=$((checks + 1))
    echo "trial $t: lender $victim killed at ${delay_ms} ms ($when): ok"
    [ "$when" = "during the run" ] && during=$((during + 1))
    rm -f "$log"
  fi
  start_lender "$victim"
done

echo "kill-trials: $TRIALS trials ($during kills during a run), $checks verified with no page lost, $failed failed (work dir $WORK)"
[ "$failed" -eq 0 ]
