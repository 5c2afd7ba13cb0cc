#!/usr/bin/env bash
# The main job: boot the VM lab and show the NVMe controller reached through VFIO from inside
# the guest. Installs what it needs. Extra arguments go to `vfblk-lab demo` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
exec cargo run --quiet --release -p vfblk-lab -- demo "$@"
