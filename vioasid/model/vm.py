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

from dataclasses import dataclass, field

from vioasid.formats.context import SM_CONTEXT_ENTRY, SM_CONTEXT_ENTRY_SIZE, pasid_dir_entries
from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_DIR_ENTRY_SIZE,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    pasid_indices,
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

_RTA = RTADDR.field("RTA")
_TTM = RTADDR.field("TTM")
_LP = SM_ROOT_ENTRY.field("LP")
_LCTP = SM_ROOT_ENTRY.field("LCTP")
_UP = SM_ROOT_ENTRY.field("UP")
_UCTP = SM_ROOT_ENTRY.field("UCTP")
_CE_P = SM_CONTEXT_ENTRY.field("P")
_CE_PASIDE = SM_CONTEXT_ENTRY.field("PASIDE")
_CE_PDTS = SM_CONTEXT_ENTRY.field("PDTS")
_CE_DIR = SM_CONTEXT_ENTRY.field("PASIDDIRPTR")
_PDE_P = PASID_DIR_ENTRY.field("P")
_PDE_PTP = PASID_DIR_ENTRY.field("PTP")
_PE_P = PASID_ENTRY.field("P")


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


def guest_pasid_dir(mem: GuestMemory, rtaddr: int, sid: int) -> tuple[int, int]:
    """(PASID directory GPA, number of directory entries) of a guest device, from the guest's
    root and scalable-mode context entry."""
    who = f"guest device {bdf_str(sid)}"
    if _TTM.get(rtaddr) != TTM_SCALABLE:
        raise GuestEntryError(
            f"{who}: guest RTADDR 0x{rtaddr:x} is not scalable mode", FaultReason.RTADDR_INV_TTM
        )
    root = _RTA.get(rtaddr) + (sid >> 8) * ROOT_ENTRY_SIZE
    devfn = sid & 0xFF
    try:
        lo, hi = mem.words(root, 2)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{who}: root entry outside guest memory", FaultReason.ROOT_TABLE_INV
        ) from None
    if devfn & 0x80:
        present, ctp = _UP.get(hi), _UCTP.get(hi)
    else:
        present, ctp = _LP.get(lo), _LCTP.get(lo)
    if not present:
        raise GuestEntryMissing(f"{who}: root entry not present", FaultReason.ROOT_ENTRY_P)
    try:
        ce = mem.words(ctp + (devfn & 0x7F) * SM_CONTEXT_ENTRY_SIZE, 4)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{who}: context entry outside guest memory", FaultReason.CONTEXT_TABLE_INV
        ) from None
    if not _CE_P.get(ce[0]):
        raise GuestEntryMissing(f"{who}: context entry not present", FaultReason.CONTEXT_ENTRY_P)
    if not _CE_PASIDE.get(ce[0]):
        raise GuestEntryError(
            f"{who}: context entry has PASIDE clear", FaultReason.CONTEXT_PASIDE_CLEAR
        )
    return _CE_DIR.get(ce[0]), pasid_dir_entries(_CE_PDTS.get(ce[0]))


def read_guest_pasid_entry(
    mem: GuestMemory, pasid_dir: int, ndir: int, sid: int, pasid: int
) -> tuple[int, ...]:
    """The 8 words of the guest's present PASID entry for ``pasid`` under ``pasid_dir``."""
    didx, tidx = pasid_indices(pasid)
    who = f"guest device {bdf_str(sid)} vPASID {pasid}"
    if didx >= ndir:
        raise GuestEntryError(
            f"{who}: beyond the guest's PASID directory", FaultReason.CONTEXT_PASID_TOO_BIG
        )
    try:
        pde = mem.read_u64(pasid_dir + didx * PASID_DIR_ENTRY_SIZE)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{who}: PASID directory outside guest memory", FaultReason.PASID_DIR_ACCESS_ERR
        ) from None
    if not pde & _PDE_P.mask:
        raise GuestEntryMissing(
            f"{who}: PASID directory entry not present", FaultReason.PASID_DIR_ENTRY_P
        )
    try:
        words = mem.words(_PDE_PTP.get(pde) + tidx * PASID_ENTRY_SIZE, 8)
    except MemoryAccessError:
        raise GuestEntryError(
            f"{who}: PASID table outside guest memory", FaultReason.PASID_TABLE_ACCESS_ERR
        ) from None
    if not words[0] & _PE_P.mask:
        raise GuestEntryMissing(f"{who}: PASID entry not present", FaultReason.PASID_ENTRY_P)
    return words
