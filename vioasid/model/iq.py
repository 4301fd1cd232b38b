"""The invalidation queue (VT-d §6.5.2): the one ring reader, decoder and dispatcher.

* :class:`Ring` is a queue as IQA describes it (base, QS, DW); :meth:`Ring.read` walks the
  descriptors from a head to a tail offset (bounded by the queue length, never outside memory).
* :func:`decode` turns one 128- or 256-bit descriptor into a :class:`Descriptor` with the
  ``vioasid.formats.invalidation`` layouts; an unknown type, a reserved bit, non-zero qw2/qw3 in
  a 256-bit descriptor or a reserved granularity make it invalid (``error``), as QEMU's
  ``vtd_process_inv_desc`` refuses them with IQE.
* :func:`dispatch` maps a valid descriptor's type and granularity onto the three scopes every
  consumer acts on (:class:`Handler`: context cache, PASID cache, IOTLB with optional PASID and
  address range) and passes the rest (wait, device-TLB, IEC, page-group response) to
  ``other``. The walker's caches (:class:`CacheInvalidation`), the daemon's re-binding and the
  device translator's IOTLB are handlers; nobody else reads type numbers.

:class:`InvalidationQueue` consumes a guest's queue from memory for a walker's caches: it
stops at the first invalid descriptor with an IQE error (IQH left pointing at it, as the
hardware does) and writes the status data of wait descriptors with SW set. Nothing raises for
hostile contents.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vioasid.formats.invalidation import (
    CC_DEVICE,
    CC_DOMAIN,
    CC_GLOBAL,
    DESC_128,
    DESC_256,
    IOTLB_DOMAIN,
    IOTLB_GLOBAL,
    IOTLB_PAGE,
    LAYOUTS,
    PC_DSI,
    PC_GLOBAL,
    PC_PASID_SI,
    PIOTLB_ALL_IN_PASID,
    PIOTLB_PSI_IN_PASID,
    TYPE_CC,
    TYPE_DEV_PIOTLB,
    TYPE_DEVICE_TLB,
    TYPE_IEC,
    TYPE_IOTLB,
    TYPE_NAMES,
    TYPE_PC,
    TYPE_PGRESP,
    TYPE_PIOTLB,
    TYPE_WAIT,
    desc_type,
)
from vioasid.formats.registers import IQA, IQH

from .cache import Caches
from .memory import GuestMemory, MemoryAccessError
from .walker import Walker

log = logging.getLogger(__name__)

_OFFSET = IQH.mask("QH")  # IQH/IQT bits 18:4: byte offsets (QEMU VTD_IQH_QH / VTD_IQT_QT)
_QS, _DW, _BASE = IQA.field("QS"), IQA.field("DW"), IQA.mask("IQA")
_Q2, _Q4 = struct.Struct("<2Q"), struct.Struct("<4Q")
# The granularities each type defines (anything else is reserved: QEMU "invalid granularity").
_GRANULARITIES = {
    TYPE_CC: (CC_GLOBAL, CC_DOMAIN, CC_DEVICE),
    TYPE_IOTLB: (IOTLB_GLOBAL, IOTLB_DOMAIN, IOTLB_PAGE),
    TYPE_PIOTLB: (PIOTLB_ALL_IN_PASID, PIOTLB_PSI_IN_PASID),
    TYPE_PC: (PC_DSI, PC_PASID_SI, PC_GLOBAL),
}
_DECODERS = {t: layout.decoder() for t, layout in LAYOUTS.items()}
_TYPE_FIELDS = ("TYPE_LO", "TYPE_HI")


@dataclass(slots=True)
class Descriptor:
    """One decoded invalidation descriptor: its type, named fields, slot and validity."""

    type_code: int
    fields: dict[str, int] = field(default_factory=dict)
    index: int = 0  # slot in the queue
    error: str = ""  # why it is invalid ("" when valid)
    words: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type_code, f"unknown-{self.type_code}")

    def __getitem__(self, name: str) -> int:
        return self.fields[name]

    def get(self, name: str, default: int = 0) -> int:
        return self.fields.get(name, default)

    def raw(self) -> bytes:
        """The descriptor's low 128 bits (what a page-group response carries on)."""
        return _Q2.pack(*self.words[:2])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.name, "type_code": self.type_code, **self.fields}
        out["index"] = self.index
        if self.error:
            out["error"] = self.error
        return out


def decode(words: tuple[int, ...], wide: bool = True, index: int = 0) -> Descriptor:
    """The one decoder: ``words`` are the descriptor's 2 (128-bit) or 4 (256-bit) qwords."""
    t = desc_type(words[0])
    d = Descriptor(t, index=index, words=tuple(words))
    layout = LAYOUTS.get(t)
    if layout is None:
        d.error = f"unknown descriptor type {t} (not defined by VT-d)"
        return d
    d.fields = {k: int(v) for k, v in _DECODERS[t](words[:2]).items() if k not in _TYPE_FIELDS}
    bad = layout.reserved_violations(tuple(words[:2]))
    if wide and t != TYPE_PGRESP and len(words) > 2 and (words[2] or words[3]):
        bad.append("qw2/qw3")
    if bad:
        d.error = f"reserved bits set in {', '.join(bad)} of a {d.name} descriptor"
    elif t in _GRANULARITIES and d.fields["G"] not in _GRANULARITIES[t]:
        d.error = f"{d.name} invalidation granularity {d.fields['G']} is reserved"
    return d


class Handler(Protocol):
    """What a consumer of invalidations does; ``None`` means "every" (domain, PASID, ...).
    Each returns how many things it changed."""

    def context(self, did: int | None, sid: int | None, fm: int) -> int: ...

    def pasid_cache(self, did: int | None, pasid: int | None) -> int: ...

    def iotlb(
        self, did: int | None, pasid: int | None, addr: int | None, am: int, ih: bool
    ) -> int: ...

    def other(self, desc: Descriptor) -> int: ...


def dispatch(d: Descriptor, h: Handler) -> int:
    """The one dispatcher: a valid descriptor's type and granularity as a handler call."""
    t, f = d.type_code, d.fields
    if t == TYPE_CC:
        g = f["G"]
        if g == CC_DEVICE:
            return h.context(f["DID"], f["SID"], f["FM"])
        return h.context(f["DID"] if g == CC_DOMAIN else None, None, 0)
    if t == TYPE_IOTLB:
        g = f["G"]
        if g == IOTLB_PAGE:
            return h.iotlb(f["DID"], None, f["ADDR"], f["AM"], bool(f["IH"]))
        return h.iotlb(f["DID"] if g == IOTLB_DOMAIN else None, None, None, 0, False)
    if t == TYPE_PIOTLB:
        if f["G"] == PIOTLB_PSI_IN_PASID:
            return h.iotlb(f["DID"], f["PASID"], f["ADDR"], f["AM"], bool(f["IH"]))
        return h.iotlb(f["DID"], f["PASID"], None, 0, False)
    if t == TYPE_PC:
        g = f["G"]
        if g == PC_GLOBAL:
            return h.pasid_cache(None, None)
        return h.pasid_cache(f["DID"], f["PASID"] if g == PC_PASID_SI else None)
    return h.other(d)


@dataclass(frozen=True, slots=True)
class Ring:
    """A queue as IQA describes it: base, size in bytes, descriptor size."""

    base: int
    size: int
    wide: bool

    @classmethod
    def of(cls, iqa: int) -> Ring:
        return cls(iqa & _BASE, 4096 << _QS.get(iqa), bool(_DW.get(iqa)))

    @property
    def dsize(self) -> int:
        return DESC_256 if self.wide else DESC_128

    @staticmethod
    def offset(reg: int) -> int:
        """The byte offset an IQH/IQT register value holds."""
        return reg & _OFFSET

    def check(self, head: int, tail: int) -> str:
        """ "" when both offsets are inside the queue and aligned; the IQE reason otherwise."""
        if self.wide and (tail & 0x10 or head & 0x10):
            return "IQH/IQT not 256-bit aligned with IQA.DW=1"
        if tail >= self.size or head >= self.size:
            return f"IQH/IQT beyond the {self.size}-byte queue"
        return ""

    def read(self, mem: GuestMemory, head: int, tail: int) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(offset, words) of each descriptor from ``head`` up to ``tail`` (checked offsets),
        at most one lap; MemoryAccessError where the queue leaves guest memory."""
        dsize, unpack = self.dsize, (_Q4 if self.wide else _Q2).unpack
        for _ in range(self.size // dsize):
            if head == tail:
                return
            yield head, unpack(mem.read(self.base + head, dsize))
            head = (head + dsize) % self.size


class CacheInvalidation:
    """The walker's caches as a :class:`Handler` (one ``Caches.invalidate_*`` per scope)."""

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def context(self, did: int | None, sid: int | None, fm: int) -> int:
        c = self.caches
        if sid is not None:
            c.invalidate_context_device(sid, fm)
        elif did is not None:
            c.invalidate_context_domain(did)
        else:
            c.invalidate_context_global()
        return 0

    def pasid_cache(self, did: int | None, pasid: int | None) -> int:
        c = self.caches
        if did is None:
            c.invalidate_pasid_global()
        elif pasid is None:
            c.invalidate_pasid_domain(did)
        else:
            c.invalidate_pasid_pasid(did, pasid)
        return 0

    def iotlb(self, did: int | None, pasid: int | None, addr: int | None, am: int, ih: bool) -> int:
        c = self.caches
        if did is None:
            c.invalidate_iotlb_global()
        elif pasid is None:
            if addr is None:
                c.invalidate_iotlb_domain(did)
            else:
                c.invalidate_iotlb_page(did, addr, am, ih)
        elif addr is None:
            c.invalidate_piotlb_pasid(did, pasid)
        else:
            c.invalidate_piotlb_page(did, pasid, addr, am, ih)
        return 0

    def other(self, desc: Descriptor) -> int:
        kind = {TYPE_DEVICE_TLB: "devtlb", TYPE_DEV_PIOTLB: "pasid_devtlb", TYPE_IEC: "iec",
                TYPE_PGRESP: "page_group_response"}.get(desc.type_code)  # fmt: skip
        if kind is not None:
            self.caches.note_device_tlb(kind)
        return 0


class InvalidationQueue(CacheInvalidation):
    """Applies queued invalidations to a walker's caches (or a bare :class:`Caches`)."""

    def __init__(self, mem: GuestMemory, walker_or_caches: Walker | Caches) -> None:
        super().__init__(
            walker_or_caches.caches if isinstance(walker_or_caches, Walker) else walker_or_caches
        )
        self.mem = mem
        self.waits = 0
        self.interrupts = 0  # wait descriptors with IF set (the caller raises the event)
        self._status_error = ""

    def process(self, iqa: int, iqh: int, iqt: int) -> tuple[int, list[dict[str, Any]], list[str]]:
        """Consume descriptors [IQH, IQT). Returns (new IQH, decoded descriptors, errors).

        An error string starting with ``IQE`` means the queue stopped at an invalid
        descriptor (the new IQH points at it). Device-TLB types are accepted and counted.
        """
        ring = Ring.of(iqa)
        head, tail = ring.offset(iqh), ring.offset(iqt)
        decoded: list[dict[str, Any]] = []
        bad = ring.check(head, tail)
        if bad:
            return head, decoded, [f"IQE: {bad}"]
        slots = ring.read(self.mem, head, tail)
        while True:
            try:
                at, words = next(slots)
            except StopIteration:
                return tail, decoded, []
            except MemoryAccessError:  # the queue itself is outside memory
                gpa = ring.base + head
                return head, decoded, [f"IQE: descriptor at 0x{gpa:x} is outside guest memory"]
            head = at
            d = decode(words, ring.wide, at // ring.dsize)
            decoded.append(d.to_json())
            if d.error:
                return head, decoded, [f"IQE: descriptor {d.index}: {d.error}"]
            dispatch(d, self)
            if self._status_error:
                err, self._status_error = self._status_error, ""
                return head, decoded, [err]
            head = (at + ring.dsize) % ring.size

    def other(self, desc: Descriptor) -> int:
        if desc.type_code != TYPE_WAIT:
            return super().other(desc)
        self.waits += 1
        if desc["IF"]:
            self.interrupts += 1
        if desc["SW"]:
            addr = desc["STATUS_ADDR"]
            try:
                self.mem.write(addr, struct.pack("<I", desc["STATUS_DATA"]))
            except MemoryAccessError:
                self._status_error = f"IQE: wait status address 0x{addr:x} is outside guest memory"
        return 0
