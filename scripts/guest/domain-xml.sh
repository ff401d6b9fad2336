#!/usr/bin/env bash
# Prints the libvirt domain XML of a Viola lab guest.
#   domain-xml.sh --name NAME --disk OVERLAY.qcow2 --bridge BRIDGE --ip 10.1.0.5/24|dhcp
#                 [--mac MAC] [--memory-mib 256] [--max-memory-mib 512] [--vcpus 1]
#                 [--max-vcpus 2] [--mtu 1400] [--gw ADDR] [--cmdline-extra "..."]
#                 [--depot-image REF]
# The one source of the lab guest's domain XML: scripts/demo.sh and the lab tests
# (viola_labtests::GuestSpec) both print it with this script. --depot-image records the depot
# image the guest runs from in the domain's metadata (what the adaptation manager stages when the
# guest moves). --ip dhcp writes viola.ip=dhcp: the guest takes its address by DHCP (its
# udhcpc script; the overlay answers for the VMs the manager creates). The serial console goes
# to $VIOLA_CONSOLE_DIR/NAME.log.
# TCG (`type='qemu'`) with the named CPU model qemu64, so the same guest can live-migrate
# between any two lab hosts; direct kernel boot from the shared guest directory.
set -euo pipefail
guest_dir=${VIOLA_GUEST_DIR:-/var/cache/viola/guest}
name="" disk="" bridge="" ip="" mac="" mem=256 maxmem=512 vcpus=1 maxvcpus=2 mtu="" gw="" extra=""
image=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2 ;; --disk) disk=$2 ;; --bridge) bridge=$2 ;; --ip) ip=$2 ;; --mac) mac=$2 ;;
    --memory-mib) mem=$2 ;; --max-memory-mib) maxmem=$2 ;; --vcpus) vcpus=$2 ;;
    --max-vcpus) maxvcpus=$2 ;; --mtu) mtu=$2 ;; --gw) gw=$2 ;; --cmdline-extra) extra=$2 ;;
    --depot-image) image=$2 ;;
    *) echo "domain-xml.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
[ -n "$name" ] && [ -n "$disk" ] && [ -n "$bridge" ] && [ -n "$ip" ] \
  || { echo "domain-xml.sh: --name, --disk, --bridge and --ip are required" >&2; exit 2; }
[[ "$name" =~ ^[A-Za-z0-9_-]{1,48}$ ]] || { echo "domain-xml.sh: bad name $name" >&2; exit 2; }
[[ "$image" =~ ^[A-Za-z0-9._-]*$ ]] || { echo "domain-xml.sh: bad depot image $image" >&2; exit 2; }
if [ -z "$mac" ]; then
  h=$(printf '%s' "$name" | md5sum)
  mac="52:54:00:${h:0:2}:${h:2:2}:${h:4:2}"
fi
[ "$maxmem" -ge "$mem" ] || maxmem=$mem
[ "$maxvcpus" -ge "$vcpus" ] || maxvcpus=$vcpus
cmdline="console=ttyS0 quiet panic=-1 viola.name=$name viola.ip=$ip viola.http=1"
[ -n "$mtu" ] && cmdline="$cmdline viola.mtu=$mtu"
[ -n "$gw" ] && cmdline="$cmdline viola.gw=$gw"
[ -n "$extra" ] && cmdline="$cmdline $extra"
console_dir=${VIOLA_CONSOLE_DIR:-/var/lib/viola-lab/console}
mkdir -p "$console_dir"
mtu_xml=""
[ -n "$mtu" ] && mtu_xml="<mtu size='$mtu'/>"
# The namespace is viola_adaptmgr::migration::depot_stage::METADATA_NS (as `virsh metadata
# --uri urn:viola:depot:1 --key viola` writes it).
metadata_xml=""
[ -n "$image" ] && metadata_xml="<metadata><viola:image xmlns:viola='urn:viola:depot:1' ref='$image'/></metadata>"
cat <<XML
<domain type='qemu'>
  <name>$name</name>
  $metadata_xml
  <memory unit='MiB'>$maxmem</memory>
  <currentMemory unit='MiB'>$mem</currentMemory>
  <vcpu placement='static' current='$vcpus'>$maxvcpus</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$guest_dir/vmlinuz</kernel>
    <initrd>$guest_dir/initrd.img</initrd>
    <cmdline>$cmdline</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='$mac'/>
      <source bridge='$bridge'/>
      <model type='virtio'/>
      $mtu_xml
      <rom enabled='no'/>
    </interface>
    <serial type='file'>
      <source path='$console_dir/$name.log' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.viola.shepherd'/>
    </channel>
    <memballoon model='virtio'><stats period='2'/></memballoon>
  </devices>
</domain>
XML
