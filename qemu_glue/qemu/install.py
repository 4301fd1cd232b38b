"""``vioasid qemu install``: Debian 13's QEMU 11.1 unpacked privately, run through its own loader.

Debian 12 cannot install Debian 13's ``qemu-system-x86`` (it needs Debian 13's libc), so this
module resolves it with a private apt configuration — its own sources list (``trixie`` and
``trixie-backports`` on the archive URI the host's apt already uses), its own lists and cache
directories and an *empty* dpkg status file, so apt downloads the package with every library it
needs and never touches the host's dpkg database. Each ``.deb`` is unpacked with ``dpkg-deb -x``
into one root, and a wrapper script runs ``ROOT/usr/bin/qemu-system-x86_64`` through
``ROOT``'s own ``ld-linux`` with ``--library-path`` and ``QEMU_MODULE_DIR`` (without it QEMU
loads the host's modules and aborts) and ``-L ROOT/usr/share/qemu`` (firmware). See
shared/design/qemu-notes.md, "Getting QEMU 11.1 from Debian's packages".

Layout under ``$VIOASID_CACHE/qemu`` (default ``~/.cache/vioasid/qemu``)::

    apt/                      the private apt state (lists, downloaded .debs)
    <version>/root/           the unpacked packages
    <version>/bin/qemu-system-x86_64   the wrapper (what vioasid runs)
    <version>/installed.json  written last: an install without it is never used

An interrupted install leaves only a ``<version>.partial-*`` folder, removed by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from images.atomic import atomic_dir

log = logging.getLogger(__name__)

PACKAGE = "qemu-system-x86"
SUITES = ("trixie", "trixie-backports")
TARGET_SUITE = "trixie-backports"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_URI = "http://deb.debian.org/debian"
MARKER = "installed.json"
WRAPPER = "qemu-system-x86_64"
MIN_VERSION = (11, 1)

Progress = Callable[[str], None]


class InstallError(Exception):
    """The private install failed; the message is one line for the user."""


@dataclass(frozen=True)
class Installed:
    """One complete private QEMU install."""

    version: str  # upstream version, e.g. 11.1.3
    debian_version: str  # e.g. 1:11.1.3+ds-2~bpo13+1
    root: Path
    wrapper: Path
    packages: int
    download_bytes: int

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "debian_version": self.debian_version,
            "path": str(self.wrapper),
            "root": str(self.root),
            "packages": self.packages,
            "download_bytes": self.download_bytes,
        }


def cache_dir() -> Path:
    """``$VIOASID_CACHE/qemu``, else ``$XDG_CACHE_HOME/vioasid/qemu`` (default ~/.cache)."""
    base = os.environ.get("VIOASID_CACHE")
    if base:
        return Path(base) / "qemu"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vioasid" / "qemu"


def version_tuple(version: str) -> tuple[int, ...]:
    """``11.1.3`` -> (11, 1, 3); anything unparsable -> ()."""
    m = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def upstream_version(debian_version: str) -> str:
    """``1:11.1.3+ds-2~bpo13+1`` -> ``11.1.3``."""
    v = debian_version.split(":", 1)[-1]
    m = re.match(r"(\d+(?:\.\d+)*)", v)
    if not m:
        raise InstallError(f"cannot read an upstream version from {debian_version!r}")
    return m.group(1)


def installed(base: Path | None = None) -> list[Installed]:
    """Every complete install in the cache, newest first."""
    base = base or cache_dir()
    found: list[Installed] = []
    if not base.is_dir():
        return found
    for d in base.iterdir():
        marker = d / MARKER
        if ".partial-" in d.name or not marker.is_file():
            continue
        try:
            meta = json.loads(marker.read_text())
            inst = Installed(
                version=str(meta["version"]),
                debian_version=str(meta["debian_version"]),
                root=d / "root",
                wrapper=d / "bin" / WRAPPER,
                packages=int(meta.get("packages", 0)),
                download_bytes=int(meta.get("download_bytes", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable QEMU install marker %s", marker)
            continue
        if inst.wrapper.is_file():
            found.append(inst)
    found.sort(key=lambda i: version_tuple(i.version), reverse=True)
    return found


def newest_installed(base: Path | None = None) -> Installed | None:
    """The newest complete private install (None when there is none)."""
    for inst in installed(base):
        if version_tuple(inst.version) >= MIN_VERSION:
            return inst
    return None


def archive_uri() -> str:
    """The Debian archive URI the host's apt already uses (never a security or other mirror)."""
    sources = Path("/etc/apt/sources.list.d")
    texts: list[str] = []
    for f in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        texts.append(f.read_text(errors="replace"))
    for line in "\n".join(texts).splitlines():
        line = line.strip()
        if line.startswith("URIs:") and "security" not in line:
            uris = line.split(":", 1)[1].split()
            if uris:
                return uris[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in line:
                uri = next((p for p in parts[1:] if "://" in p), None)
                if uri:
                    return uri
    return DEFAULT_URI


class PrivateApt:
    """apt-get/apt-cache with their own state under ``root`` and an empty dpkg status."""

    def __init__(self, root: Path, uri: str) -> None:
        self.root = root
        self.uri = uri

    def prepare(self) -> None:
        for d in (
            "etc/apt/apt.conf.d",
            "etc/apt/preferences.d",
            "etc/apt/sources.list.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        status = self.root / "var/lib/dpkg/status"
        status.write_text("")  # empty: apt resolves every dependency and never reads the host's
        signed = f" [signed-by={KEYRING}]" if KEYRING.is_file() else ""
        lines = [f"deb{signed} {self.uri} {suite} main" for suite in SUITES]
        (self.root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir": str(r),
            "Dir::State::status": str(r / "var/lib/dpkg/status"),
            "Dir::Etc::SourceList": str(r / "etc/apt/sources.list"),
            "Dir::Etc::SourceParts": str(r / "etc/apt/sources.list.d"),
            "Dir::Etc::Parts": str(r / "etc/apt/apt.conf.d"),
            "Dir::Etc::PreferencesParts": str(r / "etc/apt/preferences.d"),
            "APT::Architecture": "amd64",
            "APT::Architectures::": "amd64",
            "Debug::NoLocking": "1",
            "Acquire::Languages": "none",
            "APT::Install-Recommends": "false",
        }
        out: list[str] = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out

    def run(self, tool: str, args: Sequence[str], what: str) -> str:
        if shutil.which(tool) is None:
            raise InstallError(f"{tool} not found: vioasid qemu install needs Debian's apt")
        argv = [tool, *self.options(), *args]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        except OSError as exc:
            raise InstallError(f"{what}: cannot run {tool}: {exc}") from exc
        if out.returncode != 0:
            lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
            err = lines[-1] if lines else f"exit status {out.returncode}"
            raise InstallError(f"{what} failed: {err}")
        return out.stdout

    def candidate(self, package: str) -> str:
        out = self.run(
            "apt-cache", ["-t", TARGET_SUITE, "policy", package], f"apt-cache policy {package}"
        )
        for line in out.splitlines():
            if line.strip().startswith("Candidate:"):
                ver = line.split(":", 1)[1].strip()
                if ver and ver != "(none)":
                    return ver
        raise InstallError(f"{package} is not available from {', '.join(SUITES)} on {self.uri}")

    @property
    def archives(self) -> Path:
        return self.root / "var/cache/apt/archives"


def _wrapper_text(root: Path) -> str:
    lib = root / "usr/lib/x86_64-linux-gnu"
    return (
        "#!/bin/sh\n"
        "# vioasid: Debian's qemu-system-x86_64 run through its own loader (vioasid qemu install)\n"
        f'QEMU_MODULE_DIR="{lib}/qemu"; export QEMU_MODULE_DIR\n'
        f'exec "{lib}/ld-linux-x86-64.so.2" --library-path "{lib}" '
        f'"{root}/usr/bin/qemu-system-x86_64" -L "{root}/usr/share/qemu" "$@"\n'
    )


def _clean_partials(base: Path) -> None:
    for d in base.glob("*.partial-*"):
        shutil.rmtree(d, ignore_errors=True)


def install(
    *, force: bool = False, progress: Progress | None = None, base: Path | None = None
) -> Installed:
    """Make sure a private QEMU >= 11.1 is in the cache (instant when it already is)."""
    base = base or cache_dir()
    say = progress or (lambda _msg: None)
    if not force:
        have = newest_installed(base)
        if have is not None:
            return have
    base.mkdir(parents=True, exist_ok=True)
    _clean_partials(base)
    apt = PrivateApt(base / "apt", archive_uri())
    apt.prepare()
    t0 = time.monotonic()
    say(f"resolving {PACKAGE} from {' + '.join(SUITES)} ({apt.uri}) with a private apt")
    apt.run("apt-get", ["update", "-q"], "apt-get update (private)")
    debver = apt.candidate(PACKAGE)
    version = upstream_version(debver)
    if version_tuple(version) < MIN_VERSION:
        raise InstallError(f"{TARGET_SUITE} offers {PACKAGE} {debver}; vioasid needs >= 11.1")
    final = base / version
    if final.is_dir() and (final / MARKER).is_file() and not force:
        return next(i for i in installed(base) if i.root == final / "root")
    for old in apt.archives.glob("*.deb"):
        old.unlink()
    say(f"downloading {PACKAGE} {debver} with its libraries")
    apt.run(
        "apt-get",
        ["install", "-y", "-q", "--download-only", "-t", TARGET_SUITE, f"{PACKAGE}={debver}"],
        f"apt-get download of {PACKAGE}",
    )
    debs = sorted(apt.archives.glob("*.deb"))
    if not debs:
        raise InstallError("apt downloaded no packages")
    size = sum(d.stat().st_size for d in debs)
    say(f"unpacking {len(debs)} packages ({size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f} s")
    final_root = final / "root"

    def fill(partial: Path) -> None:
        root = partial / "root"
        root.mkdir()
        for i, deb in enumerate(debs, 1):
            out = subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise InstallError(f"dpkg-deb -x {deb.name} failed: {out.stderr.strip()[-200:]}")
            if i % 30 == 0:
                say(f"unpacked {i}/{len(debs)}")
        (partial / "bin").mkdir()
        wrapper = partial / "bin" / WRAPPER
        wrapper.write_text(_wrapper_text(final_root))
        wrapper.chmod(0o755)

    atomic_dir(final, fill, prefix=f"{version}.partial-")
    meta = {
        "version": version,
        "debian_version": debver,
        "packages": len(debs),
        "download_bytes": size,
        "suites": list(SUITES),
        "uri": apt.uri,
    }
    # Check that it runs before declaring it installed (the marker is what makes it usable).
    argv = [str(final / "bin" / WRAPPER), "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0 or "QEMU emulator version" not in out.stdout:
        shutil.rmtree(final, ignore_errors=True)
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"the unpacked QEMU {version} does not run: {err}")
    (final / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    for d in debs:
        d.unlink()
    say(f"QEMU {version} ready in {time.monotonic() - t0:.1f} s: {final / 'bin' / WRAPPER}")
    inst = next(i for i in installed(base) if i.root == final / "root")
    return inst
