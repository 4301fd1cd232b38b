"""Build the guest driver (``images/driver/``, ``vioasid_dma.ko``) against private headers.

The host's ``make`` and ``gcc`` run kbuild's external-module build (``make -C <kdir> M=<dir>
modules``) in a temporary copy of the sources. The compiler is the one the headers name in
``.kernelvariables`` (Debian 12: ``x86_64-linux-gnu-gcc-12``) when the host has it, else plain
``gcc``. BTF for the module is skipped (``CONFIG_DEBUG_INFO_BTF_MODULES=``: it needs ``pahole``
and nothing here reads module BTF) and its debug info stripped (``objcopy --strip-debug``).
Results are cached by (headers, sources) under ``<root>/driver/<key>/``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .apt import require_tool
from .atomic import atomic_dir
from .digest import files_digest
from .errors import ImageError
from .headers import KernelHeaders

log = logging.getLogger(__name__)

MODULE = "vioasid_dma"
SOURCES = ("vioasid_dma.c", "vioasid_dma_cmd.h", "Kbuild", "Makefile")
BUILD_TIMEOUT_S = 600
_GCC_RE = re.compile(r"\bgcc-(\d+)\b")

Progress = Callable[[str], None]


def driver_dir() -> Path:
    """``images/driver`` next to this file."""
    return Path(__file__).resolve().parent / "driver"


def sources_digest(src: Path | None = None) -> str:
    """Hash of the driver sources, so editing them rebuilds the module and the image."""
    return files_digest(src or driver_dir(), SOURCES, "driver source")


def compiler_args(kdir: Path) -> list[str]:
    """``CC=gcc`` when the compiler the headers name is not on the host, else nothing."""
    try:
        text = (kdir / ".kernelvariables").read_text()
    except OSError:
        return []
    m = _GCC_RE.search(text)
    if m is None:
        return []
    n = m.group(1)
    if shutil.which(f"x86_64-linux-gnu-gcc-{n}") or shutil.which(f"gcc-{n}"):
        return []
    log.warning("the headers want gcc-%s, which is not installed: building with gcc", n)
    return ["CC=gcc"]


def make_command(kdir: Path, moddir: Path) -> list[str]:
    return [
        "make",
        "-s",
        "-C",
        str(kdir),
        f"M={moddir}",
        "CONFIG_DEBUG_INFO_BTF_MODULES=",
        *compiler_args(kdir),
        "modules",
    ]


def compile_module(headers: KernelHeaders, src: Path, work: Path) -> Path:
    """Copy ``src`` into ``work`` and build it there; the path of the ``.ko``."""
    require_tool("make", "make")
    require_tool("gcc", "gcc")
    for name in SOURCES:
        shutil.copyfile(src / name, work / name)
    argv = make_command(headers.kdir, work)
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"building {MODULE}.ko: {exc}") from exc
    ko = work / f"{MODULE}.ko"
    if out.returncode != 0 or not ko.is_file():
        lines = (out.stderr + out.stdout).strip().splitlines()
        detail = " | ".join(lines[-6:]) or "(no output)"
        if "GLIBC_" in detail:
            detail += " (headers from a newer Debian need that Debian's toolchain)"
        raise ImageError(f"building {MODULE}.ko against {headers.kdir} failed: {detail}")
    if out.stderr.strip():
        log.info("%s build: %s", MODULE, out.stderr.strip())
    strip = shutil.which("objcopy")
    if strip:  # the debug info is ~3/4 of the module; the initramfs does not need it
        subprocess.run([strip, "--strip-debug", str(ko)], capture_output=True, check=False)
    return ko


def module_key(headers: KernelHeaders, src: Path | None = None) -> str:
    return hashlib.sha256(f"{headers.key}\0{sources_digest(src)}".encode()).hexdigest()[:16]


def ensure_module(
    headers: KernelHeaders, root: Path, progress: Progress | None = None, src: Path | None = None
) -> bytes:
    """The built ``vioasid_dma.ko`` for ``headers`` (built once per headers + sources)."""
    source = src or driver_dir()
    out_dir = root / "driver" / module_key(headers, source)
    ko = out_dir / f"{MODULE}.ko"
    if ko.is_file():
        return ko.read_bytes()
    if progress:
        progress(f"building {MODULE}.ko against {headers.kdir.name}")

    def fill(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="vioasid-kmod-") as tmp:
            built = compile_module(headers, source, Path(tmp))
            shutil.copyfile(built, out / f"{MODULE}.ko")

    atomic_dir(out_dir, fill)
    return ko.read_bytes()
