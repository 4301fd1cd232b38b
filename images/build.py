"""Build (or reuse) the test guest: Debian 6.12 kernel + busybox initramfs with guest_tests and
the guest driver ``vioasid_dma.ko`` (built here against the kernel's private headers).

``ensure_image()`` resolves the input versions with apt, and returns the cached image when one
with the same key exists (instant); otherwise it downloads the .debs (``apt-get download``, never
installs), extracts a PVH-bootable vmlinux and the needed modules, and packs the initramfs.
Cache: ``$XDG_CACHE_HOME/vioasid`` (default ``~/.cache/vioasid``)::

    debs/                       downloaded packages
    kernels/<kernel-key>/       vmlinuz, vmlinux (PVH), modules/<name>.ko, kernel.json
    headers/<abi>-<flavour>_<v>/ the kernel's Debian headers, unpacked (images/headers.py)
    driver/<module-key>/        vioasid_dma.ko built from images/driver/ (images/kmod.py)
    images/<image-key>/         initramfs.cpio.gz, image.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images.guest.patterns import tests_conf

from . import apt, cpio, headers, kernel, kmod, modules
from .atomic import atomic_dir as _atomic_dir
from .digest import files_digest
from .errors import ImageError

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
MODULES: tuple[str, ...] = ("virtio_blk",)
BUSYBOX_PACKAGE = "busybox-static"
DMA_SCRIPTS = ("dma_lib.sh", "pasid_tests.sh", "pasid_bench.sh", "pasid_loop.sh", "seed_tests.sh")
GUEST_SCRIPTS = ("init.sh", "disk_tests.sh", *DMA_SCRIPTS)
DRIVER_MODULE = kmod.MODULE  # built from images/driver/, loaded by /init after MODULES

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageInputs:
    """Everything the image depends on; the cache keys are hashes of these."""

    kernel_package: str
    kernel_version: str
    busybox_version: str
    modules: tuple[str, ...] = MODULES
    scripts_digest: str = ""
    driver_digest: str = ""
    builder_version: int = BUILDER_VERSION

    def kernel_key(self) -> str:
        return _digest(
            ["kernel", self.builder_version, self.kernel_package, self.kernel_version, self.modules]
        )

    def image_key(self) -> str:
        return _digest(
            [
                "image",
                self.kernel_key(),
                self.busybox_version,
                self.scripts_digest,
                self.driver_digest,
            ]
        )


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GuestImage:
    """A built test guest. ``kernel`` is the PVH vmlinux when available, else the bzImage."""

    kernel: Path
    initrd: Path
    kernel_version: str  # uname -r, e.g. 6.12.117+deb12-amd64
    kernel_package: str  # e.g. linux-image-6.12.117+deb12-amd64=6.12.117-1~deb12u1
    busybox_version: str
    bzimage: Path
    pvh: bool
    key: str
    modules: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("kernel", "initrd", "bzimage"):
            d[k] = str(d[k])
        d["modules"] = list(self.modules)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GuestImage:
        return cls(
            kernel=Path(d["kernel"]),
            initrd=Path(d["initrd"]),
            kernel_version=str(d["kernel_version"]),
            kernel_package=str(d["kernel_package"]),
            busybox_version=str(d["busybox_version"]),
            bzimage=Path(d["bzimage"]),
            pvh=bool(d["pvh"]),
            key=str(d["key"]),
            modules=tuple(d["modules"]),
        )


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vioasid`` or ``~/.cache/vioasid`` (``$VIOASID_CACHE`` overrides)."""
    if os.environ.get("VIOASID_CACHE"):
        return Path(os.environ["VIOASID_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vioasid"


def guest_scripts_dir() -> Path:
    return Path(__file__).resolve().parent / "guest"


def scripts_digest(scripts_dir: Path | None = None) -> str:
    """Hash of the guest scripts and the test table, so editing them rebuilds the initramfs."""
    d = scripts_dir or guest_scripts_dir()
    return files_digest(d, GUEST_SCRIPTS, "guest script", tests_conf().encode())


def apt_lists_fingerprint(lists_dir: Path = Path("/var/lib/apt/lists")) -> str:
    """Changes whenever ``apt-get update`` changed what apt knows."""
    h = hashlib.sha256()
    try:
        for p in sorted(lists_dir.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return h.hexdigest()[:16]


def kernel_package_name(version: str) -> str:
    """``6.12.117+deb12``, ``6.12.117+deb12-amd64`` or the package name → the package name."""
    name = version.strip()
    if not name.startswith("linux-image-"):
        name = f"linux-image-{name}"
    if not name.endswith("-amd64"):
        name += "-amd64"
    try:
        headers.split_image_name(name)
    except ImageError:
        raise ImageError(
            f"kernel version {version!r} is not a Debian kernel ABI name such as 6.12.117+deb12"
        ) from None
    return name


def resolve_packages(
    root: Path, kernel_version: str | None = None
) -> tuple[apt.DebPackage, apt.DebPackage]:
    """The kernel and busybox-static packages to use; apt is asked again only after its lists
    changed (apt-cache takes ~1 s per call here). ``kernel_version`` picks a kernel other than
    the newest 6.12 (``6.12.117+deb12``, the ``uname -r`` or the package name)."""
    wanted = kernel_package_name(kernel_version) if kernel_version else None
    memo = root / (f"resolved-{wanted}.json" if wanted else "resolved.json")
    fp = apt_lists_fingerprint()
    if fp:
        try:
            d = json.loads(memo.read_text())
            if d.get("fingerprint") == fp:
                return apt.DebPackage(*d["kernel"]), apt.DebPackage(*d["busybox"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    kpkg = apt.package(wanted) if wanted else apt.newest_kernel()
    bb = apt.package(BUSYBOX_PACKAGE)
    if fp:
        root.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(".tmp")
        data = {"fingerprint": fp, "kernel": [kpkg.name, kpkg.version]}
        data["busybox"] = [bb.name, bb.version]
        tmp.write_text(json.dumps(data))
        tmp.replace(memo)
    return kpkg, bb


def resolve_inputs(
    root: Path, kernel_version: str | None = None
) -> tuple[ImageInputs, apt.DebPackage, apt.DebPackage]:
    """Which kernel and busybox-static versions to use (no download) and the resulting inputs."""
    kpkg, bb = resolve_packages(root, kernel_version)
    inputs = ImageInputs(
        kernel_package=kpkg.name,
        kernel_version=kpkg.version,
        busybox_version=bb.version,
        scripts_digest=scripts_digest(),
        driver_digest=kmod.sources_digest(),
    )
    return inputs, kpkg, bb


def modules_dir(tree: Path, uname: str) -> Path | None:
    """``lib/modules/<uname>`` (Debian 12) or ``usr/lib/modules/<uname>`` (Debian 13)."""
    for cand in (tree / "lib" / "modules" / uname, tree / "usr" / "lib" / "modules" / uname):
        if cand.is_dir():
            return cand
    return None


def _build_kernel(
    inputs: ImageInputs, kpkg: apt.DebPackage, root: Path, progress: Progress
) -> Path:
    kdir = root / "kernels" / inputs.kernel_key()
    if (kdir / "kernel.json").is_file():
        return kdir
    deb = apt.download(kpkg, root / "debs", progress)

    def fill(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="vioasid-kernel-") as tmp:
            tree = apt.extract(deb, Path(tmp), progress)
            vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
            if not vmlinuz:
                raise ImageError(f"{deb.name} holds no boot/vmlinuz-*")
            uname = vmlinuz[0].name.removeprefix("vmlinuz-")
            shutil.copyfile(vmlinuz[0], out / "vmlinuz")
            progress("extracting the PVH vmlinux from the bzImage")
            pvh = True
            try:
                (out / "vmlinux").write_bytes(kernel.extract_vmlinux(vmlinuz[0].read_bytes()))
            except ImageError as exc:
                log.warning("PVH vmlinux unavailable (%s); booting the bzImage", exc)
                pvh = False
            progress(f"resolving modules {', '.join(inputs.modules)}")
            moddir = modules_dir(tree, uname)
            if moddir is None:
                raise ImageError(f"{deb.name} holds no lib/modules/{uname} (nor usr/lib/...)")
            order = modules.resolve(inputs.modules, modules.index(moddir))
            (out / "modules").mkdir()
            for name, ko in order:
                (out / "modules" / f"{name}.ko").write_bytes(ko)
            meta = {"uname": uname, "pvh": pvh, "modules": [n for n, _ in order]}
            (out / "kernel.json").write_text(json.dumps(meta, indent=1))

    _atomic_dir(kdir, fill)
    return kdir


def _busybox_binary(bb: apt.DebPackage, root: Path, progress: Progress) -> bytes:
    deb = apt.download(bb, root / "debs", progress)
    with tempfile.TemporaryDirectory(prefix="vioasid-busybox-") as tmp:
        tree = apt.extract(deb, Path(tmp), progress)
        for cand in (tree / "bin" / "busybox", tree / "usr" / "bin" / "busybox"):
            if cand.is_file():
                return cand.read_bytes()
    raise ImageError(f"{deb.name} holds no busybox binary")


def initramfs_entries(
    busybox: bytes, kos: Sequence[tuple[str, bytes]], scripts_dir: Path
) -> list[cpio.Entry]:
    """The initramfs tree: busybox, /init, modules, guest tests, /dev/console."""
    entries = [
        cpio.directory(d)
        for d in ("bin", "sbin", "dev", "etc", "etc/vioasid", "lib", "lib/modules", "proc")
    ]
    entries += [cpio.directory(d) for d in ("sys", "tmp", "guest_tests", "usr", "usr/bin")]
    entries += [
        cpio.chardev("dev/console", 5, 1),
        cpio.chardev("dev/null", 1, 3, 0o666),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("init", (scripts_dir / "init.sh").read_bytes(), 0o755),
        cpio.file("guest_tests/disk_tests.sh", (scripts_dir / "disk_tests.sh").read_bytes(), 0o755),
        *(
            cpio.file(f"guest_tests/{name}", (scripts_dir / name).read_bytes(), 0o755)
            for name in DMA_SCRIPTS
        ),
        cpio.file("guest_tests/tests.conf", tests_conf().encode()),
        cpio.file("etc/vioasid/modules", "".join(f"{n}\n" for n, _ in kos).encode()),
    ]
    entries += [cpio.file(f"lib/modules/{n}.ko", ko) for n, ko in kos]
    return entries


def ensure_image(
    progress: Progress | None = None,
    *,
    force: bool = False,
    root: Path | None = None,
    kernel_version: str | None = None,
) -> GuestImage:
    """The test guest image, built if it is not cached yet (or ``force``). ``kernel_version``
    selects another Debian kernel than the newest 6.12 (e.g. ``6.12.117+deb12``)."""
    say: Progress = progress or (lambda msg: log.info("%s", msg))
    root = root or cache_dir()
    inputs, kpkg, bb = resolve_inputs(root, kernel_version)
    idir = root / "images" / inputs.image_key()
    meta = idir / "image.json"
    if not force and meta.is_file():
        try:
            img = GuestImage.from_json(json.loads(meta.read_text()))
            if img.kernel.is_file() and img.initrd.is_file():
                return img
        except (ValueError, KeyError):
            pass
    t0 = time.monotonic()
    if force:
        shutil.rmtree(root / "kernels" / inputs.kernel_key(), ignore_errors=True)
    hdr = headers.ensure_headers(kpkg, root, say)  # first: a kernel without headers fails fast
    kdir = _build_kernel(inputs, kpkg, root, say)
    kmeta = json.loads((kdir / "kernel.json").read_text())
    kos = [(n, (kdir / "modules" / f"{n}.ko").read_bytes()) for n in kmeta["modules"]]
    if force:
        shutil.rmtree(root / "driver" / kmod.module_key(hdr), ignore_errors=True)
    kos.append((DRIVER_MODULE, kmod.ensure_module(hdr, root, say)))
    busybox = _busybox_binary(bb, root, say)
    say("packing the initramfs")
    scripts = guest_scripts_dir()

    def fill(out: Path) -> None:
        (out / "initramfs.cpio.gz").write_bytes(
            cpio.newc_gz(initramfs_entries(busybox, kos, scripts))
        )

    _atomic_dir(idir, fill)
    pvh = bool(kmeta["pvh"])
    img = GuestImage(
        kernel=kdir / ("vmlinux" if pvh else "vmlinuz"),
        initrd=idir / "initramfs.cpio.gz",
        kernel_version=str(kmeta["uname"]),
        kernel_package=kpkg.key,
        busybox_version=bb.version,
        bzimage=kdir / "vmlinuz",
        pvh=pvh,
        key=inputs.image_key(),
        modules=(*kmeta["modules"], DRIVER_MODULE),
    )
    meta.write_text(json.dumps(img.to_json(), indent=1))
    say(f"image ready in {time.monotonic() - t0:.1f}s: {idir}")
    return img
