#!/usr/bin/env bash
# Sets up this machine (idempotently) and runs all of Viola's tests: formatting and lints, unit,
# property and simulator tests, then the lab tests on real libvirt hosts and QEMU guests.
# Run as root. Safe to run twice in a row: every lab a test builds is torn down again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n=== %s\n' "$*" >&2; }

step "setup (packages, guest images)"
scripts/setup.sh --no-build

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

step "build"
cargo build --workspace --bins --locked --quiet
cargo build --release --locked --quiet -p viola-labtests --bin viola-wanem

step "unit, property and simulator tests"
cargo test --workspace --locked --exclude viola-labtests

step "lab tests (real namespaces, libvirtd, QEMU; one at a time)"
# Most lab tests build a lab of their own; the mechanisms tests (mech_*) share the default lab,
# which is brought up here and removed again whatever happens.
trap 'scripts/lab.sh down >/dev/null 2>&1 || true' EXIT
scripts/lab.sh up >/dev/null
cargo test --locked -p viola-labtests -- --test-threads=1
scripts/lab.sh down
leftover=$(ip netns list | awk '{print $1}' | grep -E '^(vl|lf|ov|ovm|vd|vo|vm)-' || true)
if [ -n "$leftover" ]; then
  echo "lab namespaces left behind: $leftover" >&2
  exit 1
fi
