#!/usr/bin/env bash
# Viola's lab: several sites of real libvirt hosts on one machine.
#
#   lab.sh up [--sites N] [--hosts M] [--wan-delay-ms D] [--wan-rate-mbit R] [--nat-site S]
#             [--allow-plain-migration] [--host-cpus C] [--private-images]
#   lab.sh down            remove everything `up` made (also after a crash or a half-made up)
#   lab.sh status [--json] sites, hosts, addresses, each libvirtd's state and its domains
#   lab.sh exec HOST -- CMD...   run CMD in HOST's network and mount namespace
#   lab.sh virsh HOST ARGS...    virsh against HOST's own libvirtd
#   lab.sh start-libvirtd HOST   start HOST's libvirtd again the lab's way (after a test killed it)
#   lab.sh issue-libvirt HOST [--ca-dir DIR]   issue HOST's libvirt/QEMU certificates again, from
#                          the lab's CA or DIR's (a host from outside the federation), and tell
#                          its running libvirtd to serve them (no restart)
#   lab.sh hosts           host names, one per line
#
# Address plan (never the machine's own subnet; only 198.18.0.0/15 for underlays):
#   site i (a=1, b=2, ...)  underlay 198.18.i.0/24, its router address 198.18.i.1
#   host k of site i        198.18.i.(10+k) on eth0 of namespace vl-<site><k> (a1, a2, b1 ...)
#   guests and violins      10.0.0.0/8, never routed by the lab
# Topology:
#   vl-<host>  --veth-->  vl-sw: bridge br-<site>  --veth-->  vl-rtr (routes between sites)
#   Traffic from the router toward a site crosses `viola-wanem` (the one-way WAN delay; this
#   kernel has no netem) and a tbf qdisc (the WAN rate), so a cross-site packet sees the delay
#   and the rate once in each direction; traffic inside a site never touches the router.
# Each host runs its own libvirtd in a private mount namespace with private /etc/libvirt,
# /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and /etc/pki, a random
# host_uuid, and a private image directory: /var/lib/viola/images inside the host is
# /var/lib/viola-lab/images/<host> outside. With `up --private-images` it is instead a tmpfs
# mounted only inside the host's mount namespace, as on separate machines: no process outside
# that host (another host's, the manager's, a site depot's) can see or write it, and only a
# Viola component running in the host (its depot agent) can lay images down there.
# Migrations are encrypted and mutually authenticated as in a real federation: `up` makes a lab
# CA with viola-ca (LAB_DIR/pki/ca) and issues each host's libvirt and QEMU certificates from it
# (`viola-ca issue-libvirt`, the host's name and underlay address as names) into the host's
# /etc/pki. libvirtd listens only with TLS (16514) on the underlay address, taking any client
# certificate of the lab CA; there is no TCP listener. QEMU verifies its peer's certificate and
# refuses migrations without TLS, unless `up --allow-plain-migration` (for measuring what TLS
# costs: the libvirtds still talk TLS, the migration stream may then go in the clear). Other
# hosts reach a host's libvirtd at qemu+tls://ADDRESS/system (`status --json`: libvirt_uri).
set -euo pipefail

# Several labs can coexist (parallel tests, several developers): VIOLA_LAB names the instance.
# The default instance `vl` uses the paths below; instance X uses /var/lib/viola-lab-X and
# /run/viola-lab-X and namespaces X-a1, X-rtr, ...
LAB=${VIOLA_LAB:-vl}
[[ "$LAB" =~ ^[a-z][a-z0-9]{0,5}$ ]] || { echo "lab.sh: VIOLA_LAB must be 1-6 lowercase letters/digits" >&2; exit 2; }
PREFIX=$LAB-
if [ "$LAB" = vl ]; then
  LAB_DIR=/var/lib/viola-lab
  RUN_DIR=/run/viola-lab
else
  LAB_DIR=/var/lib/viola-lab-$LAB
  RUN_DIR=/run/viola-lab-$LAB
fi
NS_DIR=$RUN_DIR/ns
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

log() { printf '[lab] %s\n' "$*" >&2; }
die() { printf 'lab.sh: %s\n' "$*" >&2; exit 1; }

site_letter() { printf "\\$(printf '%03o' $((96 + $1)))"; }
site_index() { printf '%d' $(( $(printf '%d' "'$1") - 96 )); }
host_ns() { echo "${PREFIX}$1"; }

lab_hosts() { [ -f "$RUN_DIR/hosts" ] && cat "$RUN_DIR/hosts" || true; }

host_exec() { # HOST CMD...
  local h=$1; shift
  [ -e "$NS_DIR/$h.mnt" ] || die "no lab host named $h (is the lab up?)"
  nsenter --net="/run/netns/$(host_ns "$h")" --mount="$NS_DIR/$h.mnt" -- "$@"
}

ca_bin() { # viola-ca with issue-libvirt: the workspace's build, else a fresh one
  for b in "$root/target/debug/viola-ca" "$root/target/release/viola-ca"; do
    [ -x "$b" ] && "$b" issue-libvirt --help >/dev/null 2>&1 && { echo "$b"; return; }
  done
  (cd "$root" && cargo build --quiet -p viola-common --bin viola-ca) >&2
  echo "$root/target/debug/viola-ca"
}

wanem_bin() {
  for b in "$root/target/release/viola-wanem" "$root/target/debug/viola-wanem"; do
    [ -x "$b" ] && { echo "$b"; return; }
  done
  (cd "$root" && cargo build --release --quiet -p viola-labtests --bin viola-wanem) >&2
  echo "$root/target/release/viola-wanem"
}

kill_pid() { # PID: TERM, then KILL after 3 s; only ever a PID the lab started or placed
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
cmd_down() {
  local h ns pid f
  # 1. Every process inside a lab network namespace: libvirtd, QEMU, and whatever tests started.
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill_pid "$pid"; done
  done
  # 2. QEMU processes whose pid files a lab libvirtd wrote (they may have left the namespace
  #    only in theory, but a half-made lab can have lost its namespace first).
  for f in "$LAB_DIR"/hosts/*/run/qemu/*.pid; do
    [ -f "$f" ] && kill_pid "$(cat "$f" 2>/dev/null)"
  done
  for f in "$LAB_DIR"/hosts/*/libvirtd.pid "$RUN_DIR"/*.pid; do
    [ -f "$f" ] && kill_pid "$(cat "$f" 2>/dev/null)"
  done
  # 3. Mount namespaces, then the namespaces themselves (their bridges and veths go with them).
  for f in "$NS_DIR"/*.mnt "$NS_DIR"/*.cgroup; do
    [ -e "$f" ] && umount "$f" 2>/dev/null || true
  done
  for f in "$NS_DIR"/*.mnt; do
    [ -e "$f" ] && remove_host_cgroups "$(basename "$f" .mnt)"
  done
  if mountpoint -q "$NS_DIR" 2>/dev/null; then umount "$NS_DIR" 2>/dev/null || true; fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$RUN_DIR" "$LAB_DIR"
  log "down: nothing of the lab is left"
}

# ---------------------------------------------------------------------------------------------
write_libvirt_config() { # HOST ADDR DIR PLAIN_MIGRATION_ALLOWED(0|1)
  local h=$1 addr=$2 d=$3 plain=$4 uuid
  cp -a /etc/libvirt/. "$d/etc/"
  rm -f "$d/etc/qemu/networks/autostart/"*.xml
  # libvirtd rejects a host_uuid whose digits are all equal: use a random one.
  uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >>"$d/etc/libvirtd.conf" <<EOF

# --- viola lab host $h ---
# TLS only, on the underlay address. A client is authenticated by its certificate (the lab CA's
# in /etc/pki/CA/cacert.pem, this host's own under /etc/pki/libvirt, both private to the host).
listen_tls = 1
listen_tcp = 0
listen_addr = "$addr"
auth_tls = "none"
ca_file = "/etc/pki/CA/cacert.pem"
cert_file = "/etc/pki/libvirt/servercert.pem"
key_file = "/etc/pki/libvirt/private/serverkey.pem"
host_uuid = "$uuid"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >>"$d/etc/qemu.conf" <<EOF

# --- viola lab host $h ---
# No virtlogd in the lab; QEMU's output goes straight to a file.
stdio_handler = "file"
security_driver = "none"
user = "root"
group = "root"
remember_owner = 0
# The per-domain /dev namespace would be nested in the host's private mount namespace.
namespaces = [ ]
# Migration traffic must use this host's underlay address, not the machine's hostname, which
# every lab host shares.
migration_address = "$addr"
migration_host = "$addr"
# cpu and cpuacct give CPU caps and shares (scheduler quota). Memory is sized by the balloon;
# leaving the memory controller alone keeps QEMU inside the machine's own memory cgroup.
cgroup_controllers = [ "cpu", "cpuacct" ]
# QEMU's TLS (migration stream and NBD disk copy): this host's certificates, the peer's checked
# against the lab CA; a migration without VIR_MIGRATE_TLS is refused.
default_tls_x509_cert_dir = "/etc/pki/qemu"
default_tls_x509_verify = 1
migrate_tls_x509_verify = 1
migrate_tls_force = $((1 - plain))
EOF
  echo "$uuid" >"$d/host_uuid"
}

start_host() { # HOST SITE_INDEX K PLAIN_MIGRATION_ALLOWED PRIVATE_IMAGES
  local h=$1 i=$2 k=$3 plain=$4 private=$5 ns addr d c images_mount
  ns=$(host_ns "$h")
  addr="198.18.$i.$((10 + k))"
  d="$LAB_DIR/hosts/$h"
  ip netns add "$ns"
  ip link add eth0 netns "$ns" type veth peer name "$h" netns "${PREFIX}sw"
  ip -n "${PREFIX}sw" link set "$h" master "br-$(site_letter "$i")" up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "198.18.$i.1"
  # Bridged guest traffic must not be handed to iptables (it can vanish there).
  ip netns exec "$ns" sysctl -qw net.bridge.bridge-nf-call-iptables=0 \
    net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0 2>/dev/null || true
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1

  mkdir -p "$d"/{etc,run,lib,log,cache} "$LAB_DIR/images/$h"
  cp -a /var/lib/libvirt/. "$d/lib/" 2>/dev/null || true
  write_libvirt_config "$h" "$addr" "$d" "$plain"
  issue_libvirt_certs "$h" "$LAB_DIR/pki/ca"

  # A persistent private mount namespace with the host's own libvirt directories and its own
  # image directory at /var/lib/viola/images (so "the same path on the destination" is a
  # different file on another host, as on real machines: no shared storage).
  mkdir -p /var/lib/viola/images
  # Only a mount point: every host mounts its own certificates over it (libvirt's client side,
  # libvirtd connecting to a peer or virsh, always looks in /etc/pki).
  mkdir -p /etc/pki
  images_mount="mount --bind '$LAB_DIR/images/$h' /var/lib/viola/images"
  if [ "$private" -eq 1 ]; then
    images_mount="mount -t tmpfs -o mode=0755,size=1g 'viola-images-$h' /var/lib/viola/images"
  fi
  touch "$NS_DIR/$h.mnt" "$NS_DIR/$h.cgroup"
  # The cgroup namespace is rooted at the host's own cgroup subtree, and the mount namespace
  # mounts the cgroup file systems afresh inside it (in place of the machine's: the same file
  # system cannot be mounted on top of itself), so this libvirtd sees that subtree as the
  # whole tree.
  in_host_cgroups "$h" unshare --mount="$NS_DIR/$h.mnt" --cgroup="$NS_DIR/$h.cgroup" \
    --propagation private sh -c "
    mount --bind '$d/etc' /etc/libvirt &&
    mount --bind '$d/run' /run/libvirt 2>/dev/null || { mkdir -p /run/libvirt && mount --bind '$d/run' /run/libvirt; }
    mount --bind '$d/lib' /var/lib/libvirt &&
    mount --bind '$d/log' /var/log/libvirt &&
    mount --bind '$d/cache' /var/cache/libvirt &&
    $images_mount &&
    mount --bind '$d/pki' /etc/pki &&
    awk '\$3 == \"cgroup\" || \$3 == \"cgroup2\" { print \$3, \$4, \$2 }' /proc/self/mounts |
      while read -r type opts dir; do
        umount \"\$dir\" && mount -t \"\$type\" -o \"\$opts\" \"\$type\" \"\$dir\" || exit 1
      done"
  start_libvirtd "$h"
}

# Every lab host's libvirtd and its QEMUs live in their own cgroup subtree (<mount>/PREFIX-HOST
# of the controllers libvirt uses). Sharing the machine's tree, two hosts would name a migrating
# VM's cgroup alike (qemu-ID-NAME): the source's libvirtd then finds the destination's vCPU
# thread in "its" cgroup, fails to remove it for 1.2 s at the end of every migration, and CPU
# caps set at one host would apply to the other's VM.
host_cgroup_dirs() { # HOST -> the subtree's directory in each cgroup hierarchy libvirt uses
  awk '$3 == "cgroup2" || ($3 == "cgroup" && $4 ~ /(^|,)cpu(acct)?(,|$)/) { print $2 }' /proc/self/mounts |
    while read -r dir; do echo "$dir/${PREFIX}$1"; done
}

in_host_cgroups() { # HOST CMD...: run CMD inside HOST's cgroup subtree (made if missing)
  local h=$1; shift
  # Where a subtree cannot be made, the host shares the machine's tree there (as before): slower
  # migrations, not broken ones.
  # shellcheck disable=SC2016
  sh -c 'for c in $1; do
           { mkdir -p "$c" && echo $$ >"$c/cgroup.procs"; } 2>/dev/null ||
             echo "[lab] warning: cannot use cgroup $c; this host shares the machine'"'"'s tree" >&2
         done; shift; exec "$@"' \
    sh "$(host_cgroup_dirs "$h" | paste -sd' ' -)" "$@"
}

# libvirtd runs under tini as a child subreaper: the QEMU processes it double-forks are
# reparented to tini and reaped at once when they exit (this machine's PID 1 leaves them zombies
# for ~1.5 s, and libvirtd waits for that at the end of every migration and shutdown). QEMU
# inherits the namespaces and the cgroup subtree.
start_libvirtd() { # HOST
  local h=$1 d="$LAB_DIR/hosts/$1"
  in_host_cgroups "$h" nsenter --net="/run/netns/$(host_ns "$h")" --mount="$NS_DIR/$h.mnt" \
    --cgroup="$NS_DIR/$h.cgroup" -- setsid tini -s -- libvirtd --listen --pid-file "$d/libvirtd.pid" \
    </dev/null >>"$d/log/libvirtd.stderr" 2>&1 &
}

host_address() { # HOST -> its underlay address
  local s i k
  s=${1%%[0-9]*}; k=${1#"$s"}; i=$(site_index "$s")
  echo "198.18.$i.$((10 + k))"
}

issue_libvirt_certs() { # HOST CA_DIR: HOST's libvirt and QEMU certificates into its /etc/pki
  local h=$1 s=${1%%[0-9]*}
  "$(ca_bin)" issue-libvirt --ca-dir "$2" --site "$s" --host "$h" --address "$(host_address "$h")" \
    --days 30 --out "$LAB_DIR/hosts/$h/pki" >/dev/null
}

# A host's CPU capacity: a CFS quota on its cgroup subtree, so that its libvirtd and every QEMU
# it runs (its VMs, and the VMs that migrate in, which the destination's libvirtd starts inside
# its own subtree) share C CPUs' worth of time per 100 ms, and a busy host slows only its own
# guests. Without --host-cpus every host shares the whole machine. cgroup v1 refuses a child
# quota above its parent's: a VM's CPU cap (`viola vm resize --cap-percent`) cannot exceed its
# host's capacity.
set_host_cpus() { # HOST CPUS
  local dir quota set=0
  quota=$(awk -v c="$2" 'BEGIN { printf "%d", c * 100000 }')
  for dir in $(host_cgroup_dirs "$1"); do
    if [ -f "$dir/cpu.cfs_quota_us" ]; then
      echo 100000 >"$dir/cpu.cfs_period_us" && echo "$quota" >"$dir/cpu.cfs_quota_us" && set=1
    elif [ -f "$dir/cpu.max" ]; then
      echo "$quota 100000" >"$dir/cpu.max" && set=1
    fi
  done
  [ "$set" = 1 ] || die "cannot give $1 its own CPU capacity: no cpu controller for its cgroup"
}

host_cpus_now() { # HOST -> its CPU capacity as its cgroup says ("" when it shares the machine)
  local dir q p
  for dir in $(host_cgroup_dirs "$1"); do
    if [ -f "$dir/cpu.cfs_quota_us" ]; then
      q=$(cat "$dir/cpu.cfs_quota_us"); p=$(cat "$dir/cpu.cfs_period_us")
    elif [ -f "$dir/cpu.max" ]; then
      read -r q p <"$dir/cpu.max"
    else
      continue
    fi
    case "$q" in -1|max) ;; *) awk -v q="$q" -v p="$p" 'BEGIN { printf "%.2f", q / p }'; return ;; esac
  done
}

remove_host_cgroups() { # HOST: the subtree, deepest first (its processes are gone by now)
  local dir
  for dir in $(host_cgroup_dirs "$1"); do
    [ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

wait_libvirtd() { # HOST
  local h=$1 i
  for i in $(seq 1 100); do
    if host_exec "$h" virsh -q -c qemu:///system version >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "libvirtd of $h did not come up (see $LAB_DIR/hosts/$h/log/libvirtd.log)"
}

cmd_up() {
  local sites=2 hosts=2 delay=10 rate=200 nat_sites="" plain=0 host_cpus="" private=0 i k s h
  while [ $# -gt 0 ]; do
    case "$1" in
      --sites) sites=$2; shift 2 ;;
      --hosts) hosts=$2; shift 2 ;;
      --wan-delay-ms) delay=$2; shift 2 ;;
      --wan-rate-mbit) rate=$2; shift 2 ;;
      --nat-site) nat_sites="$nat_sites $2"; shift 2 ;;
      --allow-plain-migration) plain=1; shift ;;
      --host-cpus) host_cpus=$2; shift 2 ;;
      --private-images) private=1; shift ;;
      *) die "up: unknown option $1" ;;
    esac
  done
  [[ "$sites" =~ ^[1-9]$ ]] || die "--sites must be 1..9"
  [[ "$hosts" =~ ^[1-9]$ ]] || die "--hosts must be 1..9"
  [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--wan-delay-ms must be a number"
  [[ "$rate" =~ ^[0-9]+$ ]] || die "--wan-rate-mbit must be a whole number"
  if [ -n "$host_cpus" ]; then
    [[ "$host_cpus" =~ ^[0-9]+(\.[0-9]{1,2})?$ ]] && awk -v c="$host_cpus" 'BEGIN { exit !(c >= 0.05) }' ||
      die "--host-cpus must be a number of CPUs of at least 0.05 (e.g. 0.5)"
  fi
  if ip route | grep -q '198\.1[89]\.'; then
    die "the machine's own routes use 198.18.0.0/15; the lab will not reuse that subnet"
  fi
  command -v libvirtd >/dev/null || die "libvirtd is not installed: run scripts/setup.sh"
  command -v tini >/dev/null || die "tini is not installed: run scripts/setup.sh"
  if [ -d "$RUN_DIR" ] || ip netns list 2>/dev/null | grep -q "^${PREFIX}"; then
    log "leftovers of an earlier lab found: removing them first"
    cmd_down
  fi
  trap 'log "up failed: tearing down what was made"; cmd_down' ERR
  local wanem
  wanem=$(wanem_bin)
  mkdir -p "$NS_DIR" "$LAB_DIR/hosts" "$LAB_DIR/images" "$LAB_DIR/console"
  # The lab's own federation CA: it issues every host's libvirt and QEMU certificates.
  "$(ca_bin)" init --ca-dir "$LAB_DIR/pki/ca" --name "lab-$LAB" --days 30 >/dev/null
  # The namespace files need a private mount to be bind targets.
  mount --bind "$NS_DIR" "$NS_DIR"
  mount --make-private "$NS_DIR"

  ip netns add "${PREFIX}sw"
  ip netns add "${PREFIX}rtr"
  ip -n "${PREFIX}sw" link set lo up
  ip -n "${PREFIX}rtr" link set lo up
  ip netns exec "${PREFIX}sw" sysctl -qw net.bridge.bridge-nf-call-iptables=0 \
    net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0 2>/dev/null || true
  ip netns exec "${PREFIX}rtr" sysctl -qw net.ipv4.ip_forward=1
  ip -n "${PREFIX}rtr" link add sink type bridge
  local links=()
  : >"$RUN_DIR/hosts"
  for i in $(seq 1 "$sites"); do
    s=$(site_letter "$i")
    ip -n "${PREFIX}sw" link add "br-$s" type bridge
    ip -n "${PREFIX}sw" link set "br-$s" up
    ip link add "wan-$s" netns "${PREFIX}rtr" type veth peer name "up-$s" netns "${PREFIX}sw"
    ip -n "${PREFIX}sw" link set "up-$s" master "br-$s" up
    ip link add "d-$s" netns "${PREFIX}rtr" type veth peer name "g-$s" netns "${PREFIX}rtr"
    ip -n "${PREFIX}rtr" addr add "198.18.$i.1/24" dev "g-$s"
    for l in "wan-$s" "d-$s" "g-$s"; do ip -n "${PREFIX}rtr" link set "$l" up; done
    # Into the router: straight through (kernel mirred). Out of the router toward the site:
    # through viola-wanem (delay), then tbf (rate).
    tc -n "${PREFIX}rtr" qdisc add dev "wan-$s" handle ffff: ingress
    tc -n "${PREFIX}rtr" filter add dev "wan-$s" parent ffff: protocol all u32 match u32 0 0 \
      action mirred egress redirect dev "d-$s"
    # d-$s is a port of a bridge that stays down: the kernel discards what arrives there, after
    # viola-wanem's packet socket has taken its copy (this kernel has no tc drop action).
    ip -n "${PREFIX}rtr" link set "d-$s" master sink
    # Frames must be complete (checksummed, segmented) before the packet socket copies them.
    ip netns exec "${PREFIX}rtr" ethtool -K "g-$s" tx off tso off gso off >/dev/null 2>&1
    tc -n "${PREFIX}rtr" qdisc add dev "wan-$s" root tbf rate "${rate}mbit" burst 64kb latency 40ms
    links+=("d-$s:wan-$s:$delay")
    for k in $(seq 1 "$hosts"); do echo "$s$k" >>"$RUN_DIR/hosts"; done
  done
  for s in $nat_sites; do
    i=$(site_index "$s")
    [ "$i" -ge 1 ] && [ "$i" -le "$sites" ] || die "--nat-site $s is not a site of this lab"
    # Site s sits behind a masquerading router: its hosts reach out, nobody reaches in.
    ip netns exec "${PREFIX}rtr" iptables -t nat -A POSTROUTING -s "198.18.$i.0/24" ! -d "198.18.$i.0/24" -j MASQUERADE
    ip netns exec "${PREFIX}rtr" iptables -A FORWARD -d "198.18.$i.0/24" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip netns exec "${PREFIX}rtr" iptables -A FORWARD -d "198.18.$i.0/24" ! -s "198.18.$i.0/24" -j DROP
  done
  ip netns exec "${PREFIX}rtr" "$wanem" "${links[@]}" >"$RUN_DIR/wanem.log" 2>&1 &
  echo $! >"$RUN_DIR/wanem.pid"

  # libvirtd probes QEMU's capabilities at start (seconds under TCG). Every lab host runs the
  # same QEMU, so the first host's probe seeds the others' caches, and the next lab's.
  local caps_seed=/var/cache/viola/libvirt-qemu-capabilities first=1
  for i in $(seq 1 "$sites"); do
    s=$(site_letter "$i")
    for k in $(seq 1 "$hosts"); do
      h="$s$k"
      if [ -d "$caps_seed" ]; then
        mkdir -p "$LAB_DIR/hosts/$h/cache/qemu/capabilities"
        cp -a "$caps_seed/." "$LAB_DIR/hosts/$h/cache/qemu/capabilities/" 2>/dev/null || true
      fi
      start_host "$h" "$i" "$k" "$plain" "$private"
      if [ "$first" -eq 1 ] && [ ! -d "$caps_seed" ]; then
        wait_libvirtd "$h"
        mkdir -p "$caps_seed.tmp" && cp -a "$LAB_DIR/hosts/$h/cache/qemu/capabilities/." "$caps_seed.tmp/" \
          && mv "$caps_seed.tmp" "$caps_seed" || rm -rf "$caps_seed.tmp"
      fi
      first=0
    done
  done
  for h in $(lab_hosts); do wait_libvirtd "$h"; done
  if [ -n "$host_cpus" ]; then
    for h in $(lab_hosts); do set_host_cpus "$h" "$host_cpus"; done
  fi
  cat >"$RUN_DIR/lab.env" <<EOF
sites=$sites
hosts=$hosts
wan_delay_ms=$delay
wan_rate_mbit=$rate
nat_sites="${nat_sites# }"
plain_migration_allowed=$plain
private_images=$private
EOF
  trap - ERR
  log "up: $sites sites x $hosts hosts, WAN ${delay} ms one way at ${rate} Mbit/s${host_cpus:+, $host_cpus CPUs per host}"
  cmd_status
}

# ---------------------------------------------------------------------------------------------
host_state() { # HOST -> "running PID" | "down"
  local h=$1 pid
  pid=$(cat "$LAB_DIR/hosts/$h/libvirtd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && host_exec "$h" virsh -q -c qemu:///system version >/dev/null 2>&1; then
    echo "running $pid"
  else
    echo "down -"
  fi
}

cmd_status() {
  local json=0 h s i k addr state pid doms cpus
  [ "${1:-}" = --json ] && json=1
  if [ ! -f "$RUN_DIR/lab.env" ]; then
    if [ "$json" -eq 1 ]; then echo '{"up":false,"lab":"'"$LAB"'","hosts":[]}'; else echo "lab $LAB: down"; fi
    return 0
  fi
  # shellcheck disable=SC1091
  . "$RUN_DIR/lab.env"
  if [ "$json" -eq 1 ]; then
    printf '{"up":true,"lab":"%s","lab_dir":"%s","ca_dir":"%s","plain_migration_allowed":%s,"sites":%s,"wan_delay_ms":%s,"wan_rate_mbit":%s,"hosts":[' \
      "$LAB" "$LAB_DIR" "$LAB_DIR/pki/ca" "$([ "${plain_migration_allowed:-0}" = 1 ] && echo true || echo false)" \
      "$sites" "$wan_delay_ms" "$wan_rate_mbit"
  else
    printf 'lab %s: %s sites x %s hosts, WAN %s ms one way at %s Mbit/s%s, migrations over TLS%s\n' \
      "$LAB" "$sites" "$hosts" "$wan_delay_ms" "$wan_rate_mbit" "${nat_sites:+, behind NAT: $nat_sites}" \
      "$([ "${plain_migration_allowed:-0}" = 1 ] && echo ' (plain allowed)')"
    printf '%-6s %-5s %-14s %-8s %-10s %-8s %s\n' HOST SITE ADDRESS CPUS LIBVIRTD PID DOMAINS
  fi
  local first=1
  for h in $(lab_hosts); do
    s=${h%%[0-9]*}; k=${h#"$s"}; i=$(site_index "$s")
    addr="198.18.$i.$((10 + k))"
    read -r state pid < <(host_state "$h")
    cpus=$(host_cpus_now "$h")
    doms=""
    [ "$state" = running ] && doms=$(host_exec "$h" virsh -q -c qemu:///system list --all --name 2>/dev/null | sed '/^$/d' | paste -sd, -)
    if [ "$json" -eq 1 ]; then
      [ "$first" -eq 1 ] || printf ','
      printf '{"name":"%s","site":"%s","namespace":"%s","mount_namespace":"%s","address":"%s","cpus":%s,"cgroups":"%s","libvirtd":"%s","libvirt_uri":"qemu+tls://%s/system","pki":"%s","images":"%s","host_uuid":"%s","domains":"%s"}' \
        "$h" "$s" "$(host_ns "$h")" "$NS_DIR/$h.mnt" "$addr" "${cpus:-null}" "$(host_cgroup_dirs "$h" | paste -sd' ' -)" \
        "$state" "$addr" "$LAB_DIR/hosts/$h/pki" \
        "$([ "${private_images:-0}" = 1 ] || echo "$LAB_DIR/images/$h")" "$(cat "$LAB_DIR/hosts/$h/host_uuid" 2>/dev/null)" "$doms"
    else
      printf '%-6s %-5s %-14s %-8s %-10s %-8s %s\n' "$h" "$s" "$addr" "${cpus:-machine}" "$state" "$pid" "${doms:--}"
    fi
    first=0
  done
  if [ "$json" -eq 1 ]; then printf ']}\n'; fi
}

# ---------------------------------------------------------------------------------------------
case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) shift; cmd_status "$@" ;;
  hosts) lab_hosts ;;
  exec)
    shift; h=${1:?usage: lab.sh exec HOST -- CMD...}; shift
    [ "${1:-}" = -- ] && shift
    case "$h" in
      rtr|sw) exec ip netns exec "${PREFIX}$h" "$@" ;;
      *) host_exec "$h" "$@" ;;
    esac
    ;;
  virsh) shift; h=${1:?usage: lab.sh virsh HOST ARGS...}; shift; host_exec "$h" virsh -c qemu:///system "$@" ;;
  start-libvirtd)
    h=${2:?usage: lab.sh start-libvirtd HOST}
    [ -e "$NS_DIR/$h.mnt" ] || die "no lab host named $h (is the lab up?)"
    start_libvirtd "$h"; wait_libvirtd "$h"
    ;;
  issue-libvirt)
    h=${2:?usage: lab.sh issue-libvirt HOST [--ca-dir DIR]}
    [ -e "$NS_DIR/$h.mnt" ] || die "no lab host named $h (is the lab up?)"
    ca_dir=$LAB_DIR/pki/ca
    if [ "${3:-}" = --ca-dir ]; then ca_dir=${4:?--ca-dir needs a directory}; fi
    issue_libvirt_certs "$h" "$ca_dir"
    # libvirtd's listener reads its certificates when it starts or when told to, as
    # `viola-ca install --reload-libvirtd` tells it on a real host: no restart. (QEMU reads its
    # own at each migration, libvirtd as a client at each connection.)
    host_exec "$h" virt-admin -q -c libvirtd:///system server-update-tls libvirtd ||
      die "libvirtd of $h did not read its new certificates"
    ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
