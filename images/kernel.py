"""Get an uncompressed ELF vmlinux out of an x86 bzImage, for QEMU's faster PVH boot.

The bzImage setup header (Linux Documentation/arch/x86/boot.rst) gives ``setup_sects`` (0x1f1),
``payload_offset``/``payload_length`` (0x248/0x24c, protocol 2.08+); the payload is the
compressed vmlinux (zstd, xz, gzip ... by its magic) followed by a 4-byte little-endian
uncompressed size. PVH boot needs the Xen ELF note ``XEN_ELFNOTE_PHYS32_ENTRY`` (type 18).
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess

from .apt import require_tool
from .errors import ImageError

XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4


def bzimage_payload(bz: bytes) -> bytes:
    """The compressed kernel inside a bzImage (without the trailing size word)."""
    if len(bz) < 0x250 or bz[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", bz, 0x206)[0]
    if version < 0x208:
        raise ImageError(f"bzImage boot protocol {version:#x} has no payload fields")
    setup_sects = bz[0x1F1] or 4
    off, length = struct.unpack_from("<II", bz, 0x248)
    start = (setup_sects + 1) * 512 + off
    if start + length > len(bz) or length < 8:
        raise ImageError("bzImage payload out of range")
    return bz[start : start + length]


def decompress(payload: bytes) -> bytes:
    """Decompress a kernel payload by its magic (zstd via the zstd tool; xz/gzip in Python)."""
    body = payload[:-4]  # the last 4 bytes are the uncompressed size
    want = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if body[:4] == b"\x28\xb5\x2f\xfd":
        zstd = require_tool("zstd", "zstd")
        out = subprocess.run([zstd, "-dcq"], input=body, capture_output=True, check=False)
        if out.returncode != 0:
            raise ImageError(f"zstd failed on the kernel payload: {out.stderr.decode()[-200:]}")
        data = out.stdout
    elif body[:6] == b"\xfd7zXZ\x00":
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(body)
    elif body[:2] == b"\x1f\x8b":
        data = gzip.decompress(payload)
    else:
        raise ImageError(f"unknown kernel compression (magic {body[:6].hex()})")
    if len(data) < want:
        raise ImageError(f"kernel payload decompressed to {len(data)} bytes, expected {want}")
    return data[:want] if want else data


def elf_notes(elf: bytes) -> list[tuple[str, int, bytes]]:
    """(owner, type, desc) of every note in an ELF64 little-endian file's PT_NOTE segments."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageError("not a 64-bit little-endian ELF")
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    notes: list[tuple[str, int, bytes]] = []
    for i in range(min(phnum, 64)):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            break
        p_type = struct.unpack_from("<I", elf, base)[0]
        if p_type != _PT_NOTE:
            continue
        p_offset = struct.unpack_from("<Q", elf, base + 8)[0]
        p_filesz = struct.unpack_from("<Q", elf, base + 32)[0]
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            pos += 12
            name = elf[pos : pos + namesz].rstrip(b"\0").decode("ascii", "replace")
            pos += (namesz + 3) & ~3
            desc = elf[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            notes.append((name, ntype, desc))
    return notes


def has_pvh_entry(elf: bytes) -> bool:
    """The ELF carries the Xen PHYS32_ENTRY note QEMU needs to boot it as PVH."""
    return any(o == "Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for o, t, _ in elf_notes(elf))


def extract_vmlinux(bz: bytes) -> bytes:
    """The PVH-bootable vmlinux inside ``bz``; :class:`ImageError` if it is not one."""
    elf = decompress(bzimage_payload(bz))
    if not has_pvh_entry(elf):
        raise ImageError("vmlinux has no Xen PHYS32_ENTRY note (kernel built without PVH)")
    return elf
