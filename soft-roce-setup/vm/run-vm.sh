#!/usr/bin/env bash
# Boots the Soft-RoCE test VM (qemu under software emulation, TCG) and returns the guest's result.
#
# usage: run-vm.sh BOOT_DIR [LOG_FILE]
#   BOOT_DIR holds vmlinuz and initramfs.cpio.gz from build-initramfs.sh. The console goes to
#   stdout (and LOG_FILE). Exit status: the guest's /guest-tests.sh status, 124 on timeout
#   ($COALESCE_VM_TIMEOUT seconds, default 600), 3 if the guest reported nothing.
set -euo pipefail
boot="${1:?usage: run-vm.sh BOOT_DIR [LOG_FILE]}"
log="${2:-$(mktemp)}"
command -v qemu-system-x86_64 >/dev/null || { echo "run-vm: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2; exit 2; }
set +e
timeout "${COALESCE_VM_TIMEOUT:-600}" qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 2 -m "${COALESCE_VM_MEMORY:-3072}" \
    -kernel "$boot/vmlinuz" -initrd "$boot/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 clocksource=tsc tsc=reliable oops=panic ${COALESCE_VM_APPEND:-}" \
    -nographic -no-reboot -nic none 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && { echo "run-vm: the guest did not finish in time" >&2; exit 124; }
result="$(tr -d '\r' < "$log" | awk '/^COALESCE-VM-RESULT /{print $2}' | tail -1)"
[ -n "$result" ] || { echo "run-vm: the guest reported no result (qemu status $rc)" >&2; exit 3; }
exit "$result"
