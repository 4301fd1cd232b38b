"""A minimal cpio "newc" archive writer (the initramfs format, Linux
Documentation/driver-api/early-userspace/buffer-format.rst): 110-byte ASCII-hex headers, names
and data padded to 4 bytes, ``TRAILER!!!`` last. Device nodes need no root privileges here.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    path: str  # no leading slash, e.g. "bin/busybox"
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, b"", (major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc(entries: list[Entry], mtime: int = 0) -> bytes:
    """The uncompressed archive; deterministic (fixed inode numbers, uid/gid 0, ``mtime``)."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.path.encode() + b"\0"
        fields = (
            ino if e.path != "TRAILER!!!" else 0,
            e.mode,
            0,
            0,
            2 if stat.S_ISDIR(e.mode) else 1,
            mtime,
            len(e.data),
            0,
            0,
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad(len(header) + len(name))
        out += e.data + _pad(len(e.data))
    return bytes(out)


def newc_gz(entries: list[Entry], mtime: int = 0) -> bytes:
    return gzip.compress(newc(entries, mtime), compresslevel=6, mtime=0)
