#!/usr/bin/env bash
# Cross-site live migration with the root disk: incremental (base staged at the destination,
# only the guest's overlay and RAM travel) against full-disk copy, across the lab's WAN.
#
#   scripts/bench/migration.sh [--json FILE] [--compress] [--max-downtime MS]
#
# --compress moves RAM compressed (zstd on two multifd channels; the manager's `migration_compress`).
# --max-downtime sets QEMU's downtime limit for both moves (default 50 ms).
#
# Needs the lab (scripts/lab.sh up) and the guest (scripts/guest/build.sh). The guest's base
# holds 1 GiB of data and the guest writes 64 MiB into its overlay before each move. Prints
# the figures and the ratios (full/incremental time; incremental WAN bytes / (overlay + RAM));
# with --json writes one flat JSON object with the keys inc.total_s, inc.downtime_ms,
# inc.wan_bytes, full.total_s, full.downtime_ms, full.wan_bytes, overlay_plus_ram_bytes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
json=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=$2; shift 2 ;;
    --compress) export VIOLA_BENCH_COMPRESS=1; shift ;;
    --max-downtime)
      [[ ${2:-} =~ ^[1-9][0-9]{0,4}$ ]] || { echo "--max-downtime takes milliseconds (1..99999)" >&2; exit 2; }
      export VIOLA_BENCH_MAX_DOWNTIME_MS=$2; shift 2 ;;
    *) echo "usage: $0 [--json FILE] [--compress] [--max-downtime MS]" >&2; exit 2 ;;
  esac
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cd "$root"
VIOLA_BENCH_JSON="$out" cargo test --release -q -p viola-labtests --test mech_bench \
  -- --ignored --nocapture migration_benchmark >&2
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"incremental: {r['inc.total_s']:.1f} s, downtime {r['inc.downtime_ms']} ms, WAN {r['inc.wan_bytes']/2**20:.1f} MiB")
print(f"full disk:   {r['full.total_s']:.1f} s, downtime {r['full.downtime_ms']} ms, WAN {r['full.wan_bytes']/2**20:.1f} MiB")
print(f"full/incremental time: {r['full.total_s']/r['inc.total_s']:.1f}x (target >= 5x)")
print(f"incremental WAN / (overlay + RAM = {r['overlay_plus_ram_bytes']/2**20:.1f} MiB): "
      f"{r['inc.wan_bytes']/r['overlay_plus_ram_bytes']:.2f} (target <= 1.2)")
PY
if [ -n "$json" ]; then
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); keys=["inc.total_s","inc.downtime_ms","inc.wan_bytes","full.total_s","full.downtime_ms","full.wan_bytes","overlay_plus_ram_bytes"]; json.dump({k:r[k] for k in keys}, open(sys.argv[2],"w"))' "$out" "$json"
fi
