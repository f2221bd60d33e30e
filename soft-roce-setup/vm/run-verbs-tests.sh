#!/usr/bin/env bash
# The Soft-RoCE VM test: builds the project with the verbs provider, packs the verbs tests, the
# `coalesce` CLI and `memory-server` into the test VM (build-initramfs.sh), boots it under qemu
# (run-vm.sh) and exits with the guest's result. Prints the guest's console, which includes
# perftest's ib_read_lat next to `coalesce latency --provider verbs` and the pager's fault
# latency over verbs (`coalesce demo --provider verbs`).
#
# usage: soft-roce-setup/vm/run-verbs-tests.sh [BOOT_DIR]   (default target/soft-roce-vm)
# Needs: cargo, cmake, libclang-dev (to build sideway), qemu-system-x86, cpio, apt access to
# Debian's package archive (the kernel and rdma-core packages; cached in
# $COALESCE_VM_CACHE, default ~/.cache/coalesce-soft-roce-vm).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
boot="${1:-$root/target/soft-roce-vm}"
cd "$root"

cargo build --release --locked --features verbs --bins --tests -p coalesce
tests_bin="$(cargo test --release --locked --features verbs -p coalesce --test verbs --no-run --message-format=json 2>/dev/null |
    grep '"kind":\["test"\]' | grep '"name":"verbs"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
[ -x "$tests_bin" ] || { echo "run-verbs-tests: the verbs test binary was not found" >&2; exit 2; }

"$here/build-initramfs.sh" "$boot" \
    "$tests_bin=/coalesce/verbs-tests" \
    "$root/target/release/coalesce=/coalesce/coalesce" \
    "$root/target/release/memory-server"
# The guest's tests decide the result. A boot that dies before reporting one (TCG occasionally
# trips over the kernel's live code patching at boot: an int3 oops in the idle task) is retried.
for attempt in 1 2 3; do
    set +e
    "$here/run-vm.sh" "$boot" "$boot/console.log"
    rc=$?
    set -e
    [ "$rc" = 3 ] || exit "$rc"
    echo "run-verbs-tests: boot $attempt reported no result; booting again" >&2
done
exit 3
