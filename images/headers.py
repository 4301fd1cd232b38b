"""The guest kernel's Debian headers, downloaded and unpacked privately (never installed).

An out-of-tree module for ``linux-image-<abi>-amd64`` is built against three packages of the same
Debian version: ``linux-headers-<abi>-amd64`` (the flavour's ``.config``, ``Module.symvers``,
generated headers; ``scripts`` and ``tools`` are relative symlinks into the kbuild package),
``linux-headers-<abi>-common`` (the source headers and the top ``Makefile``; architecture
``all``) and ``linux-kbuild-<abi>`` (``modpost``, ``objtool``, ``fixdep``). The flavour tree's
one-line ``Makefile`` includes the ``-common`` tree by absolute path (``/usr/src/...``); it is
rewritten to a path relative to itself, so the unpacked tree works wherever it lies. Debian 12
and 13 lay the three out the same way (``usr/src`` and ``usr/lib/linux-kbuild-<abi>``).

Cache: ``<root>/headers/<abi>_<debian-version>/`` with ``usr/...`` and ``headers.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import apt
from .atomic import atomic_dir
from .errors import ImageError

_IMAGE_RE = re.compile(r"^linux-image-(?P<abi>\d+\.\d+\.\d+\+deb\d+(?:\.\d+)?)-(?P<flavour>\w+)$")
_INCLUDE_RE = re.compile(r"^include\s+(?P<path>\S+)\s*$")
_RELOCATED = "include $(dir $(lastword $(MAKEFILE_LIST)))"


@dataclass(frozen=True)
class KernelHeaders:
    """An unpacked header tree: ``kdir`` is what ``make -C`` wants."""

    root: Path
    abi: str  # e.g. 6.12.117+deb12
    flavour: str  # e.g. amd64
    version: str  # Debian version of the packages, e.g. 6.12.117-1~deb12u1

    @property
    def kdir(self) -> Path:
        return self.root / "usr" / "src" / f"linux-headers-{self.abi}-{self.flavour}"

    @property
    def key(self) -> str:
        return f"{self.abi}-{self.flavour}_{self.version}"


def split_image_name(name: str) -> tuple[str, str]:
    """``linux-image-6.12.117+deb12-amd64`` → (``6.12.117+deb12``, ``amd64``)."""
    m = _IMAGE_RE.match(name)
    if not m:
        raise ImageError(f"{name} is not a linux-image-<abi>-<flavour> package name")
    return m.group("abi"), m.group("flavour")


def header_packages(kernel: apt.DebPackage) -> list[apt.DebPackage]:
    """The three packages the module build needs, at the kernel package's exact version."""
    abi, flavour = split_image_name(kernel.name)
    v = kernel.version
    return [
        apt.DebPackage(f"linux-headers-{abi}-{flavour}", v),
        apt.DebPackage(f"linux-headers-{abi}-common", v, arch="all"),
        apt.DebPackage(f"linux-kbuild-{abi}", v),
    ]


def relocate_makefile(kdir: Path) -> None:
    """Point the flavour tree's ``include /usr/src/<common>/Makefile`` at the unpacked copy.

    The new line finds the ``-common`` tree next to this Makefile's own directory, whatever the
    current directory of ``make`` is.
    """
    mk = kdir / "Makefile"
    try:
        lines = mk.read_text().splitlines()
    except OSError as exc:
        raise ImageError(f"header tree {kdir} has no Makefile: {exc}") from exc
    out: list[str] = []
    for line in lines:
        m = _INCLUDE_RE.match(line)
        if m and m.group("path").startswith("/usr/src/"):
            common = Path(m.group("path")).relative_to("/usr/src")
            line = f"{_RELOCATED}../{common}"
        out.append(line)
    if out == lines:
        if not any(_INCLUDE_RE.match(ln) or ln.startswith(_RELOCATED) for ln in lines):
            raise ImageError(f"{mk} includes no -common Makefile (unexpected header layout)")
        return
    mk.write_text("\n".join(out) + "\n")


def ensure_headers(
    kernel: apt.DebPackage, root: Path, progress: apt.Progress | None = None
) -> KernelHeaders:
    """The unpacked headers for ``kernel`` (downloaded and unpacked once, then reused)."""
    abi, flavour = split_image_name(kernel.name)
    hdr = KernelHeaders(
        root / "headers" / f"{abi}-{flavour}_{kernel.version}", abi, flavour, kernel.version
    )
    if (hdr.root / "headers.json").is_file() and (hdr.kdir / "Makefile").is_file():
        return hdr
    pkgs = header_packages(kernel)
    missing = [p.name for p in pkgs if not (root / "debs" / p.deb_filename()).is_file()]
    if missing:
        known = apt.candidates(missing)
        if absent := [name for name in missing if name not in known]:
            raise ImageError(
                f"{', '.join(absent)} not available from apt: vioasid_dma.ko cannot be built "
                f"for {kernel.name} (pick a kernel whose headers apt has, or run apt-get update)"
            )
    debs = [apt.download(p, root / "debs", progress) for p in pkgs]

    def fill(out: Path) -> None:
        for deb in debs:
            apt.extract(deb, out, progress)
        tmp_hdr = KernelHeaders(out, abi, flavour, kernel.version)
        if not tmp_hdr.kdir.is_dir():
            raise ImageError(f"{debs[0].name} holds no usr/src/linux-headers-{abi}-{flavour}")
        relocate_makefile(tmp_hdr.kdir)
        meta = {"abi": abi, "flavour": flavour, "version": kernel.version}
        meta |= {"packages": " ".join(p.key for p in pkgs)}
        (out / "headers.json").write_text(json.dumps(meta, indent=1))

    atomic_dir(hdr.root, fill)
    return hdr


def remove_headers(root: Path) -> None:
    """Drop every unpacked header tree (``vioasid image build --force``)."""
    shutil.rmtree(root / "headers", ignore_errors=True)
