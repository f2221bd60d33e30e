#!/usr/bin/env bash
# Builds the Soft-RoCE test VM's boot files from Debian packages only: a kernel (with rdma_rxe) and
# a busybox initramfs carrying rdma-core's userland, the rxe provider, perftest, iproute2's `rdma`
# and `ip`, the given binaries (with the ldd closure of each) and the guest scripts.
#
# usage: build-initramfs.sh OUT_DIR [FILE[=GUEST_PATH] ...]
#   OUT_DIR gets vmlinuz and initramfs.cpio.gz. Each FILE is copied (debug info stripped) to
#   GUEST_PATH, by default the same absolute path. Downloaded packages are cached in
#   $COALESCE_VM_CACHE (default ~/.cache/coalesce-soft-roce-vm) and reused when present.
set -euo pipefail

out="${1:?usage: build-initramfs.sh OUT_DIR [FILE[=GUEST_PATH] ...]}"
shift
here="$(cd "$(dirname "$0")" && pwd)"
cache="${COALESCE_VM_CACHE:-$HOME/.cache/coalesce-soft-roce-vm}"
mkdir -p "$out" "$cache/debs"

# The kernel: Debian's linux-image-amd64 from $COALESCE_VM_KERNEL_SUITE (default
# bookworm-backports: the pager needs Linux 6.8+ for UFFDIO_MOVE and UFFDIO_POISON), resolved
# through a private apt state in the cache so the host's sources are left alone. The userland
# comes from the host's own suite.
suite="${COALESCE_VM_KERNEL_SUITE:-bookworm-backports}"
apt_private=(-o Dir::Etc::sourcelist="$cache/apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
             -o Dir::State::Lists="$cache/apt/lists" -o Dir::Cache="$cache/apt/cache")
mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial"
echo "deb http://deb.debian.org/debian $suite main" > "$cache/apt/sources.list"
if [ -z "$(ls "$cache"/debs/linux-image-[0-9]*.deb 2>/dev/null)" ]; then
    apt-get -qq "${apt_private[@]}" update 2>&1 | grep -v "^W: Download is performed unsandboxed" || true
    kernel_pkg="$(apt-cache "${apt_private[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    if [ -z "$kernel_pkg" ]; then
        echo "build-initramfs: no linux-image-amd64 in $suite" >&2
        exit 2
    fi
    echo "build-initramfs: downloading $kernel_pkg from $suite"
    (cd "$cache/debs" && apt-get download -q "${apt_private[@]}" "$kernel_pkg" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
fi
ls "$cache"/debs/linux-image-[0-9]*.deb >/dev/null 2>&1 || { echo "build-initramfs: the kernel package could not be downloaded" >&2; exit 2; }
pkgs=(busybox-static rdma-core ibverbs-utils ibverbs-providers libibverbs1 librdmacm1 perftest iproute2
      libnl-3-200 libnl-route-3-200 libmnl0 libelf1 libbpf1 libcap2 libbsd0 libmd0 libtirpc3 libzstd1 zlib1g
      libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 libselinux1 libpcre2-8-0
      libdb5.3 libxtables12 libatm1 libpci3 libudev1)
missing=()
for p in "${pkgs[@]}"; do
    ls "$cache/debs/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-cache show busybox-static >/dev/null 2>&1 || apt-get update -qq
    echo "build-initramfs: downloading ${missing[*]}"
    (cd "$cache/debs" && apt-get download -q "${missing[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
fi
for p in "${pkgs[@]}"; do
    ls "$cache/debs/${p}_"*.deb >/dev/null 2>&1 || { echo "build-initramfs: package $p could not be downloaded" >&2; exit 2; }
done

pkgroot="$cache/root"
stamp="$cache/root.stamp"
want="$(ls "$cache/debs" | sort | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$pkgroot"
    mkdir -p "$pkgroot"
    for d in "$cache"/debs/*.deb; do dpkg-deb -x "$d" "$pkgroot"; done
    echo "$want" > "$stamp"
fi

kver="$(ls "$pkgroot/lib/modules" | head -1)"
cp "$pkgroot/boot/vmlinuz-$kver" "$out/vmlinuz"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,lib/modules,usr/lib/x86_64-linux-gnu,usr/bin,lib64,root}
cp "$pkgroot/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Kernel modules, in load order.
mods=(crypto/crc32_generic net/ipv4/udp_tunnel net/ipv6/ip6_udp_tunnel drivers/net/veth
      drivers/infiniband/core/ib_core drivers/infiniband/core/ib_uverbs drivers/infiniband/sw/rxe/rdma_rxe)
: > "$root/lib/modules/load-order"
for m in "${mods[@]}"; do
    src="$( (ls "$pkgroot/lib/modules/$kver/kernel/$m.ko"* 2>/dev/null || true) | head -1)"
    if [ -z "$src" ]; then
        echo "build-initramfs: $m is not a module of $kver (built in?); skipping it"
        continue
    fi
    case "$src" in
        *.xz) xz -dc "$src" > "$root/lib/modules/$(basename "$m").ko" ;;
        *.zst) zstd -dcq "$src" > "$root/lib/modules/$(basename "$m").ko" ;;
        *) cp "$src" "$root/lib/modules/$(basename "$m").ko" ;;
    esac
    echo "$(basename "$m").ko" >> "$root/lib/modules/load-order"
done

# rdma-core: libibverbs, the rxe provider and its driver file.
mkdir -p "$root/etc/libibverbs.d" "$root/usr/lib/x86_64-linux-gnu/libibverbs"
cp "$pkgroot/etc/libibverbs.d/rxe.driver" "$root/etc/libibverbs.d/"

# Copies a binary or library with every library it needs (looked up in the package tree first,
# then on this host).
copy_with_libs() {
    local src="$1" dst="$2"
    mkdir -p "$root$(dirname "$dst")"
    cp -L "$src" "$root$dst"
    chmod u+w "$root$dst"
    case "$(file -b "$root$dst" 2>/dev/null || echo ELF)" in
        *ELF*) objcopy --strip-debug "$root$dst" 2>/dev/null || true ;;
    esac
    LD_LIBRARY_PATH="$pkgroot/usr/lib/x86_64-linux-gnu:$pkgroot/lib/x86_64-linux-gnu" ldd "$src" 2>/dev/null |
        awk '/=> \//{print $3} !/=>/ && $1 ~ /^\//{print $1}' | while read -r lib; do
            local name
            name="$(basename "$lib")"
            if [ ! -e "$root/usr/lib/x86_64-linux-gnu/$name" ] && [ ! -e "$root/lib64/$name" ]; then
                case "$name" in
                    ld-linux-x86-64.so.2) cp -L "$lib" "$root/lib64/$name" ;;
                    *) cp -L "$lib" "$root/usr/lib/x86_64-linux-gnu/$name" ;;
                esac
            fi
        done
}
ln -s ../usr/lib/x86_64-linux-gnu "$root/lib/x86_64-linux-gnu"
for b in ib_read_lat ib_write_lat rdma ibv_devices ibv_devinfo ip; do
    src="$( (ls "$pkgroot"/usr/bin/$b "$pkgroot"/bin/$b "$pkgroot"/sbin/$b "$pkgroot"/usr/sbin/$b 2>/dev/null || true) | head -1)"
    [ -n "$src" ] || { echo "build-initramfs: $b not found in the packages" >&2; exit 2; }
    rm -f "$root/bin/$b"
    copy_with_libs "$src" "/usr/bin/$b"
done
for lib in "$pkgroot"/usr/lib/x86_64-linux-gnu/libibverbs/librxe-*.so; do
    copy_with_libs "$lib" "/usr/lib/x86_64-linux-gnu/libibverbs/$(basename "$lib")"
done
# Shared libraries that are loaded with dlopen (never seen by ldd).
for name in libibverbs.so.1 libgcc_s.so.1; do
    src="$( (ls "$pkgroot"/usr/lib/x86_64-linux-gnu/$name /lib/x86_64-linux-gnu/$name /usr/lib/x86_64-linux-gnu/$name 2>/dev/null || true) | head -1)"
    [ -n "$src" ] && copy_with_libs "$src" "/usr/lib/x86_64-linux-gnu/$name"
done

for spec in "$@"; do
    src="${spec%%=*}"
    dst="${spec#*=}"
    [ "$spec" = "$src" ] && dst="$(realpath "$src")"
    copy_with_libs "$src" "$dst"
done

cp "$here/guest-init.sh" "$root/init"
chmod +x "$root/init"
[ -f "$here/guest-tests.sh" ] && cp "$here/guest-tests.sh" "$root/guest-tests.sh" && chmod +x "$root/guest-tests.sh"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
echo "127.0.0.1 localhost" > "$root/etc/hosts"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz"
echo "build-initramfs: $out/vmlinuz ($kver) and $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
