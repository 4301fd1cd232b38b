#!/usr/bin/env bash
# Set up a Debian 12 or 13 host for vioasid: system packages, QEMU 11.1 (the default) and 10.0,
# a project virtual environment (.venv) with the package and its test extras, a `vioasid`
# launcher on PATH, and the test guest image. Idempotent: a second run only checks.
#
#   Debian 13: QEMU 11.1 from trixie-backports (apt), system Python 3.13 in .venv.
#   Debian 12: QEMU 10.0 from bookworm-backports (apt) and QEMU 11.1 unpacked privately by
#              `vioasid qemu install` (Debian 13's packages, never the host's dpkg database).
#
# Never installs guest kernel, header or firmware packages into the host; apt only ever takes
# packages from the suites named here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
. /etc/os-release
codename="${VERSION_CODENAME:-}"
say() { echo "setup: $*"; }

case "$codename" in
  bookworm | trixie) ;;
  *) say "warning: untested distribution '${PRETTY_NAME:-$codename}' (Debian 12 or 13 expected)" ;;
esac

# The Debian archive URI apt already uses (deb822 .sources first, then sources.list).
archive_uri() {
  local uri=""
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | head -1 | awk '{print $2}') || true
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list | grep -v security | head -1 | awk '{print $2}') || true
  [ -n "$uri" ] || uri="http://deb.debian.org/debian"
  echo "$uri"
}

add_backports() {  # $1 = suite, e.g. bookworm-backports
  if ! grep -rqs -- "$1" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    local uri
    uri=$(archive_uri)
    say "adding $1 from $uri"
    echo "deb $uri $1 main" | $SUDO tee "/etc/apt/sources.list.d/$1.list" >/dev/null
    # Backports stay opt-in (-t): apt never upgrades the host from them on its own.
  fi
}

qemu_major() {  # major version of a qemu binary, 0 when absent
  if [ -x "$1" ]; then
    "$1" --version 2>/dev/null | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/'
  else
    echo 0
  fi
}

case "$codename" in
  bookworm) add_backports bookworm-backports ;;  # QEMU 10.0 and the 6.12 guest kernel
  trixie) add_backports trixie-backports ;;      # QEMU 11.1
esac

say "apt-get update"
$SUDO apt-get update -qq
pkgs="python3 python3-venv python3-dev busybox-static cpio zstd xz-utils gcc make"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs

sysqemu=/usr/bin/qemu-system-x86_64
case "$codename" in
  trixie)
    if [ "$(qemu_major $sysqemu)" -lt 11 ]; then
      say "installing QEMU 11.1 from trixie-backports"
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t trixie-backports \
        --no-install-recommends qemu-system-x86
    fi
    ;;
  bookworm)
    if [ "$(qemu_major $sysqemu)" -lt 10 ]; then
      say "installing QEMU 10.0 from bookworm-backports (Debian 12's own 7.2 is too old)"
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
        --no-install-recommends qemu-system-x86
    fi
    ;;
  *)
    if [ "$(qemu_major $sysqemu)" -lt 10 ]; then
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
    fi
    ;;
esac
[ -x $sysqemu ] && say "system QEMU: $($sysqemu --version | head -1)"

# The project's virtual environment (system Pythons are externally managed, PEP 668).
py=$(command -v python3)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  say "creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi
say "installing the Python package into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

# A `vioasid` launcher on PATH that runs this checkout's .venv.
bindir=/usr/local/bin
[ -w "$bindir" ] || { bindir="$HOME/.local/bin"; mkdir -p "$bindir"; }
cat >"$bindir/vioasid.tmp" <<EOF
#!/bin/sh
# vioasid launcher written by $repo/scripts/setup-host.sh
exec "$repo/.venv/bin/python" -m vioasid "\$@"
EOF
chmod 755 "$bindir/vioasid.tmp"
mv -f "$bindir/vioasid.tmp" "$bindir/vioasid"
# An older vioasid installed into the Python on PATH (pyenv, pip --user) would shadow it.
if "$py" -m pip show vioasid >/dev/null 2>&1 && [ "$("$py" -c 'import sys; print(sys.prefix)')" != "$repo/.venv" ]; then
  say "removing an older vioasid from $py so the launcher is found"
  "$py" -m pip uninstall -y -q vioasid >/dev/null 2>&1 || true
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
fi
hash -r
found=$(command -v vioasid || true)
if [ "$found" != "$bindir/vioasid" ]; then
  say "warning: 'vioasid' on PATH is ${found:-missing}; the launcher is $bindir/vioasid"
fi

# QEMU 11.1 by default: the system's where it is >= 11.1, else the private copy.
if [ "$(qemu_major $sysqemu)" -lt 11 ]; then
  say "QEMU 11.1 (private copy of Debian 13's packages)"
  "$bindir/vioasid" qemu install
fi
"$bindir/vioasid" qemu path

say "building the test guest image (cached)"
"$bindir/vioasid" image build
