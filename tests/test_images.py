"""Image builder logic without apt or QEMU: cache keys, cpio, bzImage/ELF parsing, modules."""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import struct
import subprocess
from pathlib import Path

import pytest

from images import cpio, kernel, modules
from images.build import GUEST_SCRIPTS, GuestImage, ImageInputs, initramfs_entries, scripts_digest
from images.errors import ImageError

BASE = ImageInputs("linux-image-6.12.1+deb12-amd64", "6.12.1-1", "1:1.35.0-4")


def test_cache_keys_follow_inputs() -> None:
    assert BASE.image_key() == ImageInputs(*BASE.__dict__.values()).image_key()
    newer_kernel = ImageInputs("linux-image-6.12.2+deb12-amd64", "6.12.2-1", "1:1.35.0-4")
    assert newer_kernel.kernel_key() != BASE.kernel_key()
    assert newer_kernel.image_key() != BASE.image_key()
    other_bb = ImageInputs(BASE.kernel_package, BASE.kernel_version, "1:1.36.0-1")
    assert other_bb.kernel_key() == BASE.kernel_key()  # the kernel part is reused
    assert other_bb.image_key() != BASE.image_key()
    scripts = dataclasses.replace(BASE, scripts_digest="x")
    assert scripts.kernel_key() == BASE.kernel_key() and scripts.image_key() != BASE.image_key()
    mods = ImageInputs(BASE.kernel_package, BASE.kernel_version, "1:1.35.0-4", ("a", "b"))
    assert mods.kernel_key() != BASE.kernel_key()
    drv = dataclasses.replace(BASE, driver_digest="y")
    assert drv.kernel_key() == BASE.kernel_key() and drv.image_key() != BASE.image_key()
    rebuilt = dataclasses.replace(BASE, builder_version=99)
    assert rebuilt.kernel_key() != BASE.kernel_key()


def _scripts(d: Path, **text: str) -> None:
    """Every guest script in ``d``: "#!/bin/sh\n" plus ``text[stem]`` where given."""
    for name in GUEST_SCRIPTS:
        (d / name).write_text("#!/bin/sh\n" + text.get(name.removesuffix(".sh"), ""))


def test_scripts_digest_tracks_script_edits(tmp_path: Path) -> None:
    _scripts(tmp_path)
    d1 = scripts_digest(tmp_path)
    (tmp_path / "disk_tests.sh").write_text("c")
    assert scripts_digest(tmp_path) != d1
    d2 = scripts_digest(tmp_path)
    (tmp_path / "pasid_tests.sh").write_text("q")
    assert scripts_digest(tmp_path) != d2
    (tmp_path / "init.sh").unlink()
    with pytest.raises(ImageError, match=r"init\.sh"):
        scripts_digest(tmp_path)


def test_guest_image_json_round_trip(tmp_path: Path) -> None:
    img = GuestImage(
        tmp_path / "k", tmp_path / "i", "6.12", "pkg=1", "1", tmp_path / "bz", True, "k", ("m",)
    )
    assert GuestImage.from_json(img.to_json()) == img


def test_cpio_matches_gnu_cpio(tmp_path: Path) -> None:
    entries = [
        cpio.directory("bin"),
        cpio.file("bin/hello", b"hi there\n", 0o755),
        cpio.symlink("bin/sh", "hello"),
        cpio.chardev("console", 5, 1),
    ]
    (tmp_path / "a.cpio").write_bytes(cpio.newc(entries))
    if subprocess.run(["which", "cpio"], capture_output=True).returncode != 0:
        pytest.skip("cpio not installed")
    listing = subprocess.run(
        ["cpio", "-itv", "-F", str(tmp_path / "a.cpio")], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [ln.split()[-1] for ln in lines[:2]] == ["bin", "bin/hello"]
    assert "bin/sh -> hello" in listing.stdout
    assert lines[3].startswith("crw") and "5," in lines[3]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--no-absolute-filenames", "-F", str(tmp_path / "a.cpio"), "bin/hello"],
        cwd=out,
        capture_output=True,
        check=True,
    )
    assert (out / "bin/hello").read_bytes() == b"hi there\n"
    assert gzip.decompress(cpio.newc_gz(entries)) == cpio.newc(entries)


def test_initramfs_holds_init_modules_and_test_table(tmp_path: Path) -> None:
    _scripts(tmp_path, pasid_tests="# pasid\n", dma_lib="# lib\n", pasid_loop="# loop\n")
    kos = [("dep", b"D"), ("virtio_blk", b"V"), ("vioasid_dma", b"K")]
    entries = initramfs_entries(b"BB", kos, tmp_path)
    by = {e.path: e for e in entries}
    assert by["init"].data == b"#!/bin/sh\n" and by["init"].mode & 0o111
    assert by["etc/vioasid/modules"].data == b"dep\nvirtio_blk\nvioasid_dma\n"
    assert by["lib/modules/virtio_blk.ko"].data == b"V"
    assert by["lib/modules/vioasid_dma.ko"].data == b"K"
    assert by["guest_tests/pasid_tests.sh"].data.endswith(b"# pasid\n")
    assert by["guest_tests/dma_lib.sh"].data.endswith(b"# lib\n")
    assert by["guest_tests/pasid_loop.sh"].data.endswith(b"# loop\n")
    assert by["dev/console"].rdev == (5, 1)
    assert b"large " in by["guest_tests/tests.conf"].data


def _elf_with_notes(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        blob += struct.pack("<III", len(n), len(desc), ntype)
        blob += n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(blob), len(blob), 4)
    return bytes(ehdr) + phdr + blob


def _bzimage(payload: bytes, size: int) -> bytes:
    setup_sects = 4
    bz = bytearray((setup_sects + 1) * 512)
    bz[0x1F1] = setup_sects
    bz[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", bz, 0x206, 0x20F)
    struct.pack_into("<II", bz, 0x248, 0, len(payload) + 4)
    return bytes(bz) + payload + struct.pack("<I", size)


def test_extract_vmlinux_xz_with_pvh_note() -> None:
    elf = _elf_with_notes([(b"GNU", 3, b"abcd"), (b"Xen", 18, b"\0\0\x20\0")])
    bz = _bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf))
    assert kernel.extract_vmlinux(bz) == elf


def test_extract_vmlinux_refuses_non_pvh_and_junk() -> None:
    elf = _elf_with_notes([(b"Xen", 6, b"linux\0\0\0")])
    bz = _bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf))
    with pytest.raises(ImageError, match="PHYS32_ENTRY"):
        kernel.extract_vmlinux(bz)
    with pytest.raises(ImageError, match="compression"):
        kernel.extract_vmlinux(_bzimage(b"\x01\x02\x03\x04\x05\x06\x07\x08", 8))
    with pytest.raises(ImageError, match="bzImage"):
        kernel.extract_vmlinux(b"\0" * 4096)


def _ko(deps: str) -> bytes:
    return b"\x7fELF junk\0name=x\0depends=" + deps.encode() + b"\0vermagic=6.12\0"


def test_modules_resolve_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/virtio_blk.ko.xz").write_bytes(lzma.compress(_ko("dep-one,dep2")))
    (tmp_path / "a/dep-one.ko.xz").write_bytes(lzma.compress(_ko("dep2")))
    (tmp_path / "dep2.ko").write_bytes(_ko(""))
    idx = modules.index(tmp_path)
    assert set(idx) == {"virtio_blk", "dep_one", "dep2"}
    order = modules.resolve(["virtio_blk"], idx)
    assert [n for n, _ in order] == ["dep2", "dep_one", "virtio_blk"]
    assert order[-1][1] == _ko("dep-one,dep2")  # stored decompressed


def test_modules_missing_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.ko").write_bytes(_ko("b"))
    (tmp_path / "b.ko").write_bytes(_ko("a"))
    (tmp_path / "c.ko").write_bytes(_ko("nope"))
    idx = modules.index(tmp_path)
    with pytest.raises(ImageError, match="cycle"):
        modules.resolve(["a"], idx)
    with pytest.raises(ImageError, match="nope"):
        modules.resolve(["c"], idx)


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from images import apt

    monkeypatch.setattr("images.apt.shutil.which", lambda _name: None)
    with pytest.raises(ImageError, match=r"zstd not found: install it with 'apt-get install zstd'"):
        apt.require_tool("zstd", "zstd")
    with pytest.raises(ImageError, match="apt-get install apt"):
        apt.newest_kernel()


def test_deb_filename_escapes_the_epoch() -> None:
    from images.apt import DebPackage

    pkg = DebPackage("busybox-static", "1:1.35.0-4+deb12u1+b1")
    assert pkg.deb_filename() == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
    assert pkg.key == "busybox-static=1:1.35.0-4+deb12u1+b1"
