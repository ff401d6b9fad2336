#!/usr/bin/env bash
# Violins and VMs as a service: the time to make N VMs over two sites with one request
# (`viola vm create NAME --count N`: every staging request sent before any is waited for, so
# each site's depot plans them together) against N requests one after the other, on a lab of
# its own (two sites of two hosts, real daemons, QEMU guests taking their address by DHCP).
#
#   scripts/bench/lifecycle.sh [--json FILE] [--vms N]
#
# Prints, for both ways, the seconds until the creates returned and until every VM answered
# HTTP at its address, and the ratios one-at-a-time / one-plan; with --json writes one flat
# JSON object with the keys vms, one_plan.create_s, one_plan.all_answer_s,
# one_at_a_time.create_s, one_at_a_time.all_answer_s, create_ratio, all_answer_ratio.
# Needs root and the machine set up (scripts/setup.sh). The lab is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
json=""
vms=8
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=$2; shift 2 ;;
    --vms)
      [[ ${2:-} =~ ^[1-9][0-9]?$ ]] && [ "$2" -le 32 ] || { echo "--vms takes 1..32" >&2; exit 2; }
      vms=$2; shift 2 ;;
    *) echo "usage: $0 [--json FILE] [--vms N]" >&2; exit 2 ;;
  esac
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cd "$root"
VIOLA_BENCH_JSON="$out" VIOLA_BENCH_VMS="$vms" cargo test -q -p viola-labtests --test lifecycle_lab \
  -- --ignored --nocapture --exact create_benchmark >&2
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
n = r["vms"]
print(f"{n} VMs over two sites, one request (one plan): created in {r['one_plan.create_s']:.1f} s, all answering after {r['one_plan.all_answer_s']:.1f} s")
print(f"{n} VMs over two sites, one request each:       created in {r['one_at_a_time.create_s']:.1f} s, all answering after {r['one_at_a_time.all_answer_s']:.1f} s")
print(f"one-at-a-time / one-plan: creates {r['create_ratio']:.2f}x, all answering {r['all_answer_ratio']:.2f}x")
PY
if [ -n "$json" ]; then cp "$out" "$json"; fi
