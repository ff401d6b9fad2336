#!/usr/bin/env bash
# Builds Viola's MPI lab guest, idempotently: Debian bookworm (minbase) with OpenSSH and MPICH,
# booted with the lab guest's own kernel and initramfs (scripts/guest/build.sh: the initramfs
# mounts /dev/vda and execs /sbin/viola-init there), so the image holds no kernel. Output in
# $VIOLA_MPI_GUEST_DIR (default /var/cache/viola/guest-mpi):
#   os.qcow2    the OS: minbase, openssh-server, busybox (udhcpc), iproute2, ping, procps, and
#               /sbin/viola-init (scripts/guest/mpi-init), viola-hosts, the udhcpc script
#   mpi.qcow2   a qcow2 overlay backed by os.qcow2 (relative name) holding only what MPICH,
#               /usr/local/bin/mpi-ring (scripts/guest/mpi-ring.c) and /usr/local/bin/mpi-nemo
#               (scripts/guest/mpi-nemo.c, the two-phase job) add: the depot imports the
#               chain as two layers, shared with any other image built on os.qcow2
# A VM's root disk is a qcow2 overlay on mpi.qcow2 (see `overlay` below), booted e.g. with
#   scripts/guest/domain-xml.sh --disk VM.qcow2 ... --cmdline-extra "viola.ssh_key=TYPE,BASE64"
#
#   scripts/guest/mpi-image.sh                        build what is missing or out of date
#   scripts/guest/mpi-image.sh --force                rebuild
#   scripts/guest/mpi-image.sh overlay DEST [BASE]    create a VM overlay DEST backed by BASE
#                                                     (default: mpi.qcow2)
# Environment: VIOLA_MPI_IMAGE_MB (file system size, default 1024), VIOLA_MPI_MIRROR (default
# http://deb.debian.org/debian), VIOLA_MPI_LAYER=debugfs|mkfs (how mpi.qcow2 is made; see
# make_mpi_raw). Needs root, mmdebstrap, e2fsprogs and qemu-utils; network access to the mirror.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"
out=${VIOLA_MPI_GUEST_DIR:-/var/cache/viola/guest-mpi}
size_mb=${VIOLA_MPI_IMAGE_MB:-1024}
mirror=${VIOLA_MPI_MIRROR:-http://deb.debian.org/debian}
security=${VIOLA_MPI_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
layer=${VIOLA_MPI_LAYER:-debugfs}
suite=bookworm
os_packages=openssh-server,busybox,iproute2,iputils-ping,procps
mpi_packages="mpich"
build_packages="libmpich-dev gcc libc6-dev"
inputs=("$self" "$here/mpi-init" "$here/udhcpc.script" "$here/viola-hosts" "$here/mpi-ring.c"
  "$here/mpi-nemo.c")
log() { printf '[guest-mpi] %s\n' "$*" >&2; }
die() { printf 'mpi-image.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# mmdebstrap customize hooks (this script calls itself; $1 is the chroot, $VIOLA_MPI_WORK the
# build's temporary directory). Order: os, snapshot, mpi, final.

# The OS configuration, in the tree both images share.
hook_os() {
  local r=$1
  printf 'viola-guest\n' >"$r/etc/hostname"
  # No 127.0.1.1 line: MPI ranks would advertise loopback. viola-init adds "ADDR NAME" at boot
  # and viola-hosts the peers.
  cat >"$r/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
  cat >"$r/etc/environment" <<'EOF'
UCX_TLS=tcp,sm,self
UCX_NET_DEVICES=eth0
HYDRA_IFACE=eth0
EOF
  cat >"$r/etc/profile.d/viola-mpi.sh" <<'EOF'
# Viola MPI guest: MPICH (ch4:ucx) over TCP on eth0 (see /etc/environment).
set -a
. /etc/environment
set +a
EOF
  # sshd reads no /etc/environment without PAM: the same defaults for every SSH session,
  # interactive or not (what `mpiexec -launcher ssh` runs on the peers).
  cat >"$r/etc/ssh/sshd_config.d/viola.conf" <<'EOF'
# Viola MPI guest (the first value of a setting wins: this file is included before the rest).
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
HostKey /etc/ssh/ssh_host_ed25519_key
SetEnv UCX_TLS=tcp,sm,self UCX_NET_DEVICES=eth0 HYDRA_IFACE=eth0
EOF
  # Every VM makes its own host key on its first boot (mpi-init).
  rm -f "$r"/etc/ssh/ssh_host_*
  install -m 0755 "$here/mpi-init" "$r/sbin/viola-init"
  install -m 0755 "$here/viola-hosts" "$r/usr/local/bin/viola-hosts"
  install -D -m 0755 "$here/udhcpc.script" "$r/usr/share/udhcpc/default.script"
  # busybox applets the init and the udhcpc script call by name.
  local a
  for a in udhcpc arping; do ln -sf /bin/busybox "$r/usr/local/sbin/$a"; done
  mkdir -p "$r/root/.ssh" && chmod 700 "$r/root/.ssh"
  # No getty, no systemd: nothing of /etc/machine-id is needed, and an empty one is fine.
  : >"$r/etc/machine-id"
}

# Files apt leaves behind that mmdebstrap's own cleanup removes at the end (for the OS copy).
clean_apt() {
  local r=$1
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
    "$r"/var/cache/apt/archives/partial/* "$r"/var/cache/ldconfig/aux-cache "$r"/tmp/*
  mkdir -p "$r/var/lib/apt/lists/partial"
}

# The OS tree, copied before MPICH goes in (mount points are copied empty).
hook_snapshot() {
  local r=$1 os="$VIOLA_MPI_WORK/os"
  mkdir -p "$os"
  cp -ax "$r/." "$os/"
  clean_apt "$os"
  printf '# Viola guest: no DNS; peers are in /etc/hosts (viola-init, viola-hosts).\n' \
    >"$os/etc/resolv.conf"
}

# MPICH, and the jobs (the ring, the NEMO3D-shaped job) compiled with mpicc; the compiler goes
# again. The job runs once, tiny, on two local ranks with its own verification.
hook_mpi() {
  local r=$1 prog
  # shellcheck disable=SC2086
  chroot "$r" apt-get install -y -q --no-install-recommends $mpi_packages $build_packages
  for prog in mpi-ring mpi-nemo; do
    install -m 0644 "$here/$prog.c" "$r/tmp/$prog.c"
    chroot "$r" mpicc -O2 -Wall -Werror -o "/usr/local/bin/$prog" "/tmp/$prog.c"
    rm -f "$r/tmp/$prog.c"
  done
  chroot "$r" env UCX_TLS=tcp,sm,self timeout 120 mpiexec -launcher fork -n 2 \
    /usr/local/bin/mpi-nemo --strain-iters 3 --block-kib 4 --lanczos-iters 2 --mem-mib 1 \
    --verify | tail -n 1 | grep -q 'verify=ok' || die "mpi-nemo's self-check failed"
  # Everything the build brought in goes, even what an installed package merely recommends or
  # suggests (perl, pulled in by autoconf, would stay otherwise: 48 MB).
  chroot "$r" apt-mark manual $mpi_packages >/dev/null
  # shellcheck disable=SC2086
  chroot "$r" apt-get purge -y -q --autoremove -o APT::AutoRemove::RecommendsImportant=false \
    -o APT::AutoRemove::SuggestsImportant=false $build_packages
  chroot "$r" mpichversion | sed -n '1,3p' >&2
  chroot "$r" ldd /usr/local/bin/mpi-ring /usr/local/bin/mpi-nemo >/dev/null
}

# Files both trees must hold identically (the MPI tree had the build machine's during apt).
hook_final() {
  local r=$1
  cp -a "$VIOLA_MPI_WORK/os/etc/resolv.conf" "$r/etc/resolv.conf"
}

case "${1:-}" in
  hook-os|hook-snapshot|hook-mpi|hook-final)
    [ -n "${VIOLA_MPI_WORK:-}" ] || die "$1: VIOLA_MPI_WORK is not set"
    fn=${1//-/_}; shift; "$fn" "$@"; exit 0 ;;
  overlay)
    dest=${2:?usage: mpi-image.sh overlay DEST [BASE]}
    base=${3:-$out/mpi.qcow2}
    qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$dest"
    exit 0 ;;
  --force|"") ;;
  *) die "unknown argument $1 (see the header)" ;;
esac
force=0
[ "${1:-}" = --force ] && force=1

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, chroot)"
stamp=$( { cat "${inputs[@]}"; echo "$size_mb $mirror $layer $os_packages $mpi_packages"; } | md5sum | cut -d' ' -f1)
if [ "$force" -eq 0 ] && [ -s "$out/os.qcow2" ] && [ -s "$out/mpi.qcow2" ] \
  && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  log "up to date in $out"
  exit 0
fi
for tool in mmdebstrap mkfs.ext4 debugfs e2fsck qemu-img; do
  command -v "$tool" >/dev/null || die "$tool missing (scripts/setup.sh installs mmdebstrap, e2fsprogs, qemu-utils)"
done

started=$(date +%s)
work=$(mktemp -d /var/tmp/viola-guest-mpi.XXXXXX)
# --one-file-system: should a failed mmdebstrap leave /dev or /proc mounted in the chroot, those
# are not descended into.
trap 'rm -rf --one-file-system "$work"' EXIT
export VIOLA_MPI_WORK="$work"

# 1. One mmdebstrap run: the OS, a copy of it, then MPICH and the ring on top.
log "mmdebstrap $suite minbase + $os_packages, then $mpi_packages"
excludes=()
for p in doc man info locale lintian linda bug; do
  excludes+=("--dpkgopt=path-exclude=/usr/share/$p/*")
done
# maybe-merged-usr: the merged /usr layout from the start, with usr-is-merged; else apt satisfies
# init-system-helpers' "usrmerge | usr-is-merged" with usrmerge, which brings full Perl (48 MB).
mmdebstrap --mode=root --variant=minbase --format=directory \
  --hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr \
  --include="$os_packages" \
  --aptopt='APT::Install-Recommends "false"' --aptopt='Acquire::Languages "none"' \
  "${excludes[@]}" --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook="\"$self\" hook-os \"\$1\"" \
  --customize-hook="\"$self\" hook-snapshot \"\$1\"" \
  --customize-hook="\"$self\" hook-mpi \"\$1\"" \
  --customize-hook="\"$self\" hook-final \"\$1\"" \
  "$suite" "$work/mpi" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" \
  "deb $security $suite-security main" </dev/null
if [ ! -x "$work/mpi/usr/local/bin/mpi-ring" ] || [ ! -x "$work/mpi/usr/local/bin/mpi-nemo" ] || [ ! -x "$work/mpi/usr/bin/mpiexec.hydra" ] || [ ! -L "$work/mpi/usr/bin/mpiexec" ]; then
  die "the MPI tree lacks mpi-ring, mpi-nemo or mpiexec"
fi
if [ ! -x "$work/os/sbin/viola-init" ] || [ -e "$work/os/usr/bin/mpiexec.hydra" ]; then
  die "the OS copy is not what it should be"
fi

# 2. The OS as ext4 (populated from the directory: no loop mounts). Inode tables and journal
# zeroed now, as in build.sh: left lazy, each VM's kernel would write them into its overlay.
mkfs_ext4() { # DIR IMAGE
  mkfs.ext4 -q -F -L viola-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$1" "$2" "${size_mb}M"
}
log "os.raw: mkfs.ext4 -d (${size_mb} MiB)"
mkfs_ext4 "$work/os" "$work/os.raw"

# 3. The MPI image as raw, changing as few blocks of the OS image as possible.
#   debugfs (default): a copy of os.raw into which debugfs -w writes only what differs
#     between the trees (new and changed files, removed ones): the OS's blocks stay put.
#   mkfs: mkfs.ext4 -d of the whole MPI tree (lays everything out afresh: a larger overlay).
# /dev's content is left out: devtmpfs is mounted over it at boot.
list_tree() { # DIR: "PATH<TAB>TYPE<TAB>MODE<TAB>UID<TAB>GID<TAB>SIZE<TAB>MTIME<TAB>LINK" per entry
  (cd "$1" && find . -mindepth 1 -path './dev/*' -prune -o -printf '%P\t%y\t%m\t%U\t%G\t%s\t%T@\t%l\n') |
    LC_ALL=C sort
}
debugfs_script() { # OS_DIR MPI_DIR: debugfs commands turning the OS file system into the MPI one
  local os=$1 mpi=$2
  if (cd "$mpi" && find . -name '*"*' -o -name "*$(printf '\t')*" -o -name "*$(printf '\n')*" | grep -q .); then
    die "file names with quotes, tabs or newlines in the MPI tree"
  fi
  list_tree "$os" >"$work/os.list"
  list_tree "$mpi" >"$work/mpi.list"
  # shellcheck disable=SC2016
  awk -F'\t' -v src="$mpi" '
    function q(s) { return "\"" s "\"" }
    function create(p, t, m, u, g, mt, l) {
      if (t == "d") print "mkdir " q("/" p)
      else if (t == "f") print "write " q(src "/" p) " " q("/" p)
      else if (t == "l") print "symlink " q("/" p) " " q(l)
      else { print "unsupported file type " t " of " p > "/dev/stderr"; exit 1 }
      meta(p, t, m, u, g, mt)
    }
    function meta(p, t, m, u, g, mt,   bits) {
      bits = (t == "d") ? 16384 : (t == "l") ? 40960 : 32768
      if (t != "l") printf "sif %s mode 0%o\n", q("/" p), bits + oct(m)
      print "sif " q("/" p) " uid " u
      print "sif " q("/" p) " gid " g
      split(mt, s, "."); print "sif " q("/" p) " mtime @" s[1]
    }
    function remove(p, t) { print (t == "d" ? "rmdir " : "rm ") q("/" p) }
    function oct(s,   n, i) { n = 0; for (i = 1; i <= length(s); i++) n = n * 8 + substr(s, i, 1); return n }
    FNR == NR { old[$1] = $0; next }
    {
      p = $1; seen[p] = 1
      if (!(p in old)) { create(p, $2, $3, $4, $5, $7, $8); next }
      split(old[p], o, "\t")
      if (o[2] != $2) { rm_later[p] = o[2]; recreate[p] = $0; next }
      if ($2 == "d") {
        if (o[3] != $3 || o[4] != $4 || o[5] != $5) meta(p, $2, $3, $4, $5, $7)
      } else if (o[3] != $3 || o[4] != $4 || o[5] != $5 || o[6] != $6 || o[7] != $7 || o[8] != $8) {
        remove(p, $2); create(p, $2, $3, $4, $5, $7, $8)
      }
    }
    END {
      n = 0
      for (p in old) if (!(p in seen)) gone[++n] = p
      # Deepest first.
      for (i = n; i >= 1; i--) { split(old[gone[i]], o, "\t"); remove(gone[i], o[2]) }
      for (p in recreate) {
        remove(p, rm_later[p]); split(recreate[p], f, "\t"); create(p, f[2], f[3], f[4], f[5], f[7], f[8])
      }
    }' "$work/os.list" "$work/mpi.list" >"$work/debugfs.cmds.tmp"
  # awk's "for in" is unordered: removals must come deepest first; sort them apart.
  grep -E '^(rm|rmdir) ' "$work/debugfs.cmds.tmp" | LC_ALL=C sort -r -k2 >"$work/debugfs.cmds" || true
  grep -v -E '^(rm|rmdir) ' "$work/debugfs.cmds.tmp" >>"$work/debugfs.cmds" || true
}
make_mpi_raw() {
  case "$layer" in
    debugfs)
      cp --sparse=always "$work/os.raw" "$work/mpi.raw"
      debugfs_script "$work/os" "$work/mpi"
      log "mpi.raw: $(grep -c -E '^(write|mkdir|symlink) ' "$work/debugfs.cmds") entries written, $(grep -c -E '^(rm|rmdir) ' "$work/debugfs.cmds") removed (debugfs -w)"
      debugfs -w -f "$work/debugfs.cmds" "$work/mpi.raw" >"$work/debugfs.log" 2>&1
      # debugfs reports failures only on stderr, prefixed by the command's name.
      if grep -E '^(write|mkdir|symlink|sif|rm|rmdir): ' "$work/debugfs.log"; then
        die "debugfs failed (above)"
      fi
      ;;
    mkfs) mkfs_ext4 "$work/mpi" "$work/mpi.raw" ;;
    *) die "VIOLA_MPI_LAYER=$layer: debugfs or mkfs" ;;
  esac
  e2fsck -fn "$work/mpi.raw" >"$work/e2fsck.log" 2>&1 || { cat "$work/e2fsck.log" >&2; die "mpi.raw fails e2fsck"; }
}
make_mpi_raw

# 4. qcow2: os.qcow2 in full, mpi.qcow2 as an overlay with only the clusters that differ (an
# empty overlay on mpi.raw, rebased in safe mode onto os.qcow2, copies exactly those).
log "qcow2: os.qcow2, and mpi.qcow2 as its overlay"
qemu-img convert -q -f raw -O qcow2 "$work/os.raw" "$work/os.qcow2"
(cd "$work" && qemu-img create -q -f qcow2 -F raw -b mpi.raw mpi.qcow2 \
  && qemu-img rebase -q -f qcow2 -F qcow2 -b os.qcow2 mpi.qcow2)
qemu-img compare -q -f qcow2 -F raw "$work/mpi.qcow2" "$work/mpi.raw" || die "mpi.qcow2 differs from mpi.raw"

mkdir -p "$out"
mv "$work/os.qcow2" "$out/os.qcow2"
mv "$work/mpi.qcow2" "$out/mpi.qcow2"
echo "$stamp" >"$out/.stamp"
du_mb() { du -sm "$1" | cut -f1; }
log "trees: OS $(du_mb "$work/os") MiB, OS+MPI $(du_mb "$work/mpi") MiB"
log "os.qcow2 $(du -h "$out/os.qcow2" | cut -f1), mpi.qcow2 overlay $(du -h "$out/mpi.qcow2" | cut -f1) ($layer) in $out"
log "built in $(($(date +%s) - started)) s"
