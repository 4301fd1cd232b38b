"""Kernel modules for the initramfs: read ``.modinfo``, resolve ``depends=`` into load order.

Debian ships modules as ``.ko.xz`` without modules.dep in the image package; each module's
``.modinfo`` section holds ``depends=a,b``. Modules are decompressed on the host (Python lzma) so
the guest's busybox ``insmod`` loads plain ``.ko`` files.
"""

from __future__ import annotations

import lzma
from collections.abc import Iterable
from pathlib import Path

from .errors import ImageError

MAX_MODULES = 64


def module_name(path: Path) -> str:
    """``virtio-rng.ko.xz`` → ``virtio_rng`` (the kernel's name for it)."""
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix in (".zst", ".gz"):
        raise ImageError(f"{path.name}: only .ko and .ko.xz modules are supported")
    return data


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """``key=value`` strings of a module (all values per key), scanned from its bytes."""
    info: dict[str, list[str]] = {}
    for chunk in ko.split(b"\0"):
        for key in (b"depends=", b"name=", b"vermagic=", b"alias=", b"softdep="):
            if chunk.startswith(key):
                k = key[:-1].decode()
                info.setdefault(k, []).append(chunk[len(key) :].decode("utf-8", "replace"))
    return info


def depends(ko: bytes) -> list[str]:
    deps: list[str] = []
    for value in modinfo(ko).get("depends", []):
        deps += [d.replace("-", "_") for d in value.split(",") if d]
    return deps


def index(modules_dir: Path) -> dict[str, Path]:
    """Module name → file, for every ``*.ko*`` under ``modules_dir``."""
    return {module_name(p): p for p in modules_dir.rglob("*.ko*")}


def resolve(wanted: Iterable[str], modules: dict[str, Path]) -> list[tuple[str, bytes]]:
    """(name, decompressed .ko) for ``wanted`` plus dependencies, dependencies first."""
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"module dependency cycle at {name}")
        if name not in modules:
            raise ImageError(f"kernel module {name} not found in the kernel package")
        if len(done) >= MAX_MODULES:
            raise ImageError("too many modules to resolve")
        visiting.add(name)
        ko = read_module(modules[name])
        for dep in depends(ko):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append((name, ko))

    for name in wanted:
        visit(name.replace("-", "_"))
    return order
