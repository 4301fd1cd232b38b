"""The disk tests' table and data pattern: one source of truth for the guest and the host.

The guest (``disk_tests.sh``, busybox awk) writes, for each test, the bytes
``pattern(offset, length, gen)`` of a canonical whole-disk pattern to ``/dev/vda`` at ``offset``.
The canonical pattern is made of 512-byte records, record ``lba`` (byte ``lba * 512``) being::

    "VIOASID g=<gen> lba=<lba> " + fill, cut to 511 bytes, + "\\n"
    fill = ("%08x" % ((lba * 2654435761 + gen * 7919) % 2**31)) repeated

The image builder writes :data:`TESTS` into the initramfs as ``/guest_tests/tests.conf``, so
the guest runs exactly the table the host checks with :func:`expected_blocks` /
:func:`check_disk`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
KIB = 1024
MIB = 1024 * KIB
MULT = 2654435761
GEN_MULT = 7919
DEFAULT_DISK_BYTES = 32 * MIB
STOP_MAGIC = b"VIOASID-STOP\n"


@dataclass(frozen=True)
class DiskTest:
    """One guest disk test: write ``length`` bytes at ``offset`` with ``bs``-byte requests.

    ``mode``: ``direct`` (O_DIRECT both ways), ``buffered`` (page cache + fsync + drop_caches;
    works at any byte offset), ``parallel`` (4 concurrent O_DIRECT writers over the range).
    """

    name: str
    offset: int
    length: int
    bs: int
    mode: str

    def conf_line(self) -> str:
        return f"{self.name} {self.offset} {self.length} {self.bs} {self.mode}"


TESTS: tuple[DiskTest, ...] = (
    DiskTest("page", 1 * MIB, 4 * KIB, 4 * KIB, "direct"),
    DiskTest("multipage", 2 * MIB, 64 * KIB, 64 * KIB, "direct"),
    DiskTest("sector_unaligned", 3 * MIB + 3 * SECTOR, 13 * SECTOR, SECTOR, "direct"),
    DiskTest("crosspage", 3 * MIB + 64 * KIB + 7 * SECTOR, 24 * KIB, 8 * KIB, "direct"),
    DiskTest("byte_unaligned", 4 * MIB + 1000, 3000, 1000, "buffered"),
    DiskTest("large", 8 * MIB, 2 * MIB, 1 * MIB, "direct"),
    DiskTest("buffered_flush", 12 * MIB, 256 * KIB, 64 * KIB, "buffered"),
    DiskTest("parallel", 16 * MIB, 1 * MIB, 64 * KIB, "parallel"),
    DiskTest("far", 30 * MIB + 5 * SECTOR, 8 * KIB, 4 * KIB, "direct"),
)


def stop_offset(disk_bytes: int = DEFAULT_DISK_BYTES) -> int:
    """Where the host writes :data:`STOP_MAGIC` to end the guest's loop mode (last sector)."""
    return disk_bytes - SECTOR


def tests_conf(tests: Iterable[DiskTest] = TESTS) -> str:
    """``tests.conf`` for the guest: one ``name offset length bs mode`` line per test."""
    return "".join(t.conf_line() + "\n" for t in tests)


def record(lba: int, gen: int = 0) -> bytes:
    """The 512-byte record of the canonical pattern at sector ``lba``."""
    head = f"VIOASID g={gen} lba={lba} "
    unit = "%08x" % ((lba * MULT + gen * GEN_MULT) % 2**31)
    body = head + unit * ((511 - len(head)) // 8 + 1)
    return (body[:511] + "\n").encode()


def pattern(offset: int, length: int, gen: int = 0) -> bytes:
    """Bytes ``[offset, offset + length)`` of the canonical pattern."""
    if length <= 0:
        return b""
    first = offset // SECTOR
    last = (offset + length - 1) // SECTOR
    data = b"".join(record(lba, gen) for lba in range(first, last + 1))
    start = offset - first * SECTOR
    return data[start : start + length]


def select(names: Sequence[str] | None = None) -> list[DiskTest]:
    """The tests named (all if None), in table order; unknown names raise ``KeyError``."""
    if names is None:
        return list(TESTS)
    known = {t.name: t for t in TESTS}
    for n in names:
        if n not in known:
            raise KeyError(f"unknown guest disk test {n!r}; known: {', '.join(known)}")
    return [t for t in TESTS if t.name in set(names)]


def expected_blocks(names: Sequence[str] | None = None, gen: int = 0) -> list[tuple[int, bytes]]:
    """(offset, bytes) the backing file must hold after the named tests ran with ``gen``."""
    return [(t.offset, pattern(t.offset, t.length, gen)) for t in select(names)]


@dataclass(frozen=True)
class Mismatch:
    test: str
    offset: int
    first_bad: int  # absolute byte offset of the first differing byte
    expected: bytes
    found: bytes


def check_disk(
    path: Path | str, names: Sequence[str] | None = None, gen: int = 0
) -> list[Mismatch]:
    """Compare the backing file with what the guest wrote; empty list when it matches."""
    bad: list[Mismatch] = []
    with open(path, "rb") as f:
        for t in select(names):
            want = pattern(t.offset, t.length, gen)
            got = os.pread(f.fileno(), t.length, t.offset)
            if got != want:
                i = next(
                    (k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                    min(len(want), len(got)),
                )
                bad.append(
                    Mismatch(t.name, t.offset, t.offset + i, want[i : i + 32], got[i : i + 32])
                )
    return bad


def request_stop(path: Path | str, disk_bytes: int | None = None) -> None:
    """Tell a guest in loop mode (``vioasid.loop=1``) to stop: write the stop sector."""
    size = disk_bytes if disk_bytes is not None else os.path.getsize(path)
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), STOP_MAGIC.ljust(SECTOR, b"\0"), stop_offset(size))
        f.flush()
        os.fsync(f.fileno())


def make_disk(path: Path | str, size: int = DEFAULT_DISK_BYTES) -> Path:
    """Create (or reset) a zero-filled raw disk of ``size`` bytes."""
    p = Path(path)
    with open(p, "wb") as f:
        f.truncate(size)
    return p
