"""The guest driver (images/driver/): its command parser in a userspace harness, the private
header unpack, and a real module build against the guest kernel's Debian headers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from images import apt, headers, kmod, modules
from images.build import cache_dir, kernel_package_name, modules_dir, resolve_packages
from images.errors import ImageError

HARNESS = Path(__file__).resolve().parent / "driver" / "parser_harness.c"


@pytest.fixture(scope="module")
def parser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the driver (scripts/setup-host.sh installs it)"
    exe = tmp_path_factory.mktemp("harness") / "parser"
    out = subprocess.run(
        [
            gcc,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=gnu11",
            f"-I{kmod.driver_dir()}",
            "-o",
            str(exe),
            str(HARNESS),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return exe


def parse(exe: Path, *lines: str) -> list[str]:
    out = subprocess.run(
        [str(exe)], input="".join(f"{ln}\n" for ln in lines), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def fields(line: str) -> dict[str, str]:
    assert line.startswith("ok "), line
    return dict(w.split("=", 1) for w in line.split()[1:])


def test_parser_accepts_the_documented_commands(parser: Path) -> None:
    got = parse(
        parser,
        "bind",
        "bind 7",
        "unbind 0x10",
        "map 3 0x1000 8192 rw",
        "map 3 0 4096 ro 0x80000",
        "unmap 3 0x80000 4096",
        "copy 5 1 2:0x20 100",
        "fill 1 0xfffff 1 0xff",
        "compare 2 0 0 0x100000",
        "batch 16 copy 2 0 0x80000 4096",
        "  copy\t9  0   10 7  \\n",
    )
    f = [fields(g) for g in got]
    assert f[0]["op"] == "0" and f[0]["has"] == "0"
    assert (f[1]["op"], f[1]["pasid"], f[1]["has"]) == ("0", "7", "1")
    assert (f[2]["op"], f[2]["pasid"]) == ("1", "16")
    assert (f[3]["off"], f[3]["at"], f[3]["len"], f[3]["rw"]) == ("0x1000", "0x1000", "0x2000", "1")
    assert (f[4]["off"], f[4]["at"], f[4]["rw"]) == ("0x0", "0x80000", "0")
    assert (f[5]["op"], f[5]["off"], f[5]["len"]) == ("3", "0x80000", "0x1000")
    assert (f[6]["a"], f[6]["b"], f[6]["len"]) == ("5:0x1", "2:0x20", "0x64")
    assert (f[7]["a"], f[7]["len"], f[7]["byte"]) == ("1:0xfffff", "0x1", "255")
    assert (f[8]["op"], f[8]["len"]) == ("6", "0x100000")
    assert (f[9]["op"], f[9]["count"], f[9]["b"]) == ("7", "16", "2:0x80000")
    assert (f[10]["op"], f[10]["pasid"], f[10]["a"], f[10]["len"]) == ("4", "9", "9:0x0", "0x7")


BAD = [
    ("", "empty command"),
    ("frobnicate 1", "unknown command"),
    ("Bind", "unknown command"),
    ("bind x", "usage: bind"),
    ("bind 1 2", "usage: bind"),
    ("bind 0x", "usage: bind"),
    ("bind -1", "usage: bind"),
    ("bind 0x100000", "usage: bind"),  # beyond the descriptor's 20-bit PASID
    ("bind 99999999999999999999999", "usage: bind"),  # overflow
    ("unbind", "usage: unbind"),
    ("map 1 0 4096", "usage: map"),
    ("map 1 0 4096 rx", "usage: map"),
    ("map 1 1 4096 rw", "page-aligned"),
    ("map 1 0 100 rw", "page-aligned"),
    ("map 1 0 0 rw", "page-aligned"),
    ("map 1 0xff000 0x2000 rw", "page-aligned"),  # past the buffer
    ("map 1 0 4096 rw 0x100000", "page-aligned"),
    ("map 1 0 4096 rw 1 2", "usage: map"),
    ("unmap 1 0 1", "page-aligned"),
    ("copy 1 0 0", "usage: copy"),
    ("copy 1 0 0x100000 1", "beyond the buffer"),
    ("copy 1 0 0 0x100001", "usage: copy"),
    ("copy 1 :0 0 1", "usage: copy"),
    ("copy 1 0x100000:0 0 1", "usage: copy"),
    ("copy 1 0 0 1 1", "usage: copy"),
    ("compare 1 0 -1 2", "usage: compare"),
    ("fill 1 0 1 256", "usage: fill"),
    ("fill 1 0xfffff 2 0", "beyond the buffer"),
    ("batch 0 copy 1 0 0 1", "usage: batch"),
    ("batch 257 copy 1 0 0 1", "usage: batch"),
    ("batch 2 fill 1 0 0 1", "usage: batch"),
    ("batch 16 copy 1 0 0x80000 0x10000", "beyond the buffer"),
    ("@200", None),  # the next line forced to 200 bytes: longer than any command
    ("bind", "too long"),
    ("@6", None),  # "bind\0x": a NUL inside the write
    ("bind\\0x", "NUL"),
]


def test_parser_refuses_bad_syntax(parser: Path) -> None:
    lines = [line for line, _ in BAD]
    wants = [want for _, want in BAD if want is not None]
    got = parse(parser, *lines)
    assert len(got) == len(wants)
    for line, want, out in zip([ln for ln, w in BAD if w is not None], wants, got, strict=True):
        assert out.startswith("invalid "), (line, out)
        assert want in out, (line, out)


def test_relocate_makefile_points_next_door(tmp_path: Path) -> None:
    kdir = tmp_path / "usr/src/linux-headers-6.12.1+deb12-amd64"
    common = tmp_path / "usr/src/linux-headers-6.12.1+deb12-common"
    kdir.mkdir(parents=True)
    common.mkdir(parents=True)
    (kdir / "Makefile").write_text("include /usr/src/linux-headers-6.12.1+deb12-common/Makefile\n")
    (common / "Makefile").write_text("hello:\n\t@echo common-makefile $(CURDIR)\n")
    headers.relocate_makefile(kdir)
    text = (kdir / "Makefile").read_text()
    assert "/usr/src" not in text and "linux-headers-6.12.1+deb12-common/Makefile" in text
    headers.relocate_makefile(kdir)  # idempotent
    assert (kdir / "Makefile").read_text() == text
    if shutil.which("make"):
        out = subprocess.run(
            ["make", "-s", "-C", str(kdir), "hello"], capture_output=True, text=True, cwd="/"
        )
        assert out.returncode == 0, out.stderr
        assert "common-makefile" in out.stdout
    (kdir / "Makefile").write_text("all:\n")
    with pytest.raises(ImageError, match="includes no -common"):
        headers.relocate_makefile(kdir)


def test_header_package_names() -> None:
    kpkg = apt.DebPackage("linux-image-6.12.117+deb12-amd64", "6.12.117-1~deb12u1")
    pkgs = headers.header_packages(kpkg)
    assert [p.key for p in pkgs] == [
        "linux-headers-6.12.117+deb12-amd64=6.12.117-1~deb12u1",
        "linux-headers-6.12.117+deb12-common=6.12.117-1~deb12u1",
        "linux-kbuild-6.12.117+deb12=6.12.117-1~deb12u1",
    ]
    assert pkgs[1].deb_filename().endswith("_all.deb")
    assert headers.split_image_name("linux-image-6.12.118+deb13-amd64") == (
        "6.12.118+deb13",
        "amd64",
    )
    with pytest.raises(ImageError):
        headers.split_image_name("linux-image-amd64")
    for v in ("6.12.117+deb12", "6.12.117+deb12-amd64", "linux-image-6.12.117+deb12-amd64"):
        assert kernel_package_name(v) == "linux-image-6.12.117+deb12-amd64"
    with pytest.raises(ImageError, match=r"such as 6\.12\.117"):
        kernel_package_name("latest")


def test_modules_dir_debian_12_and_13(tmp_path: Path) -> None:
    assert modules_dir(tmp_path, "6.12") is None
    (tmp_path / "usr/lib/modules/6.12").mkdir(parents=True)
    assert modules_dir(tmp_path, "6.12") == tmp_path / "usr/lib/modules/6.12"
    (tmp_path / "lib/modules/6.12").mkdir(parents=True)
    assert modules_dir(tmp_path, "6.12") == tmp_path / "lib/modules/6.12"


def test_sources_digest_tracks_edits(tmp_path: Path) -> None:
    for name in kmod.SOURCES:
        shutil.copyfile(kmod.driver_dir() / name, tmp_path / name)
    d1 = kmod.sources_digest(tmp_path)
    (tmp_path / "vioasid_dma.c").write_text("/* changed */\n")
    assert kmod.sources_digest(tmp_path) != d1
    (tmp_path / "Kbuild").unlink()
    with pytest.raises(ImageError, match="Kbuild"):
        kmod.sources_digest(tmp_path)


def test_module_builds_against_the_guest_kernel_headers(tmp_path: Path) -> None:
    """The real build: the image's kernel's headers (fetched privately, as the image build
    does), the host's gcc and make, a temp dir; the .ko carries the kernel's vermagic, the PCI
    alias of the function and the GPL licence."""
    kpkg, _ = resolve_packages(cache_dir())
    hdr = headers.ensure_headers(kpkg, cache_dir())
    work = tmp_path / "build"
    work.mkdir()
    ko = kmod.compile_module(hdr, kmod.driver_dir(), work)
    data = ko.read_bytes()
    assert data[:4] == b"\x7fELF"
    info = modules.modinfo(data)
    assert info["name"] == ["vioasid_dma"]
    assert info["vermagic"][0].startswith(f"{hdr.abi}-{hdr.flavour} ")
    assert "pci:v00007A50d00000001sv*sd*bc*sc*i*" in info["alias"]
    assert b"license=GPL\0" in data
    assert modules.depends(data) == []
    # a source that does not compile is an ImageError naming the failure
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in kmod.SOURCES:
        shutil.copyfile(kmod.driver_dir() / name, broken / name)
    (broken / "vioasid_dma.c").write_text(
        '#include <linux/module.h>\nint x = ;\nMODULE_LICENSE("GPL");\n'
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageError, match="failed"):
        kmod.compile_module(hdr, broken, out)
