#!/usr/bin/env bash
# Depot benchmark: every figure is a ratio against a baseline measured in the same run.
#
#   scripts/bench/depot.sh [--json FILE] [--skip-lab] [--only verify|assembly|planner|transfer]
#   Extra options for the depot daemon and fetch in the transfer run: DEPOT_XFER_ARGS (e.g.
#   "--congestion cubic"); fetch-only options in DEPOT_FETCH_ARGS (e.g. "--streams 8").
#
#   transfer_over_iperf3                   verified multi-stream fetch a1 -> b1 across the lab's WAN
#                                          link (10 ms one way, 200 Mbit/s) / iperf3 on the same link
#   verify_over_raw_blake3                 chunk verification throughput / raw BLAKE3 throughput:
#                                          both one thread, the same bytes (the test image read
#                                          into memory once, so warm for both), interleaved rounds,
#                                          medians; default chunker (also reported: 16 KiB-aligned)
#   assembly_time_over_qemu_img_convert    `viola-depot assemble` (chain + overlay + qemu-img checks,
#                                          every store byte verified, fsync'd) / `qemu-img convert
#                                          -O qcow2` of the same image + fsync of its output; medians
#                                          of interleaved runs, each started after `sync`
#   assembly_time_over_cp                  the same against `cp`
#   planner_met_over_lp_bound              Σ met / Σ LP bound over seeds 0..9 (50 VMs, 4 sites)
#   planner_met_over_exact_optimum         Σ met / Σ exact optimum (MILP) on the same scenarios
#
# Runs its own lab instance (VIOLA_LAB=vdb) for the transfer figure and removes it again.
# Needs root, qemu-img, iperf3 and the lab prerequisites (scripts/setup.sh).
set -euo pipefail

JSON=""
SKIP_LAB=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --json) JSON="$2"; shift 2 ;;
        --skip-lab) SKIP_LAB=1; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        *) echo "usage: $0 [--json FILE] [--skip-lab]" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d /tmp/vd-bench.XXXXXX)"
LAB_UP=0
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    if [ "$LAB_UP" = 1 ]; then VIOLA_LAB=vdb scripts/lab.sh down >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building (release)" >&2
cargo build --release -q -p viola-depot --bin viola-depot
cargo build --release -q -p viola-common --bin viola-ca
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
VD="$TARGET/viola-depot"
CA="$TARGET/viola-ca"

# A real guest-like disk: ext4 filled with real files, as qcow2 (~280 MB allocated).
echo "== making a test image" >&2
mkdir -p "$WORK/root"
cp -a /usr/lib/python3* "$WORK/root/" 2>/dev/null || true
cp -a /usr/share/doc "$WORK/root/" 2>/dev/null || true
qemu-img create -q -f raw "$WORK/img.raw" 1G
mkfs.ext4 -q -d "$WORK/root" "$WORK/img.raw"
qemu-img convert -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"
rm -rf "$WORK/root"
IMG_BYTES=$(stat -c %s "$WORK/img.qcow2")

want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
VERIFY_RATIO=null; ASM_S=null; CONV_S=null; CP_S=null; MET=null; BOUND=null; EXACT=null
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

# --- verification vs raw BLAKE3 --------------------------------------------------------------
if want verify; then
echo "== verification" >&2
VERIFY_JSON=$("$VD" bench-verify "$WORK/img.qcow2")
VERIFY_RATIO=$(echo "$VERIFY_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["verify_over_raw_blake3"])')
echo "   $VERIFY_JSON" >&2
fi

# --- assembly vs cp and qemu-img convert ------------------------------------------------------
export VIOLA_DEPOT_STORE="$WORK/store"
"$VD" --quiet import "$WORK/img.qcow2" --name bench >/dev/null
if want assembly; then
echo "== assembly" >&2
ASM=(); CONV=(); CP=()
for i in 1 2 3 4 5; do
    sync
    t0=$(now); "$VD" --quiet assemble bench --image-dir "$WORK/asm$i" --vm vm >/dev/null; t1=$(now)
    ASM+=("$(echo "$t1 - $t0" | bc -l)")
    sync
    t0=$(now); qemu-img convert -O qcow2 "$WORK/img.qcow2" "$WORK/conv$i.qcow2"; sync "$WORK/conv$i.qcow2"; t1=$(now)
    CONV+=("$(echo "$t1 - $t0" | bc -l)")
    sync
    t0=$(now); cp "$WORK/img.qcow2" "$WORK/cp$i.qcow2"; sync "$WORK/cp$i.qcow2"; t1=$(now)
    CP+=("$(echo "$t1 - $t0" | bc -l)")
    rm -rf "$WORK/asm$i" "$WORK/conv$i.qcow2" "$WORK/cp$i.qcow2"
done
ASM_S=$(printf '%s\n' "${ASM[@]}" | median)
CONV_S=$(printf '%s\n' "${CONV[@]}" | median)
CP_S=$(printf '%s\n' "${CP[@]}" | median)
echo "   assemble ${ASM_S}s  qemu-img convert ${CONV_S}s  cp ${CP_S}s  ($IMG_BYTES bytes)" >&2
echo "   runs: assemble ${ASM[*]}; convert ${CONV[*]}; cp ${CP[*]}" >&2
fi

# --- planner vs LP bound and exact optimum ----------------------------------------------------
if want planner; then
echo "== planner" >&2
PLAN=$(for seed in 0 1 2 3 4 5 6 7 8 9; do
    "$VD" plan --generate "$seed" --vms 50 --sites 4 --exact | python3 -c '
import re,sys
t=sys.stdin.read()
met,n=re.search(r"met (\d+) of (\d+)",t).groups(); b=re.search(r"LP bound ([0-9.]+)",t).group(1); e=re.search(r"exact optimum \(MILP\): (\d+)",t).group(1)
print(met,b,e)'
done | awk '{m+=$1; b+=$2; e+=$3} END {printf "%d %.2f %d\n", m, b, e}')
read -r MET BOUND EXACT <<<"$PLAN"
echo "   met $MET, LP bound $BOUND, exact $EXACT (50 VMs x 10 seeds)" >&2
fi

# --- transfer across the WAN vs iperf3 --------------------------------------------------------
XFER_RATIO=null; IPERF_MBIT=null; XFER_MBIT=null
if [ "$SKIP_LAB" = 0 ] && want transfer; then
    echo "== lab (VIOLA_LAB=vdb) for the WAN transfer" >&2
    LAB_UP=1
    VIOLA_LAB=vdb scripts/lab.sh up --sites 2 --hosts 1 --wan-delay-ms 10 --wan-rate-mbit 200 >/dev/null
    # Network namespace only (the store and identities live in /tmp, visible everywhere);
    # `ip netns exec` execs, so $! below is the daemon itself.
    lab() { local h=$1; shift; [ "$1" = -- ] && shift; ip netns exec "vdb-$h" "$@"; }
    "$CA" init --ca-dir "$WORK/ca" >/dev/null
    "$CA" issue --ca-dir "$WORK/ca" --role depot --site a --host a1 --out "$WORK/id-a1" >/dev/null
    "$CA" issue --ca-dir "$WORK/ca" --role depot --site b --host b1 --out "$WORK/id-b1" >/dev/null
    # iperf3 b1 <- a1 (reverse mode: the server at a1 sends), same direction as the fetch.
    lab a1 -- iperf3 -s -1 -D -B 198.18.1.11 >/dev/null
    sleep 0.5
    IPERF_MBIT=$(lab b1 -- iperf3 -c 198.18.1.11 -R -t 10 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6)')
    ip netns exec vdb-a1 "$VD" --quiet --store "$WORK/store" serve --site a --listen 198.18.1.11:7410 --identity "$WORK/id-a1" --rate-mbit 200 --rtt-ms 20 ${DEPOT_XFER_ARGS:-} 2>"$WORK/serve.log" &
    SERVER_PID=$!
    sleep 1
    FETCH=$(lab b1 -- "$VD" --quiet --store "$WORK/store-b" fetch bench --from 198.18.1.11:7410 --identity "$WORK/id-b1" --rate-mbit 200 --rtt-ms 20 ${DEPOT_XFER_ARGS:-} ${DEPOT_FETCH_ARGS:-} --json)
    XFER_MBIT=$(echo "$FETCH" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["bytes_fetched"]*8/d["seconds"]/1e6)')
    XFER_RATIO=$(echo "$XFER_MBIT / $IPERF_MBIT" | bc -l)
    echo "   fetch ${XFER_MBIT} Mbit/s, iperf3 ${IPERF_MBIT} Mbit/s" >&2
fi

RESULT=$(python3 - "$VERIFY_RATIO" "$ASM_S" "$CONV_S" "$CP_S" "$MET" "$BOUND" "$EXACT" "$XFER_RATIO" "$XFER_MBIT" "$IPERF_MBIT" "$IMG_BYTES" <<'PY'
import json, sys
v, asm, conv, cp, met, bound, exact, xr, xm, im, size = sys.argv[1:]
num = lambda s: None if s == "null" else float(s)
div = lambda a, b: None if num(a) is None or num(b) is None else num(a) / num(b)
out = {
    "transfer_over_iperf3": num(xr),
    "transfer_mbit_s": num(xm),
    "iperf3_mbit_s": num(im),
    "verify_over_raw_blake3": num(v),
    "assembly_time_over_qemu_img_convert": div(asm, conv),
    "assembly_time_over_cp": div(asm, cp),
    "assembly_s": num(asm),
    "qemu_img_convert_s": num(conv),
    "cp_s": num(cp),
    "image_bytes": int(size),
    "planner_met_over_lp_bound": div(met, bound),
    "planner_met_over_exact_optimum": div(met, exact),
    "planner_met": num(met),
    "planner_lp_bound": num(bound),
    "planner_exact_optimum": num(exact),
}
print(json.dumps(out))
PY
)
echo "$RESULT" | python3 -c '
import json,sys
d=json.load(sys.stdin)
for k,v in d.items(): print(f"{k:40} {v}")'
if [ -n "$JSON" ]; then echo "$RESULT" > "$JSON"; fi
