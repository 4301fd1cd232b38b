"""Find and fetch Debian packages with apt (``apt-cache``, ``apt-get download``), never install.

The guest kernel is the newest ``linux-image-6.12.<n>+deb<m>[.<k>]-amd64`` apt can fetch: from
bookworm-backports/-security on Debian 12, from the main suite on Debian 13.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageError

KERNEL_SERIES = "6.12"
_KERNEL_RE = re.compile(r"^linux-image-(\d+\.\d+\.\d+)\+deb\d+(?:\.\d+)?-amd64$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str  # Debian version, e.g. 6.12.117-1~deb12u1
    arch: str = "amd64"  # "all" for architecture-independent packages (the -common headers)

    @property
    def key(self) -> str:
        return f"{self.name}={self.version}"

    def deb_filename(self) -> str:
        """The file name ``apt-get download`` writes (``:`` of an epoch as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} not found: install it with 'apt-get install {package}'")
    return path


def _run(argv: Sequence[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ImageError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ImageError(f"{what} failed: {err}")
    return out.stdout


def candidates(names: Sequence[str]) -> dict[str, str]:
    """Candidate version per package name (packages apt cannot fetch are left out)."""
    require_tool("apt-cache", "apt")
    out = _run(["apt-cache", "policy", *names], "apt-cache policy")
    result: dict[str, str] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            ver = line.split(":", 1)[1].strip()
            if ver and ver != "(none)":
                result[current] = ver
    return result


def compare_versions(a: str, b: str) -> int:
    """Debian version order via ``dpkg --compare-versions`` (-1, 0, 1)."""
    if a == b:
        return 0
    rc = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
    return -1 if rc == 0 else 1


def newest_kernel(series: str = KERNEL_SERIES) -> DebPackage:
    """The newest fetchable ``linux-image-<series>.*-amd64`` (generic flavour, signed)."""
    require_tool("apt-cache", "apt")
    names = _run(["apt-cache", "pkgnames", f"linux-image-{series}."], "apt-cache pkgnames")
    wanted = [n for n in names.split() if _KERNEL_RE.match(n)]
    if not wanted:
        raise ImageError(
            f"no linux-image-{series}.*-amd64 package known to apt: on Debian 12 enable "
            "bookworm-backports and run 'apt-get update' (scripts/setup-host.sh does both)"
        )
    cands = candidates(wanted)
    if not cands:
        raise ImageError(f"no linux-image-{series}.*-amd64 candidate: run 'apt-get update'")
    order = functools.cmp_to_key(compare_versions)
    best = max(cands, key=lambda name: order(cands[name]))
    return DebPackage(best, cands[best])


def package(name: str) -> DebPackage:
    """The candidate version of one package."""
    cands = candidates([name])
    if name not in cands:
        raise ImageError(f"package {name} is not available from apt: run 'apt-get update'")
    return DebPackage(name, cands[name])


def download(pkg: DebPackage, dest: Path, progress: Progress | None = None) -> Path:
    """``apt-get download`` the exact version into ``dest`` (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / pkg.deb_filename()
    if target.is_file() and target.stat().st_size > 0:
        return target
    require_tool("apt-get", "apt")
    if progress:
        progress(f"downloading {pkg.key}")
    _run_in(["apt-get", "download", "-q", pkg.key], dest, f"apt-get download {pkg.key}")
    if not target.is_file():
        found = sorted(dest.glob(f"{pkg.name}_*.deb"))
        if not found:
            raise ImageError(f"apt-get download {pkg.key} wrote no .deb into {dest}")
        return found[-1]
    return target


def _run_in(argv: Sequence[str], cwd: Path, what: str) -> None:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ImageError(f"{what} failed: {err}")


def extract(deb: Path, dest: Path, progress: Progress | None = None) -> Path:
    """``dpkg-deb -x`` a package into ``dest``."""
    require_tool("dpkg-deb", "dpkg")
    if progress:
        progress(f"unpacking {deb.name}")
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
    return dest
