#!/usr/bin/env bash
# Every policy on every PlanetLab day in the CloudSim 3.0.3 model (energy, migrations, SLATAH,
# PDM, SLAV, ESV, host shutdowns), viola's ratios against the best baseline of the same run, and
# the time of one decision of each policy for 1,000 hosts and 10,000 VMs.
#
#   scripts/bench/policies.sh [--json FILE] [--data DIR]
#
# With --json FILE, one flat JSON object: "<policy>.<day>.<metric>" and "<policy>.decision_ms".
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
json=""
data="${VIOLA_PLANETLAB:-$root/../shared/data/planetlab}"
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        *) echo "usage: $0 [--json FILE] [--data DIR]" >&2; exit 2 ;;
    esac
done
cargo build --release -q --manifest-path "$root/Cargo.toml" -p viola-adaptmgr --bin viola-sim >&2
sim="$root/target/release/viola-sim"
baselines="thr-mmt-0.8 iqr-mmt-1.5 mad-mmt-2.5 lr-mmt-1.2 lrr-mmt-1.2"
policies="dvfs $baselines thr-mc-0.8 thr-rs-0.8 violin marinescu-a marinescu-b shirako-energy-aware shirako-room-for-growth viola"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
days=""
for d in "$data"/2011*; do
    [ -d "$d" ] || continue
    day="$(basename "$d")"
    days="$days $day"
    for p in $policies; do
        "$sim" "$d" "$p" > "$tmp/$day.$p.json"
    done
done
"$sim" --decision-bench "$(echo $policies | tr ' ' ',')" > "$tmp/decision.json" 2>/dev/null
python3 - "$tmp" "$json" "$baselines" "$policies" $days <<'PY'
import json, sys
tmp, out, baselines, policies, days = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5:]
flat = {}
dec = json.load(open(f"{tmp}/decision.json"))
print(f"{'day':9} {'policy':24} {'energy kWh':>10} {'migrations':>10} {'SLATAH':>8} {'PDM':>9} {'SLAV':>10} {'ESV':>10} {'shutdowns':>9}")
for day in days:
    res = {p: json.load(open(f"{tmp}/{day}.{p}.json")) for p in policies}
    for p in policies:
        r = res[p]
        print(f"{day:9} {p:24} {r['energy_kwh']:10.2f} {r['migrations']:10d} {r['slatah']:8.4f} {r['pdm']:9.6f} {r['slav']:10.3e} {r['esv']:10.3e} {r['host_shutdowns']:9d}")
        for k in ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "host_shutdowns", "service_level"):
            flat[f"{p}.{day}.{k}"] = r[k]
    best = min(baselines, key=lambda b: res[b]["esv"])
    v = res["viola"]
    esv_ratio = v["esv"] / res[best]["esv"]
    mig_ratio = v["migrations"] / res[best]["migrations"]
    energy_ratio = v["energy_kwh"] / res[best]["energy_kwh"]
    print(f"{day:9} viola vs best baseline ({best}): ESV x{esv_ratio:.4f}, migrations x{mig_ratio:.3f}, energy x{energy_ratio:.3f}")
    flat[f"viola.{day}.esv_ratio_vs_best_baseline"] = esv_ratio
    flat[f"viola.{day}.migrations_ratio_vs_best_baseline"] = mig_ratio
    flat[f"viola.{day}.energy_ratio_vs_best_baseline"] = energy_ratio
print("decision time, 1,000 hosts / 10,000 VMs (median of 5):")
for p in policies:
    print(f"  {p:24} {dec[p]:8.2f} ms  (x{dec[p] / dec['thr-mmt-0.8']:.2f} of thr-mmt-0.8)")
    flat[f"{p}.decision_ms"] = dec[p]
if out:
    with open(out, "w") as f:
        json.dump(flat, f, indent=0, sort_keys=True)
PY
