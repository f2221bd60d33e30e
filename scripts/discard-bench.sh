#!/usr/bin/env bash
# Discards (issue #15, BENCHMARKS.md): a program that allocates and frees large blocks and never
# pages (python3 calling malloc/free through ctypes, 64 KiB to 2 MiB blocks, first and last page
# touched) run plainly, under the preload without a pager (mimalloc alone), and under the preload
# with a pager whose budget holds everything, once with mimalloc's own 10 ms purge delay
# (MIMALLOC_PURGE_DELAY=10) and once with the preload's default (100 ms). Every purge of the
# paged heap is a remove event the freeing thread waits for the fault handler to read. Runs the
# configurations alternately ROUNDS times; prints each run's time and the pager's discard count.
#
# usage: scripts/discard-bench.sh   (build first: cargo build --release --workspace)
# env:   ROUNDS (5), OPS (300000)
set -u
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}; OPS=${OPS:-300000}
lib=$PWD/target/release/libcoalesce.so
out=$(mktemp)
./target/release/memory-server --listen 127.0.0.1:0 --capacity 1GiB >"$out" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 50); do grep -q "listening on" "$out" && break; sleep 0.1; done
addr=$(sed -n 's/listening on //p' "$out")
script="import time, ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
t = time.time()
for i in range($OPS):
    n = (64 << 10) << (i % 6)
    p = libc.malloc(n); ctypes.memset(p, 1, 4096); ctypes.memset(p + n - 4096, 1, 4096); libc.free(p)
print('%.3f' % (time.time() - t))"
run() { # label, env...
  local label=$1; shift
  local res; res=$(env "$@" /usr/bin/python3 -c "$script" 2>&1)
  printf '%-28s %s s  %s\n' "$label" "$(echo "$res" | grep -E '^[0-9.]+$')" \
    "$(echo "$res" | grep -oE '^discards: [0-9]+ pages' || true)"
}
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  run "plain"
  run "mimalloc, no pager" LD_PRELOAD="$lib"
  run "pager, purge delay 10 ms" LD_PRELOAD="$lib" COALESCE_SERVERS="$addr" COALESCE_LOCAL=256MiB COALESCE_STATS=1 MIMALLOC_PURGE_DELAY=10
  run "pager, purge delay 100 ms" LD_PRELOAD="$lib" COALESCE_SERVERS="$addr" COALESCE_LOCAL=256MiB COALESCE_STATS=1
done
