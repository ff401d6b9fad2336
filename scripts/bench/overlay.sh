#!/usr/bin/env bash
# overlay.sh — Viola's overlay against a plain veth, kernel VXLAN, tinc (switch mode), OpenVPN
# (tap), wireguard-go and boringtun (both L3 WireGuard, for reference), on one topology and in
# one run.
#
#   vo-bv-a (10.77.0.11) --veth-- [vo-bh-a: br0 + tunnel] ==veth underlay== [vo-bh-b: br0 + tunnel] --veth-- vo-bv-b (10.77.0.12)
#                                   198.18.99.1/24  <---- ul0, MTU 1500 ---->  198.18.99.2/24
#
# Throughput: per kind, the topology is built from scratch, measured alone and removed again:
# iperf3 TCP vB -> vA with 1 and with 4 streams (--time s each), and CPU: the busy CPU seconds of
# the whole machine (/proc/stat) per GB of TCP payload, which counts kernel and userspace work
# alike; for userspace tunnels also the tunnel processes' own CPU seconds per GB. This is done
# in --tcp-rounds rounds (default 3), every round going through all kinds in a rotated order;
# a kind's Gb/s figures are the medians of its rounds (<kind>.tcp1_gbps_min/_max give the
# spread), its CPU per GB is over all its rounds: single runs of the userspace tunnels vary by
# a quarter from one minute to the next on these machines.
# RTT: afterwards every kind gets its own copy of the topology (vo-bh-a-KIND, ...), all side by
# side, and --rtt-rounds rounds ping each in turn, --pings pings per kind at 10 ms (idle RTT),
# so that every kind is measured in the same minutes; then the same again while the script holds
# a machine-wide PM QoS request of 0 µs, so that idle CPUs poll instead of halting ("rtt*",
# <kind>.rtt_lowlat_ms).
# WAN: then every kind once more over a WAN between the two hosts (--wan-delay-ms one way,
# default 10, and --wan-rate-mbit, default 200, as the lab's WAN): the underlay veth is cut in
# two by a namespace vo-bw where viola-wanem (the lab's delay line: this kernel has no netem)
# delays every frame and a tbf qdisc sets the rate, each way. iperf3 1 stream for --time s
# through each tunnel, and once between the hosts themselves without a tunnel:
# <kind>.wan_over_underlay is the tunnel's goodput over that (--no-wan skips it).
# VM MTU is 1400 everywhere (a full VM frame plus Viola's 4-byte header fits one 1434-byte QUIC datagram).
#
# Usage: overlay.sh [--json FILE] [--time S] [--tcp-rounds R] [--pings N] [--rtt-rounds R]
#                   [--kinds "veth vxlan viola tinc openvpn wireguard_go boringtun"]
#                   [--no-wan | --wan-delay-ms D --wan-rate-mbit R]
#                   [--hops N] [--wait-quiet PCT [--quiet-max S]] [--no-install] [--keep]
#   --hops N          after the RTT rounds, N more pings through viola, tinc and openvpn with
#                     tcpdump in both host namespaces: median µs per hop (<kind>.hop_*_us; the
#                     hops are named in overlay_hops.py). Needs tcpdump and python3.
#   --wait-quiet PCT  before each kind (and before the RTT rounds), wait (at most --quiet-max s, default 300) until other load
#                     is below PCT % of all CPUs; userspace tunnels share the CPUs with everything
#                     else, so a busy machine distorts their figures (each kind reports the load
#                     seen right before it was measured, the most over its rounds, as
#                     <kind>.background_busy_pct).
# Extra daemon options for the viola kind in VIOLA_OVERLAY_ARGS, extra top-level TOML lines of its
# configuration in VIOLA_OVERLAY_TOML (e.g. 'quic_congestion = "cubic"'); VIOLA_OVERLAY_BIN runs
# another viola-overlay binary, built already (to compare two builds in turns; VIOLA_CA_BIN for
# viola-ca, default the checkout's release build). With perf, the viola daemons' epoll_wait
# calls that returned events are counted during the one-stream run
# (viola.epoll_events_per_mb: how often the kernel had news for them, per MB of TCP payload)
# and the plain RTT rounds (viola.epoll_events_per_ping, both daemons, keepalives included);
# calls that returned nothing (busy polling, timers) are not counted.
# Needs root. Installs iperf3, tinc, openvpn, wireguard-go, wireguard-tools, ethtool, linux-perf
# with apt if missing, boringtun-cli 0.7.1 with cargo into /var/cache/viola/bench-tools (its default 4
# threads), builds viola-overlay and viola-wanem (release). Writes one flat JSON object with --json: <kind>.tcp1_gbps,
# <kind>.tcp4_gbps, <kind>.rtt_ms, <kind>.cpu_s_per_gb (+ <kind>.rtt_lowlat_ms,
# <kind>.tunnel_cpu_s_per_gb, <kind>.wan_mbps, <kind>.wan_over_underlay, ratios and
# differences).
set -Eeuo pipefail
export LC_ALL=C
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

ALL_KINDS="veth vxlan viola tinc openvpn wireguard_go boringtun"
KINDS=$ALL_KINDS
TIME=10
PINGS=300
RTT_ROUNDS=5
TCP_ROUNDS=3
HOPS=0
JSON_OUT=
INSTALL=1
KEEP=0
QUIET_PCT=0
QUIET_MAX=300
WAN=1
WAN_DELAY_MS=10
WAN_RATE_MBIT=200
while (($#)); do
  case $1 in
    --json) JSON_OUT=$2; shift 2 ;;
    --time) TIME=$2; shift 2 ;;
    --pings) PINGS=$2; shift 2 ;;
    --rtt-rounds) RTT_ROUNDS=$2; shift 2 ;;
    --tcp-rounds) TCP_ROUNDS=$2; shift 2 ;;
    --hops) HOPS=$2; shift 2 ;;
    --kinds) KINDS=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --keep) KEEP=1; shift ;;
    --wait-quiet) QUIET_PCT=$2; shift 2 ;;
    --quiet-max) QUIET_MAX=$2; shift 2 ;;
    --no-wan) WAN=0; shift ;;
    --wan-delay-ms) WAN_DELAY_MS=$2; shift 2 ;;
    --wan-rate-mbit) WAN_RATE_MBIT=$2; shift 2 ;;
    -h|--help) sed -n '2,52p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $TIME =~ ^[1-9][0-9]?$ ]] || { echo "--time must be 1..99" >&2; exit 2; }
[[ $PINGS =~ ^[1-9][0-9]{0,3}$ ]] || { echo "--pings must be 1..9999" >&2; exit 2; }
[[ $RTT_ROUNDS =~ ^[1-9][0-9]?$ ]] || { echo "--rtt-rounds must be 1..99" >&2; exit 2; }
[[ $TCP_ROUNDS =~ ^[1-9]$ ]] || { echo "--tcp-rounds must be 1..9" >&2; exit 2; }
[[ $HOPS =~ ^[0-9]{1,4}$ ]] || { echo "--hops must be 0..9999" >&2; exit 2; }
[[ $QUIET_PCT =~ ^[0-9]{1,3}$ && $QUIET_MAX =~ ^[0-9]{1,4}$ ]] || { echo "bad --wait-quiet/--quiet-max" >&2; exit 2; }
[[ $WAN_DELAY_MS =~ ^[0-9]{1,3}$ && $WAN_RATE_MBIT =~ ^[1-9][0-9]{0,4}$ ]] || { echo "--wan-delay-ms 0..999, --wan-rate-mbit 1..99999" >&2; exit 2; }
for k in $KINDS; do [[ " $ALL_KINDS " == *" $k "* ]] || { echo "unknown kind $k" >&2; exit 2; }; done
[[ $(id -u) == 0 ]] || { echo "must run as root" >&2; exit 2; }

HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
HA= HB= VA= VB= KW=
NSS=() # namespaces we made (removed by teardown)
UL_A=198.18.99.1 UL_B=198.18.99.2 VM_A=10.77.0.11 VM_B=10.77.0.12 VM_MTU=1400
PORT=5211
HZ=$(getconf CLK_TCK)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
nsx() { ip netns exec "$@"; }

# ----------------------------------------------------------------- install and build
if ((INSTALL)); then
  declare -A PKG=([iperf3]=iperf3 [tincd]=tinc [openvpn]=openvpn [wireguard-go]=wireguard-go [wg]=wireguard-tools [jq]=jq [openssl]=openssl [ethtool]=ethtool [perf]=linux-perf)
  ((HOPS)) && PKG+=([tcpdump]=tcpdump [python3]=python3)
  missing=()
  for c in "${!PKG[@]}"; do command -v "$c" >/dev/null || missing+=("${PKG[$c]}"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/vo-bench-apt.log 2>&1 ||
      { apt-get update >>/tmp/vo-bench-apt.log 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/vo-bench-apt.log 2>&1; } ||
      log "warning: apt-get install failed (see /tmp/vo-bench-apt.log)"
  fi
fi
BENCH_TOOLS=/var/cache/viola/bench-tools
export PATH=$BENCH_TOOLS/bin:$PATH
if ((INSTALL)) && [[ " $KINDS " == *" boringtun "* ]] && ! command -v boringtun-cli >/dev/null; then
  log "installing boringtun-cli 0.7.1 (cargo install, about a minute)"
  cargo install -q --locked boringtun-cli --version 0.7.1 --root "$BENCH_TOOLS" >/tmp/vo-bench-cargo.log 2>&1 ||
    die "cargo install boringtun-cli failed (see /tmp/vo-bench-cargo.log)"
fi
for c in iperf3 jq ip ping; do command -v "$c" >/dev/null || die "$c missing"; done
((WAN)) && { command -v ethtool >/dev/null || die "ethtool missing (for the WAN runs; or --no-wan)"; }
if [[ " $KINDS " == *" viola "* && -z ${VIOLA_OVERLAY_BIN:-} ]]; then
  log "building viola-overlay (release)"
  (cd "$ROOT" && cargo build --release -q -p viola-overlay -p viola-common --bins) || die "cargo build failed"
fi
VIOLA=${VIOLA_OVERLAY_BIN:-$ROOT/target/release/viola-overlay}
WANEM=$ROOT/target/release/viola-wanem
if ((WAN)) && [[ ! -x $WANEM ]]; then
  log "building viola-wanem (release)"
  (cd "$ROOT" && cargo build --release -q -p viola-labtests --bin viola-wanem) || die "cargo build viola-wanem failed"
fi
[[ " $KINDS " != *" viola "* || -x $VIOLA ]] || die "VIOLA_OVERLAY_BIN=$VIOLA is not an executable"
VIOLA_CA=${VIOLA_CA_BIN:-$ROOT/target/release/viola-ca}

# ----------------------------------------------------------------- bookkeeping
WORK=$(mktemp -d /tmp/vo-bench.XXXXXX)
PIDS=() # daemons we started (for CPU and cleanup)
VIOLA_PIDS=() # the viola daemons among them
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$1"; }
teardown() {
  local p ns i
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 1 30); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  PIDS=() VIOLA_PIDS=()
  for ns in "${NSS[@]}"; do
    ns_exists "$ns" || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  NSS=()
}
cleanup() {
  local rc=$?
  teardown
  if ((KEEP || rc)); then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if ip netns list 2>/dev/null | awk '{print $1}' | grep -q '^vo-b[hv]-'; then
  die "namespaces vo-bh-*/vo-bv-* exist (another run?); remove them first"
fi

wait_for() { # TENTHS WHAT CMD...
  local n=$1 what=$2 i
  shift 2
  for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timeout waiting for $what"
}
start_bg() { # NS LOG CMD...   (records the PID)
  local ns=$1 logf=$2
  shift 2
  ip netns exec "$ns" "$@" >"$logf" 2>&1 </dev/null &
  PIDS+=($!)
}
proc_ticks() { # sum utime+stime of PIDS
  local p s=0 f
  for p in "${PIDS[@]}"; do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || die "tunnel process $p died"
    f=${f##*) }
    read -r -a a <<<"$f"
    s=$((s + a[11] + a[12]))
  done
  echo $s
}
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }

# ----------------------------------------------------------------- topology
# One topology's namespaces and work directory; SUFFIX "" for the throughput runs (one kind at a
# time), "-KIND" for the RTT runs (all kinds side by side).
use_set() { # SUFFIX
  HA=vo-bh-a$1 HB=vo-bh-b$1 VA=vo-bv-a$1 VB=vo-bv-b$1 W=vo-bw$1
  KW=$WORK/t$1
  mkdir -p "$KW"
}
hns() { [[ $1 == a ]] && echo "$HA" || echo "$HB"; }
vns() { [[ $1 == a ]] && echo "$VA" || echo "$VB"; }

build_base() {
  local ns side
  NSS+=("$HA" "$HB" "$VA" "$VB")
  for ns in "$HA" "$HB" "$VA" "$VB"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    nsx "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  done
  for ns in "$HA" "$HB"; do
    if nsx "$ns" test -e /proc/sys/net/bridge/bridge-nf-call-iptables; then
      nsx "$ns" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0
    fi
  done
  if ((WAN_MODE)); then
    # The underlay cut in two: vo-bw delays every frame (viola-wanem) and limits the rate (tbf)
    # on its way out of wa toward a and out of wb toward b.
    NSS+=("$W")
    ip netns add "$W"
    ip -n "$W" link set lo up
    nsx "$W" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$HA" link add ul0 mtu 1500 type veth peer name wa netns "$W" mtu 1500
    ip -n "$HB" link add ul0 mtu 1500 type veth peer name wb netns "$W" mtu 1500
    for ns in "$HA" "$HB"; do
      # The delay line copies frames as they are: they must leave the hosts whole and checksummed.
      nsx "$ns" ethtool -K ul0 tx off tso off gso off >/dev/null 2>&1 || die "ethtool -K ul0 in $ns"
    done
    for ns in wa wb; do
      ip -n "$W" link set "$ns" up
      tc -n "$W" qdisc add dev "$ns" root tbf rate "${WAN_RATE_MBIT}mbit" burst 64kb latency 40ms
    done
    start_bg "$W" "$KW/wanem.log" "$WANEM" "wa:wb:$WAN_DELAY_MS" "wb:wa:$WAN_DELAY_MS"
  else
    ip -n "$HA" link add ul0 mtu 1500 type veth peer name ul0 netns "$HB" mtu 1500
  fi
  ip -n "$HA" addr add "$UL_A/24" dev ul0
  ip -n "$HB" addr add "$UL_B/24" dev ul0
  ip -n "$HA" link set ul0 up
  ip -n "$HB" link set ul0 up
  for side in a b; do
    local h v ip=$VM_A
    h=$(hns "$side") v=$(vns "$side")
    [[ $side == b ]] && ip=$VM_B
    ip -n "$h" link add br0 type bridge stp_state 0
    ip -n "$h" link set br0 up
    ip -n "$h" link add vm0 mtu "$VM_MTU" type veth peer name eth0 netns "$v" mtu "$VM_MTU"
    ip -n "$h" link set vm0 master br0 up
    ip -n "$v" addr add "$ip/24" dev eth0
    ip -n "$v" link set eth0 up
  done
}

setup_veth() {
  local ns
  for ns in "$HA" "$HB"; do
    ip -n "$ns" addr flush dev ul0
    ip -n "$ns" link set ul0 master br0
  done
}

setup_vxlan() {
  ip -n "$HA" link add vx0 type vxlan id 77 local "$UL_A" remote "$UL_B" dev ul0 dstport 4789
  ip -n "$HB" link add vx0 type vxlan id 77 local "$UL_B" remote "$UL_A" dev ul0 dstport 4789
  local ns
  for ns in "$HA" "$HB"; do ip -n "$ns" link set vx0 master br0 up; done
}

setup_viola() {
  local d=$KW/viola side ul other
  "$VIOLA_CA" init --ca-dir "$d/ca" >/dev/null
  for side in a b; do
    [[ $side == a ]] && { ul=$UL_A; other=$UL_B; } || { ul=$UL_B; other=$UL_A; }
    "$VIOLA_CA" issue --ca-dir "$d/ca" --role overlay --site "$side" --host "${side}1" --out "$d/$side" >/dev/null
    cat >"$d/$side.toml" <<EOF
listen = "$ul:4500"
identity_dir = "$d/$side"
control_socket = "$d/$side.sock"
${VIOLA_OVERLAY_TOML:-}
[[peers]]
addr = "$other:4500"
[[violins]]
id = 77
bridge = "br0"
EOF
    start_bg "$(hns "$side")" "$d/$side.log" env RUST_LOG=warn "$VIOLA" run --config "$d/$side.toml" ${VIOLA_OVERLAY_ARGS:-}
    VIOLA_PIDS+=("${PIDS[-1]}")
  done
  wait_for 100 "viola TAPs" ip -n "$HB" link show br0t
}

setup_tinc() {
  local side ns d ip
  for side in a b; do
    d=$KW/tinc/$side ns=$(hns "$side") ip=$UL_A
    [[ $side == b ]] && ip=$UL_B
    mkdir -p "$d/hosts"
    { echo "Name = h$side"; echo "Mode = switch"; echo "DeviceType = tap"; echo "Interface = tinc0"
      echo "AddressFamily = ipv4"; [[ $side == b ]] && echo "ConnectTo = ha"; } >"$d/tinc.conf"
    printf 'Address = %s\nPort = 655\n' "$ip" >"$d/hosts/h$side"
    timeout 60 tincd -c "$d" -K 2048 </dev/null >"$d/keygen.log" 2>&1 || die "tinc keygen"
  done
  cp "$KW/tinc/a/hosts/ha" "$KW/tinc/b/hosts/ha"
  cp "$KW/tinc/b/hosts/hb" "$KW/tinc/a/hosts/hb"
  for side in a b; do
    ns=$(hns "$side") d=$KW/tinc/$side
    ip -n "$ns" tuntap add dev tinc0 mode tap
    ip -n "$ns" link set tinc0 master br0 up
    start_bg "$ns" "$d/tincd.log" tincd -c "$d" -D -d1 --pidfile="$d/pid"
  done
  SETTLE=8 # tinc 1.0 uses TCP for large frames until PMTU discovery has finished
}

setup_openvpn() {
  local p=$KW/pki side
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=vo-bench-ca
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\n' >srv.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=clientAuth\n' >cli.ext
    for n in srv cli; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $n.key -out $n.csr -subj "/CN=vo-bench-$n"
      openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile $n.ext
    done
  ) >"$KW/pki.log" 2>&1 || die "openssl"
  for side in a b; do
    ip -n "$(hns "$side")" tuntap add dev ovpn0 mode tap
    ip -n "$(hns "$side")" link set ovpn0 master br0 up
  done
  local common=(--dev ovpn0 --dev-type tap --proto udp4 --port 1194 --disable-dco --ca "$p/ca.crt" --verb 3 --ping 10 --ping-restart 60)
  start_bg "$HA" "$KW/ovpn-a.log" openvpn "${common[@]}" --local "$UL_A" --remote "$UL_B" --tls-server --dh none \
    --cert "$p/srv.crt" --key "$p/srv.key" --remote-cert-tls client
  start_bg "$HB" "$KW/ovpn-b.log" openvpn "${common[@]}" --local "$UL_B" --remote "$UL_A" --tls-client \
    --cert "$p/cli.crt" --key "$p/cli.key" --remote-cert-tls server
  wait_for 300 "openvpn a" grep -q 'Initialization Sequence Completed' "$KW/ovpn-a.log"
  wait_for 300 "openvpn b" grep -q 'Initialization Sequence Completed' "$KW/ovpn-b.log"
}

# wireguard-go keeps its socket in /run/wireguard: give each side a private /run under $KW.
wg_in() { # SIDE CMD...
  local side=$1
  shift
  ip netns exec "$(hns "$side")" unshare -m --propagation private sh -c 'mount --bind "$0" /run && exec "$@"' "$KW/wgrun$side" "$@"
}
setup_wireguard_go() { setup_wireguard wireguard-go -f; }
setup_boringtun() { setup_wireguard boringtun-cli -f --disable-drop-privileges; }
setup_wireguard() { # DAEMON ARGS... (the interface name follows): a userspace WireGuard, L3
  local side ns other_vm other_ul br_ip peer
  for side in a b; do
    mkdir -p "$KW/wgrun$side"
    (umask 077 && wg genkey >"$KW/wg-$side.key")
    wg pubkey <"$KW/wg-$side.key" >"$KW/wg-$side.pub"
  done
  for side in a b; do
    ip netns exec "$(hns "$side")" unshare -m --propagation private \
      sh -c 'mount --bind "$0" /run && exec "$@"' "$KW/wgrun$side" "$@" "vowg$side" >"$KW/wg-$side.log" 2>&1 </dev/null &
    PIDS+=($!)
  done
  for side in a b; do
    ns=$(hns "$side")
    if [[ $side == a ]]; then other_vm=$VM_B other_ul=$UL_B br_ip=10.77.0.1; else other_vm=$VM_A other_ul=$UL_A br_ip=10.77.0.2; fi
    wait_for 100 "$1 socket $side" test -S "$KW/wgrun$side/wireguard/vowg$side.sock"
    [[ $side == a ]] && peer=$(cat "$KW/wg-b.pub") || peer=$(cat "$KW/wg-a.pub")
    wg_in "$side" wg set "vowg$side" private-key "$KW/wg-$side.key" listen-port 51820 \
      peer "$peer" endpoint "$other_ul:51820" allowed-ips "$other_vm/32"
    ip -n "$ns" link set "vowg$side" up
    ip -n "$ns" addr add "$br_ip/24" dev br0
    ip -n "$ns" route add "$other_vm/32" dev "vowg$side"
    nsx "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.br0.proxy_arp=1 net.ipv4.neigh.br0.proxy_delay=0
  done
}

# ----------------------------------------------------------------- measurement
iperf() { # STREAMS -> "bits_per_second bytes"
  timeout -k 5 $((TIME + 30)) ip netns exec "$VB" iperf3 -c "$VM_A" -B "$VM_B" -p "$PORT" -t "$TIME" -P "$1" -J \
    --connect-timeout 5000 >"$WORK/iperf-$1.json" 2>&1 || true
  jq -r 'if .error then "ERR" else "\(.end.sum_received.bits_per_second) \(.end.sum_received.bytes)" end' "$WORK/iperf-$1.json" 2>/dev/null || echo ERR
}

busy_pct_1s() {
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); printf "%.0f", 100*(y[1]-x[1])/(y[2]-x[2])}'
}
wait_quiet() { # bounded by QUIET_MAX seconds
  ((QUIET_PCT > 0)) || return 0
  local t0=$SECONDS b
  while :; do
    b=$(busy_pct_1s)
    ((b < QUIET_PCT)) && { log "other load ${b}% < ${QUIET_PCT}%: go"; return 0; }
    ((SECONDS - t0 >= QUIET_MAX)) && { log "other load still ${b}% after ${QUIET_MAX}s: measuring anyway"; return 0; }
  done
}

wait_connected() { # KIND: the tunnel of the current topology carries a ping within 30 s
  local i
  for ((i = 0; i < 60; i++)); do
    nsx "$VB" ping -c1 -W1 -q "$VM_A" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$1: no connectivity"
}

declare -A R
WAN_MODE=0
# per kind, over the throughput rounds: Gb/s of each round, busy and tunnel ticks, bytes
declare -A TS1 TS4 BUSY_TICKS TUNNEL_TICKS BYTES BYTES1 BG_MAX EPOLL_EVENTS
measure() { # KIND: throughput and CPU, this kind alone on the machine
  local kind=$1
  SETTLE=1
  wait_quiet
  log "$kind: building"
  # a fresh work directory for every round (keys and CAs are made anew)
  rm -rf "$WORK/t"
  use_set ""
  build_base
  "setup_$kind"
  wait_connected "$kind"
  sleep "$SETTLE"
  start_bg "$VA" "$WORK/iperf-server.log" iperf3 -s -B "$VM_A" -p "$PORT"
  wait_for 100 "iperf3 server" nsx "$VA" sh -c "ss -ltn | grep -q '$VM_A:$PORT '"
  timeout -k 5 30 ip netns exec "$VB" iperf3 -c "$VM_A" -B "$VM_B" -p "$PORT" -t 2 >/dev/null 2>&1 || die "$kind: warm-up failed"
  # the iperf3 server is not a tunnel process: keep it out of the tunnel CPU sum
  local server=${PIDS[-1]}
  unset 'PIDS[-1]'
  local t0 b0 r1 r4 t1 b1 bg0 bg1
  # other load on the machine right before measuring (1 s), reported with the results
  bg0=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  sleep 1
  bg1=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  R[$kind.background_busy_pct]=$(awk -v a="$bg0" -v b="$bg1" 'BEGIN{split(a,x," "); split(b,y," "); printf "%.0f", 100*(y[1]-x[1])/(y[2]-x[2])}')
  t0=$( ((${#PIDS[@]})) && proc_ticks || echo 0)
  b0=$(busy_ticks)
  log "$kind: iperf3 1 stream, ${TIME}s"
  local perf_pid=
  if [[ $kind == viola ]] && command -v perf >/dev/null; then
    timeout -s INT $((TIME + 60)) perf stat -x, -o "$WORK/epoll.csv" -e syscalls:sys_exit_epoll_wait --filter 'ret > 0' \
      -p "$(IFS=,; echo "${VIOLA_PIDS[*]}")" 2>/dev/null &
    perf_pid=$!
  fi
  r1=$(iperf 1)
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    EPOLL_EVENTS[$kind]=$(( ${EPOLL_EVENTS[$kind]:-0} + $(awk -F, '$1 ~ /^[0-9]+$/ {s += $1} END {print s + 0}' "$WORK/epoll.csv" 2>/dev/null || echo 0) ))
  fi
  sleep 1
  log "$kind: iperf3 4 streams, ${TIME}s"
  r4=$(iperf 4)
  t1=$( ((${#PIDS[@]})) && proc_ticks || echo 0)
  b1=$(busy_ticks)
  PIDS+=("$server")
  [[ $r1 != ERR && $r4 != ERR ]] || die "$kind: iperf3 failed ($(head -c 300 "$WORK/iperf-1.json"))"
  read -r bps1 by1 <<<"$r1"
  read -r bps4 by4 <<<"$r4"
  local k=$kind g1 g4
  g1=$(awk -v b="$bps1" 'BEGIN{printf "%.3f", b/1e9}')
  g4=$(awk -v b="$bps4" 'BEGIN{printf "%.3f", b/1e9}')
  TS1[$k]+=" $g1"
  TS4[$k]+=" $g4"
  BUSY_TICKS[$k]=$(( ${BUSY_TICKS[$k]:-0} + b1 - b0 ))
  TUNNEL_TICKS[$k]=$(( ${TUNNEL_TICKS[$k]:-0} + t1 - t0 ))
  BYTES[$k]=$(awk -v a="${BYTES[$k]:-0}" -v g="$by1" -v h="$by4" 'BEGIN{printf "%.0f", a + g + h}')
  BYTES1[$k]=$(awk -v a="${BYTES1[$k]:-0}" -v g="$by1" 'BEGIN{printf "%.0f", a + g}')
  ((${R[$k.background_busy_pct]} > ${BG_MAX[$k]:-0})) && BG_MAX[$k]=${R[$k.background_busy_pct]}
  log "$kind: tcp1 $g1 Gbit/s, tcp4 $g4 Gbit/s (other load before: ${R[$k.background_busy_pct]} %)"
  if [[ $kind == viola ]]; then
    "$VIOLA" status --socket "$KW/viola/b.sock" >"$WORK/viola-status-b.txt" 2>&1 || true
  fi
  teardown
}

# RTT, all kinds side by side: on this machine idle RTT drifts by a factor of two within minutes
# (how fast halted vCPUs wake, how cold the caches are), so kinds measured one after another
# would be compared across different conditions. Every kind gets its own topology; then
# --rtt-rounds rounds ping each kind in turn (rotating the order), --pings in all per kind and
# condition, at 10 ms. Condition "plain" as the machine is; "held" while the script holds a
# machine-wide PM QoS request of 0 µs, so idle CPUs poll instead of halting (what
# viola-overlay's cpu_wake_latency_us = 0 does), for every kind alike.
# --hops N: per-hop latency of N more pings at 10 ms through each TAP tunnel (viola, tinc,
# openvpn), from tcpdump timestamps in both host namespaces (overlay_hops.py names the hops).
# Separate from the RTT rounds, because tcpdump itself adds work on the path.
measure_hops() { # KINDS...
  local k side ns hop us pids
  for k in "$@"; do
    [[ $k == viola || $k == tinc || $k == openvpn ]] || continue
    use_set "-$k"
    log "hops: $HOPS pings through $k"
    pids=()
    for side in a b; do
      ns=$(hns "$side")
      timeout -k 2 $((HOPS / 100 + 8)) ip netns exec "$ns" tcpdump -i any -nn -tt -l 'icmp or udp' \
        >"$WORK/hops-$k-$side.txt" 2>/dev/null &
      pids+=($!)
    done
    sleep 1.5
    timeout -k 5 $((HOPS / 50 + 30)) ip netns exec "$VB" ping -q -c "$HOPS" -i 0.01 -W 1 "$VM_A" >/dev/null 2>&1 || true
    wait "${pids[@]}" || true
    while read -r hop us; do
      [[ $hop == pings ]] && { R[$k.hop_pings]=$us; continue; }
      R[$k.hop_${hop}_us]=$us
    done < <(python3 "$HERE/overlay_hops.py" "$WORK/hops-$k-a.txt" "$WORK/hops-$k-b.txt")
    log "$k: hops (median µs) B tap->udp ${R[$k.hop_b_tap_to_udp_us]:-?}, A udp->tap ${R[$k.hop_a_udp_to_tap_us]:-?}, A vm ${R[$k.hop_a_vm_reply_us]:-?}, A tap->udp ${R[$k.hop_a_tap_to_udp_us]:-?}, B udp->tap ${R[$k.hop_b_udp_to_tap_us]:-?}, total ${R[$k.hop_total_us]:-?} (${R[$k.hop_pings]:-0} pings)"
  done
}

measure_rtt() {
  local kinds=($KINDS) k i round cond qos settle=1 n
  n=$(((PINGS + RTT_ROUNDS - 1) / RTT_ROUNDS))
  wait_quiet
  for k in "${kinds[@]}"; do
    log "rtt: building $k"
    SETTLE=1
    use_set "-$k"
    build_base
    "setup_$k"
    wait_connected "$k"
    ((SETTLE > settle)) && settle=$SETTLE
  done
  sleep "$settle"
  for cond in plain held; do
    if [[ $cond == held ]]; then
      if ! exec {qos}>/dev/cpu_dma_latency; then
        log "rtt: no PM QoS (/dev/cpu_dma_latency): no rtt* figures"
        break
      fi
      printf 0 >&"$qos"
    fi
    log "rtt ($cond): $RTT_ROUNDS rounds of $n pings at 10 ms per kind"
    local perf_pid=
    if [[ $cond == plain && ${#VIOLA_PIDS[@]} -gt 0 ]] && command -v perf >/dev/null; then
      timeout -s INT $((PINGS * ${#kinds[@]} / 50 + 60)) perf stat -x, -o "$WORK/epoll-rtt.csv" -e syscalls:sys_exit_epoll_wait --filter 'ret > 0' \
        -p "$(IFS=,; echo "${VIOLA_PIDS[*]}")" 2>/dev/null &
      perf_pid=$!
    fi
    for ((round = 0; round < RTT_ROUNDS; round++)); do
      for ((i = 0; i < ${#kinds[@]}; i++)); do
        k=${kinds[$(((i + round) % ${#kinds[@]}))]}
        use_set "-$k"
        timeout -k 5 $((n / 50 + 30)) ip netns exec "$VB" ping -c "$n" -i 0.01 -W 1 "$VM_A" 2>/dev/null |
          sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' >>"$WORK/rtt-$k-$cond.txt" || true
      done
    done
    [[ $cond == held ]] && exec {qos}>&-
    if [[ -n $perf_pid ]]; then
      kill -INT "$perf_pid" 2>/dev/null || true
      wait "$perf_pid" 2>/dev/null || true
      EPOLL_EVENTS_RTT=$(awk -F, '$1 ~ /^[0-9]+$/ {s += $1} END {print s + 0}' "$WORK/epoll-rtt.csv" 2>/dev/null || echo 0)
    fi
  done
  ((HOPS)) && measure_hops "${kinds[@]}"
  local avg
  for k in "${kinds[@]}"; do
    for cond in plain held; do
      avg=null
      [[ -s $WORK/rtt-$k-$cond.txt ]] &&
        avg=$(awk '{s += $1; n++} END {if (n) printf "%.3f", s / n; else print "null"}' "$WORK/rtt-$k-$cond.txt")
      [[ $cond == plain ]] && R[$k.rtt_ms]=$avg || R[$k.rtt_lowlat_ms]=$avg
    done
    R[$k.rtt_replies]=0
    [[ -f $WORK/rtt-$k-plain.txt ]] && R[$k.rtt_replies]=$(wc -l <"$WORK/rtt-$k-plain.txt")
    if [[ $k == viola && -n ${EPOLL_EVENTS_RTT:-} ]] && ((R[viola.rtt_replies] > 0)); then
      R[viola.epoll_events_per_ping]=$(awk -v n="$EPOLL_EVENTS_RTT" -v p="${R[viola.rtt_replies]}" 'BEGIN{printf "%.2f", n / p}')
      log "viola: ${R[viola.epoll_events_per_ping]} epoll_wait calls with events in both daemons per ping (4 hops; plain rounds)"
    fi
    log "$k: rtt ${R[$k.rtt_ms]} ms (${R[$k.rtt_lowlat_ms]} ms with wake-ups held), ${R[$k.rtt_replies]} of $((n * RTT_ROUNDS)) replies"
  done
  teardown
}

# WAN: every kind once over the delay line, and the hosts themselves without a tunnel before
# and after (their mean is the underlay's goodput). iperf3 omits its first 2 s (slow start).
measure_wan() { # KIND, or "underlay": no tunnel, host to host
  local kind=$1 r bps
  wait_quiet
  log "wan $kind: building"
  rm -rf "$WORK/t"
  use_set ""
  build_base
  if [[ $kind == underlay ]]; then
    wait_for 300 "the WAN" nsx "$HB" ping -c1 -W1 -q "$UL_A"
    start_bg "$HA" "$WORK/iperf-server.log" iperf3 -s -B "$UL_A" -p "$PORT"
    wait_for 100 "iperf3 server" nsx "$HA" sh -c "ss -ltn | grep -q '$UL_A:$PORT '"
    timeout -k 5 $((TIME + 40)) ip netns exec "$HB" iperf3 -c "$UL_A" -B "$UL_B" -p "$PORT" -t "$TIME" -O 2 -J \
      --connect-timeout 5000 >"$WORK/iperf-wan.json" 2>&1 || true
  else
    SETTLE=1
    "setup_$kind"
    wait_connected "$kind"
    sleep "$SETTLE"
    start_bg "$VA" "$WORK/iperf-server.log" iperf3 -s -B "$VM_A" -p "$PORT"
    wait_for 100 "iperf3 server" nsx "$VA" sh -c "ss -ltn | grep -q '$VM_A:$PORT '"
    timeout -k 5 $((TIME + 40)) ip netns exec "$VB" iperf3 -c "$VM_A" -B "$VM_B" -p "$PORT" -t "$TIME" -O 2 -J \
      --connect-timeout 5000 >"$WORK/iperf-wan.json" 2>&1 || true
  fi
  r=$(jq -r 'if .error then "ERR" else .end.sum_received.bits_per_second end' "$WORK/iperf-wan.json" 2>/dev/null || echo ERR)
  [[ $r != ERR ]] || die "wan $kind: iperf3 failed ($(head -c 300 "$WORK/iperf-wan.json"))"
  bps=$(awk -v b="$r" 'BEGIN{printf "%.1f", b/1e6}')
  WAN_MBPS[$kind]+=" $bps"
  log "wan $kind: $bps Mbit/s"
  teardown
}
declare -A WAN_MBPS

sorted() { tr ' ' '\n' | sed '/^$/d' | sort -g; } # space-separated numbers, one per line, ascending
median() { sorted | awk '{v[NR] = $1} END {if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
KIND_LIST=($KINDS)
for ((round = 0; round < TCP_ROUNDS; round++)); do
  log "throughput round $((round + 1)) of $TCP_ROUNDS"
  for ((i = 0; i < ${#KIND_LIST[@]}; i++)); do
    measure "${KIND_LIST[$(((i + round) % ${#KIND_LIST[@]}))]}"
  done
done
for k in $KINDS; do
  R[$k.tcp1_gbps]=$(median <<<"${TS1[$k]}")
  R[$k.tcp4_gbps]=$(median <<<"${TS4[$k]}")
  R[$k.tcp1_gbps_min]=$(sorted <<<"${TS1[$k]}" | head -1)
  R[$k.tcp1_gbps_max]=$(sorted <<<"${TS1[$k]}" | tail -1)
  R[$k.background_busy_pct]=${BG_MAX[$k]:-0}
  R[$k.cpu_s_per_gb]=$(awk -v t="${BUSY_TICKS[$k]}" -v hz="$HZ" -v b="${BYTES[$k]}" 'BEGIN{printf "%.2f", (t/hz)/(b/1e9)}')
  if [[ $k == viola || $k == tinc || $k == openvpn || $k == wireguard_go || $k == boringtun ]]; then
    R[$k.tunnel_cpu_s_per_gb]=$(awk -v t="${TUNNEL_TICKS[$k]}" -v hz="$HZ" -v b="${BYTES[$k]}" 'BEGIN{printf "%.2f", (t/hz)/(b/1e9)}')
  fi
  if [[ -n ${EPOLL_EVENTS[$k]:-} ]]; then
    R[$k.epoll_events_per_mb]=$(awk -v n="${EPOLL_EVENTS[$k]}" -v b="${BYTES1[$k]}" 'BEGIN{printf "%.1f", n / (b / 1e6)}')
    log "$k: ${R[$k.epoll_events_per_mb]} epoll_wait calls with events in its daemons per MB (one stream)"
  fi
  log "$k: tcp1 ${R[$k.tcp1_gbps]} Gbit/s (rounds:${TS1[$k]}), tcp4 ${R[$k.tcp4_gbps]} Gbit/s (rounds:${TS4[$k]}), ${R[$k.cpu_s_per_gb]} busy CPU s/GB"
done
measure_rtt
if ((WAN)); then
  WAN_MODE=1
  log "WAN: ${WAN_DELAY_MS} ms one way, ${WAN_RATE_MBIT} Mbit/s, iperf3 1 stream for ${TIME}s per kind"
  measure_wan underlay
  for k in $KINDS; do measure_wan "$k"; done
  measure_wan underlay
  WAN_MODE=0
  R[underlay.wan_mbps]=$(awk '{s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.1f", s / NF}' <<<"${WAN_MBPS[underlay]}")
  for k in $KINDS; do
    R[$k.wan_mbps]=${WAN_MBPS[$k]# }
    R[$k.wan_over_underlay]=$(awk -v a="${R[$k.wan_mbps]}" -v b="${R[underlay.wan_mbps]}" 'BEGIN{printf "%.3f", a / b}')
  done
  R[bench.wan_delay_ms]=$WAN_DELAY_MS
  R[bench.wan_rate_mbit]=$WAN_RATE_MBIT
fi

# ----------------------------------------------------------------- report
ratio() { awk -v a="${R[$1]:-}" -v b="${R[$2]:-}" 'BEGIN{ if (a=="" || b=="" || b+0==0) print "null"; else printf "%.2f", a/b }'; }
diff_ms() { awk -v a="${R[$1]:-}" -v b="${R[$2]:-}" 'BEGIN{ if (a=="" || b=="" || a=="null" || b=="null") print "null"; else printf "%.3f", a-b }'; }
R[ratio.viola_over_tinc_tcp1]=$(ratio viola.tcp1_gbps tinc.tcp1_gbps)
R[ratio.viola_over_openvpn_tcp1]=$(ratio viola.tcp1_gbps openvpn.tcp1_gbps)
R[ratio.viola_over_wireguard_go_tcp1]=$(ratio viola.tcp1_gbps wireguard_go.tcp1_gbps)
R[ratio.viola_over_boringtun_tcp1]=$(ratio viola.tcp1_gbps boringtun.tcp1_gbps)
R[ratio.viola_over_veth_tcp1]=$(ratio viola.tcp1_gbps veth.tcp1_gbps)
R[rtt.viola_minus_vxlan_ms]=$(diff_ms viola.rtt_ms vxlan.rtt_ms)
R[rtt.viola_minus_vxlan_lowlat_ms]=$(diff_ms viola.rtt_lowlat_ms vxlan.rtt_lowlat_ms)
R[rtt.tinc_minus_vxlan_ms]=$(diff_ms tinc.rtt_ms vxlan.rtt_ms)
R[rtt.openvpn_minus_vxlan_ms]=$(diff_ms openvpn.rtt_ms vxlan.rtt_ms)
R[bench.time_s]=$TIME
R[bench.tcp_rounds]=$TCP_ROUNDS

printf '\n%-13s %10s %10s %9s %11s %14s %16s %12s\n' kind "tcp1 Gb/s" "tcp4 Gb/s" "rtt ms" "rtt* ms" "busy CPU s/GB" "tunnel CPU s/GB" "other load %"
for k in $KINDS; do
  printf '%-13s %10s %10s %9s %11s %14s %16s %12s\n' "$k" "${R[$k.tcp1_gbps]}" "${R[$k.tcp4_gbps]}" "${R[$k.rtt_ms]}" "${R[$k.rtt_lowlat_ms]}" \
    "${R[$k.cpu_s_per_gb]}" "${R[$k.tunnel_cpu_s_per_gb]:--}" "${R[$k.background_busy_pct]}"
done
echo
echo "viola / tinc (1 stream):         ${R[ratio.viola_over_tinc_tcp1]}   (target >= 2)"
echo "viola / openvpn (1 stream):      ${R[ratio.viola_over_openvpn_tcp1]}   (target >= 2)"
echo "viola / wireguard-go (1 stream): ${R[ratio.viola_over_wireguard_go_tcp1]}   (target >= 1)"
echo "viola / boringtun (1 stream):    ${R[ratio.viola_over_boringtun_tcp1]}"
echo "viola / veth (1 stream):         ${R[ratio.viola_over_veth_tcp1]}"
echo "viola RTT - vxlan RTT:           ${R[rtt.viola_minus_vxlan_ms]} ms   (target <= 0.2)"
echo "  the same with wake-ups held:   ${R[rtt.viola_minus_vxlan_lowlat_ms]} ms   (rtt*: CPU wake-up latency held at 0 µs, PM QoS)"
echo "tinc RTT - vxlan RTT:            ${R[rtt.tinc_minus_vxlan_ms]} ms"
echo "openvpn RTT - vxlan RTT:         ${R[rtt.openvpn_minus_vxlan_ms]} ms"
if ((WAN)); then
  printf '\nWAN (%s ms one way, %s Mbit/s): underlay without a tunnel %s Mbit/s (%s)\n%-13s %10s %18s\n' "$WAN_DELAY_MS" "$WAN_RATE_MBIT" \
    "${R[underlay.wan_mbps]}" "${WAN_MBPS[underlay]# }" kind "Mbit/s" "of the underlay"
  for k in $KINDS; do printf '%-13s %10s %18s\n' "$k" "${R[$k.wan_mbps]}" "${R[$k.wan_over_underlay]}"; done
fi
if ((HOPS)); then
  printf '\nmedian µs per hop (--hops %s)\n%-13s %8s %8s %8s %8s %8s %8s\n' "$HOPS" kind "B t->u" "A u->t" "A vm" "A t->u" "B u->t" total
  for k in viola tinc openvpn; do
    [[ -n ${R[$k.hop_total_us]:-} ]] || continue
    printf '%-13s %8s %8s %8s %8s %8s %8s\n' "$k" "${R[$k.hop_b_tap_to_udp_us]}" "${R[$k.hop_a_udp_to_tap_us]}" \
      "${R[$k.hop_a_vm_reply_us]}" "${R[$k.hop_a_tap_to_udp_us]}" "${R[$k.hop_b_udp_to_tap_us]}" "${R[$k.hop_total_us]}"
  done
  R[ratio.viola_over_tinc_hop_total]=$(ratio viola.hop_total_us tinc.hop_total_us)
  echo "viola / tinc (hop total):        ${R[ratio.viola_over_tinc_hop_total]}"
fi

if [[ -n $JSON_OUT ]]; then
  {
    echo "{"
    first=1
    for key in $(printf '%s\n' "${!R[@]}" | sort); do
      v=${R[$key]}
      [[ $v =~ ^-?[0-9.]+$ || $v == null ]] || v="\"$v\""
      ((first)) || echo ","
      printf '  "%s": %s' "$key" "$v"
      first=0
    done
    echo
    echo "}"
  } >"$JSON_OUT"
  jq . "$JSON_OUT" >/dev/null || die "wrote invalid JSON to $JSON_OUT"
  log "wrote $JSON_OUT"
fi
