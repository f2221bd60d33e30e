#!/bin/sh
# /init of the Soft-RoCE test VM: mounts the pseudo file systems, loads rdma_rxe, puts 10.0.0.1 on
# one end of a veth pair, adds rxe0 on it, runs /guest-tests.sh and reports its exit status on the
# console as "COALESCE-VM-RESULT <status>" before powering off.
export PATH=/usr/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# /tmp stays on the initramfs (already in RAM): binaries may live under it at their build paths.
mkdir -p /dev/pts /dev/shm /tmp && mount -t tmpfs shm /dev/shm
ulimit -l unlimited 2>/dev/null
echo 1 > /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null
status=0
setup() {
    [ -n "$COALESCE_VM_TRACE" ] && set -x
    for m in $(cat /lib/modules/load-order); do
        insmod "/lib/modules/$m" || { echo "guest: insmod $m failed"; return 1; }
    done
    ip link set lo up
    # "peer name" is not honoured by this ip build; an unnamed pair is veth0 and veth1.
    ip link add type veth || return 1
    ip addr add 10.0.0.1/24 dev veth0
    ip link set veth0 up
    ip link set veth1 up
    rdma link add rxe0 type rxe netdev veth0 || { echo "guest: rdma link add failed"; return 1; }
    ibv_devices
}
if setup; then
    sh /guest-tests.sh
    status=$?
else
    status=90
fi
echo "COALESCE-VM-RESULT $status"
sync
poweroff -f
