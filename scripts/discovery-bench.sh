#!/usr/bin/env bash
# Discovery overhead and reactivity (issue #11, BENCHMARKS.md), in a network namespace made for
# the run (loopback with multicast; nothing else talks there, so its packet counter counts
# discovery only): mDNS packets per second with two lenders announcing every INTERVAL, without
# and with one browser; then, TRIALS times, how long after a lender's process starts a running
# browser sees it.
#
# usage: scripts/discovery-bench.sh   (root; build first: cargo build --release --workspace --examples)
# env:   INTERVAL (5s, the lenders' --announce-interval), TRIALS (5)
set -u
cd "$(dirname "$0")/.."
NS=coalesce-discovery-bench-$$
ip netns add "$NS"
# Every process started in the namespace is stopped with it.
trap 'ip netns pids "$NS" | xargs -r kill 2>/dev/null; sleep 0.5; ip netns del "$NS"' EXIT
ip -n "$NS" link set lo up
ip -n "$NS" link set lo multicast on
packets() { ip -n "$NS" -s link show lo | awk '/RX:/{getline; print $2}'; }
run() { ip netns exec "$NS" "$@"; }
for _ in 1 2; do
  run ./target/release/memory-server --listen 127.0.0.1:0 --capacity 64MiB --announce \
    --announce-interval "${INTERVAL:-5s}" >/dev/null 2>&1 &
done
sleep 2
a=$(packets); sleep 20; b=$(packets)
echo "two lenders announcing every ${INTERVAL:-5s}, no browser: $(echo "scale=2; ($b-$a)/20" | bc) packets/s"
run ./target/release/examples/browse 25 >/dev/null 2>&1 &
bp=$!
sleep 2
a=$(packets); sleep 20; b=$(packets)
echo "plus one browser: $(echo "scale=2; ($b-$a)/20" | bc) packets/s"
wait "$bp" 2>/dev/null
out=$(mktemp -d)
for t in $(seq "${TRIALS:-5}"); do
  run ./target/release/examples/browse 8 >"$out/browse" 2>&1 &
  bp=$!
  sleep 2
  before=$(ip netns pids "$NS")
  start=$(date +%s.%N)
  run ./target/release/memory-server --listen 127.0.0.1:0 --capacity 64MiB --announce >"$out/late" 2>/dev/null &
  lp=$!
  sleep 0.3
  port=$(sed -n 's/listening on 127.0.0.1://p' "$out/late")
  wait "$bp"
  seen=$(grep "127.0.0.1:$port" "$out/browse" | head -1 |
    sed -n "s/.*tv_sec: \([0-9]*\), tv_nsec: \([0-9]*\).*/\1 \2/p" | awk '{printf "%d.%09d", $1, $2}')
  # Stop the late lender: the processes in the namespace that were not there before it.
  for pid in $(ip netns pids "$NS"); do grep -qx "$pid" <<<"$before" || kill "$pid"; done
  wait "$lp" 2>/dev/null
  if [ -n "$seen" ]; then echo "trial $t: seen $(echo "$seen - $start" | bc) s after the lender's process started"; else echo "trial $t: not seen"; fi
done
rm -rf "$out"
