#!/usr/bin/env bash
# Sets up this machine (idempotently) and runs all of Viola's tests: formatting and lints, unit,
# property and simulator tests, a bounded run of the decoder fuzz targets, then the lab tests on
# real libvirt hosts and QEMU guests.
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

step "fuzz targets (bounded: 15 s each)"
# Every decoder fuzz target, built with cargo-fuzz on the stable toolchain (no sanitizer), runs
# for 15 s from its checked-in seeds; a crash, hang or OOM fails the step and names the target
# and the input it saved. Longer runs by hand: scripts/fuzz.sh --seconds N.
scripts/fuzz.sh --ci

step "lab tests (real namespaces, libvirtd, QEMU; one at a time)"
# Most lab tests build a lab of their own; the mechanisms tests (on viola_labtests::mech) use the
# default lab, which is built afresh for each of them (some kill hosts) and removed again whatever
# happens.
trap 'scripts/lab.sh down >/dev/null 2>&1 || true' EXIT
cargo test --locked -p viola-labtests --lib --bins
failed=()
# A test binary needs the default lab when it says so with a line `// lab: default` and has a
# test that is not ignored (mech_bench is a benchmark driver only).
needs_default_lab() {
  grep -q '^// lab: default' "$1" || return 1
  local tests ignored
  tests=$(grep -cE '^#\[(tokio::)?test' "$1" || true)
  ignored=$(grep -cE '^#\[ignore' "$1" || true)
  [ "$tests" -gt "$ignored" ]
}
for file in tests/tests/*.rs; do
  t=$(basename "$file" .rs)
  lab=0
  if needs_default_lab "$file"; then lab=1; scripts/lab.sh up >/dev/null; fi
  cargo test --locked -p viola-labtests --test "$t" -- --test-threads=1 || failed+=("$t")
  if [ "$lab" = 1 ]; then scripts/lab.sh down >/dev/null; fi
done
leftover=$(ip netns list | awk '{print $1}' | grep -E '^(vl|lf|ovl|ovm|vdl|vdb|vds)-' || true)
if [ -n "$leftover" ]; then
  echo "lab namespaces left behind: $leftover" >&2
  exit 1
fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "lab tests failed: ${failed[*]}" >&2
  exit 1
fi
