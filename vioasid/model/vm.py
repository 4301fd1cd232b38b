"""A VM as the host sees it: guest memory, guest devices, CPU PASID table, fault/PRQ queues.

A :class:`VM` holds its guest memory (regions), the guest-visible vIOMMU registers (RTADDR:
the guest's own scalable-mode tables live in guest RAM), its devices (guest RID -> host
function, ``vfio-pci`` | ``mdev``), the VM's global pPASIDs (one per vPASID, README "pPASID
allocation"), its CPU PASID translation table (vPASID -> pPASID for ENQCMD), its fault queue (VT-d
fault records, reported with guest RID + vPASID) and its page-request queue (VT-d page request
descriptors). :class:`GuestTables` reads the guest's context and PASID entries out of guest
memory through the walker's one reader: bounded, every present and reserved bit checked.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import PASID_ENTRIES_PER_TABLE, PASID_ENTRY, PASID_TABLE_MASK
from vioasid.formats.registers import RTADDR, TTM_SCALABLE

from .cache import Caches, ContextInfo
from .errors import InvalidRequest, NotFound, VioasidError
from .faults import Fault, FaultError, bdf_str
from .guest_driver import SecondStagePageTable
from .host import HostFunction
from .memory import GuestMemory, MemoryAccessError, Region
from .policy import Assign, Rule
from .walker import NOT_PRESENT, Walker

FAULT_QUEUE_LIMIT = 1024  # records kept per VM; later faults only count as overflow (PFO)
PRQ_LIMIT = 1024

_TTM = RTADDR.field("TTM")
_PE_WORDS = len(PASID_ENTRY.words)
_PE_SIZE = PASID_ENTRY.size
_PE_STRUCT = struct.Struct(f"<{_PE_WORDS}Q")


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
    # guest RID -> its context entry, until invalidated
    context_cache: dict[int, ContextInfo] = field(default_factory=dict)
    global_ppasid: dict[int, int] = field(default_factory=dict)  # vPASID -> VM's global pPASID
    global_refs: dict[int, int] = field(default_factory=dict)  # bindings using it
    cpu_table: dict[int, int] = field(default_factory=dict)  # CPU PASID translation table
    cpu_refs: dict[int, int] = field(default_factory=dict)  # enqcmd bindings using it
    faults: list[Fault] = field(default_factory=list)  # VT-d fault records, guest RID + vPASID
    fault_overflow: int = 0
    page_requests: list[bytes] = field(default_factory=list)  # VT-d page request descriptors
    prq_overflow: int = 0

    def __post_init__(self) -> None:
        self.tables = GuestTables(self.memory)

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


def _refusal(exc: FaultError, sid: int, pasid: int | None = None) -> VioasidError:
    """The walker's fault as a refusal: a missing entry is NotFound, anything else invalid."""
    cls = GuestEntryMissing if exc.reason in NOT_PRESENT else GuestEntryError
    return cls(f"{_who(sid, pasid)}: {exc.detail}", exc.reason)


class GuestTables:
    """A guest's root -> context -> PASID tables in its RAM, read through the walker's one
    reader (every present and reserved bit checked, as a request through them would be).
    Refusals are :class:`GuestEntryMissing` (not present) or :class:`GuestEntryError`."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.reader = Walker(memory, caches=Caches(enabled=False))
        # The folded test of a present, well-formed first-stage entry (the bind fast path);
        # False means :meth:`check` names what is wrong (or it is another PGTT).
        self.entry_ok: Callable[[tuple[int, ...]], bool] = self.reader.first_stage_entry_ok

    def context(self, rtaddr: int, sid: int) -> ContextInfo:
        """The guest device's scalable-mode context entry, with PASIDs enabled."""
        if _TTM.get(rtaddr) != TTM_SCALABLE:
            raise GuestEntryError(
                f"{_who(sid)}: guest RTADDR 0x{rtaddr:x} is not scalable mode",
                FaultReason.RTADDR_INV_TTM,
            )
        try:
            ctx = self.reader.context_info(rtaddr, sid)
        except FaultError as exc:
            raise _refusal(exc, sid) from None
        if not ctx.paside:
            raise GuestEntryError(
                f"{_who(sid)}: context entry has PASIDE clear", FaultReason.CONTEXT_PASIDE_CLEAR
            )
        return ctx

    def pasid_entry(self, ctx: ContextInfo, sid: int, pasid: int) -> tuple[int, ...]:
        """The words of the guest's present, well-formed PASID entry for ``pasid``."""
        reader = self.reader
        words = reader.first_stage_words(ctx, pasid)
        if words is not None:
            return words
        # anything else: the reader names the refusal (or it is another PGTT, refused later)
        try:
            gpa = reader.pasid_table(ctx, pasid) + (pasid & PASID_TABLE_MASK) * _PE_SIZE
            words = self.leaf_words(gpa, 1)
            reader.decode_pasid_entry(words, pasid)
        except FaultError as exc:
            raise _refusal(exc, sid, pasid) from None
        return words

    def leaf(self, ctx: ContextInfo, sid: int, pasid: int) -> tuple[int, ...]:
        """Every word of the leaf PASID table holding ``pasid`` (64 entries), for binding many
        vPASIDs with one read; check each entry with ``entry_ok`` / :meth:`check`."""
        try:
            return self.leaf_words(self.reader.pasid_table(ctx, pasid), PASID_ENTRIES_PER_TABLE)
        except FaultError as exc:
            raise _refusal(exc, sid, pasid) from None

    def leaf_words(self, gpa: int, entries: int) -> tuple[int, ...]:
        try:
            return self.memory.words(gpa, entries * _PE_WORDS)
        except MemoryAccessError:
            raise FaultError(
                FaultReason.PASID_TABLE_ACCESS_ERR, f"PASID table 0x{gpa:x} outside guest memory"
            ) from None

    def check(self, words: tuple[int, ...], sid: int, pasid: int) -> None:
        """Raise the refusal :meth:`pasid_entry` would for these entry words."""
        try:
            self.reader.decode_pasid_entry(words, pasid)
        except FaultError as exc:
            raise _refusal(exc, sid, pasid) from None
