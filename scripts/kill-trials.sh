#!/usr/bin/env bash
# Kill trials (issue #9): TRIALS runs of `coalesce demo` over LENDERS memory-servers on 127.0.0.1
# with REDUNDANCY (default: two copies of every page over three lenders). In each run KILLS
# lenders (default 1), chosen at random, are killed with SIGKILL at random moments (fill,
# sequential passes or random reads), and restarted on their ports before the next run. Every run
# must exit 0: every word verified, no page lost (no SIGBUS, "0 pages could not be fetched").
# Prints one line per trial and a summary; exit status 1 if any trial failed (its log is kept in
# the work directory).
#
# usage: scripts/kill-trials.sh [TRIALS] (default 100; build first: cargo build --release)
# env:   BIN (default target/release), BASE_PORT (default 17470), WORK (default a temp dir),
#        REDUNDANCY (replicate:2), LENDERS (3), KILLS (1; at most what REDUNDANCY survives)
#        e.g. REDUNDANCY=ec:4+2 LENDERS=6 KILLS=2 scripts/kill-trials.sh 30
set -euo pipefail

TRIALS=${1:-100}
BIN=${BIN:-target/release}
BASE_PORT=${BASE_PORT:-17470}
WORK=${WORK:-$(mktemp -d /tmp/coalesce-kill-trials.XXXXXX)}
REDUNDANCY=${REDUNDANCY:-replicate:2}
LENDERS=${LENDERS:-3}
KILLS=${KILLS:-1}
PORTS=()
for i in $(seq 0 $((LENDERS - 1))); do PORTS+=("$((BASE_PORT + i))"); done
SERVERS=$(printf '127.0.0.1:%s,' "${PORTS[@]}")
SERVERS=${SERVERS%,}
LENDER_ARGS=(--capacity 512MiB --slab-size 16MiB --lease 5s)
# shellcheck source=scripts/lenders.sh
source "$(dirname "$0")/lenders.sh"

for i in $(seq 0 $((LENDERS - 1))); do start_lender "$i"; done

failed=0
checks=0
during=0
for t in $(seq "$TRIALS"); do
  mapfile -t victims < <(shuf -i 0-$((LENDERS - 1)) -n "$KILLS")
  log="$WORK/trial-$t.log"
  "$BIN/coalesce" demo --servers "$SERVERS" --redundancy "$REDUNDANCY" --size 96MiB --local 16MiB \
    --passes 2 --random-reads 50000 --fault-threads 2 >"$log" 2>&1 &
  demo=$!
  when="during the run"
  at=0
  delays=()
  for victim in "${victims[@]}"; do
    delay_ms=$((RANDOM % 3500))
    if [ "$delay_ms" -gt "$at" ]; then
      sleep "$(printf '%d.%03d' $(((delay_ms - at) / 1000)) $(((delay_ms - at) % 1000)))"
      at=$delay_ms
    fi
    kill -0 "$demo" 2>/dev/null || when="after the run ended"
    kill -9 "${PIDS[$victim]}" 2>/dev/null || true
    wait "${PIDS[$victim]}" 2>/dev/null || true
    delays+=("$victim@${at}ms")
  done
  victim="${delays[*]}"
  rc=0
  wait "$demo" || rc=$?
  lost=$(sed -n 's/.*failures: \([0-9]*\) pages could not be fetched.*/\1/p' "$log" | tail -1)
  if [ "$rc" -ne 0 ] || [ "${lost:-x}" != "0" ]; then
    failed=$((failed + 1))
    echo "trial $t: lender(s) $victim killed: FAILED (exit $rc, pages lost: ${lost:-unknown}; log $log)"
  else
    checks=$((checks + 1))
    echo "trial $t: lender(s) $victim killed ($when): ok"
    [ "$when" = "during the run" ] && during=$((during + 1))
    rm -f "$log"
  fi
  for v in "${victims[@]}"; do start_lender "$v"; done
done

echo "kill-trials: $TRIALS trials ($during kills during a run), $checks verified with no page lost, $failed failed (work dir $WORK)"
[ "$failed" -eq 0 ]
