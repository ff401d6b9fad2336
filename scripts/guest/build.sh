#!/usr/bin/env bash
# Builds Viola's lab guest from Debian's packages, idempotently:
#   $VIOLA_GUEST_DIR (default /var/cache/viola/guest)/
#     vmlinuz       Debian's kernel, extracted from linux-image-*-amd64 with dpkg-deb -x
#                   (never installed into this machine's /boot)
#     initrd.img    busybox + the virtio/ext4 modules; mounts /dev/vda and switches to it
#     base.qcow2    the root disk's base image: ext4 with busybox, the init and the lab tools
# A VM's root disk is a qcow2 overlay on base.qcow2 (see `overlay` below).
#
#   scripts/guest/build.sh                        build what is missing
#   scripts/guest/build.sh --force                rebuild everything
#   scripts/guest/build.sh overlay DEST [BASE]    create a VM overlay DEST backed by BASE
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${VIOLA_GUEST_DIR:-/var/cache/viola/guest}
base_size=${VIOLA_GUEST_BASE_MB:-64}
log() { printf '[guest] %s\n' "$*" >&2; }

if [ "${1:-}" = overlay ]; then
  dest=${2:?usage: build.sh overlay DEST [BASE]}
  base=${3:-$out/base.qcow2}
  qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$dest"
  exit 0
fi
force=0
[ "${1:-}" = --force ] && force=1

mkdir -p "$out"
if [ "$force" -eq 0 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/base.qcow2" ] \
  && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$(cat "$here"/* | md5sum | cut -d' ' -f1)" ]; then
  log "up to date in $out"
  exit 0
fi

work=$(mktemp -d /var/tmp/viola-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. The kernel and its modules, from the package linux-image-amd64 points at.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "build.sh: cannot find Debian's kernel package" >&2; exit 1; }
mkdir -p "$out/debs"
deb=$(ls "$out"/debs/"${kpkg}"_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  log "downloading $kpkg"
  (cd "$out/debs" && apt-get download -q "$kpkg" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  deb=$(ls "$out"/debs/"${kpkg}"_*.deb 2>/dev/null | head -n 1 || true)
  [ -n "$deb" ] || { echo "build.sh: download of $kpkg failed" >&2; exit 1; }
fi
log "extracting $(basename "$deb")"
dpkg-deb -x "$deb" "$work/k"
kver=$(ls "$work/k/lib/modules")
depmod -b "$work/k" "$kver"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"

# 2. The initramfs: busybox, the modules in dependency order, stage-1 init.
mkdir -p "$work/initrd/bin" "$work/initrd/sbin" "$work/initrd/modules"
cp /bin/busybox "$work/initrd/bin/busybox"
moddir="$work/k/lib/modules/$kver"
# virtio_console: the shepherd's channel (/usr/bin/viola-ask).
want="crc32c_generic crc32c-intel virtio_pci virtio_net virtio_blk virtio_balloon virtio_console ext4"
: >"$work/initrd/modules.order"
add_module() { # resolve dependencies depth-first from modules.dep
  local name=$1 path deps dep base
  path=$(awk -F: -v n="/$name.ko" '{ if (index($1, n) && substr($1, length($1) - length(n) + 1) == n) { print $1; exit } }' "$moddir/modules.dep")
  if [ -z "$path" ]; then
    path=$(awk -F: -v n="/$name.ko" 'index($1, n) { print $1; exit }' "$moddir/modules.dep")
  fi
  [ -n "$path" ] || { log "module $name not found (built in?)"; return 0; }
  base=$(basename "$path"); base=${base%%.ko*}.ko
  grep -qx "$base" "$work/initrd/modules.order" && return 0
  deps=$(awk -F: -v p="$path" '$1 == p { print $2 }' "$moddir/modules.dep")
  for dep in $deps; do
    dep=$(basename "$dep"); add_module "${dep%%.ko*}"
  done
  case "$path" in
    *.ko.xz) xz -dc "$moddir/$path" >"$work/initrd/modules/$base" ;;
    *.ko.zst) zstd -qdc "$moddir/$path" >"$work/initrd/modules/$base" ;;
    *) cp "$moddir/$path" "$work/initrd/modules/$base" ;;
  esac
  echo "$base" >>"$work/initrd/modules.order"
}
for m in $want; do add_module "$m"; done
cp "$here/initramfs-init" "$work/initrd/init"
cp "$here/viola-init" "$work/initrd/sbin/viola-init"
mkdir -p "$work/initrd/usr/share/udhcpc"
install -m 0755 "$here/udhcpc.script" "$work/initrd/usr/share/udhcpc/default.script"
(cd "$work/initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img"

# 3. The root disk's base: ext4 populated from a directory (no loop mounts needed).
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,data,www/cgi-bin,root}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp "$here/viola-init" "$root/sbin/viola-init"
# viola.ip=dhcp: busybox udhcpc (linked above with every applet) runs this on lease events.
mkdir -p "$root/usr/share/udhcpc"
install -m 0755 "$here/udhcpc.script" "$root/usr/share/udhcpc/default.script"
cp "$here/cpuburn" "$here/diskwrite" "$here/viola-ask" "$here/viola-job" "$root/usr/bin/"
# SSH (viola.ssh_key): dropbear and the shared libraries it needs, at the host's paths.
for b in /usr/sbin/dropbear /usr/bin/dropbearkey; do
  [ -x "$b" ] || { echo "build.sh: $b missing: install dropbear-bin (scripts/setup.sh does)" >&2; exit 1; }
  install -D -m 0755 "$b" "$root$b"
  for lib in $(ldd "$b" | grep -o '/[^ ]*'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$lib" "$root$lib"
  done
done
cp "$here/viola-cgi" "$root/www/cgi-bin/viola"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
# Inode tables and journal zeroed now: left lazy, every guest's kernel would zero them after
# its first boot, writing megabytes into each VM's overlay (which a migration then copies).
mkfs.ext4 -q -F -L viola-root -E lazy_itable_init=0,lazy_journal_init=0 \
  -d "$root" "$work/base.raw" "${base_size}M"
qemu-img convert -q -f raw -O qcow2 "$work/base.raw" "$work/base.qcow2"

mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
mv "$work/base.qcow2" "$out/base.qcow2"
echo "$kver" >"$out/kernel-version"
cat "$here"/* | md5sum | cut -d' ' -f1 >"$out/.stamp"
log "built kernel $kver, initrd and base.qcow2 (${base_size} MiB) in $out"
