"""Guest memory as a set of regions (guest-physical base, size, backing).

A backing is anything exposing the buffer protocol: a ``bytearray`` (tests), an ``mmap`` of a
file whose offset == GPA (a QEMU memory-backend-file), or an ``mmap`` of a file descriptor at an
offset (what vhost-user SET_MEM_TABLE hands over). Every access is bounds-checked against the
regions: an access outside every region (or straddling two) raises :class:`MemoryAccessError`,
which the walker turns into the VT-d fault the spec names. Nothing ever reads outside a region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

_U64 = struct.Struct("<Q")
_NO_REGION: tuple[int, memoryview] = (0, memoryview(b""))


class MemoryAccessError(Exception):
    """An access to guest-physical memory that no region backs."""

    def __init__(self, gpa: int, size: int) -> None:
        super().__init__(f"guest-physical 0x{gpa:x}+0x{size:x} is outside guest memory")
        self.gpa = gpa
        self.size = size


@dataclass
class Region:
    """One guest-physical range backed by a buffer. ``uaddr`` is the front-end's (QEMU's)
    virtual address of the region, when one was given (vhost-user)."""

    gpa: int
    size: int
    buf: memoryview
    uaddr: int | None = None
    name: str = ""
    _keep: object = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """A guest's physical memory: non-overlapping regions, bounds-checked access."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._last: Region | None = None
        # (GPA base, buffer) of the largest region: the one the walker's direct path reads
        # (kept by add/remove/close, the only writers of ``regions``)
        self.largest: tuple[int, memoryview] = _NO_REGION

    def _regions_changed(self) -> None:
        self._last = None
        big = max(self.regions, key=lambda r: r.size, default=None)
        self.largest = _NO_REGION if big is None else (big.gpa, big.buf)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, size: int, gpa: int = 0) -> GuestMemory:
        """Zero-filled in-memory guest RAM (tests, scenarios)."""
        mem = cls()
        mem.add(gpa, bytearray(size), name="ram")
        return mem

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], writable: bool = False) -> GuestMemory:
        """A memory-backend file where file offset == GPA (a <=2 GiB q35 guest)."""
        mem = cls()
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            size = os.fstat(fd).st_size
            mem.add_fd(fd, 0, size, 0, writable=writable, name=str(path))
        finally:
            os.close(fd)
        return mem

    def add(
        self,
        gpa: int,
        backing: bytearray | bytes | memoryview | mmap.mmap,
        *,
        uaddr: int | None = None,
        name: str = "",
    ) -> Region:
        view = memoryview(backing).cast("B")
        region = Region(gpa, len(view), view, uaddr, name, backing)
        for r in self.regions:
            if gpa < r.end and r.gpa < region.end:
                raise ValueError(f"region 0x{gpa:x}+0x{len(view):x} overlaps {r.name or r.gpa}")
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._regions_changed()
        return region

    def remove(self, region: Region) -> None:
        """Forget one region (its buffer is not released; the caller owns it)."""
        self.regions = [r for r in self.regions if r is not region]
        self._regions_changed()

    def add_fd(
        self,
        fd: int,
        offset: int,
        size: int,
        gpa: int,
        *,
        writable: bool = True,
        uaddr: int | None = None,
        name: str = "",
    ) -> Region:
        """Map ``size`` bytes of ``fd`` from ``offset`` (need not be page aligned) at ``gpa``."""
        if size <= 0:
            raise ValueError("region size must be positive")
        page = mmap.ALLOCATIONGRANULARITY
        base = offset - (offset % page)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size + (offset - base), mmap.MAP_SHARED, prot, offset=base)
        view = memoryview(mm)[offset - base :]
        return self.add(gpa, view, uaddr=uaddr, name=name or f"fd{fd}")

    def close(self) -> None:
        """Release every region (mmaps are unmapped when no view remains)."""
        regions, self.regions = self.regions, []
        self._regions_changed()
        for r in regions:
            r.buf.release()
            keep = r._keep
            if isinstance(keep, memoryview):
                obj = keep.obj  # read before release: a released view refuses every attribute
                keep.release()
                keep = obj
            if isinstance(keep, mmap.mmap):
                with contextlib.suppress(BufferError):
                    keep.close()

    # -- lookup -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def region_of(self, gpa: int, size: int = 1) -> Region:
        r = self._last
        if r is not None and r.gpa <= gpa and gpa + size <= r.end:
            return r
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                self._last = r
                return r
        raise MemoryAccessError(gpa, size)

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self.region_of(gpa, size)
        except MemoryAccessError:
            return False
        return True

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    # -- access -------------------------------------------------------------------------
    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy view of ``size`` bytes at ``gpa`` (must lie in one region)."""
        if gpa < 0 or size < 0:
            raise MemoryAccessError(gpa, size)
        r = self.region_of(gpa, max(size, 1))
        off = gpa - r.gpa
        return r.buf[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        if gpa < 0:
            raise MemoryAccessError(gpa, 8)
        r = self._last
        if r is None or not (r.gpa <= gpa and gpa + 8 <= r.end):
            r = self.region_of(gpa, 8)
        return _U64.unpack_from(r.buf, gpa - r.gpa)[0]  # type: ignore[no-any-return]

    def write_u64(self, gpa: int, value: int) -> None:
        r = self.region_of(gpa, 8)
        _U64.pack_into(r.buf, gpa - r.gpa, value)

    def words(self, gpa: int, count: int) -> tuple[int, ...]:
        """``count`` little-endian u64s starting at ``gpa`` (one region)."""
        r = self.region_of(gpa, 8 * count)
        return struct.unpack_from(f"<{count}Q", r.buf, gpa - r.gpa)

    def uaddr_to_gpa(self, uaddr: int, size: int = 1) -> int:
        """Map a front-end virtual address (vhost-user ``userspace_addr``) back to a GPA."""
        for r in self.regions:
            if r.uaddr is not None and r.uaddr <= uaddr and uaddr + size <= r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise MemoryAccessError(uaddr, size)
