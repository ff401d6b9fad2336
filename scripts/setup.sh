#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine needs to build, run and test Viola, idempotently:
# Debian packages (libvirt, QEMU with a matching qemu-utils, network tools), the guest kernel
# and images, and the release build of Viola's binaries.
#
#   scripts/setup.sh            everything
#   scripts/setup.sh --no-build packages and guest only
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and the lab needs network namespaces)" >&2
  exit 1
fi

packages=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  iproute2 iputils-ping iperf3 busybox-static e2fsprogs cpio kmod xz-utils zstd
  jq socat netcat-openbsd tcpdump iptables procps psmisc curl ca-certificates ethtool bc tini
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}

# QEMU: installing qemu-system-x86 alone pulls Debian's qemu-utils of its own release and removes
# the newer qemu-utils some images ship, taking qemu-img with it. Install both from one release.
qemu_ok=1
sys_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
utils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ -z "$sys_ver" ] || [ "$sys_ver" != "$utils_ver" ] || ! command -v qemu-img >/dev/null; then
  qemu_ok=0
fi

if [ "${#missing[@]}" -gt 0 ] || [ "$qemu_ok" -eq 0 ]; then
  apt_update_once
  export DEBIAN_FRONTEND=noninteractive
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ "$qemu_ok" -eq 0 ]; then
    ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    log "installing qemu-system-x86 and qemu-utils $ver together"
    apt-get install -y -qq --allow-downgrades --no-install-recommends \
      "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-utils=$ver" \
      "qemu-block-extra=$ver" qemu-system-data >/dev/null
  fi
fi
command -v qemu-img >/dev/null || { echo "setup.sh: qemu-img is missing after install" >&2; exit 1; }
command -v libvirtd >/dev/null || { echo "setup.sh: libvirtd is missing after install" >&2; exit 1; }

# Debian's package starts nothing here (no systemd), but a libvirtd left running in the root
# namespace by another setup would not disturb the lab: every lab host runs its own.

# Rust toolchain: the machine kind ships rustup's toolchain; fail clearly if it is not there.
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup.sh: cargo not found (this machine kind is expected to ship a Rust toolchain)" >&2
    exit 1
  fi
fi

log "guest kernel and images"
"$here/guest/build.sh"

if [ "$build" -eq 1 ]; then
  log "building Viola (release)"
  (cd "$root" && cargo build --release --workspace --bins --quiet)
fi
log "done"
