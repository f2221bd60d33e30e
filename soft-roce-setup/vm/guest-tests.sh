#!/bin/sh
# Runs inside the Soft-RoCE VM (from /init, with rxe0 up on veth0 at 10.0.0.1). The tests decide
# the exit status; the measurements are printed for the record.
# /coalesce/verbs-tests: the tests/verbs.rs binary; /coalesce/coalesce: the CLI. memory-server sits
# at the absolute path the test binary was built with.
export COALESCE_REQUIRE_VERBS=1 COALESCE_VERBS_DEVICE=rxe0 RUST_LOG=warn RUST_BACKTRACE=1
status=0
echo "clock source: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "== verbs tests (transport and pager over rxe0)"
/coalesce/verbs-tests --test-threads=1 --nocapture || status=1

# perftest's median moves between two modes from one run to the next in the same boot (about 45
# and 75 us under TCG), so the tools are alternated three times and compared on the median of
# their three medians (and of their three minima: the path's cost without scheduling delays, and
# their three means). perftest runs twice per round, and its second runs are compared with its
# first in the same way: the spread the reference shows against itself in this boot.
# perftest reads the same remote page every time; `coalesce latency` reads a random page of its
# slab by default (as the pager does) and the same page with --same-page: the like-for-like one.
# perftest_lat ROUND RECORD: one run of ib_read_lat, its result line appended to RECORD.
perftest_lat() {
    ib_read_lat -d rxe0 -x 1 -s 4096 -n 5000 >/tmp/perftest-server.log 2>&1 &
    sleep 1
    ib_read_lat -d rxe0 -x 1 -s 4096 -n 5000 -U 10.0.0.1 >/tmp/perftest.log
    wait
    grep -E "^ 4096" /tmp/perftest.log >>"$2"
    if [ "$1" = 1 ]; then grep -E "#bytes|^ 4096" /tmp/perftest.log; else grep -E "^ 4096" /tmp/perftest.log; fi
    # perftest's requests fall in two clusters (a post that catches Soft-RoCE's kernel worker
    # still busy with the previous READ, and one that must wake it; BENCHMARKS.md, "The time
    # between READs"): its median is whichever holds more.
    awk -F', ' '/^[0-9]+, / { n++; v[n] = $2; if (n == 1 || $2 < min) min = $2 }
        END { for (i = 1; i <= n; i++) if (v[i] < 1.3 * min) fast++;
              printf "perftest: %d of %d requests within 1.3x of its minimum (its fast cluster)\n", fast, n }' /tmp/perftest.log
}
for round in 1 2 3; do
    echo "== 4 KiB RDMA READ latency, round $round: perftest ib_read_lat"
    perftest_lat "$round" /tmp/perftest-rounds
    echo "== 4 KiB RDMA READ latency, round $round: coalesce latency --provider verbs"
    /coalesce/coalesce latency --provider verbs --device rxe0 --ops 5000 >/tmp/ours.log || status=1
    if [ "$round" = 1 ]; then cat /tmp/ours.log; else grep READ /tmp/ours.log; fi
    grep "READ busy-poll" /tmp/ours.log >>/tmp/ours-rounds
    echo "== 4 KiB RDMA READ latency, round $round: coalesce latency --provider verbs --same-page"
    /coalesce/coalesce latency --provider verbs --device rxe0 --ops 5000 --same-page >/tmp/same.log || status=1
    grep READ /tmp/same.log
    grep "READ busy-poll" /tmp/same.log >>/tmp/same-rounds
    echo "== 4 KiB RDMA READ latency, round $round: perftest ib_read_lat again (the reference against itself)"
    perftest_lat 2 /tmp/perftest-again-rounds
done
median3() { sort -n | sed -n 2p; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
medians() { sed 's/.*median *\([0-9.]*\) us.*/\1/' "$1" | median3; }
minima() { sed 's/.* min *\([0-9.]*\) us.*/\1/' "$1" | median3; }
means() { sed 's/.* mean *\([0-9.]*\) us.*/\1/' "$1" | median3; }
perftest_median="$(awk '{print $5}' /tmp/perftest-rounds | median3)"
perftest_min="$(awk '{print $3}' /tmp/perftest-rounds | median3)"
ours_median="$(medians /tmp/ours-rounds)"
same_median="$(medians /tmp/same-rounds)"
ours_min="$(minima /tmp/ours-rounds)"
same_min="$(minima /tmp/same-rounds)"
perftest_mean="$(awk '{print $6}' /tmp/perftest-rounds | median3)"
ours_mean="$(means /tmp/ours-rounds)"
same_mean="$(means /tmp/same-rounds)"
again_median="$(awk '{print $5}' /tmp/perftest-again-rounds | median3)"
echo "READ median of three rounds: perftest $perftest_median us, coalesce busy-poll $ours_median us," \
    "ratio $(ratio "$ours_median" "$perftest_median")x; same page $same_median us, ratio $(ratio "$same_median" "$perftest_median")x"
echo "READ minimum, median of three rounds: perftest $perftest_min us, coalesce busy-poll $ours_min us," \
    "ratio $(ratio "$ours_min" "$perftest_min")x; same page $same_min us, ratio $(ratio "$same_min" "$perftest_min")x"
echo "READ mean, median of three rounds: perftest $perftest_mean us, coalesce busy-poll $ours_mean us," \
    "ratio $(ratio "$ours_mean" "$perftest_mean")x; same page $same_mean us, ratio $(ratio "$same_mean" "$perftest_mean")x"
spread="$(awk -v a="$again_median" -v b="$perftest_median" 'BEGIN { printf "%.2f", (a > b ? a / b : b / a) }')"
echo "READ median of three rounds, perftest against itself: first runs $perftest_median us, second runs" \
    "$again_median us, the slower ${spread}x the faster"
echo "== the same, blocking waits polling instead of sleeping on the completion channel"
COALESCE_VERBS_WAIT=poll /coalesce/coalesce latency --provider verbs --device rxe0 --ops 5000 | grep blocking || status=1

echo "== the same two, with every vCPU loaded by a busy loop"
busy=""
for _ in $(grep -c ^processor /proc/cpuinfo | xargs seq); do
    ( while :; do :; done ) &
    busy="$busy $!"
done
ib_read_lat -d rxe0 -x 1 -s 4096 -n 2000 >/tmp/perftest-server-loaded.log 2>&1 &
sleep 1
ib_read_lat -d rxe0 -x 1 -s 4096 -n 2000 10.0.0.1 | grep -E "^ 4096"
wait $!
/coalesce/coalesce latency --provider verbs --device rxe0 --ops 2000 | grep READ || status=1
/coalesce/coalesce latency --provider verbs --device rxe0 --ops 2000 --same-page | grep "READ busy" || status=1
kill $busy

echo "== pager over verbs: coalesce demo --provider verbs"
/coalesce/coalesce demo --provider verbs --device rxe0 --size 128MiB --local 32MiB --random-reads 20000 || status=1
echo "== the same, waits polling instead of sleeping on the completion channel"
COALESCE_VERBS_WAIT=poll /coalesce/coalesce demo --provider verbs --device rxe0 --size 128MiB --local 32MiB \
    --random-reads 20000 | grep -E "random reads that faulted|service time" || status=1
exit $status
