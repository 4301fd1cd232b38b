"""A host's physical functions and its IOMMU tables in host memory.

:class:`HostFunction` is one physical PCI function (its host RID, ``enqcmd``/``translating``
capabilities, its per-RID pPASID allocator, who holds it, and which binding owns each slot of
its PASID table). :class:`HostIommu` is the host side of VT-d: a scalable-mode root table whose
context entry for every function points at that function's one PASID directory/table, indexed by
pPASID, in host memory. Its entries are nested (PGTT=3): FLPTPTR is the guest's first-stage table
(a guest-physical address) and SSPTPTR the VM's second stage (guest-physical -> host-physical).
The entries are written by :class:`~vioasid.model.guest_driver.GuestIommuDriver` (the same
Linux-like table writer the guest uses), the hot per-bind entry write with masks derived from
``formats.pasid.PASID_ENTRY``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

from vioasid.formats.context import pasid_dir_entries
from vioasid.formats.paging import PTE_SIZE, SECOND_STAGE_PTE
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_DIR_ENTRY_SIZE,
    PASID_DIR_SHIFT,
    PASID_ENTRIES_PER_TABLE,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    PASID_TABLE_MASK,
    PGTT_NESTED,
)

from .allocator import PasidAllocator
from .errors import Exhausted, InvalidRequest
from .faults import bdf_str
from .guest_driver import GuestIommuDriver, PageAllocator, SecondStagePageTable
from .memory import GuestMemory, Region

# A PASID-table slot's owner (HostFunction.owner): (the device's DID << OWNER_SHIFT) | vPASID.
OWNER_SHIFT = 20
VPASID_MASK = (1 << OWNER_SHIFT) - 1

# Host-physical layout: IOMMU tables, then each VM's RAM at a distinct 1 GiB-aligned range.
HOST_TABLES_BASE = 0x1000_0000
HOST_TABLES_SIZE = 0x4000_0000  # 1 GiB of lazily-backed host memory for root/context/PASID/SS
VM_HPA_BASE = 0x1_0000_0000
VM_HPA_ALIGN = 0x4000_0000
SS_LEVELS = 4  # second stage AW = 2 (48-bit guest-physical)
HPA_LIMIT = 1 << 48
"""Host-physical addresses the second stage can reach (48-bit, AW = 2): every VM's host range
ends at or below it."""
GPA_LIMIT = 1 << 48
"""Guest-physical addresses a 4-level second stage maps."""

_P = PASID_ENTRY.field("P")
_P_MASK = _P.mask
_AW = PASID_ENTRY.field("AW")
_PGTT = PASID_ENTRY.field("PGTT")
_DID = PASID_ENTRY.field("DID")
_SRE = PASID_ENTRY.field("SRE")
_FLPM = PASID_ENTRY.field("FLPM")
_WPE = PASID_ENTRY.field("WPE")
_EAFE = PASID_ENTRY.field("EAFE")
_FLPTPTR = PASID_ENTRY.field("FLPTPTR")
_SSPTPTR = PASID_ENTRY.field("SSPTPTR")
_PDE_P = PASID_DIR_ENTRY.field("P").mask
_PDE_PTP = PASID_DIR_ENTRY.field("PTP").mask
_Q8 = struct.Struct("<8Q")
_U64 = struct.Struct("<Q")
# Hot-path constants of a nested entry, derived from the layout's fields.
_QW0_NESTED = _P.mask | _AW.put(SS_LEVELS - 2) | _PGTT.put(PGTT_NESTED)
_SSPTPTR_M = _SSPTPTR.mask
# What a nested entry takes from the guest's first-stage entry (qw2), as pasid_pte_config_nestd.
QW2_NESTED_COPY = _SRE.mask | _FLPM.mask | _WPE.mask | _EAFE.mask | _FLPTPTR.mask
_DID_S, _DID_VM = _DID.lo, _DID.vmask
_SS_PRESENT = SECOND_STAGE_PTE.field("R").mask | SECOND_STAGE_PTE.field("W").mask
_SS_PS = SECOND_STAGE_PTE.field("PS").mask
_SS_ADDR = SECOND_STAGE_PTE.field("ADDR").mask


@dataclass
class HostFunction:
    """One physical function of a host (README "Host functions and how a guest gets them")."""

    rid: int
    enqcmd: bool = False
    translating: bool = False
    pasid_bits: int = 20
    allocator: PasidAllocator = field(init=False)
    # Slot owners of this function's PASID table: pPASID -> (DID << 20) | vPASID.
    owner: dict[int, int] = field(default_factory=dict)
    vfio_vm: str | None = None  # the VM holding the whole function (vfio-pci)
    mdev_users: dict[str, int] = field(default_factory=dict)  # VM -> mdevs it holds

    def __post_init__(self) -> None:
        self.allocator = PasidAllocator(self.pasid_bits, f"function {bdf_str(self.rid)}")

    @property
    def bdf(self) -> str:
        return bdf_str(self.rid)

    @property
    def assigned(self) -> str | None:
        if self.vfio_vm is not None:
            return "vfio-pci"
        return "mdev" if self.mdev_users else None


class HostIommu:
    """The host IOMMU's tables in host memory: one PASID table per function, by pPASID."""

    def __init__(self, pasid_bits: int, *, hpa_base: int = VM_HPA_BASE) -> None:
        self.mem = GuestMemory()
        self._tables_buf = mmap.mmap(-1, HOST_TABLES_SIZE)
        region = self.mem.add(HOST_TABLES_BASE, self._tables_buf, name="host-tables")
        self._tables_view = region.buf
        self.pages = PageAllocator(self.mem, HOST_TABLES_BASE, HOST_TABLES_SIZE)
        self.driver = GuestIommuDriver.for_pasid_bits(self.mem, self.pages, pasid_bits)
        self.rtaddr = self.driver.rtaddr
        if hpa_base < VM_HPA_BASE or hpa_base % VM_HPA_ALIGN:
            raise ValueError("VM host ranges start 1 GiB aligned, at or above 4 GiB")
        self._hpa_base = hpa_base
        self._ranges: dict[int, int] = {}  # host range start -> size, one per VM
        self._ndir = pasid_dir_entries(self.driver.pdts)
        # (function RID, directory index) -> leaf PASID table (host-physical)
        self.leaves: dict[tuple[int, int], int] = {}
        self._journal: list[tuple[int, int]] | None = None

    # -- functions ------------------------------------------------------------------------
    def add_function(self, rid: int) -> None:
        """Context entry + PASID directory for the function (its one PASID table)."""
        self.driver.attach_device(rid)

    def entry_gpa(self, rid: int, ppasid: int, *, create: bool) -> int | None:
        """Host-physical address of the function's PASID-table entry for ``ppasid``; ``create``
        makes the leaf PASID table (lazily, like Linux). None when there is none / no room."""
        didx = ppasid >> PASID_DIR_SHIFT
        key = (rid, didx)
        leaf = self.leaves.get(key)
        if leaf is None:
            if not create or didx >= self._ndir or rid not in self.driver.pasid_dirs:
                return None
            try:
                leaf = self.pages.alloc()
            except ValueError:
                return None
            dgpa = self.driver.pasid_dirs[rid] + didx * PASID_DIR_ENTRY_SIZE
            self.mem.write_u64(dgpa, _PDE_P | _PDE_PTP & leaf)
            self.leaves[key] = leaf
            if self._journal is not None:
                self._journal.append(key)
        return leaf + (ppasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE

    # -- all-or-nothing sections (migration import) ----------------------------------------
    def begin(self) -> tuple[list[tuple[int, int]], frozenset[int]]:
        """Start recording what is created, so :meth:`rollback` can give it back."""
        self._journal = []
        return self._journal, frozenset(self._ranges)

    def rollback(self, saved: tuple[list[tuple[int, int]], frozenset[int]]) -> None:
        """Free the leaf PASID tables made since :meth:`begin` (their entries are clear by
        now) and give back the host ranges taken since."""
        journal, ranges = saved
        for rid, didx in reversed(journal):
            leaf = self.leaves.pop((rid, didx))
            self.mem.write_u64(self.driver.pasid_dirs[rid] + didx * PASID_DIR_ENTRY_SIZE, 0)
            self.mem.write(leaf, bytes(4096))
            self.pages.release(leaf)
        for start in set(self._ranges) - ranges:
            del self._ranges[start]
        self._journal = None

    def commit(self, saved: tuple[list[tuple[int, int]], frozenset[int]]) -> None:
        self._journal = None

    def write_nested(
        self, rid: int, ppasid: int, *, did: int, guest_qw2: int, ssptptr: int
    ) -> None:
        """Install a nested (PGTT=3) entry like ``pasid_pte_config_nestd``: the first-stage
        fields (FLPTPTR, FLPM, SRE, WPE, EAFE) copied from the guest's entry qw2, the VM's
        second stage, the device's DID; tail words first, qw0 with P last."""
        leaf = self.leaves.get((rid, ppasid >> PASID_DIR_SHIFT))
        if leaf is None:
            gpa = self.entry_gpa(rid, ppasid, create=True)
            if gpa is None:
                raise ValueError(f"no PASID table for {bdf_str(rid)} pPASID {ppasid}")
        else:
            gpa = leaf + (ppasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE
        # Leaf tables live in the host-tables region; one pack writes the 8 words (the model is
        # single-threaded, so no walk can observe the entry half-written).
        _Q8.pack_into(
            self._tables_view,
            gpa - HOST_TABLES_BASE,
            _QW0_NESTED | (ssptptr & _SSPTPTR_M),
            (did & _DID_VM) << _DID_S,
            guest_qw2 & QW2_NESTED_COPY,
            0, 0, 0, 0, 0,
        )  # fmt: skip

    def clear(self, rid: int, ppasid: int) -> None:
        """Tear the entry down (``intel_pasid_tear_down_entry``: clear P, then the entry)."""
        gpa = self.entry_gpa(rid, ppasid, create=False)
        if gpa is None:
            return
        self.mem.write_u64(gpa, self.mem.read_u64(gpa) & ~_P_MASK)
        self.mem.write(gpa, bytes(PASID_ENTRY_SIZE))

    def entry_words(self, rid: int, ppasid: int) -> tuple[int, ...] | None:
        gpa = self.entry_gpa(rid, ppasid, create=False)
        if gpa is None:
            return None
        words = PASID_ENTRY.words_of(self.mem.view(gpa, PASID_ENTRY_SIZE))
        return words if words[0] & _P_MASK else None

    def present_entries(self, rid: int) -> dict[int, tuple[int, ...]]:
        """Every present entry of the function's PASID table, by pPASID (tests, dumps)."""
        out: dict[int, tuple[int, ...]] = {}
        pdir = self.driver.pasid_dirs[rid]
        ndir = pasid_dir_entries(self.driver.pdts)
        for didx, pde in enumerate(self.mem.words(pdir, ndir)):
            if not pde & _PDE_P:
                continue
            n = len(PASID_ENTRY.words)
            leaf = self.mem.words(pde & _PDE_PTP, PASID_ENTRIES_PER_TABLE * n)
            for tidx in range(PASID_ENTRIES_PER_TABLE):
                words = leaf[tidx * n : (tidx + 1) * n]
                if any(words):
                    out[(didx << PASID_DIR_SHIFT) | tidx] = words
        return out

    # -- VM ranges ------------------------------------------------------------------------
    def _take_range(self, span: int) -> int:
        """The lowest free ``span`` bytes of VM host space (first fit between the VMs' ranges,
        given back by :meth:`unmap_vm`); ``Exhausted`` when none is left below the limit."""
        start = self._hpa_base
        for base in sorted(self._ranges):
            if base - start >= span:
                break
            start = max(start, base + self._ranges[base])
        if start + span > HPA_LIMIT:
            raise Exhausted(
                f"no free host range of 0x{span:x} bytes below 0x{HPA_LIMIT:x} "
                f"({len(self._ranges)} VMs placed)"
            )
        self._ranges[start] = span
        return start

    def map_vm(
        self, name: str, guest: GuestMemory
    ) -> tuple[int, SecondStagePageTable, list[Region]]:
        """Give the VM a distinct host range: its RAM appears in host memory at ``hpa + gpa``
        and a second-stage table maps exactly that. Returns (hpa, table, host regions). A VM
        whose RAM reaches past the 48-bit guest-physical space is refused, one that fits in no
        free host range is ``Exhausted``; either way nothing changes."""
        top = max((r.end for r in guest.regions), default=0)
        if top > GPA_LIMIT:
            raise InvalidRequest(
                f"VM {name}: guest memory ends at 0x{top:x}, past the 48-bit guest-physical "
                "space the second stage maps"
            )
        hpa = self._take_range(max(VM_HPA_ALIGN, -(-top // VM_HPA_ALIGN) * VM_HPA_ALIGN))
        ss = SecondStagePageTable(self.mem, self.pages, levels=SS_LEVELS)
        added: list[Region] = []
        try:
            for r in guest.regions:
                added.append(
                    self.mem.add(hpa + r.gpa, r.buf, name=f"{name}:{r.name or hex(r.gpa)}")
                )
                start = -(-r.gpa // 4096) * 4096
                end = r.end // 4096 * 4096
                if end > start:
                    ss.map(start, hpa + start, end - start)
        except BaseException:
            self.unmap_vm(ss, added, hpa)
            raise
        return hpa, ss, added

    def unmap_vm(
        self, ss: SecondStagePageTable, regions: list[Region], hpa: int | None = None
    ) -> None:
        """Drop a VM's host regions, free its second-stage pages and give its host range back
        (``hpa``, else the range holding its first region)."""
        if hpa is None and regions:
            hpa = next((b for b, n in self._ranges.items() if b <= regions[0].gpa < b + n), None)
        for r in regions:
            self.mem.remove(r)
        self._release_table(ss.root, ss.levels)
        if hpa is not None:
            self._ranges.pop(hpa, None)

    def _release_table(self, table: int, level: int) -> None:
        if level > 1:
            for pte in self.mem.words(table, 512):
                if pte & _SS_PRESENT and not (pte & _SS_PS and level in (2, 3)):
                    self._release_table(pte & _SS_ADDR, level - 1)
        self.mem.write(table, bytes(512 * PTE_SIZE))
        self.pages.release(table)
