#!/usr/bin/env bash
# Viola's multi-site demo. Sets up this machine (idempotently: packages, guest, release build),
# then, in a lab of two sites with two hosts each:
#   1. a federation CA and a certificate for every daemon (role, site, host);
#   2. an overlay daemon on every host: one violin ("demo", a private Ethernet across sites);
#   3. a depot at each site: the guest image imported at site a and assembled into g1's disk at
#      a1; fetched by site b's depot over the WAN (QUIC, mutual TLS, every chunk verified) and
#      assembled into g2's disk at host b2;
#   4. two guests on the violin, g1 on a1 (site a) and g2 on b2 (site b), both booted from
#      depot-assembled chains, reachable across sites at their own addresses;
#   5. the adaptation manager (on host a2) with a monitor per host; `viola vm migrate` moves g1
#      live, with its disk, to b1 (site b) while host a2 pings it every 10 ms: its base staged at
#      b1 through site b's depot (the manager's staging API call), only g1's own layer copied,
#      same IP, same MAC, the overlay told in advance;
#   6. the manager's policy loop on its own (act mode, 5 s period): g1, capped at 30 % of a CPU,
#      starts burning one; the loop raises its cap and, once the burn is over, lowers it back,
#      and its decision log says why (no resize typed after the first).
# It prints what happened and how long each step took, and removes everything at the end (also
# on failure). Run as root. `--no-setup` skips the machine setup.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export VIOLA_LAB=${VIOLA_LAB:-demo}
export RUST_LOG=${RUST_LOG:-warn}
bin="$root/target/release"
lab() { scripts/lab.sh "$@"; }
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
since() { printf '%.2f' "$(echo "$(now) - $1" | bc)"; }

if [ "${1:-}" != --no-setup ]; then
  say "setting up this machine (packages, guest kernel and images, release build)"
  scripts/setup.sh
fi
for b in viola-ca viola-overlay viola-depot viola-adaptmgr viola-monitor viola; do
  [ -x "$bin/$b" ] || { echo "demo.sh: $bin/$b missing: run scripts/setup.sh" >&2; exit 1; }
done

pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  lab down >/dev/null 2>&1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
t=$(now)
say "1. lab: 2 sites x 2 hosts (own libvirtd each), WAN 10 ms one way, 200 Mbit/s"
lab up >/dev/null
lab status
lab_dir=$(lab status --json | jq -r .lab_dir)
D=$lab_dir/demo
mkdir -p "$D"
echo "   lab up in $(since "$t") s"

say "2. federation CA and certificates"
"$bin/viola-ca" init --ca-dir "$D/ca" >/dev/null
issue() { "$bin/viola-ca" issue --ca-dir "$D/ca" --role "$1" --site "$2" --host "$3" --out "$D/pki/$1-$3" >/dev/null; }
for h in a1 a2 b1 b2; do issue overlay "${h:0:1}" "$h"; issue monitor "${h:0:1}" "$h"; done
issue depot a a1; issue depot b b1; issue adaptmgr fed mgr; issue cli fed operator
echo "   $(ls "$D/pki" | wc -l) certificates: $(ls "$D/pki" | paste -sd' ' -)"

mac_of() { local h; h=$(printf '%s' "$1" | md5sum); echo "52:54:00:${h:0:2}:${h:2:2}:${h:4:2}"; }
g1=demo-g1 g1_ip=10.1.0.5 g1_mac=$(mac_of demo-g1)
g2=demo-g2 g2_ip=10.1.0.6 g2_mac=$(mac_of demo-g2)

say "3. overlay: violin 1 \"demo\" on every host, QUIC datagrams with mutual TLS between hosts"
peers=""
for h in a1 a2 b1 b2; do peers+="[[peers]]"$'\n'"addr = \"$(lab status --json | jq -r ".hosts[] | select(.name==\"$h\") | .address"):4500\""$'\n'; done
for h in a1 a2 b1 b2; do
  addr=$(lab status --json | jq -r ".hosts[] | select(.name==\"$h\") | .address")
  cat >"$D/overlay-$h.toml" <<EOF
listen = "$addr:4500"
identity_dir = "$D/pki/overlay-$h"
control_socket = "$D/overlay-$h.sock"
$peers
[[violins]]
id = 1
name = "demo"
vms = [{ mac = "$g1_mac", ip = "$g1_ip" }, { mac = "$g2_mac", ip = "$g2_ip" }]
EOF
  lab exec "$h" -- "$bin/viola-overlay" run --config "$D/overlay-$h.toml" >"$D/overlay-$h.log" 2>&1 &
  pids+=($!)
done
for h in a1 a2 b1 b2; do
  until lab exec "$h" -- ip link show vio1 >/dev/null 2>&1; do sleep 0.1; done
done
# Hosts a2 and b2 join the violin through their bridge, as observers.
lab exec a2 -- ip addr add 10.1.0.202/24 dev vio1
lab exec b2 -- ip addr add 10.1.0.204/24 dev vio1
sleep 1
"$bin/viola-overlay" status --socket "$D/overlay-a2.sock" | sed 's/^/   /' | head -12

say "4. depots: import at site a, fetch to site b across the WAN (verified), assemble at b2"
t=$(now)
"$bin/viola-depot" --quiet --store "$D/depot-a" import /var/cache/viola/guest/base.qcow2 --name demo-base
image=$(cat "$D/depot-a/names/demo-base")
echo "   imported at site a in $(since "$t") s: $("$bin/viola-depot" --store "$D/depot-a" status 2>/dev/null | head -1)"
echo "   image demo-base = manifest $image"
lab exec a1 -- "$bin/viola-depot" serve --store "$D/depot-a" --site a --listen 198.18.1.11:7410 \
  --identity "$D/pki/depot-a1" --metrics-listen 198.18.1.11:9410 \
  --image-dir-template "$lab_dir/images/{host}" >"$D/depot-a.log" 2>&1 &
pids+=($!)
sleep 1
t=$(now)
lab exec b1 -- "$bin/viola-depot" --quiet --store "$D/depot-b" fetch demo-base --from 198.18.1.11:7410 \
  --identity "$D/pki/depot-b1" --rate-mbit 200 --rtt-ms 20 --json >"$D/fetch.json"
echo "   site b fetched it in $(since "$t") s: $(jq -c '{bytes: (.bytes_fetched // .bytes // null), chunks: (.chunks_fetched // .chunks // null), rejected: (.chunks_rejected // .rejected // 0)}' "$D/fetch.json" 2>/dev/null || cat "$D/fetch.json")"
t=$(now)
lab exec b2 -- "$bin/viola-depot" --quiet --store "$D/depot-b" assemble demo-base \
  --image-dir /var/lib/viola/images --vm "$g2" >/dev/null
echo "   assembled at b2 in $(since "$t") s: $(ls "$lab_dir/images/b2" | paste -sd' ' -)"
# Site b's depot serves its store from now on: the manager stages through it.
lab exec b1 -- "$bin/viola-depot" serve --store "$D/depot-b" --site b --listen 198.18.2.11:7410 \
  --identity "$D/pki/depot-b1" --peer a=198.18.1.11:7410 \
  --image-dir-template "$lab_dir/images/{host}" >"$D/depot-b.log" 2>&1 &
pids+=($!)

say "5. guests on the violin: $g1 on a1 (site a), $g2 on b2 (site b), from depot-assembled chains"
lab exec a1 -- "$bin/viola-depot" --quiet --store "$D/depot-a" assemble demo-base \
  --image-dir /var/lib/viola/images --vm "$g1" >/dev/null
echo "   assembled at a1: $(ls "$lab_dir/images/a1" | paste -sd' ' -)"
xml() { VIOLA_CONSOLE_DIR="$lab_dir/console" scripts/guest/domain-xml.sh --name "$1" \
  --disk "/var/lib/viola/images/$1.qcow2" --bridge vio1 --ip "$2/24" --mtu 1400; }
xml "$g1" "$g1_ip" >"$D/$g1.xml"
xml "$g2" "$g2_ip" >"$D/$g2.xml"
t=$(now)
lab virsh a1 define "$D/$g1.xml" >/dev/null
# g1's domain records the depot image it runs from: the manager stages that image when it moves.
lab virsh a1 metadata "$g1" --uri urn:viola:depot:1 --key viola --set "<image ref='$image'/>" --config >/dev/null
lab virsh a1 start "$g1" >/dev/null
lab virsh b2 define "$D/$g2.xml" >/dev/null && lab virsh b2 start "$g2" >/dev/null
for ip in "$g1_ip" "$g2_ip"; do
  until lab exec a2 -- curl -sf -m 2 "http://$ip/cgi-bin/viola?info" >/dev/null 2>&1; do sleep 0.2; done
done
echo "   both guests answer from a2 (site a) over the violin after $(since "$t") s"
echo "   a2 -> $g2 on site b: $(lab exec a2 -- ping -c 5 -i 0.2 -q "$g2_ip" | tail -1)"
echo "   $g1 writes a marker to its disk: $(lab exec a2 -- curl -s "http://$g1_ip/cgi-bin/viola?marker-write=demo-$$")"

say "6. adaptation manager (on a2) + monitors; live migration of $g1 a1 -> b1 across the WAN"
# The manager runs in host a2's namespace so it reaches the depots on the lab's underlay.
mgr=198.18.1.12:17443
hosts_toml=""
for h in a1 a2 b1 b2; do
  addr=$(lab status --json | jq -r ".hosts[] | select(.name==\"$h\") | .address")
  # How the other hosts' libvirtds reach this one: TLS, with the lab CA's host certificates.
  peer_uri=$(lab status --json | jq -r ".hosts[] | select(.name==\"$h\") | .libvirt_uri")
  hosts_toml+="[[hosts]]
name = \"$h\"
site = \"${h:0:1}\"
libvirt_uri = \"qemu+unix:///system?socket=$lab_dir/hosts/$h/run/libvirt-sock\"
migration_uri = \"$peer_uri\"
images_local = \"$lab_dir/images/$h\"
overlay_addr = \"$addr:4500\"

"
done
cat >"$D/adaptmgr.toml" <<EOF
listen = "$mgr"
metrics_listen = "127.0.0.1:19443"
identity_dir = "$D/pki/adaptmgr-mgr"
inventory = "$D/inventory.redb"
heartbeat_timeout_s = 30
images_host_dir = "/var/lib/viola/images"

$hosts_toml
[[violins]]
name = "demo"
id = 1
vms = ["$g1", "$g2"]

[[depots]]
site = "a"
addr = "198.18.1.11:7410"

[[depots]]
site = "b"
addr = "198.18.2.11:7410"

# The policy loop acts on its own; the demo shows its vertical layer (caps of capped VMs), so
# the consolidation of idle hosts (viola's underload) is off here.
[policy]
mode = "act"
period_s = 5

[policy.viola]
underload = 0.0

[policy.vertical]
cooldown_s = 10
quiet_periods = 2
EOF
lab exec a2 -- "$bin/viola-adaptmgr" --config "$D/adaptmgr.toml" >"$D/adaptmgr.log" 2>&1 &
pids+=($!)
port=19450
for h in a1 a2 b1 b2; do
  lab exec "$h" -- "$bin/viola-monitor" --host "$h" --site "${h:0:1}" --manager "$mgr" --interval-ms 1000 \
    --libvirt-uri "qemu+unix:///system?socket=$lab_dir/hosts/$h/run/libvirt-sock" \
    --metrics-listen "127.0.0.1:$port" --identity "$D/pki/monitor-$h" >"$D/monitor-$h.log" 2>&1 &
  pids+=($!)
  port=$((port + 1))
done
viola() { lab exec a2 -- "$bin/viola" --manager "$mgr" --identity "$D/pki/cli-operator" "$@"; }
until viola --json vm list 2>/dev/null | jq -e ".[] | select(.name==\"$g1\")" >/dev/null 2>&1; do sleep 0.5; done
viola host list | sed 's/^/   /'
viola vm list | sed 's/^/   /'

lab exec a2 -- ping -n -q -i 0.01 -w 40 "$g1_ip" >"$D/ping.txt" 2>&1 &
ping_pid=$!
sleep 1
t=$(now)
viola vm migrate "$g1" --to b1 | tee "$D/migrate.txt"
total=$(since "$t")
sleep 2
kill -INT "$ping_pid" 2>/dev/null || true
wait "$ping_pid" 2>/dev/null || true
downtime=$(sed -n 's/.*downtime \([0-9]*\) ms.*/\1/p' "$D/migrate.txt" | head -1)
sent=$(awk '/packets transmitted/ {print $1}' "$D/ping.txt")
got=$(awk '/packets transmitted/ {print $4}' "$D/ping.txt")

say "what happened"
echo "   $g1 moved a1 (site a) -> b1 (site b) in $total s with its disk, keeping $g1_ip and $g1_mac"
echo "   its base at b1: $(grep -o 'depot of site b staged[^"\\]*' "$D/migrate.txt" | head -1 || true)"
echo "   guest downtime (QEMU): ${downtime:-?} ms; pings every 10 ms from a2: $((sent - got)) of $sent lost (~$(( (sent - got) * 10 )) ms)"
echo "   a1 runs: $(lab virsh a1 list --name | sed '/^$/d' | paste -sd, - || true)   b1 runs: $(lab virsh b1 list --name | sed '/^$/d' | paste -sd, -)"
marker=$(lab exec a2 -- curl -s -m 5 "http://$g1_ip/cgi-bin/viola?marker-read" || true)
echo "   marker read back from its disk on site b: ${marker:-(no answer)}"
echo "   where a2's overlay sends frames for $g1_mac now: $("$bin/viola-overlay" status --json --socket "$D/overlay-a2.sock" | jq -r ".switch.violins[0].macs[] | select(.mac==\"$g1_mac\") | \"\(.location) (seq \(.seq))\"")"
if [ "$marker" != "demo-$$" ]; then
  # Say so, with the guest's own view, instead of ending as if it had worked.
  say "FAILED: $g1 does not answer at b1 after the move; the last lines of its console:"
  tail -n 15 "$lab_dir/console/$g1.log" 2>/dev/null | sed 's/^/   /'
  say "tearing the lab down"
  exit 1
fi
say "7. the policy loop on its own: $g1 (at b1) capped at 30 % of a CPU starts burning one"
# The loop's decisions on g1 that were carried out, as JSON lines.
done_resizes() {
  viola --json decisions | jq -c "select(.actions[] | (.vm == \"$g1\" and .action == \"resize\" and .outcome.outcome == \"done\"))" | wc -l
}
viola vm resize "$g1" --cap-percent 30 >/dev/null
sleep 6 # a quiet control period at the new cap
burn=30
[ "$(lab exec a2 -- curl -s -m 5 "http://$g1_ip/cgi-bin/viola?burn=1,$burn")" = ok ] || { say "FAILED: $g1 did not start burning"; exit 1; }
t=$(now)
deadline=$(( $(date +%s) + 40 ))
until [ "$(done_resizes)" -ge 1 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: the loop did not raise $g1's cap within 40 s"; exit 1; }
  sleep 0.5
done
raised_after=$(since "$t")
sleep "$(echo "$burn - $raised_after" | bc | sed 's/^-.*/0/')"
t=$(now)
deadline=$(( $(date +%s) + 60 ))
# Raised once or twice, then lowered once: the last carried-out resize lowers the cap.
until viola --json decisions | jq -e "select(.actions[] | (.vm == \"$g1\" and .action == \"resize\" and .outcome.outcome == \"done\" and (.reason | test(\"lowered\"))))" >/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: the loop did not lower $g1's cap within 60 s of the burn's end"; exit 1; }
  sleep 0.5
done
lowered_after=$(since "$t")
viola decisions | sed 's/^/   /'
echo "   cap raised ${raised_after} s after the burn began; back to 30 % ${lowered_after} s after it ended"

say "done: tearing the lab down"
