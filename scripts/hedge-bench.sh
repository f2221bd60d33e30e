#!/usr/bin/env bash
# Hedged reads (issue #12, BENCHMARKS.md): `coalesce demo` random-read fault latency over two
# lenders on 127.0.0.1 with replicate:2, with hedging and with --no-hedge, run alternately:
# first with one lender pausing (SIGSTOP for PAUSE_MS of every PERIOD_MS, as a lender whose
# process stalls: a GC, a page-cache flush, a noisy neighbour), then with neither pausing (what
# hedging costs when nothing is slow). Prints the demo's latency and hedging lines per run.
#
# usage: scripts/hedge-bench.sh   (build first: cargo build --release --workspace)
# env:   ROUNDS (2), PAUSE_MS (10), PERIOD_MS (50), READS (200000), LINK (loopback),
#        SIZE (128MiB), LOCAL (32MiB), PAUSING ("yes no": which of the two parts to run),
#        SLO (unset; e.g. p99=60ms: a third run per round, hedging with that objective, and every
#        run with --local-max LOCAL so that the objective controller cannot grow the local share),
#        MODES (which runs each round makes, in order: any of slo, on, off; default all of them)
set -u
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}; PAUSE_MS=${PAUSE_MS:-10}; PERIOD_MS=${PERIOD_MS:-50}; READS=${READS:-200000}
pids=(); addrs=()
trap 'kill -CONT "${pids[@]}" 2>/dev/null; kill "${pids[@]}" 2>/dev/null' EXIT
for i in 0 1; do
  out=$(mktemp)
  ./target/release/memory-server --listen 127.0.0.1:0 --capacity 1GiB --link "${LINK:-loopback}" >"$out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do grep -q "listening on" "$out" && break; sleep 0.1; done
  addrs+=("$(sed -n 's/listening on //p' "$out")")
done
pause_loop() {
  local run_s; run_s=$(echo "scale=3; ($PERIOD_MS-$PAUSE_MS)/1000" | bc)
  while kill -0 "${pids[1]}" 2>/dev/null; do
    kill -STOP "${pids[1]}"; sleep "$(echo "scale=3; $PAUSE_MS/1000" | bc)"; kill -CONT "${pids[1]}"; sleep "$run_s"
  done
}
demo() {
  ./target/release/coalesce demo --servers "${addrs[0]},${addrs[1]}" --redundancy replicate:2 \
    --size "${SIZE:-128MiB}" --local "${LOCAL:-32MiB}" --random-reads "$READS" ${SLO:+--local-max "${LOCAL:-32MiB}"} "$@" 2>/dev/null |
    grep -E "random reads that faulted|remote fault service time|hedged reads|objective" | sed 's/^/    /'
}
for pausing in ${PAUSING:-yes no}; do
  for round in $(seq "$ROUNDS"); do
    for hedge in ${MODES:-${SLO:+slo} on off}; do
      echo "lender ${addrs[1]} pausing: $pausing (${PAUSE_MS} ms of every ${PERIOD_MS} ms), hedging $hedge, round $round"
      pauser=""
      if [ "$pausing" = yes ]; then pause_loop & pauser=$!; fi
      case $hedge in
        slo) echo "    (objective $SLO)"; demo --slo "$SLO" ;;
        on) demo ;;
        off) demo --no-hedge ;;
      esac
      if [ -n "$pauser" ]; then kill "$pauser"; wait "$pauser" 2>/dev/null; kill -CONT "${pids[1]}"; fi
    done
  done
done
