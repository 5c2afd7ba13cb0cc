#!/usr/bin/env bash
# Builds a Debian package of the target: vfblk-bridge, vfblk-rpc, vfblk-keeper and
# vfblk-setup in /usr/bin, the systemd unit (sandboxed, with the fd store) in
# /lib/systemd/system, the manuals in /usr/share/doc/vfblk. Nothing is enabled or started
# at install: `systemctl enable --now vfblk-bridge` is the operator's step.
#
# Usage: scripts/build-deb.sh [--out DIR] [--bin-dir DIR]
#   --out DIR       where the .deb goes (default target/deb)
#   --bin-dir DIR   package these binaries instead of building the release ones (the tests
#                   package their own build this way)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

out=target/deb
bin_dir=
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    *) sed -n '2,11p' "$0" >&2; exit 2 ;;
    esac
done

binaries=(vfblk-bridge vfblk-rpc vfblk-keeper vfblk-setup)
if [ -z "$bin_dir" ]; then
    echo "build-deb: cargo build --release (${binaries[*]})"
    cargo build --release --quiet -p vfblk-control --bins
    bin_dir=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }

stage=$(mktemp -d "${TMPDIR:-/tmp}/vfblk-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
    "$stage/usr/share/doc/vfblk"
for b in "${binaries[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "build-deb: $bin_dir/$b missing" >&2; exit 1; }
    install -m 0755 "$bin_dir/$b" "$stage/usr/bin/$b"
    # Debug info out (a tenth of the size), symbols kept: backtraces still name functions.
    strip --strip-debug "$stage/usr/bin/$b"
done
# The unit names /usr/local/bin (a `cargo install --root /usr/local`); a package installs in
# /usr/bin.
sed 's#/usr/local/bin/#/usr/bin/#g' dist/systemd/vfblk-bridge.service \
    > "$stage/lib/systemd/system/vfblk-bridge.service"
chmod 0644 "$stage/lib/systemd/system/vfblk-bridge.service"
for doc in operation.md recovery.md architecture.md; do
    install -m 0644 "docs/$doc" "$stage/usr/share/doc/vfblk/$doc"
done
cat > "$stage/usr/share/doc/vfblk/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vfblk
License: Apache-2.0
EOF
size_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
# librbd is opened at run time by the rbd backend only, so it is a suggestion, not a
# dependency.
cat > "$stage/DEBIAN/control" <<EOF
Package: vfblk
Version: $version
Architecture: $arch
Maintainer: vfblk developers <vfblk@localhost>
Depends: libc6 (>= 2.36), libgcc-s1
Suggests: librbd1, qemu-system-x86
Installed-Size: $size_kib
Section: admin
Priority: optional
Description: userspace NVMe and vhost-user-blk target for virtual machines
 Serves block backends (RAM, files, NVMe controllers through VFIO, Ceph RBD images) to
 virtual machines as vhost-user-blk, and survives its own upgrade and crash without the
 guests seeing an error or a reconnect.
EOF

mkdir -p "$out"
deb="$out/vfblk_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1)): ${binaries[*]}, the systemd unit, the manuals"
