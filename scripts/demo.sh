#!/usr/bin/env bash
# Viola's multi-site demo. Sets up this machine (idempotently: packages, guest, release build),
# then, in a lab of two sites with two hosts each, starts Viola's daemons and builds everything
# else with Viola's own commands (no virsh, no violin written in any configuration file):
#   1. the lab; 2. a federation CA and a certificate for every daemon (role, site, host);
#   3. an overlay daemon on every host, configured with its peers only (and a state file);
#   4. a depot at each site: the guest image imported at site a; site b's depot peers with a's;
#   5. the adaptation manager (on host a2) with the depots and a VM template, and a monitor per
#      host;
#   6. `viola violin create demo --sites a,b` (a private Ethernet across the sites, bridge
#      vio<id> on every host), then `viola vm create` of g1 on a1 (image local to site a) and
#      g2 on b2 (image fetched by site b's depot over the WAN: QUIC, mutual TLS, every chunk
#      verified), each with a deadline; the guests take their addresses by DHCP from the
#      overlay and answer HTTP across the sites; it prints how long each create took and how
#      long until each VM answered;
#   7. `viola vm migrate` moves g1 live, with its disk, to b1 (site b) while host a2 pings it
#      every 10 ms: its base staged at b1 through site b's depot, only g1's own layer copied,
#      same IP, same MAC, the overlay told in advance;
#   7b. a scientist's job in g2 gets a deadline (`viola vm deadline`) three times what it needs
#      at a whole CPU; the job reports its progress from inside (`viola-ask progress`) and the
#      manager keeps g2's CPU cap at the smallest share that still meets the deadline;
#   8. the manager's policy loop on its own (act mode, 5 s period): g1, capped at 30 % of a CPU,
#      starts burning one; the loop raises its cap and, once the burn is over, lowers it back,
#      and its decision log says why (no resize typed after the first);
#   8b. the loop moves a VM across the sites on its own: each lab host has one CPU of its own
#      (`lab.sh up --host-cpus 1`, the monitors reporting their host's cgroup); a third VM is
#      packed onto b1 beside g1, both burn within caps of 55 % (1.1 CPUs wanted of b1's 1) and
#      g2 on b2 burns within 60 %, so site b has no room: the loop moves one of b1's VMs live to
#      site a while a2 pings it;
#   9. `viola violin delete demo --force`, and a check that no domain, disk or bridge is left.
# The manager serves its web dashboard from step 5 on, forwarded to https://127.0.0.1:18443/
# (VIOLA_DASHBOARD_PORT) on this machine: import the operator's certificate it prints into a
# browser to watch the violin, the VMs, the migrations and the policy's decisions as they happen.
# It prints what happened and how long each step took, and removes everything at the end (also
# on failure). Run as root. `--no-setup` skips the machine setup; `--hold` waits for Enter
# before tearing down, to look around the dashboard.
# `--mpi` adds a scientist's cluster after step 9: the MPI guest (two layers) imported at site
# a, `viola violin create hpc`, one VM per site made from it with the scientist's SSH key, the
# MPI host file from `viola violin hostfile`, and the NEMO3D-shaped job (`mpi-nemo --verify`)
# run with `mpiexec` across the sites while one of its ranks live-migrates to the other site.
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

setup=1 mpi=0 hold=0
for arg in "$@"; do
  case "$arg" in
    --no-setup) setup=0 ;;
    --mpi) mpi=1 ;;
    --hold) hold=1 ;;
    *) echo "usage: scripts/demo.sh [--no-setup] [--mpi] [--hold]" >&2; exit 2 ;;
  esac
done
if [ "$setup" = 1 ]; then
  say "setting up this machine (packages, guest kernel and images, release build)"
  scripts/setup.sh
fi
mpi_image=${VIOLA_MPI_GUEST_DIR:-/var/cache/viola/guest-mpi}/mpi.qcow2
if [ "$mpi" = 1 ] && [ ! -f "$mpi_image" ]; then
  echo "demo.sh: $mpi_image missing: run scripts/guest/mpi-image.sh (setup does)" >&2
  exit 1
fi
for b in viola-ca viola-overlay viola-depot viola-adaptmgr viola-monitor viola; do
  [ -x "$bin/$b" ] || { echo "demo.sh: $bin/$b missing: run scripts/setup.sh" >&2; exit 1; }
done

pids=() waiters=()
cleanup() {
  set +e
  for p in "${waiters[@]}" "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  lab down >/dev/null 2>&1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
t=$(now)
say "1. lab: 2 sites x 2 hosts (own libvirtd and one CPU each), WAN 10 ms one way, 200 Mbit/s"
# Each host gets its own CPU (a cgroup quota): load on one host then slows only its guests,
# and its monitor reports that host's capacity and use, as on separate machines.
lab up --host-cpus 1 >/dev/null
lab status
lab_dir=$(lab status --json | jq -r .lab_dir)
D=$lab_dir/demo
mkdir -p "$D"
echo "   lab up in $(since "$t") s"

say "2. federation CA and certificates"
"$bin/viola-ca" init --ca-dir "$D/ca" >/dev/null
issue() { "$bin/viola-ca" issue --ca-dir "$D/ca" --role "$1" --site "$2" --host "$3" --out "$D/pki/$1-$3" "${@:4}" >/dev/null; }
for h in a1 a2 b1 b2; do issue overlay "${h:0:1}" "$h"; issue monitor "${h:0:1}" "$h"; done
# The manager's certificate also names where browsers reach its dashboard.
issue depot a a1; issue depot b b1; issue adaptmgr fed mgr --address 127.0.0.1 --address 198.18.1.12
issue cli fed operator
# The operator's certificate as a browser imports it (PKCS#12, empty password).
openssl pkcs12 -export -passout pass: -name viola-operator -inkey "$D/pki/cli-operator/key.pem" \
  -in "$D/pki/cli-operator/cert.pem" -certfile "$D/ca/ca.pem" -out "$D/operator.p12"
echo "   $(ls "$D/pki" | wc -l) certificates: $(ls "$D/pki" | paste -sd' ' -)"

say "3. overlay daemons: one per host, peers only (no violin configured), QUIC with mutual TLS"
addr_of() { lab status --json | jq -r ".hosts[] | select(.name==\"$1\") | .address"; }
peers=""
for h in a1 a2 b1 b2; do peers+="[[peers]]"$'\n'"addr = \"$(addr_of "$h"):4500\""$'\n'; done
for h in a1 a2 b1 b2; do
  # The violins the manager gives a daemon at run time are kept in its state file, so a
  # restarted daemon carries them again before the manager tells it anything.
  cat >"$D/overlay-$h.toml" <<EOF
listen = "$(addr_of "$h"):4500"
identity_dir = "$D/pki/overlay-$h"
control_socket = "$D/overlay-$h.sock"
state_file = "$D/overlay-$h.state"
$peers
EOF
  lab exec "$h" -- "$bin/viola-overlay" run --config "$D/overlay-$h.toml" >"$D/overlay-$h.log" 2>&1 &
  pids+=($!)
done
for h in a1 a2 b1 b2; do
  until [ -S "$D/overlay-$h.sock" ]; do sleep 0.1; done
done
sleep 1
"$bin/viola-overlay" status --socket "$D/overlay-a2.sock" | sed 's/^/   /' | head -12

say "4. depots: the guest image imported at site a; site a's and site b's depots serve (b fetches from a)"
t=$(now)
"$bin/viola-depot" --quiet --store "$D/depot-a" import /var/cache/viola/guest/base.qcow2 --name demo-base
echo "   imported at site a in $(since "$t") s: $("$bin/viola-depot" --store "$D/depot-a" status 2>/dev/null | head -1)"
echo "   image demo-base = manifest $(cat "$D/depot-a/names/demo-base")"
if [ "$mpi" = 1 ]; then
  # The MPI guest is a chain (the MPI layer on the OS layer): imported as two parts.
  "$bin/viola-depot" --quiet --store "$D/depot-a" import "$mpi_image" --name mpi
  echo "   image mpi (Debian, MPICH, OpenSSH; two layers) = manifest $(cat "$D/depot-a/names/mpi")"
fi
# The depots plan their transfers for the lab's WAN (200 Mbit/s, 20 ms round trip).
lab exec a1 -- "$bin/viola-depot" serve --store "$D/depot-a" --site a --listen 198.18.1.11:7410 \
  --identity "$D/pki/depot-a1" --metrics-listen 198.18.1.11:9410 --rate-mbit 200 --rtt-ms 20 \
  --image-dir-template "$lab_dir/images/{host}" >"$D/depot-a.log" 2>&1 &
pids+=($!)
# Site b's depot starts empty: it fetches what a VM at site b needs from site a's, over the WAN
# (QUIC, mutual TLS, every chunk verified), when the manager asks it to stage an image.
lab exec b1 -- "$bin/viola-depot" serve --store "$D/depot-b" --site b --listen 198.18.2.11:7410 \
  --identity "$D/pki/depot-b1" --peer a=198.18.1.11:7410 --rate-mbit 200 --rtt-ms 20 \
  --image-dir-template "$lab_dir/images/{host}" >"$D/depot-b.log" 2>&1 &
pids+=($!)
for h in a1 b1; do
  deadline=$(( $(date +%s) + 30 ))
  until lab exec "$h" -- ss -Hlun 'sport = :7410' | grep -q 7410; do
    [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: the depot at $h does not serve"; tail -n 5 "$D"/depot-*.log; exit 1; }
    sleep 0.2
  done
done
echo "   depots serving: site a at a1 (198.18.1.11:7410), site b at b1 (198.18.2.11:7410, peer a)"

say "5. adaptation manager (on a2) with the depots and a VM template, no violin configured; a monitor per host"
# The manager runs in host a2's namespace so it reaches the depots and overlays on the lab's
# underlay.
mgr=198.18.1.12:17443
hosts_toml=""
for h in a1 a2 b1 b2; do
  # How the other hosts' libvirtds reach this one: TLS, with the lab CA's host certificates.
  peer_uri=$(lab status --json | jq -r ".hosts[] | select(.name==\"$h\") | .libvirt_uri")
  hosts_toml+="[[hosts]]
name = \"$h\"
site = \"${h:0:1}\"
libvirt_uri = \"qemu+unix:///system?socket=$lab_dir/hosts/$h/run/libvirt-sock\"
migration_uri = \"$peer_uri\"
images_local = \"$lab_dir/images/$h\"
overlay_addr = \"$(addr_of "$h"):4500\"

"
done
dashboard=198.18.1.12:18444
dash_port=${VIOLA_DASHBOARD_PORT:-18443}
cat >"$D/adaptmgr.toml" <<EOF
listen = "$mgr"
dashboard_listen = "$dashboard"
metrics_listen = "127.0.0.1:19443"
identity_dir = "$D/pki/adaptmgr-mgr"
inventory = "$D/inventory.redb"
heartbeat_timeout_s = 30
images_host_dir = "/var/lib/viola/images"

$hosts_toml
[[depots]]
site = "a"
addr = "198.18.1.11:7410"

[[depots]]
site = "b"
addr = "198.18.2.11:7410"

# How \`viola vm create\` defines a VM: the lab guest boots its kernel directly, takes its
# address by DHCP (answered by the overlay daemon on its host) and serves HTTP on it.
[vm_template]
kernel = "/var/cache/viola/guest/vmlinuz"
initrd = "/var/cache/viola/guest/initrd.img"
cmdline = "console=ttyS0 quiet panic=-1 viola.ip=dhcp viola.http=1"
console_dir = "$lab_dir/console"
mtu = 1400

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
  # Inside the host's mount namespace /sys/fs/cgroup/{cpu,cpuacct} are the host's own cgroup.
  lab exec "$h" -- "$bin/viola-monitor" --host "$h" --site "${h:0:1}" --manager "$mgr" --interval-ms 1000 \
    --cgroup-dir /sys/fs/cgroup/cpu --cgroup-dir /sys/fs/cgroup/cpuacct \
    --libvirt-uri "qemu+unix:///system?socket=$lab_dir/hosts/$h/run/libvirt-sock" \
    --metrics-listen "127.0.0.1:$port" --identity "$D/pki/monitor-$h" \
    --overlay-socket "$D/overlay-$h.sock" >"$D/monitor-$h.log" 2>&1 &
  pids+=($!)
  port=$((port + 1))
done
viola() { lab exec a2 -- "$bin/viola" --manager "$mgr" --identity "$D/pki/cli-operator" "$@"; }
deadline=$(( $(date +%s) + 60 ))
until [ "$(viola --json host list 2>/dev/null | jq '[.[] | select(.state == "up")] | length' 2>/dev/null)" = 4 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: not every host reports to the manager within 60 s"; tail -n 5 "$D/adaptmgr.log"; exit 1; }
  sleep 0.5
done
viola host list | sed 's/^/   /'
# The dashboard on this machine's loopback, forwarded into a2's namespace.
a2_ns=$(lab status --json | jq -r '.hosts[] | select(.name=="a2") | .namespace')
socat "TCP-LISTEN:$dash_port,bind=127.0.0.1,reuseaddr,fork" \
  "SYSTEM:ip netns exec $a2_ns socat STDIO TCP\\:${dashboard%:*}\\:${dashboard##*:}" 2>"$D/dashboard-forward.log" &
pids+=($!)
dash_url="https://127.0.0.1:$dash_port"
# What the browser reads, read here with the operator's certificate.
dash_api() { curl -sf -m 5 --cacert "$D/ca/ca.pem" --cert "$D/pki/cli-operator/cert.pem" --key "$D/pki/cli-operator/key.pem" "$dash_url/api/v1/$1"; }
deadline=$(( $(date +%s) + 20 ))
until dash_api overview >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: the dashboard does not answer at $dash_url"; tail -n 5 "$D/adaptmgr.log" "$D/dashboard-forward.log"; exit 1; }
  sleep 0.5
done
echo "   dashboard: $dash_url/ (HTTPS, client certificates from the federation CA)"
echo "     import $D/operator.p12 (empty password) into your browser and trust $D/ca/ca.pem;"
echo "     it shows $(dash_api overview | jq -r '[.sites[].hosts[]] | length') hosts, as $(dash_api overview | jq -r .viewer.identity)"

g1=demo-g1 g2=demo-g2
say "6. a violin across the sites and two VMs on it, with Viola's commands only"
echo "   \$ viola violin create demo --subnet 10.1.0.0/24 --sites a,b"
t=$(now)
viola --json violin create demo --subnet 10.1.0.0/24 --sites a,b >"$D/violin.json"
vid=$(jq -r '.[0].id' "$D/violin.json")
bridge=vio$vid
for h in a1 a2 b1 b2; do lab exec "$h" -- ip link show "$bridge" >/dev/null; done
echo "   violin demo (id $vid, 10.1.0.0/24): bridge $bridge on every host after $(since "$t") s"
# Hosts a2 and b2 join the violin through their bridge, as observers (addresses the violin
# does not hand out: VMs get the lowest free ones).
lab exec a2 -- ip addr add 10.1.0.202/24 dev "$bridge"
lab exec b2 -- ip addr add 10.1.0.204/24 dev "$bridge"

ip_of() { viola --json vm list | jq -r ".[] | select(.name==\"$1\") | .ip // empty"; }
mac_of() { viola --json vm list | jq -r ".[] | select(.name==\"$1\") | .macs[0] // empty"; }
# Waits (in the background) until VM $1 answers HTTP at $2 from a2, and writes how long after
# $3 (the start of its create) into $D/answered-$1; gives up after 180 s.
await_http() {
  local deadline=$(( $(date +%s) + 180 ))
  until lab exec a2 -- curl -sf -m 2 "http://$2/cgi-bin/viola?info" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
  since "$3" >"$D/answered-$1"
}
# Makes VM $1 at host $2 with deadline $3 s (its disk staged through the site's depot, its
# domain defined and started on the violin) and starts waiting for it to answer.
create() {
  local t0 ip
  echo "   \$ viola vm create $1 --violin demo --image demo-base --host $2 --ready-by $3"
  t0=$(now)
  if ! viola vm create "$1" --violin demo --image demo-base --host "$2" --ready-by "$3" | sed 's/^/   /'; then
    say "FAILED: viola vm create $1 (its error above)"
    [ ! -s "$D/adaptmgr.log" ] || { echo "   the manager's last lines:"; tail -n 10 "$D/adaptmgr.log" | sed 's/^/   /'; }
    exit 1
  fi
  echo "   $1 created in $(since "$t0") s"
  ip=$(ip_of "$1")
  [ -n "$ip" ] || { say "FAILED: viola vm list shows no address for $1"; exit 1; }
  await_http "$1" "$ip" "$t0" &
  waiters+=($!)
}
create "$g1" a1 120
create "$g2" b2 180
g1_ip=$(ip_of "$g1") g1_mac=$(mac_of "$g1")
g2_ip=$(ip_of "$g2") g2_mac=$(mac_of "$g2")
echo "   addresses handed out by the violin: $g1 $g1_ip ($g1_mac), $g2 $g2_ip ($g2_mac)"
vms=("$g1" "$g2")
for i in 0 1; do
  vm=${vms[$i]}
  if ! wait "${waiters[$i]}"; then
    say "FAILED: $vm does not answer HTTP at its address within 180 s of its creation; the last lines of its console:"
    tail -n 15 "$lab_dir/console/$vm.log" 2>/dev/null | sed 's/^/   /'
    exit 1
  fi
done
waiters=() # both done and waited for
echo "   $g1 (a1, image already at site a) answers from a2 $(cat "$D/answered-$g1") s after its \`vm create\` began"
echo "   $g2 (b2, image fetched across the WAN) answers from a2 $(cat "$D/answered-$g2") s after its \`vm create\` began"
echo "   a2 -> $g2 on site b: $(lab exec a2 -- ping -c 5 -i 0.2 -q "$g2_ip" | tail -1)"
echo "   $g1 writes a marker to its disk: $(lab exec a2 -- curl -s "http://$g1_ip/cgi-bin/viola?marker-write=demo-$$")"
viola violin show demo | sed 's/^/   /'
viola vm list | sed 's/^/   /'

say "7. live migration of $g1 a1 -> b1 across the WAN while a2 pings it every 10 ms"
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
echo "   the dashboard lists it: $(dash_api overview | jq -r --arg vm "$g1" '.migrations_recent[] | select(.vm == $vm) | "\(.vm) \(.from) -> \(.to) \(.outcome), \((.finished_ms - .started_ms) / 1000) s, downtime \(.downtime_ms) ms"' | head -1)"
links=$(dash_api "history?series=host/a2/link/&range=hour" | jq -r '[.series[] | select(.name | endswith("/tx_mbit_s")) | "\(.name | split("/")[3] | sub(":"; "/")) \([.points[][1]] | max * 100 | round / 100) Mbit/s"] | join(", ")' || true)
echo "   a2's overlay links at their peak, from the dashboard's per-link history: ${links:-(none)}"
echo "   where a2's overlay sends frames for $g1_mac now: $("$bin/viola-overlay" status --json --socket "$D/overlay-a2.sock" | jq -r ".switch.violins[] | select(.id == $vid) | .macs[] | select(.mac==\"$g1_mac\") | \"\(.location) (seq \(.seq))\"")"
if [ "$marker" != "demo-$$" ]; then
  # Say so, with the guest's own view, instead of ending as if it had worked.
  say "FAILED: $g1 does not answer at b1 after the move; the last lines of its console:"
  tail -n 15 "$lab_dir/console/$g1.log" 2>/dev/null | sed 's/^/   /'
  say "tearing the lab down"
  exit 1
fi
say "7b. a scientist's job in $g2 with a deadline: the manager gives it the smallest CPU share that meets it"
# viola-job in the guest does UNITS equal pieces of CPU work and tells the manager its progress
# from inside (viola-ask progress, on its shepherd channel). Prints the job's own duration.
run_job() { # UNITS REPORT_S TIMEOUT_S
  local r deadline=$(( $(date +%s) + $3 ))
  [ "$(lab exec a2 -- curl -s -m 5 "http://$g2_ip/cgi-bin/viola?job-start=$1,$2")" = ok ] || return 1
  until r=$(lab exec a2 -- curl -s -m 5 "http://$g2_ip/cgi-bin/viola?job-result") && [ "${r#units=}" != "$r" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 1
  done
  echo "$r" | awk '{ split($2, s, "="); split($3, e, "="); printf "%.1f", e[2] - s[2] }'
}
calibration=$(run_job 10 60 120) || { say "FAILED: $g2's calibration job did not end"; exit 1; }
units=$(echo "$calibration" | awk '{ u = int(15 * 10 / $1 + 0.999); print (u < 5 ? 5 : u) }')
alone=$(echo "$calibration $units" | awk '{ printf "%.1f", $1 / 10 * $2 }')
due=$(echo "$alone" | awk '{ printf "%d", 3 * $1 + 0.999 }')
echo "   a job of $units units needs ${alone} s of a whole CPU; \$ viola vm deadline $g2 --in-s $due"
viola vm deadline "$g2" --in-s "$due" >/dev/null
took=$(run_job "$units" 5 $((2 * due + 60))) || { say "FAILED: $g2's job did not end"; exit 1; }
viola --json decisions | jq -r "select(.policy == \"vservices\") | .actions[] | select(.vm == \"$g2\") | \"   \\(.detail): \\(.reason)\"" | tail -n 4
echo "   the job took ${took} s of its ${due} s (alone at a whole CPU: ${alone} s)"
if [ "$(echo "$took > $due + 3" | bc)" = 1 ]; then
  say "FAILED: $g2's job missed its deadline"
  exit 1
fi

say "8. the policy loop on its own: $g1 (at b1) capped at 30 % of a CPU starts burning one"
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
echo "   cap raised ${raised_after} s after the burn began; lowered again ${lowered_after} s after it ended (to the cap its last decision above gives)"

say "8b. the loop moves a VM across the sites on its own: site b has more work than its CPUs"
g3=demo-g3
# vm create puts no more vCPUs on a host than it has CPUs: g3 starts at a1 and the operator
# packs it onto b1 beside g1 (a manual move checks memory only).
viola vm create "$g3" --violin demo --image demo-base --host a1 --memory-mib 192 --ready-by 120 | sed 's/^/   /'
g3_ip=$(ip_of "$g3")
deadline=$(( $(date +%s) + 180 ))
until lab exec a2 -- curl -sf -m 2 "http://$g3_ip/cgi-bin/viola?info" >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: $g3 does not answer HTTP within 180 s"; exit 1; }
  sleep 0.5
done
viola vm migrate "$g3" --to b1 >/dev/null
# g2's 60 %: the vertical layer (on since step 8) cannot raise it (a doubled cap would take b2
# past its 90 % target), and b2 stays below the policy's overload mark. At 40 % it was raised
# to 80 %, and with QEMU's own thread b2 then passed 95 %: the loop moved g2 instead.
for v in "$g1:55" "$g3:55" "$g2:60"; do viola vm resize "${v%:*}" --cap-percent "${v#*:}" >/dev/null; done
moves_before=$(viola --json decisions | jq -c 'select(.actions[] | (.action == "migrate" and .outcome.outcome == "done"))' | wc -l)
for ip in "$g1_ip" "$g3_ip" "$g2_ip"; do
  [ "$(lab exec a2 -- curl -s -m 5 "http://$ip/cgi-bin/viola?burn=1,90")" = ok ] || { say "FAILED: $ip did not start burning"; exit 1; }
done
echo "   b1: $g1 and $g3 (caps 55 %) burn, wanting 1.1 of b1's 1 CPU; b2: $g2 (cap 60 %) burns"
# Every burning VM is pinged: the loop picks which one to move.
ping_pids=()
for v in "$g1:$g1_ip" "$g3:$g3_ip" "$g2:$g2_ip"; do
  lab exec a2 -- ping -n -q -i 0.02 -w 90 "${v#*:}" >"$D/ping-loop-${v%%:*}.txt" 2>&1 &
  ping_pids+=($!)
done
t=$(now)
deadline=$(( $(date +%s) + 75 ))
until [ "$(viola --json decisions | jq -c 'select(.actions[] | (.action == "migrate" and .outcome.outcome == "done"))' | wc -l)" -gt "$moves_before" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: the loop did not relieve b1 within 75 s"; tail -n 5 "$D/adaptmgr.log"; exit 1; }
  sleep 0.5
done
moved_after=$(since "$t")
sleep 2
for p in "${ping_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
move=$(viola --json decisions | jq -r 'select(.actions[] | (.action == "migrate" and .outcome.outcome == "done")) | .actions[] | select(.action == "migrate" and .outcome.outcome == "done") | "\(.vm) \(.from) -> \(.to): \(.reason)"' | tail -n 1)
echo "   the loop moved ${move} (${moved_after} s after the burn began)"
moved=${move%% *}
if [ -f "$D/ping-loop-$moved.txt" ]; then
  sent=$(awk '/packets transmitted/ {print $1}' "$D/ping-loop-$moved.txt")
  got=$(awk '/packets transmitted/ {print $4}' "$D/ping-loop-$moved.txt")
  echo "   pings of $moved every 20 ms from a2 meanwhile: $((sent - got)) of $sent lost"
fi
# Mostly one of b1's VMs goes; when QEMU's own threads take b2 past its mark too, the loop may
# relieve b2 first (g2 to site a). Either is the loop moving a VM across the sites on its own.
case "$move" in
  "$g3 b1 -> a"*|"$g1 b1 -> a"*|"$g2 b2 -> a"*) ;;
  *) say "FAILED: expected a move from site b to site a, got: ${move:-nothing}"; exit 1 ;;
esac
viola host list | sed 's/^/   /'

say "9. \`viola violin delete demo --force\`: its VMs, disks and bridges go from every host"
t=$(now)
viola violin delete demo --force | sed 's/^/   /'
echo "   deleted in $(since "$t") s"
left=""
for h in a1 a2 b1 b2; do
  doms=$(lab virsh "$h" list --all --name | grep '^demo-' | paste -sd, - || true)
  [ -z "$doms" ] || left+=" $h: domains $doms;"
  disks=$(compgen -G "$lab_dir/images/$h/demo-*" | xargs -r -n1 basename | paste -sd, - || true)
  [ -z "$disks" ] || left+=" $h: disks $disks;"
  ! lab exec "$h" -- ip link show "$bridge" >/dev/null 2>&1 || left+=" $h: bridge $bridge;"
done
[ "$(viola --json violin list | jq length)" = 0 ] || left+=" the manager still lists a violin;"
if [ -n "$left" ]; then
  say "FAILED: left behind after the delete:$left"
  exit 1
fi
for h in a1 a2 b1 b2; do
  echo "   $h: virsh list --all: $(lab virsh "$h" list --all --name | sed '/^$/d' | paste -sd, - | grep . || echo '(none)'); $bridge: $(lab exec "$h" -- ip link show "$bridge" >/dev/null 2>&1 && echo present || echo gone)"
done
echo "   nothing left: no demo domain, disk or $bridge on any host, no violin at the manager"

if [ "$mpi" = 1 ]; then
  say "10. a scientist's cluster: two MPI VMs across the sites, a job, and a rank that moves"
  ssh-keygen -q -t ed25519 -N '' -C scientist@demo -f "$D/id_ed25519"
  echo "   \$ viola violin create hpc --subnet 10.2.0.0/24 --sites a,b"
  viola --json violin create hpc --subnet 10.2.0.0/24 --sites a,b >"$D/hpc.json"
  # The scientist works from host a2, on the violin at an address it does not hand out.
  lab exec a2 -- ip addr add 10.2.0.250/24 dev "vio$(jq -r '.[0].id' "$D/hpc.json")"
  for n in node0:a node1:b; do
    echo "   \$ viola vm create ${n%:*} --violin hpc --image mpi --site ${n#*:} --memory-mib 512 --ssh-key id_ed25519.pub"
    t=$(now)
    viola vm create "${n%:*}" --violin hpc --image mpi --site "${n#*:}" --memory-mib 512 \
      --ready-by 300 --ssh-key "$D/id_ed25519.pub" | sed 's/^/   /'
    echo "   ${n%:*} created in $(since "$t") s"
  done
  on() { # on VM CMD...: ssh root@VM's address from a2 with the scientist's key (bounded)
    local ip; ip=$(ip_of "$1"); shift
    lab exec a2 -- timeout 600 ssh -i "$D/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
      -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5 \
      -o ServerAliveInterval=5 "root@$ip" "$@"
  }
  deadline=$(( $(date +%s) + 180 ))
  until on node0 true 2>/dev/null && on node1 true 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { say "FAILED: node0 and node1 do not take SSH logins within 180 s"; exit 1; }
    sleep 1
  done
  echo "   \$ viola violin hostfile hpc --format pairs"
  pairs=$(viola violin hostfile hpc --format pairs)
  sed 's/^/   /' <<<"$pairs"
  on node0 "umask 077 && cat >/root/.ssh/id_ed25519" <"$D/id_ed25519"
  on node0 viola-hosts $pairs
  job="mpiexec -launcher ssh -f /root/hosts -n 2 /usr/local/bin/mpi-nemo --strain-iters 2000 --block-kib 16 --lanczos-iters 3 --mem-mib 32 --verify"
  echo "   node0\$ $job"
  on node0 "MPIEXEC_TIMEOUT=150 $job" >"$D/nemo.out" 2>&1 &
  jobpid=$!
  waiters+=("$jobpid")
  sleep 3
  echo "   \$ viola vm migrate node1 --to a2        (while the job runs)"
  viola vm migrate node1 --to a2 --timeout-s 240 | sed 's/^/   /'
  rc=0; wait "$jobpid" || rc=$?
  grep -E '^nemo (strain iter=(1|500|1000|1500|2000)/|lanczos|ok|FAILED)' "$D/nemo.out" | sed 's/^/   /'
  if ! grep -q '^nemo ok .*verify=ok$' "$D/nemo.out"; then
    say "FAILED: the MPI job across the move (exit $rc)"; tail -n 5 "$D/nemo.out"; exit 1
  fi
  if [ "$rc" != 0 ]; then
    # Known, not Viola's: now and then mpiexec does not return after the job has ended and
    # verified, until MPIEXEC_TIMEOUT stops it (both ranks spin in MPI's UCX teardown with
    # nothing queued between them, with or without a migration; see README, mpi_lab).
    echo "   WARNING: the job ended and verified, but mpiexec returned only at its timeout (exit $rc)"
  fi
  echo "   the job ended with the result rank 0 recomputed alone (verify=ok), node1 now at $(viola --json vm list | jq -r '.[] | select(.name=="node1") | .host')"
  viola violin delete hpc --force | sed 's/^/   /'
fi

if [ "$hold" = 1 ]; then
  say "holding: the dashboard stays at $dash_url/ until you press Enter"
  read -r _ || true
fi
say "done: tearing the lab down"
