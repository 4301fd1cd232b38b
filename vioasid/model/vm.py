"""A VM as the host sees it: guest memory, guest devices, CPU PASID table, fault/PRQ queues.

A :class:`VM` holds its guest memory (regions), the guest-visible vIOMMU registers (RTADDR:
the guest's own scalable-mode tables live in guest RAM), its devices (guest RID -> host
function, ``vfio-pci`` | ``mdev``), the VM's global pPASIDs (one per vPASID, README "pPASID
allocation"), its CPU PASID translation table (vPASID -> pPASID for ENQCMD), its fault queue (VT-d
fault records, reported with guest RID + vPASID) and its page-request queue (VT-d page request
descriptors). :func:`read_guest_pasid_entry` reads the guest's PASID entry for (device, vPASID)
out of guest memory, bounded and refusing anything malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vioasid.formats.context import SM_CONTEXT_ENTRY, SM_CONTEXT_ENTRY_SIZE
from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_DIR_ENTRY_SIZE,
    PASID_DIR_SHIFT,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    PASID_TABLE_MASK,
)
from vioasid.formats.registers import RTADDR, TTM_SCALABLE
from vioasid.formats.root import ROOT_ENTRY_SIZE, SM_ROOT_ENTRY

from .errors import InvalidRequest, NotFound
from .faults import Fault, bdf_str
from .guest_driver import SecondStagePageTable
from .host import HostFunction
from .memory import GuestMemory, MemoryAccessError, Region
from .policy import Assign, Rule

FAULT_QUEUE_LIMIT = 1024  # records kept per VM; later faults only count as overflow (PFO)
PRQ_LIMIT = 1024

# Masks/shifts for the bind path, derived from the layouts.
_TTM_S, _TTM_M = RTADDR.field("TTM").lo, RTADDR.field("TTM").vmask
_RTA_M = RTADDR.field("RTA").mask
_LP_M = SM_ROOT_ENTRY.field("LP").mask
_LCTP_M = SM_ROOT_ENTRY.field("LCTP").mask
assert SM_ROOT_ENTRY.field("UP").mask == _LP_M and SM_ROOT_ENTRY.field("UCTP").mask == _LCTP_M
_CE_P_M = SM_CONTEXT_ENTRY.field("P").mask
_CE_PASIDE_M = SM_CONTEXT_ENTRY.field("PASIDE").mask
_CE_PDTS_S, _CE_PDTS_M = SM_CONTEXT_ENTRY.field("PDTS").lo, SM_CONTEXT_ENTRY.field("PDTS").vmask
_CE_DIR_M = SM_CONTEXT_ENTRY.field("PASIDDIRPTR").mask
_PDE_P_M = PASID_DIR_ENTRY.field("P").mask
_PDE_PTP_M = PASID_DIR_ENTRY.field("PTP").mask
_PE_P_M = PASID_ENTRY.field("P").mask
_Q8 = struct.Struct(f"<{len(PASID_ENTRY.words)}Q")


@dataclass(eq=False)
class Device:
    """A guest device: guest RID -> host function, how it was assigned, its policy row.

    ``ppasids`` is the vPASID -> pPASID table the device (``translating``) or its mediation
    (``mdev``) is programmed with; for a device that does not convert it holds pPASID == vPASID.
    ``did`` is the host domain id tagging this device's host PASID entries (unique per host).
    """

    guest_rid: int
    function: HostFunction
    assign: Assign
    rule: Rule
    did: int
    ppasids: dict[int, int] = field(default_factory=dict)

    @property
    def bdf(self) -> str:
        return bdf_str(self.guest_rid)


@dataclass(eq=False)
class VM:
    """One VM on one host."""

    name: str
    memory: GuestMemory
    hpa: int  # host-physical base of the VM's distinct range (guest RAM at hpa + gpa)
    second_stage: SecondStagePageTable
    host_regions: list[Region]
    rtaddr: int = 0  # the guest's RTADDR register (its own root table, in guest RAM)
    devices: dict[int, Device] = field(default_factory=dict)
    # guest RID -> (PASID directory, entries) from its context entry, until invalidated
    context_cache: dict[int, tuple[int, int]] = field(default_factory=dict)
    global_ppasid: dict[int, int] = field(default_factory=dict)  # vPASID -> VM's global pPASID
    global_refs: dict[int, int] = field(default_factory=dict)  # bindings using it
    cpu_table: dict[int, int] = field(default_factory=dict)  # CPU PASID translation table
    cpu_refs: dict[int, int] = field(default_factory=dict)  # enqcmd bindings using it
    faults: list[Fault] = field(default_factory=list)  # VT-d fault records, guest RID + vPASID
    fault_overflow: int = 0
    page_requests: list[bytes] = field(default_factory=list)  # VT-d page request descriptors
    prq_overflow: int = 0

    @property
    def memory_size(self) -> int:
        return max((r.end for r in self.memory.regions), default=0)

    def queue_fault(self, fault: Fault) -> None:
        if len(self.faults) < FAULT_QUEUE_LIMIT:
            self.faults.append(fault)
        else:
            self.fault_overflow += 1

    def queue_page_request(self, desc: bytes) -> None:
        if len(self.page_requests) < PRQ_LIMIT:
            self.page_requests.append(desc)
        else:
            self.prq_overflow += 1

    def bindings(self) -> int:
        return sum(len(d.ppasids) for d in self.devices.values())


class GuestEntryError(InvalidRequest):
    """The guest's tables do not hold a usable PASID entry; ``reason`` is the VT-d code a
    request through them would fault with."""

    def __init__(self, message: str, reason: FaultReason) -> None:
        super().__init__(message)
        self.reason = reason


class GuestEntryMissing(NotFound):
    """The guest has no present PASID entry for (device, vPASID)."""

    def __init__(self, message: str, reason: FaultReason) -> None:
        super().__init__(message)
        self.reason = reason


def _who(sid: int, pasid: int | None = None) -> str:
    who = f"guest device {bdf_str(sid)}"
    return who if pasid is None else f"{who} vPASID {pasid}"


def guest_pasid_dir(mem: GuestMemory, rtaddr: int, sid: int) -> tuple[int, int]:
    """(PASID directory GPA, number of directory entries) of a guest device, from the guest's
    root and scalable-mode context entry."""
    if (rtaddr >> _TTM_S) & _TTM_M != TTM_SCALABLE:
        raise GuestEntryError(
            f"{_who(sid)}: guest RTADDR 0x{rtaddr:x} is not scalable mode",
            FaultReason.RTADDR_INV_TTM,
        )
    devfn = sid & 0xFF
    try:
        half = mem.read_u64((rtaddr & _RTA_M) + (sid >> 8) * ROOT_ENTRY_SIZE + 8 * (devfn >> 7))
    except MemoryAccessError:
        raise GuestEntryError(
            f"{_who(sid)}: root entry outside guest memory", FaultReason.ROOT_TABLE_INV
        ) from None
    if not half & _LP_M:  # LP and UP are bit 0 of their halves
        raise GuestEntryMissing(f"{_who(sid)}: root entry not present", FaultReason.ROOT_ENTRY_P)
    try:
        ce0 = mem.read_u64((half & _LCTP_M) + (devfn & 0x7F) * SM_CONTEXT_ENTRY_SIZE)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{_who(sid)}: context entry outside guest memory", FaultReason.CONTEXT_TABLE_INV
        ) from None
    if not ce0 & _CE_P_M:
        raise GuestEntryMissing(
            f"{_who(sid)}: context entry not present", FaultReason.CONTEXT_ENTRY_P
        )
    if not ce0 & _CE_PASIDE_M:
        raise GuestEntryError(
            f"{_who(sid)}: context entry has PASIDE clear", FaultReason.CONTEXT_PASIDE_CLEAR
        )
    return ce0 & _CE_DIR_M, 1 << (((ce0 >> _CE_PDTS_S) & _CE_PDTS_M) + 7)


def read_guest_pasid_entry(
    mem: GuestMemory, pasid_dir: int, ndir: int, sid: int, pasid: int
) -> tuple[int, ...]:
    """The 8 words of the guest's present PASID entry for ``pasid`` under ``pasid_dir``."""
    didx = pasid >> PASID_DIR_SHIFT
    if didx >= ndir:
        raise GuestEntryError(
            f"{_who(sid, pasid)}: beyond the guest's PASID directory",
            FaultReason.CONTEXT_PASID_TOO_BIG,
        )
    try:
        pde = mem.read_u64(pasid_dir + didx * PASID_DIR_ENTRY_SIZE)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{_who(sid, pasid)}: PASID directory outside guest memory",
            FaultReason.PASID_DIR_ACCESS_ERR,
        ) from None
    if not pde & _PDE_P_M:
        raise GuestEntryMissing(
            f"{_who(sid, pasid)}: PASID directory entry not present",
            FaultReason.PASID_DIR_ENTRY_P,
        )
    gpa = (pde & _PDE_PTP_M) + (pasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE
    try:
        r = mem.region_of(gpa, PASID_ENTRY_SIZE)
        words: tuple[int, ...] = _Q8.unpack_from(r.buf, gpa - r.gpa)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{_who(sid, pasid)}: PASID table outside guest memory",
            FaultReason.PASID_TABLE_ACCESS_ERR,
        ) from None
    if not words[0] & _PE_P_M:
        raise GuestEntryMissing(
            f"{_who(sid, pasid)}: PASID entry not present", FaultReason.PASID_ENTRY_P
        )
    return words


def guest_leaf(mem: GuestMemory, pasid_dir: int, pasid: int) -> tuple[int, ...]:
    """All words of the guest's leaf PASID table holding ``pasid`` (its directory entry must
    have been checked present, e.g. by :func:`read_guest_pasid_entry`)."""
    pde = mem.read_u64(pasid_dir + (pasid >> PASID_DIR_SHIFT) * PASID_DIR_ENTRY_SIZE)
    words: tuple[int, ...] = mem.words(pde & _PDE_PTP_M, PASID_ENTRY_SIZE // 8 * 64)
    return words
