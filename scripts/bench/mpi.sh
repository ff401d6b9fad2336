#!/usr/bin/env bash
# The VIOLIN paper's NEMO3D scenario in small: a two-rank MPI job (one rank per site, the MPI
# guest of scripts/guest/mpi-image.sh) with a network-heavy phase (a token ring across the
# sites) and then a CPU-heavy phase (fixed arithmetic per rank), both VMs capped at 30 % of a
# CPU as VMs sharing their hosts would be. The job runs uncapped (reference), capped with the
# manager's policy loop advising only, and capped with the loop acting (it raises the caps of
# ranks running at their cap), on a lab of its own.
#
#   scripts/bench/mpi.sh [--json FILE] [--laps N] [--work N]
#
# Prints each run's phase times and the speed-up of acting over advising (compute phase and
# whole job); with --json writes one flat JSON object with the keys ring_laps, work,
# uncapped.ring_s, uncapped.compute_s, advise.ring_s, advise.compute_s, act.ring_s,
# act.compute_s, act.resizes, speedup.compute, speedup.job. Needs root and the machine set up
# (scripts/setup.sh). The lab is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
json=""
laps=300
work=3000000
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=$2; shift 2 ;;
    --laps) [[ ${2:-} =~ ^[1-9][0-9]{0,5}$ ]] || { echo "--laps takes 1..999999" >&2; exit 2; }; laps=$2; shift 2 ;;
    --work) [[ ${2:-} =~ ^[1-9][0-9]{0,8}$ ]] || { echo "--work takes 1..999999999" >&2; exit 2; }; work=$2; shift 2 ;;
    *) echo "usage: $0 [--json FILE] [--laps N] [--work N]" >&2; exit 2 ;;
  esac
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cd "$root"
VIOLA_BENCH_JSON="$out" VIOLA_BENCH_RING_LAPS="$laps" VIOLA_BENCH_WORK="$work" \
  cargo test -q -p viola-labtests --test mpi_lab -- --ignored --nocapture --exact adaptation_benchmark >&2
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for run in ("uncapped", "advise", "act"):
    print(f"{run:>9}: ring ({r['ring_laps']} laps) {r[run + '.ring_s']:.1f} s, compute {r[run + '.compute_s']:.1f} s")
print(f"acting over advising: compute phase {r['speedup.compute']:.2f}x, whole job {r['speedup.job']:.2f}x ({r['act.resizes']} resizes carried out)")
PY
if [ -n "$json" ]; then cp "$out" "$json"; fi
