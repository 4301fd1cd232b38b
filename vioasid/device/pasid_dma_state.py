"""Encode / decode the PASID DMA functions' migration stream (vioasid.formats.pasid_migration).

:func:`encode_functions` packs every function's :meth:`PasidDmaFunction.migration_state`;
:func:`decode_functions` refuses a truncated, corrupt or future-version stream with
:class:`~vioasid.model.errors.MigrationFailed` (the destination then keeps nothing) and returns
the records keyed by guest RID.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import construct as cs

from vioasid.formats.pasid_migration import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PAGE_SIZE,
    PAGES,
    STREAM,
    VERSION,
)
from vioasid.model.errors import MigrationFailed
from vioasid.model.faults import bdf_str
from vioasid.model.memory import GuestMemory

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
    if len(stream) < HEADER_SIZE:
        raise MigrationFailed(f"PASID function stream truncated: {len(stream)} bytes")
    try:
        header = HEADER.parse(stream[:HEADER_SIZE])
    except cs.ConstructError:
        raise MigrationFailed(
            f"not a PASID function stream (magic {bytes(stream[:8])!r}, expected {MAGIC!r})"
        ) from None
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


def encode_pages(memory: GuestMemory, frames: Iterable[int]) -> bytes:
    """The pages ``frames`` (guest page frame numbers) of ``memory``, as they are now."""
    data: bytes = PAGES.build(
        [{"gpa": pfn * PAGE_SIZE, "data": bytes(memory.view(pfn * PAGE_SIZE, PAGE_SIZE))}
         for pfn in sorted(frames)]
    )  # fmt: skip
    return data


def apply_pages(memory: GuestMemory, stream: bytes) -> int:
    """Write an :func:`encode_pages` stream into ``memory``; pages written."""
    try:
        pages = PAGES.parse(stream)
    except (cs.ConstructError, ValueError):
        raise MigrationFailed("dirty-page stream malformed") from None
    for p in pages:
        if p.gpa % PAGE_SIZE:
            raise MigrationFailed(f"dirty page 0x{p.gpa:x} is not page-aligned")
        memory.view(p.gpa, PAGE_SIZE)[:] = p.data
    return len(pages)


__all__ = ["apply_pages", "decode_functions", "encode_functions", "encode_pages"]
