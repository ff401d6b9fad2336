#!/usr/bin/env bash
# Viola's multi-site demo: sets up this machine (idempotently), builds a lab of two sites with
# two hosts each, boots a guest on site a, live-migrates it with its disk to site b, and prints
# what happened and how long each step took. The lab is removed at the end, also on failure.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export VIOLA_LAB=${VIOLA_LAB:-demo}
lab() { scripts/lab.sh "$@"; }

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
since() { printf '%.2f' "$(echo "$(now) - $1" | bc)"; }

if [ "${1:-}" != --no-setup ]; then
  say "setting up this machine (packages, guest kernel and images, release build)"
  scripts/setup.sh
fi

trap 'say "tearing the lab down"; lab down >/dev/null 2>&1 || true' EXIT
t=$(now)
say "building the lab: 2 sites x 2 hosts, each host a namespace with its own libvirtd"
lab up >/dev/null
lab status
echo "   lab up in $(since "$t") s"

lab_dir=$(lab status --json | jq -r .lab_dir)
guest=demo-g1
ip=10.1.0.5
for h in a1 b1; do
  lab exec "$h" -- sh -c 'ip link add lan0 type bridge && ip link set lan0 up && ip addr add 10.1.0.1/24 dev lan0'
  cp /var/cache/viola/guest/base.qcow2 "$lab_dir/images/$h/base.qcow2"
  lab exec "$h" -- qemu-img create -q -f qcow2 -F qcow2 -b /var/lib/viola/images/base.qcow2 "/var/lib/viola/images/$guest.qcow2"
done
VIOLA_CONSOLE_DIR="$lab_dir/console" scripts/guest/domain-xml.sh --name "$guest" \
  --disk "/var/lib/viola/images/$guest.qcow2" --bridge lan0 --ip "$ip/24" >"$lab_dir/$guest.xml"

say "booting $guest on host a1 (site a), TCG, qcow2 overlay on a base image"
lab virsh a1 define "$lab_dir/$guest.xml" >/dev/null
t=$(now)
lab virsh a1 start "$guest" >/dev/null
until lab exec a1 -- ping -c 1 -W 0.2 "$ip" >/dev/null 2>&1; do sleep 0.05; done
until lab exec a1 -- curl -sf -m 2 "http://$ip/cgi-bin/viola?info" >/dev/null 2>&1; do sleep 0.1; done
echo "   $guest answers on $ip after $(since "$t") s"
echo "   writes a marker to its root disk: $(lab exec a1 -- curl -s "http://$ip/cgi-bin/viola?marker-write=demo-$$")"

say "live-migrating $guest with its disk from a1 (site a) to b1 (site b) across the WAN"
t=$(now)
lab virsh a1 migrate --live --p2p --persistent --undefinesource --copy-storage-inc \
  "$guest" qemu+tcp://198.18.2.11/system
total=$(since "$t")
info=$(lab virsh b1 domjobinfo "$guest" --completed)
downtime=$(echo "$info" | awk -F: '/Total downtime/ {print $2}' | awk '{print $1}')
echo "   migrated in $total s, guest downtime ${downtime} ms (QEMU's figure)"
echo "   a1 now runs: $(lab virsh a1 list --name | sed '/^$/d' | paste -sd, - || true)"
echo "   b1 now runs: $(lab virsh b1 list --name | sed '/^$/d' | paste -sd, -)"
echo "   marker read back on site b: $(lab exec b1 -- curl -s "http://$ip/cgi-bin/viola?marker-read")"
say "done"
