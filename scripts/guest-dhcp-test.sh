#!/usr/bin/env bash
# Boots the lab guest with viola.ip=dhcp against dnsmasq, without libvirt or the overlay, and
# checks that it takes the lease: in a throwaway network namespace (vgt-PID) a bridge with
# 10.77.0.1/24, dnsmasq answering DHCP for one MAC (10.77.0.42, MTU option 1400, no router, as
# the overlay answers) and QEMU (TCG) with a TAP on that bridge. Passes when the console says
# VIOLA-GUEST-READY with the leased address, the guest answers HTTP there, and its eth0 has the
# MTU the server gave. Needs root; touches nothing outside the namespace and a temp directory.
#   VIOLA_GUEST_DIR=/tmp/guest-test scripts/guest-dhcp-test.sh
#   VGT_MTU=1300   also put viola.mtu=1300 on the command line (it wins over the server's 1400)
#   VGT_RENEW=1    also wait for the renewal of the 2-minute lease (about 70 s more)
#   VGT_IP=10.77.0.43/24   boot the static path instead (viola.ip=ADDR/PREFIX), same checks
set -euo pipefail
guest_dir=${VIOLA_GUEST_DIR:-/var/cache/viola/guest}
timeout_s=${VGT_TIMEOUT:-240}
ns=vgt-$$
mac=52:54:00:77:00:05
lease=10.77.0.42
guest_ip=${VGT_IP:-dhcp}
expect=${VGT_IP:-$lease/24}
addr=${expect%/*}
# Without viola.mtu, a static guest keeps the NIC's 1500; a DHCP one takes the server's 1400.
if [ "$guest_ip" = dhcp ]; then expect_mtu=${VGT_MTU:-1400}; else expect_mtu=${VGT_MTU:-1500}; fi
work=$(mktemp -d /tmp/vgt.XXXXXX)
qemu_pid="" dns_pid="" cat_pid=""
cleanup() {
  for pid in $qemu_pid $dns_pid $cat_pid; do kill "$pid" 2>/dev/null || true; done
  for pid in $qemu_pid $dns_pid $cat_pid; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "--- console" >&2; cat "$work/console.log" >&2 || true
  echo "--- dnsmasq" >&2; cat "$work/dnsmasq.log" >&2 || true; exit 1; }

ip netns add "$ns"
nsx() { ip netns exec "$ns" "$@"; }
nsx ip link set lo up
nsx ip link add br0 type bridge
nsx ip addr add 10.77.0.1/24 dev br0
nsx ip link set br0 up
nsx ip tuntap add dev tap0 mode tap
nsx ip link set tap0 master br0
nsx ip link set tap0 up

qemu-img create -q -f qcow2 -F qcow2 -b "$guest_dir/base.qcow2" "$work/overlay.qcow2"

# --dhcp-option=3 with no value: no router option, as the overlay answers.
# Started with `ip netns exec` itself (not through nsx) so that $! is the daemon's own PID.
ip netns exec "$ns" /usr/sbin/dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface=br0 \
  --bind-interfaces --dhcp-authoritative --dhcp-range=10.77.0.10,10.77.0.99,255.255.255.0,2m \
  --dhcp-host="$mac,$lease" --dhcp-option=3 --dhcp-option=option:mtu,1400 \
  --dhcp-leasefile="$work/leases" --pid-file="$work/dnsmasq.pid" --log-dhcp \
  >"$work/dnsmasq.log" 2>&1 &
dns_pid=$!

# The serial port as a pair of FIFOs: the guest's output is copied to console.log and
# commands for its console shell are written to ser.in.
mkfifo "$work/ser.in" "$work/ser.out"
cat "$work/ser.out" >"$work/console.log" &
cat_pid=$!
ip netns exec "$ns" qemu-system-x86_64 -accel tcg -cpu qemu64 -m 256 -display none -monitor none -no-reboot \
  -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.img" \
  -append "console=ttyS0 quiet panic=-1 viola.name=vgt viola.ip=$guest_ip viola.http=1${VGT_MTU:+ viola.mtu=$VGT_MTU}" \
  -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2" \
  -nic "tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci,mac=$mac" \
  -serial "pipe:$work/ser" &
qemu_pid=$!
exec 3>"$work/ser.in"

deadline=$((SECONDS + timeout_s))
until grep -q VIOLA-GUEST-READY "$work/console.log" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || fail "no VIOLA-GUEST-READY within ${timeout_s}s"
  kill -0 "$qemu_pid" 2>/dev/null || fail "QEMU exited"
  sleep 1
done
ready=$(grep -a VIOLA-GUEST-READY "$work/console.log" | tr -d '\r')
echo "console: $ready"
case "$ready" in
  *" ip=$expect "*) ;;
  *) fail "the guest did not report $expect" ;;
esac
info=$(nsx wget -q -T 5 -O - "http://$addr/cgi-bin/viola?info" 2>/dev/null \
  || nsx curl -s -m 5 "http://$addr/cgi-bin/viola?info") || fail "no HTTP answer on $addr"
echo "http: $(echo "$info" | tr '\n' ' ')"
echo "$info" | grep -q '^name=vgt$' || fail "unexpected HTTP answer"
echo 'echo "VGT-MTU=$(cat /sys/class/net/eth0/mtu) VGT-ROUTE=$(ip route | grep -c default)"' >&3
for _ in $(seq 30); do grep -aq 'VGT-MTU=[0-9]' "$work/console.log" && break; sleep 1; done
probe=$(grep -ao 'VGT-MTU=[0-9]* VGT-ROUTE=[0-9]*' "$work/console.log" | tail -n 1)
echo "guest: $probe"
[ "$probe" = "VGT-MTU=$expect_mtu VGT-ROUTE=0" ] || fail "eth0 MTU/route not as leased"
if [ "${VGT_RENEW:-0}" = 1 ] && [ "$guest_ip" = dhcp ]; then
  # udhcpc renews at half the lease (60 s): a second DHCPACK, and the address still answers.
  deadline=$((SECONDS + 120))
  until [ "$(grep -c "DHCPACK(br0) $lease" "$work/dnsmasq.log")" -ge 2 ]; do
    [ $SECONDS -lt $deadline ] || fail "no renewal within 120 s"
    sleep 2
  done
  nsx wget -q -T 5 -O /dev/null "http://$lease/cgi-bin/viola?info" || fail "no HTTP after renewal"
  echo "renewed: $(grep -c "DHCPACK(br0) $lease" "$work/dnsmasq.log") DHCPACKs, still answering"
fi
echo "PASS"
