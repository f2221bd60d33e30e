#!/bin/sh
# Builds the fuzz targets with libFuzzer's coverage instrumentation (stable Rust: sanitizer
# coverage through LLVM flags, no nightly sanitizers) and runs each for SECONDS (default 30).
# A crash stops the run with its input under fuzz/artifacts/TARGET/; add it as a regression test.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -eu
cd "$(dirname "$0")"
seconds=${1:-30}
[ $# -gt 0 ] && shift
targets=${*:-"frame control wire handshake"}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the flags off build scripts (they run on the host uninstrumented).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --bins --target "$host"
bin="target/$host/release"
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzz: $t for ${seconds}s"
    if ! "$bin/$t" -max_total_time="$seconds" -rss_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "corpus/$t" > "artifacts/$t/log" 2>&1; then
        tail -n 40 "artifacts/$t/log"
        echo "fuzz: $t FOUND A CRASH (input in fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov:" "artifacts/$t/log" | tail -n 3
done
