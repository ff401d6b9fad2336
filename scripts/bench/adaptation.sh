#!/usr/bin/env bash
# The adaptation manager's control period at scale: 1,000 fake hosts and 10,000 VMs with 30
# periods of monitor samples in a real inventory (redb in a temporary directory). One tick is
# the whole period's work before anything is carried out: read the inventory, build the
# policies' state (adaptmgr/src/observe.rs), decide with `viola`, order the moves with the
# planner. 50 ticks after 3 warm-up ones, each with a fresh policy (the first decision is the
# heavy one), release build.
#
#   scripts/bench/adaptation.sh [--json FILE] [--hosts N] [--vms N] [--rounds N]
#
#   tick_ms.p50, tick_ms.p99     the tick (target: p99 < 100 ms)
#   phase_ms.*                   medians of its parts (read_inventory, build_state,
#                                decide_and_plan), to see where the time goes
#
# Not here (they need the lab: real libvirt, QEMU, overlay and monitors): decision_to_action_ms
# (from the decision to the first hypervisor call) and reaction_s (from a guest's load change to
# the action done).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
json=""
hosts=1000
vms=10000
rounds=50
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json="$2"; shift 2 ;;
        --hosts) hosts="$2"; shift 2 ;;
        --vms) vms="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        *) echo "usage: $0 [--json FILE] [--hosts N] [--vms N] [--rounds N]" >&2; exit 2 ;;
    esac
done
cargo build --release -q --manifest-path "$root/Cargo.toml" -p viola-adaptmgr --example tick_bench >&2
out="$("$root/target/release/examples/tick_bench" "$hosts" "$vms" "$rounds")"
python3 - "$out" "$json" <<'PY'
import json, sys
fig = json.loads(sys.argv[1])
print(f"tick at {fig['hosts']} hosts / {fig['vms']} VMs ({fig['actions_per_tick']} actions per decision):")
print(f"  tick_ms.p50 {fig['tick_ms.p50']:.1f}   tick_ms.p99 {fig['tick_ms.p99']:.1f}   max {fig['tick_ms.max']:.1f}")
print("  parts (medians): " + ", ".join(f"{k.split('.', 1)[1]} {v:.1f} ms" for k, v in fig.items() if k.startswith("phase_ms.")))
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(fig, f, indent=2, sort_keys=True)
        f.write("\n")
PY
