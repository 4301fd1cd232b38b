"""Encode / decode the PASID DMA functions' migration stream (vioasid.formats.pasid_migration).

:func:`encode_functions` packs every function's :meth:`PasidDmaFunction.migration_state`;
:func:`decode_functions` refuses a truncated, corrupt or future-version stream with
:class:`~vioasid.model.errors.MigrationFailed` (the destination then keeps nothing) and returns
the records keyed by guest RID.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import construct as cs

from vioasid.formats.pasid_migration import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PAGE,
    PAGE_SIZE,
    STREAM,
    VERSION,
)
from vioasid.model.errors import MigrationFailed
from vioasid.model.faults import bdf_str
from vioasid.model.memory import GuestMemory
from vioasid.model.migration import parse_stream_header

from .pasid_dma import PasidDmaFunction


def encode_functions(functions: Iterable[PasidDmaFunction]) -> bytes:
    """The stream of ``functions`` (their state now: take it with the VM stopped)."""
    body = {"functions": [f.migration_state() for f in functions]}
    data: bytes = STREAM.build(
        {"header": {"version": VERSION, "flags": 0}, "body": {"value": body}, "crc32": None}
    )
    return data


def decode_functions(stream: bytes) -> dict[int, Any]:
    """``{guest rid: record}``; MigrationFailed for anything but an intact stream."""
    header = parse_stream_header(stream, HEADER, HEADER_SIZE, MAGIC, "PASID function stream")
    if header.version != VERSION or header.flags:
        raise MigrationFailed(
            f"PASID function stream version {header.version} flags 0x{header.flags:x} "
            f"not understood (this vioasid reads version {VERSION})"
        )
    try:
        parsed = STREAM.parse(stream)
    except cs.ChecksumError:
        raise MigrationFailed("PASID function stream checksum mismatch (corrupt)") from None
    except (cs.ConstructError, ValueError) as exc:
        why = " ".join(str(exc).split())
        raise MigrationFailed(f"PASID function stream malformed: {why}") from None
    out: dict[int, Any] = {}
    for rec in parsed.body.value.functions:
        if rec.guest_rid in out:
            raise MigrationFailed(f"function {bdf_str(rec.guest_rid)} appears twice")
        out[rec.guest_rid] = rec
    return out


# The hot path of PAGES (it runs while the VM is stopped): struct, sizes from the construct
# definition (tests check both give the same bytes).
_COUNT = struct.Struct("<I")
_GPA = struct.Struct("<Q")
_ENTRY = PAGE.sizeof()
assert _GPA.size + PAGE_SIZE == _ENTRY


def encode_pages(memory: GuestMemory, frames: Iterable[int]) -> bytes:
    """The pages ``frames`` (guest page frame numbers) of ``memory``, as they are now
    (:data:`vioasid.formats.pasid_migration.PAGES`)."""
    pfns = sorted(frames)
    parts: list[bytes | memoryview] = [_COUNT.pack(len(pfns))]
    for pfn in pfns:
        gpa = pfn * PAGE_SIZE
        parts += (_GPA.pack(gpa), memory.view(gpa, PAGE_SIZE))
    return b"".join(parts)


def apply_pages(memory: GuestMemory, stream: bytes) -> int:
    """Write an :func:`encode_pages` stream into ``memory``; pages written."""
    if len(stream) < _COUNT.size:
        raise MigrationFailed("dirty-page stream truncated")
    n = int(_COUNT.unpack_from(stream)[0])
    if len(stream) != _COUNT.size + n * _ENTRY:
        raise MigrationFailed(f"dirty-page stream of {len(stream)} bytes for {n} pages")
    view = memoryview(stream)
    for i in range(n):
        off = _COUNT.size + i * _ENTRY
        (gpa,) = _GPA.unpack_from(stream, off)
        if gpa % PAGE_SIZE:
            raise MigrationFailed(f"dirty page 0x{gpa:x} is not page-aligned")
        try:
            memory.view(gpa, PAGE_SIZE)[:] = view[off + _GPA.size : off + _ENTRY]
        except Exception as exc:  # outside the destination's RAM
            raise MigrationFailed(f"dirty page 0x{gpa:x}: {exc}") from None
    return n


__all__ = ["apply_pages", "decode_functions", "encode_functions", "encode_pages"]
