"""Translation results: a :class:`Translation` or a :class:`Fault` carrying the VT-d reason code.

A fault is what the guest's driver would read from a VT-d fault record: source id (RID), PASID
(if any), faulting address, read/write and the reason code. :meth:`Fault.record` builds that
record with the ``formats.fault.FAULT_RECORD`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vioasid.formats.fault import FAULT_RECORD, FaultReason


def bdf_str(sid: int) -> str:
    """``0x0018`` -> ``"00:03.0"`` (bus:device.function)."""
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1F:02x}.{sid & 7}"


def parse_bdf(text: str) -> int:
    """``"00:03.0"`` (or ``"0000:00:03.0"``) -> source id; ValueError on bad input."""
    t = text.strip()
    if t.count(":") == 2:
        t = t.split(":", 1)[1]
    try:
        bus_s, rest = t.split(":")
        dev_s, fn_s = rest.split(".")
        bus, dev, fn = int(bus_s, 16), int(dev_s, 16), int(fn_s, 16)
    except ValueError:
        raise ValueError(f"bad BDF {text!r}: expected BB:DD.F, e.g. 00:03.0") from None
    if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8):
        raise ValueError(f"bad BDF {text!r}: bus < 0x100, device < 0x20, function < 8")
    return (bus << 8) | (dev << 3) | fn


@dataclass(frozen=True, slots=True)
class Fault:
    """A DMA remapping fault as the guest would see it."""

    reason: FaultReason
    addr: int
    sid: int
    pasid: int | None = None
    write: bool = False
    detail: str = ""

    @property
    def name(self) -> str:
        return self.reason.label

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reason": int(self.reason),
            "name": self.name,
            "bdf": bdf_str(self.sid),
            "addr": hex(self.addr),
            "write": self.write,
        }
        if self.pasid is not None:
            out["pasid"] = self.pasid
        if self.detail:
            out["detail"] = self.detail
        return out

    def record(self) -> bytes:
        """The 128-bit VT-d fault record (§10.4.14) for this fault."""
        return FAULT_RECORD.build(
            {
                "FI": self.addr & ~0xFFF & ((1 << 64) - 1),
                "SID": self.sid,
                "PP": int(self.pasid is not None),
                "FR": int(self.reason),
                "PV": self.pasid or 0,
                "T": int(not self.write),
                "F": 1,
            }
        )


@dataclass(frozen=True, slots=True)
class Translation:
    """A successful translation of one page-sized request."""

    iova: int
    address: int  # output address (GPA for a guest walk, HPA after the host's second stage)
    page_size: int
    pgtt: str  # "first-stage" | "second-stage" | "nested" | "pass-through" | "legacy"
    did: int
    read: bool
    write: bool
    execute: bool = False
    sid: int = 0
    pasid: int | None = None
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "translated": True,
            "address": hex(self.address),
            "page_size": self.page_size,
            "pgtt": self.pgtt,
            "did": self.did,
            "read": self.read,
            "write": self.write,
            "bdf": bdf_str(self.sid),
            "iova": hex(self.iova),
        }
        if self.pasid is not None:
            out["pasid"] = self.pasid
        return out


class FaultError(Exception):
    """Raised inside the walker to unwind to the point that returns the :class:`Fault`."""

    def __init__(self, reason: FaultReason, detail: str = "") -> None:
        super().__init__(detail or reason.label)
        self.reason = reason
        self.detail = detail
