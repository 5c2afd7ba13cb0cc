#!/usr/bin/env bash
# Installs what the lab and the tests need on a fresh Debian 12 machine, idempotently:
# QEMU, fio, busybox, cpio and xz from Debian's packages; Ceph's mon, OSD, CLIs and librbd
# (the tests' private cluster, the RBD backend); hugepages on the host; the guest kernel
# (downloaded with apt, unpacked and cached by the lab outside the git tree).
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.cargo/bin:$PATH"
have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need_apt=()
# busybox-static, not busybox: the guest image copies /bin/busybox without libraries.
# python3-prometheus-client: the metrics test parses our endpoint with Prometheus's parser.
# fonts-dejavu-core: the benchmark suite's plots draw their text with DejaVu Sans.
# valgrind, strace: the cost benchmark counts instructions, allocations and system calls.
# syslinux, mtools, dosfstools: the boot disk a nested guest boots from (FAT + syslinux).
# systemd: systemd-analyze rates the sandbox of the unit in dist/ (offline, no running systemd).
# mmdebstrap: the root file system of the lab guest that boots systemd (lab/src/systemd.rs).
for pkg in qemu-system-x86 fio busybox-static cpio xz-utils python3-prometheus-client fonts-dejavu-core valgrind strace syslinux syslinux-common mtools dosfstools systemd mmdebstrap; do
    installed "$pkg" || need_apt+=("$pkg")
done

# The tests' private Ceph cluster (lab/src/ceph.rs: ceph-mon, ceph-osd, the ceph and rbd CLIs)
# and librbd's headers for the RBD backend; without recommends (no mgr, no mds, no radosgw).
need_ceph=()
for pkg in ceph-mon ceph-osd ceph-common librbd-dev; do
    installed "$pkg" || need_ceph+=("$pkg")
done

export DEBIAN_FRONTEND=noninteractive
apt_updated=no
apt_install() {
    if [ "$apt_updated" = no ]; then
        echo "setup: apt-get update"
        apt-get update -qq
        apt_updated=yes
    fi
    echo "setup: apt-get install $*"
    apt-get install -y -qq "$@" >/dev/null
}
if [ ${#need_apt[@]} -gt 0 ]; then
    apt_install "${need_apt[@]}"
fi
if [ ${#need_ceph[@]} -gt 0 ]; then
    apt_install --no-install-recommends "${need_ceph[@]}"
fi
# qemu-system-x86 from Debian 12 can displace a newer qemu-utils; install the matching one.
have qemu-img || apt_install qemu-utils
# The guest kernel is found through apt-cache; make sure the package lists exist.
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
    [ "$apt_updated" = yes ] || { apt-get update -qq; apt_updated=yes; }
fi

# The lab's second QEMU (10, with reconnect-ms) comes from bookworm-backports: downloaded and
# unpacked into the lab cache by `vfblk-lab setup`, never installed over Debian 12's 7.2.
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup: adding the bookworm-backports source (for QEMU 10, downloaded only)"
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    apt-get update -qq
fi

# Hugepages on the host for the DMA-memory tests (the lab guest reserves its own).
want_huge=64
have_huge=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$have_huge" -lt "$want_huge" ]; then
    if echo "$want_huge" > /proc/sys/vm/nr_hugepages 2>/dev/null; then
        echo "setup: reserved $(cat /proc/sys/vm/nr_hugepages) x 2 MiB hugepages on the host"
    else
        echo "setup: warning: could not reserve hugepages (not root?); DMA tests use the 4 KiB fallback"
    fi
fi

cargo run --quiet --release -p vfblk-lab -- setup
