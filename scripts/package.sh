#!/usr/bin/env bash
# Builds Viola's Debian packages from the release build, with dpkg-deb (no debian/ tree, no
# cargo-deb: the packages are plain, and the shared-library dependencies come from
# dpkg-shlibdeps as in any Debian package):
#   viola-overlay   viola-overlay, its systemd unit, /etc/viola/overlay.toml.example
#   viola-depot     viola-depot, its unit, /etc/viola/depot.toml.example, the `viola` user
#   viola-monitor   viola-monitor, its unit, /etc/viola/monitor.toml.example
#   viola-adaptmgr  viola-adaptmgr, its unit, /etc/viola/adaptmgr.toml.example
#   viola-cli       viola (the CLI) and viola-ca (the federation CA), docs/DEPLOY.md
# The units start nothing until their configuration exists (ConditionPathExists).
#
#   scripts/package.sh [--out DIR] [--no-build]
# writes DIR/<package>_<version>_amd64.deb (default DIR: target/debian) and prints their paths.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"

out=target/debian build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: scripts/package.sh [--out DIR] [--no-build]" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb dpkg-shlibdeps; do
  command -v "$tool" >/dev/null || { echo "package.sh: $tool missing (Debian's dpkg-dev)" >&2; exit 1; }
done
if [ "$build" = 1 ]; then
  cargo build --release --quiet -p viola-overlay -p viola-depot -p viola-monitor -p viola-adaptmgr -p viola-common --bins
fi
# Where cargo put the build: CARGO_TARGET_DIR when set (relative: to the workspace, as for cargo).
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$root/$target ;; esac
bin=$target/release
base_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Debian versions must grow with every commit: the commit count since the start.
version="$base_version+git$(git rev-list --count HEAD 2>/dev/null || echo 0)"
arch=$(dpkg --print-architecture)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Package NAME DESCRIPTION EXTRA_DEPENDS BINARIES... (UNIT and EXAMPLE by naming convention).
package() {
  local name=$1 description=$2 extra=$3
  shift 3
  local d=$work/$name
  mkdir -p "$d/DEBIAN" "$d/usr/bin" "$d/usr/share/doc/$name"
  local b
  for b in "$@"; do
    [ -x "$bin/$b" ] || { echo "package.sh: $bin/$b missing: build first (or drop --no-build)" >&2; exit 1; }
    install -m 0755 "$bin/$b" "$d/usr/bin/$b"
    # The release profile keeps line tables for profiling; a package does not need them.
    strip --strip-debug "$d/usr/bin/$b"
  done
  local role=${name#viola-}
  if [ -f "packaging/systemd/$name.service" ]; then
    install -D -m 0644 "packaging/systemd/$name.service" "$d/lib/systemd/system/$name.service"
  fi
  if [ -f "packaging/etc/$role.toml" ]; then
    install -D -m 0644 "packaging/etc/$role.toml" "$d/etc/viola/$role.toml.example"
    echo "/etc/viola/$role.toml.example" >"$d/DEBIAN/conffiles"
  fi
  install -m 0644 README.md "$d/usr/share/doc/$name/README.md"
  cat >"$d/usr/share/doc/$name/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: viola
License: Apache-2.0
EOF
  # The shared libraries the binaries link, as versioned package dependencies.
  mkdir -p "$work/shlibs/debian"
  printf 'Source: viola\n\nPackage: %s\nArchitecture: any\n' "$name" >"$work/shlibs/debian/control"
  local shlibs
  shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O "${@/#/$d/usr/bin/}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
  local depends=$shlibs
  [ -z "$extra" ] || depends="$depends, $extra"
  cat >"$d/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: Viola developers <viola@example.invalid>
Section: net
Priority: optional
Depends: $depends
Homepage: https://example.invalid/viola
Description: $description
 Viola gives VMs spread over several sites one private virtual Ethernet, moves them
 between sites while they run without changing their addresses, assembles their disks
 at the destination from content-addressed parts before a deadline, and resizes or
 migrates them as load changes. See /usr/share/doc/viola-cli/DEPLOY.md.
EOF
  local unit=""
  [ ! -f "$d/lib/systemd/system/$name.service" ] || unit=$name.service
  {
    echo '#!/bin/sh'
    echo 'set -e'
    if [ "$name" = viola-depot ]; then
      # The depot runs as its own user; its state and the image directories it writes are its.
      echo 'if [ "$1" = configure ]; then'
      echo '  getent passwd viola >/dev/null || useradd --system --user-group --home-dir /var/lib/viola --shell /usr/sbin/nologin viola'
      echo '  install -d -o viola -g viola -m 0755 /var/lib/viola/depot /var/lib/viola/images'
      echo 'fi'
    fi
    echo 'install -d -m 0755 /etc/viola'
    if [ -n "$unit" ]; then
      # Enabled, but it starts only once /etc/viola/<role>.toml exists (ConditionPathExists).
      echo 'if [ "$1" = configure ] && [ -d /run/systemd/system ]; then'
      echo '  systemctl daemon-reload'
      echo "  systemctl enable $unit >/dev/null 2>&1 || true"
      echo "  systemctl try-restart $unit || true"
      echo 'fi'
    fi
  } >"$d/DEBIAN/postinst"
  chmod 0755 "$d/DEBIAN/postinst"
  if [ -n "$unit" ]; then
    cat >"$d/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop $unit || true
  [ "\$1" != remove ] || systemctl disable $unit >/dev/null 2>&1 || true
fi
EOF
    chmod 0755 "$d/DEBIAN/prerm"
  fi
  local deb=$out/${name}_${version}_${arch}.deb
  dpkg-deb --root-owner-group --build "$d" "$deb" >/dev/null
  echo "$deb"
}

package viola-overlay "Viola overlay daemon (violins over QUIC with mutual TLS)" "iproute2" viola-overlay
package viola-depot "Viola depot (content-addressed disk images, staged before deadlines)" "qemu-utils, passwd" viola-depot
package viola-monitor "Viola monitor (host and VM samples for the manager)" "" viola-monitor
package viola-adaptmgr "Viola adaptation manager (migrations, policies, violins, dashboard)" "" viola-adaptmgr
mkdir -p "$work/viola-cli/usr/share/doc/viola-cli"
cp docs/DEPLOY.md "$work/viola-cli/usr/share/doc/viola-cli/DEPLOY.md"
package viola-cli "Viola's command line: viola (violins, VMs, migrations) and viola-ca (the federation CA)" "" viola viola-ca
