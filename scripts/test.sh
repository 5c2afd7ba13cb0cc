#!/usr/bin/env bash
# Runs every test: unit tests of each crate and the lab (VM) tests. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh
log=$(mktemp /tmp/vfblk-test.XXXXXX)
# Lab tests boot guests one at a time (they share a lock); unit tests run in parallel.
set +e
cargo test --workspace --no-fail-fast -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries (cargo's own last line is a crate's doc-tests).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
rm -f "$log"
exit "$status"
