#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine needs to build, run and test Viola, idempotently:
# Debian packages (libvirt, QEMU with a matching qemu-utils, network tools), cargo-fuzz, the
# guest kernel and images, and the release build of Viola's binaries.
#
#   scripts/setup.sh            everything
#   scripts/setup.sh --no-build packages, cargo-fuzz and guest only
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

# dpkg-dev: scripts/package.sh (dpkg-shlibdeps); mmdebstrap also makes package_lab's Debian root.
# chromium, chromium-driver, libnss3-tools: the dashboard's browser test (and a browser for the
# demo's dashboard; see the Chromium policy below).
# ebtables: libvirt's nwfilter calls it for the VMs' port filters ([vm_template] port_filter).
# etcd-server, etcd-client: replicated managers' store (mech_replicated runs a three-member
# cluster in lab namespaces; viola-etcd's tests run members on loopback).
packages=(
  pkg-config
  iproute2 iputils-ping iperf3 busybox-static e2fsprogs cpio kmod xz-utils zstd
  etcd-server etcd-client
  jq socat netcat-openbsd tcpdump iptables ebtables procps psmisc curl ca-certificates ethtool bc tini
  dnsmasq-base dropbear-bin openssh-client mmdebstrap
  chromium chromium-driver libnss3-tools openssl dpkg-dev
)
# libvirt and QEMU come as one stack, from one release. On Debian 12 that is bookworm-backports
# (libvirt 11, QEMU 10): bookworm's own QEMU 7.2 corrupts the virtio TX ring of a guest that is
# live-migrated under TCG now and then (see the README), and these machines already ship
# qemu-utils from backports, which bookworm's qemu-system-x86 would replace by its own.
stack=(
  libvirt-daemon-system libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  libvirt0 qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra
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

release_args=()
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ]; then
  release_args=(-t bookworm-backports)
  if ! grep -rqs --include='*.list' --include='*.sources' 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d; then
    log "adding Debian's bookworm-backports to apt's sources (for libvirt and QEMU)"
    cat >/etc/apt/sources.list.d/viola-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_update_once
  fi
fi

# The stack is up to date when every package of it is installed at the version apt would pick
# from the chosen release.
stack_ok() {
  local p have want
  for p in "${stack[@]}"; do
    have=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || true)
    want=$(apt-cache "${release_args[@]}" policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$have" ] && [ "$have" = "$want" ] || return 1
  done
}

export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update_once
  log "installing: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! stack_ok; then
  apt_update_once
  log "installing libvirt and QEMU together${release_args:+ from ${release_args[1]}}"
  apt-get install -y -qq --no-install-recommends "${release_args[@]}" "${stack[@]}" >/dev/null
fi
sys_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
utils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
[ -n "$sys_ver" ] && [ "$sys_ver" = "$utils_ver" ] ||
  { echo "setup.sh: qemu-system-x86 ($sys_ver) and qemu-utils ($utils_ver) differ" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "setup.sh: qemu-img is missing after install" >&2; exit 1; }

# Chromium asks which client certificate to send to a site that wants one, and headless it
# cannot ask: this policy lets it send the one it has to the dashboard as the lab and the demo
# forward it (https://127.0.0.1, any port). A browser whose NSS database holds no Viola
# certificate sends nothing; other sites are not affected.
policy_dir=/etc/chromium/policies/managed
policy_file=$policy_dir/viola-dashboard.json
policy='{"AutoSelectCertificateForUrls": ["{\"pattern\":\"https://127.0.0.1\",\"filter\":{}}"]}'
if [ "$(cat "$policy_file" 2>/dev/null)" != "$policy" ]; then
  log "installing the Chromium policy for the dashboard's client certificate ($policy_file)"
  mkdir -p "$policy_dir"
  printf '%s\n' "$policy" >"$policy_file"
fi
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

# cargo-fuzz, from crates.io, for the decoders' fuzz targets that CI runs for a bounded time
# (fuzz.sh pins its version and installs it only when that version is missing).
"$here/fuzz.sh" --install

log "guest kernel and images"
"$here/guest/build.sh"
# The MPI guest (Debian with MPICH and OpenSSH, as an OS layer and an MPI layer) for mpi_lab.
"$here/guest/mpi-image.sh"

if [ "$build" -eq 1 ]; then
  log "building Viola (release)"
  (cd "$root" && cargo build --release --workspace --bins --quiet)
fi
log "done"
