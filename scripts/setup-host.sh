#!/usr/bin/env bash
# Install what vioasid needs on a Debian 12 or 13 host: QEMU 10.0 (never Debian 12's 7.2),
# busybox-static and cpio for the guest image, and the Python package with its test extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
. /etc/os-release
codename="${VERSION_CODENAME:-}"

need_qemu=1
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  ver=$(qemu-system-x86_64 --version | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/')
  [ "${ver:-0}" -ge 10 ] && need_qemu=0
fi

pkgs="busybox-static cpio zstd xz-utils gcc make"
if [ "$codename" = "bookworm" ] && [ $need_qemu -eq 1 ]; then
  # Add bookworm-backports on the same archive URI apt already uses.
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list | grep -v security | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri="http://deb.debian.org/debian"
    echo "setup: adding bookworm-backports from $uri"
    echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
  fi
fi
echo "setup: apt-get update"
$SUDO apt-get update -qq
if [ $need_qemu -eq 1 ]; then
  if [ "$codename" = "bookworm" ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
      --no-install-recommends qemu-system-x86
  else
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
  fi
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs
qemu-system-x86_64 --version | head -1
ver=$(qemu-system-x86_64 --version | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/')
if [ "${ver:-0}" -lt 10 ]; then
  echo "setup: QEMU >= 10 is required (found $ver)" >&2
  exit 1
fi
echo "setup: installing the Python package"
python3 -m pip install -q -e '.[test]'
# pyenv-managed Pythons reach new console scripts through shims: refresh them.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: building the test guest image (cached)"
python3 -m vioasid image build
