#!/usr/bin/env bash
# Sets up this machine (idempotently) and runs all of Viola's tests: formatting and lints, unit,
# property and simulator tests, a bounded run of the decoder fuzz targets, then the lab tests on
# real libvirt hosts and QEMU guests.
# Run as root. Safe to run twice in a row: every lab a test builds is torn down again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Each step says how much disk is left: a fresh CI machine may have little, and a build that
# fills it fails far from the cause.
step() {
  printf '\n=== %s (%s; %s free on the build disk)\n' "$*" "$(date -u +%T)" \
    "$(df -h --output=avail . | tail -1 | tr -d ' ')" >&2
}
# No incremental compilation: CI builds each crate once, and the incremental caches would double
# the target dir.
export CARGO_INCREMENTAL=0

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
# The fuzz builds (instrumented, release) are not needed again in this run; their disk is.
rm -rf target/fuzz

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
# The lab instances whose namespaces exist now (instance X has namespaces X-a1, X-rtr, ... and
# its run directory; see scripts/lab.sh).
lab_instances() {
  ip netns list | awk '{print $1}' | sed -n 's/^\([a-z][a-z0-9]\{0,5\}\)-.*/\1/p' | sort -u |
    while read -r i; do
      if { [ "$i" = vl ] && [ -d /run/viola-lab ]; } || [ -d "/run/viola-lab-$i" ]; then echo "$i"; fi
    done
}
# Each test file is bounded (a hung guest or job must fail the run, not stall it past CI's
# limit); a lab it leaves behind (killed at its bound, or a teardown bug) is a failure too, and
# is removed so that the next file starts on a clean machine.
limit=${VIOLA_LAB_TEST_LIMIT_S:-1200}
for file in tests/tests/*.rs; do
  t=$(basename "$file" .rs)
  printf -- '--- %s (%s; %s free)\n' "$t" "$(date -u +%T)" \
    "$(df -h --output=avail . | tail -1 | tr -d ' ')" >&2
  lab=0
  if needs_default_lab "$file"; then lab=1; scripts/lab.sh up >/dev/null; fi
  rc=0
  timeout --kill-after=30 "$limit" \
    cargo test --locked -p viola-labtests --test "$t" -- --test-threads=1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "lab test $t did not end within ${limit} s: stopped" >&2
  fi
  [ "$rc" = 0 ] || failed+=("$t")
  if [ "$lab" = 1 ]; then scripts/lab.sh down >/dev/null; fi
  for i in $(lab_instances); do
    echo "lab $i left behind by $t: removing it" >&2
    VIOLA_LAB=$i scripts/lab.sh down >/dev/null 2>&1 || true
    failed+=("$t(left lab $i)")
  done
  # Plain namespaces a test makes without scripts/lab.sh (package_lab: vpk-host).
  for ns in $(ip netns list | awk '{print $1}' | grep '^vpk-' || true); do
    echo "namespace $ns left behind by $t: removing it" >&2
    ip netns del "$ns" || true
    failed+=("$t(left namespace $ns)")
  done
done
leftover=$(lab_instances)
if [ -n "$leftover" ]; then
  echo "lab namespaces left behind: $leftover" >&2
  exit 1
fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "lab tests failed: ${failed[*]}" >&2
  exit 1
fi
