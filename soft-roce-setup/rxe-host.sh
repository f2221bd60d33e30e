#!/usr/bin/env bash
# Soft-RoCE on a real Linux host: load rdma_rxe, add an rxe link on a network interface, check it
# with ibv_devices; or undo that. Needs root, a kernel with rdma_rxe (Debian's linux-image-amd64
# has it), iproute2's `rdma` tool and rdma-core (apt-get install rdma-core ibverbs-utils
# ibverbs-providers).
#
# usage: rxe-host.sh up IFACE [RXE_NAME]    (default name rxe0)
#        rxe-host.sh down [RXE_NAME]
#        rxe-host.sh status
set -euo pipefail
cmd="${1:-status}"
need() { command -v "$1" >/dev/null || { echo "rxe-host: $1 is missing ($2)" >&2; exit 2; }; }
need rdma "apt-get install iproute2"
case "$cmd" in
    up)
        iface="${2:?usage: rxe-host.sh up IFACE [RXE_NAME]}"
        name="${3:-rxe0}"
        [ "$(id -u)" = 0 ] || { echo "rxe-host: run as root" >&2; exit 2; }
        ip link show "$iface" >/dev/null 2>&1 || { echo "rxe-host: no interface $iface" >&2; exit 2; }
        ip -4 addr show dev "$iface" | grep -q inet || echo "rxe-host: warning: $iface has no IPv4 address; RoCE needs one for its GID" >&2
        need modprobe "apt-get install kmod"
        modprobe rdma_rxe || { echo "rxe-host: this kernel has no rdma_rxe module" >&2; exit 2; }
        modprobe ib_uverbs 2>/dev/null || true
        if rdma link show "$name/1" >/dev/null 2>&1; then
            echo "rxe-host: $name already exists"
        else
            rdma link add "$name" type rxe netdev "$iface"
        fi
        need ibv_devices "apt-get install ibverbs-utils"
        ibv_devices | grep -q "$name" || { echo "rxe-host: $name does not show in ibv_devices (is ibverbs-providers installed?)" >&2; exit 1; }
        echo "rxe-host: $name is up on $iface; use --provider verbs --device $name"
        ;;
    down)
        name="${2:-rxe0}"
        [ "$(id -u)" = 0 ] || { echo "rxe-host: run as root" >&2; exit 2; }
        rdma link delete "$name" 2>/dev/null || echo "rxe-host: no link $name"
        if ! rdma link show 2>/dev/null | grep -q rxe; then
            modprobe -r rdma_rxe 2>/dev/null || true
        fi
        echo "rxe-host: $name removed"
        ;;
    status)
        rdma link show 2>/dev/null || true
        command -v ibv_devices >/dev/null && ibv_devices || true
        ;;
    *)
        echo "usage: rxe-host.sh up IFACE [RXE_NAME] | down [RXE_NAME] | status" >&2
        exit 2
        ;;
esac
