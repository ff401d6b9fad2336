#!/usr/bin/env bash
# The adaptation manager's control period at scale: 1,000 fake hosts and 10,000 VMs with 30
# periods of monitor samples in a real inventory (redb in a temporary directory). One tick is
# the whole period's work before anything is carried out: read the inventory, build the
# policies' state (adaptmgr/src/observe.rs), decide with `viola`, order the moves with the
# planner. 50 ticks after 3 warm-up ones, each with a fresh policy (the first decision is the
# heavy one), release build.
#
#   scripts/bench/adaptation.sh [--json FILE] [--hosts N] [--vms N] [--rounds N] [--lab]
#
#   tick_ms.p50, tick_ms.p99     the tick (target: p99 < 100 ms)
#   phase_ms.*                   medians of its parts (read_inventory, build_state,
#                                decide_and_plan), to see where the time goes
#
# With --lab, also on the default lab (brought up and removed again unless it is already up;
# real libvirt, QEMU, the manager in act mode with a 5 s period, a monitor sampling each second),
# by the lab test adapt_vertical: a guest capped at 30 % starts burning a CPU:
#   reaction_s                   from the burn's start to libvirt's raised cap (the action done)
#   lowered_after_s              from the burn's end to the cap back at 30 % (10 s cool-down)
#   decision_to_action_ms        from the loop's decision to its first action's call into the
#                                manager (which opens the hypervisor): recording the decision
#                                and ordering the steps (the manager's metric
#                                viola_adaptmgr_policy_decision_to_action_ms)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
json=""
hosts=1000
vms=10000
rounds=50
lab=0
while [ $# -gt 0 ]; do
    case "$1" in
        --lab) lab=1; shift ;;
        --json) json="$2"; shift 2 ;;
        --hosts) hosts="$2"; shift 2 ;;
        --vms) vms="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        *) echo "usage: $0 [--json FILE] [--hosts N] [--vms N] [--rounds N] [--lab]" >&2; exit 2 ;;
    esac
done
cargo build --release -q --manifest-path "$root/Cargo.toml" -p viola-adaptmgr --example tick_bench >&2
out="$("$root/target/release/examples/tick_bench" "$hosts" "$vms" "$rounds")"
lab_figures=""
if [ "$lab" = 1 ]; then
    cd "$root"
    if scripts/lab.sh status | grep -q ': down'; then
        trap 'scripts/lab.sh down >/dev/null 2>&1 || true' EXIT
        scripts/lab.sh up >&2
    fi
    log=$(mktemp)
    if ! cargo test -q -p viola-labtests --test adapt_vertical -- --nocapture >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "the lab scenario failed" >&2
        exit 1
    fi
    lab_figures=$(grep -o -E '(reaction_s|lowered_after_s|decision_to_action_ms)=[0-9.]+' "$log" | tr '\n' ' ')
    rm -f "$log"
fi
python3 - "$out" "$json" "$lab_figures" <<'PY'
import json, sys
fig = json.loads(sys.argv[1])
for kv in sys.argv[3].split():
    k, v = kv.split("=")
    fig[k] = float(v)
print(f"tick at {fig['hosts']} hosts / {fig['vms']} VMs ({fig['actions_per_tick']} actions per decision):")
print(f"  tick_ms.p50 {fig['tick_ms.p50']:.1f}   tick_ms.p99 {fig['tick_ms.p99']:.1f}   max {fig['tick_ms.max']:.1f}")
print("  parts (medians): " + ", ".join(f"{k.split('.', 1)[1]} {v:.1f} ms" for k, v in fig.items() if k.startswith("phase_ms.")))
if "reaction_s" in fig:
    print(f"lab: cap raised {fig['reaction_s']:.1f} s after the guest's burn began, "
          f"back {fig.get('lowered_after_s', float('nan')):.1f} s after it ended; "
          f"decision to action {fig.get('decision_to_action_ms', float('nan')):.0f} ms")
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(fig, f, indent=2, sort_keys=True)
        f.write("\n")
PY
