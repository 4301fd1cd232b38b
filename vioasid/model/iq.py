"""The invalidation-queue processor (VT-d §6.5.2): consumes a guest's descriptors from memory.

``process(iqa, iqh, iqt)`` walks the ring from IQH to IQT (IQA: base, QS, DW; IQH/IQT: the
register values, i.e. byte offsets), decodes each 128- or 256-bit descriptor with the
``vioasid.formats.invalidation`` layouts, drops the matching cache entries, writes the status
data of wait descriptors with SW set, and stops at the first invalid descriptor (unknown type,
reserved bits, non-zero qw2/qw3 in 256-bit mode) with an IQE error, leaving IQH pointing at it as
the hardware does. Work is bounded by the queue length; nothing raises for hostile contents.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

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
from vioasid.formats.registers import IQA

from .cache import Caches
from .memory import GuestMemory, MemoryAccessError
from .walker import Walker

log = logging.getLogger(__name__)

_IQ_OFFSET_MASK = 0x7FFF0  # IQH/IQT bits 18:4 (QEMU VTD_IQH_QH / VTD_IQT_QT)
_QS = IQA.field("QS")
_DW = IQA.field("DW")
_IQA_BASE = IQA.field("IQA").mask
_G = {t: LAYOUTS[t].field("G") for t in (TYPE_CC, TYPE_IOTLB, TYPE_PIOTLB, TYPE_PC)}


class InvalidationQueue:
    """Applies queued invalidations to a walker's caches (or a bare :class:`Caches`)."""

    def __init__(self, mem: GuestMemory, walker_or_caches: Walker | Caches) -> None:
        self.mem = mem
        self.caches = (
            walker_or_caches.caches if isinstance(walker_or_caches, Walker) else walker_or_caches
        )
        self.waits = 0
        self.interrupts = 0  # wait descriptors with IF set (the caller raises the event)

    def process(self, iqa: int, iqh: int, iqt: int) -> tuple[int, list[dict[str, Any]], list[str]]:
        """Consume descriptors [IQH, IQT). Returns (new IQH, decoded descriptors, errors).

        An error string starting with ``IQE`` means the queue stopped at an invalid
        descriptor (the new IQH points at it). Device-TLB types are accepted and counted.
        """
        wide = bool(_DW.get(iqa))
        dsize = DESC_256 if wide else DESC_128
        qbytes = 4096 << _QS.get(iqa)
        base = iqa & _IQA_BASE
        head = iqh & _IQ_OFFSET_MASK
        tail = iqt & _IQ_OFFSET_MASK
        decoded: list[dict[str, Any]] = []
        if wide and (tail & 0x10 or head & 0x10):
            return head, decoded, ["IQE: IQH/IQT not 256-bit aligned with IQA.DW=1"]
        if tail >= qbytes or head >= qbytes:
            return head, decoded, [f"IQE: IQH/IQT beyond the {qbytes}-byte queue"]
        for _ in range(qbytes // dsize):
            if head == tail:
                break
            gpa = base + head
            try:
                raw = self.mem.read(gpa, dsize)
            except MemoryAccessError:  # the queue itself is outside memory
                return head, decoded, [f"IQE: descriptor at 0x{gpa:x} is outside guest memory"]
            words = struct.unpack(f"<{dsize // 8}Q", raw)
            desc, err = self._decode(words, wide)
            if err:
                desc["index"] = head // dsize
                decoded.append(desc)
                return head, decoded, [f"IQE: descriptor {head // dsize}: {err}"]
            desc["index"] = head // dsize
            err = self._apply(desc)
            decoded.append(desc)
            if err:
                return head, decoded, [err]
            head = (head + dsize) % qbytes
        return head, decoded, []

    # -- decoding ---------------------------------------------------------------------------
    @staticmethod
    def _decode(words: tuple[int, ...], wide: bool) -> tuple[dict[str, Any], str]:
        t = desc_type(words[0])
        layout = LAYOUTS.get(t)
        out: dict[str, Any] = {"type": TYPE_NAMES.get(t, f"unknown-{t}"), "type_code": t}
        if layout is None:
            return out, f"unknown descriptor type {t}"
        for w, val in zip(layout.words, words[:2], strict=True):
            for name, v in w.decode(val).items():
                if not name.startswith("TYPE_"):
                    out[name] = v
        bad = layout.reserved_violations(words[:2])
        if wide and t != TYPE_PGRESP and (words[2] or words[3]):
            bad.append("qw2/qw3")
        if bad:
            return out, f"reserved bits set in {', '.join(bad)} of a {out['type']} descriptor"
        return out, ""

    # -- dispatch ---------------------------------------------------------------------------
    def _apply(self, d: dict[str, Any]) -> str:
        c = self.caches
        t = d["type_code"]
        if t == TYPE_CC:
            g = d["G"]
            if g == CC_GLOBAL:
                c.invalidate_context_global()
            elif g == CC_DOMAIN:
                c.invalidate_context_domain(d["DID"])
            elif g == CC_DEVICE:
                c.invalidate_context_device(d["SID"], d["FM"])
            else:
                c.invalidate_context_global()  # reserved granularity: be conservative
        elif t == TYPE_IOTLB:
            g = d["G"]
            if g == IOTLB_GLOBAL:
                c.invalidate_iotlb_global()
            elif g == IOTLB_DOMAIN:
                c.invalidate_iotlb_domain(d["DID"])
            elif g == IOTLB_PAGE:
                c.invalidate_iotlb_page(d["DID"], d["ADDR"], d["AM"], bool(d["IH"]))
            else:
                c.invalidate_iotlb_global()
        elif t == TYPE_PIOTLB:
            if d["G"] == PIOTLB_PSI_IN_PASID:
                c.invalidate_piotlb_page(d["DID"], d["PASID"], d["ADDR"], d["AM"], bool(d["IH"]))
            elif d["G"] == PIOTLB_ALL_IN_PASID:
                c.invalidate_piotlb_pasid(d["DID"], d["PASID"])
            else:
                c.invalidate_iotlb_domain(d["DID"])
        elif t == TYPE_PC:
            g = d["G"]
            if g == PC_DSI:
                c.invalidate_pasid_domain(d["DID"])
            elif g == PC_PASID_SI:
                c.invalidate_pasid_pasid(d["DID"], d["PASID"])
            elif g == PC_GLOBAL:
                c.invalidate_pasid_global()
            else:
                c.invalidate_pasid_global()
        elif t == TYPE_DEVICE_TLB:
            c.note_device_tlb("devtlb")
        elif t == TYPE_DEV_PIOTLB:
            c.note_device_tlb("pasid_devtlb")
        elif t == TYPE_IEC:
            c.note_device_tlb("iec")
        elif t == TYPE_PGRESP:
            c.note_device_tlb("page_group_response")
        elif t == TYPE_WAIT:
            self.waits += 1
            if d["IF"]:
                self.interrupts += 1
            if d["SW"]:
                addr = d["STATUS_ADDR"]
                try:
                    self.mem.write(addr, struct.pack("<I", d["STATUS_DATA"]))
                except MemoryAccessError:
                    return f"IQE: wait status address 0x{addr:x} is outside guest memory"
        return ""
