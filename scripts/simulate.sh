#!/usr/bin/env bash
# Replays a folder of PlanetLab-format traces (one file per VM, one CPU % per line, 5-minute
# samples) in the CloudSim 3.0.3 model with one policy and prints one JSON object
# (energy_kwh, migrations, slatah, pdm, slav, esv, host_shutdowns, service_level, ...).
#
#   scripts/simulate.sh DAY_DIR POLICY [viola-sim options: --hosts N --sites K --wan-mbps M --trace FILE]
#
# Policies: dvfs, thr-mmt-0.8, iqr-mmt-1.5, mad-mmt-2.5, lr-mmt-1.2, lrr-mmt-1.2 (also -mc-/-rs-
# selections), violin, marinescu-a, marinescu-b, shirako-energy-aware, shirako-room-for-growth, viola.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DAY_DIR POLICY [--hosts N] [--sites K] [--wan-mbps M] [--trace FILE]" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --release -q --manifest-path "$root/Cargo.toml" -p viola-adaptmgr --bin viola-sim >&2
exec "$root/target/release/viola-sim" "$@"
