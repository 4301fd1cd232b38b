"""A guest IOMMU driver in miniature: lays out VT-d tables in a :class:`GuestMemory`.

It writes root, context, PASID-directory and PASID-table entries and first/second-stage page
tables the way Linux ``drivers/iommu/intel`` does (``context_entry_set_pasid_table()``,
``intel_pasid_setup_*()``, lazily filled PASID directory, ``pasid_pte_config_*``), so tests,
scenarios, benchmarks and the example image exercise the walker on realistic tables. Every
entry is built with the ``vioasid.formats`` layouts.
"""

from __future__ import annotations

from vioasid.formats.context import (
    LEGACY_CONTEXT_ENTRY,
    LEGACY_CONTEXT_ENTRY_SIZE,
    SM_CONTEXT_ENTRY,
    SM_CONTEXT_ENTRY_SIZE,
    pasid_dir_entries,
)
from vioasid.formats.paging import ENTRIES_PER_TABLE, FIRST_STAGE_PTE, PTE_SIZE, SECOND_STAGE_PTE
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_DIR_ENTRY_SIZE,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    pasid_indices,
)
from vioasid.formats.registers import RTADDR, TTM_LEGACY, TTM_SCALABLE
from vioasid.formats.root import LEGACY_ROOT_ENTRY, ROOT_ENTRY_SIZE, SM_ROOT_ENTRY

from .memory import GuestMemory

PAGE = 4096


class PagesExhausted(ValueError):
    """The guest's page-table pool is full (its memory is too small for its tables)."""


class PageAllocator:
    """Hands out zeroed 4 KiB guest pages from ``[base, base + size)`` of a GuestMemory."""

    def __init__(self, mem: GuestMemory, base: int, size: int) -> None:
        if base % PAGE or size % PAGE or size <= 0:
            raise ValueError("allocator range must be page aligned and non-empty")
        if not mem.contains(base, size):
            raise ValueError(f"allocator range 0x{base:x}+0x{size:x} is outside guest memory")
        self.mem = mem
        self.base = base
        self.size = size
        self.next = base
        self.free: list[int] = []

    def alloc(self, pages: int = 1) -> int:
        """GPA of ``pages`` contiguous zeroed pages; :class:`PagesExhausted` when the range is
        full."""
        if pages == 1 and self.free:
            gpa = self.free.pop()
        else:
            if self.next + pages * PAGE > self.base + self.size:
                raise PagesExhausted("guest page allocator exhausted")
            gpa = self.next
            self.next += pages * PAGE
        self.mem.write(gpa, bytes(pages * PAGE))
        return gpa

    def release(self, gpa: int) -> None:
        """Return one page to the allocator."""
        self.free.append(gpa)

    @property
    def used(self) -> int:
        return self.next - self.base - PAGE * len(self.free)


class GuestIommuDriver:
    """Root/context/PASID tables as a Linux intel-iommu guest lays them out.

    ``scalable=False`` builds legacy-mode tables instead (``set_legacy_context``).
    """

    def __init__(
        self, mem: GuestMemory, alloc: PageAllocator, *, pdts: int = 2, scalable: bool = True
    ) -> None:
        if not 0 <= pdts <= 7:
            raise ValueError("PDTS is 3 bits")
        self.mem = mem
        self.alloc = alloc
        self.pdts = pdts
        self.scalable = scalable
        self.root = alloc.alloc()
        ttm = TTM_SCALABLE if scalable else TTM_LEGACY
        self.rtaddr: int = RTADDR.words[0].encode({"TTM": ttm, "RTA": self.root})
        self.context_tables: dict[tuple[int, int], int] = {}  # (bus, upper half) -> table GPA
        self.pasid_dirs: dict[int, int] = {}  # sid -> PASID directory GPA

    @classmethod
    def for_pasid_bits(
        cls, mem: GuestMemory, alloc: PageAllocator, pasid_bits: int = 20
    ) -> GuestIommuDriver:
        """Directory sized like Linux for ``pasid_bits``-bit PASIDs (PDTS = bits - 6 - 7)."""
        return cls(mem, alloc, pdts=max(0, min(7, pasid_bits - 6 - 7)))

    # -- root / context -----------------------------------------------------------------
    def _context_entry_gpa(self, sid: int) -> int:
        bus, devfn = sid >> 8, sid & 0xFF
        root_gpa = self.root + bus * ROOT_ENTRY_SIZE
        if not self.scalable:
            key = (bus, 0)
            if key not in self.context_tables:
                table = self.alloc.alloc()
                self.context_tables[key] = table
                self.mem.write(root_gpa, LEGACY_ROOT_ENTRY.build({"P": 1, "CTP": table}))
            return self.context_tables[key] + devfn * LEGACY_CONTEXT_ENTRY_SIZE
        upper = devfn >> 7
        key = (bus, upper)
        if key not in self.context_tables:
            table = self.alloc.alloc()
            self.context_tables[key] = table
            old = SM_ROOT_ENTRY.flat(self.mem.view(root_gpa, ROOT_ENTRY_SIZE))
            if upper:
                old.update(UP=1, UCTP=table)
            else:
                old.update(LP=1, LCTP=table)
            self.mem.write(root_gpa, SM_ROOT_ENTRY.build(old))
        return self.context_tables[key] + (devfn & 0x7F) * SM_CONTEXT_ENTRY_SIZE

    def context_entry_gpa(self, sid: int) -> int:
        return self._context_entry_gpa(sid)

    def attach_device(
        self,
        sid: int,
        *,
        rid_pasid: int = 0,
        pre: bool = False,
        paside: bool = True,
        dte: bool = False,
    ) -> None:
        """Scalable-mode context entry + PASID directory (``context_entry_set_pasid_table``)."""
        if not self.scalable:
            raise ValueError("attach_device builds scalable-mode tables; use set_legacy_context")
        ndir = pasid_dir_entries(self.pdts)
        pages = max(1, ndir * PASID_DIR_ENTRY_SIZE // PAGE)
        pdir = self.alloc.alloc(pages)
        self.pasid_dirs[sid] = pdir
        entry = SM_CONTEXT_ENTRY.build(
            {
                "P": 1,
                "DTE": int(dte),
                "PASIDE": int(paside),
                "PRE": int(pre),
                "PDTS": self.pdts,
                "PASIDDIRPTR": pdir,
                "RID_PASID": rid_pasid,
            }
        )
        self.mem.write(self._context_entry_gpa(sid), entry)

    def detach_device(self, sid: int) -> None:
        self.mem.write(self._context_entry_gpa(sid), bytes(SM_CONTEXT_ENTRY_SIZE))
        self.pasid_dirs.pop(sid, None)

    def set_legacy_context(
        self, sid: int, *, did: int, ssptptr: int = 0, aw: int = 2, tt: int = 0
    ) -> None:
        """Legacy-mode context entry (TT 0 multi-level, 2 pass-through)."""
        if self.scalable:
            raise ValueError("legacy context entries need GuestIommuDriver(scalable=False)")
        entry = LEGACY_CONTEXT_ENTRY.build(
            {"P": 1, "TT": tt, "SSPTPTR": ssptptr, "AW": aw, "DID": did}
        )
        self.mem.write(self._context_entry_gpa(sid), entry)

    # -- PASID directory / table --------------------------------------------------------
    def pasid_entry_gpa(self, sid: int, pasid: int, *, create: bool = False) -> int:
        """GPA of the PASID-table entry; ``create`` allocates the leaf table like Linux."""
        pdir = self.pasid_dirs.get(sid)
        if pdir is None:
            raise ValueError(f"device 0x{sid:04x} is not attached")
        didx, tidx = pasid_indices(pasid)
        if didx >= pasid_dir_entries(self.pdts):
            raise ValueError(f"PASID {pasid} is beyond the directory (PDTS={self.pdts})")
        dgpa = pdir + didx * PASID_DIR_ENTRY_SIZE
        pde = self.mem.read_u64(dgpa)
        if not PASID_DIR_ENTRY.field("P").get(pde):
            if not create:
                raise ValueError(f"PASID {pasid}: no PASID table yet")
            table = self.alloc.alloc()
            self.mem.write_u64(dgpa, PASID_DIR_ENTRY.words[0].encode({"P": 1, "PTP": table}))
            pde = self.mem.read_u64(dgpa)
        return PASID_DIR_ENTRY.field("PTP").get(pde) + tidx * PASID_ENTRY_SIZE

    def set_pasid_entry(
        self,
        sid: int,
        pasid: int,
        *,
        pgtt: int,
        did: int,
        flptptr: int = 0,
        ssptptr: int = 0,
        aw: int = 2,
        flpm: int = 0,
        sre: bool = False,
        wpe: bool = False,
        ere: bool = False,
        fpd: bool = False,
        pwsnp: bool = False,
    ) -> None:
        """Write a present PASID entry (``pasid_pte_config_*``): words first, P last."""
        gpa = self.pasid_entry_gpa(sid, pasid, create=True)
        raw = PASID_ENTRY.build(
            {
                "P": 1,
                "FPD": int(fpd),
                "AW": aw,
                "PGTT": pgtt,
                "SSPTPTR": ssptptr,
                "DID": did,
                "PWSNP": int(pwsnp),
                "SRE": int(sre),
                "ERE": int(ere),
                "FLPM": flpm,
                "WPE": int(wpe),
                "FLPTPTR": flptptr,
            }
        )
        self.mem.write(gpa + 8, raw[8:])
        self.mem.write(gpa, raw[:8])

    def clear_pasid_entry(self, sid: int, pasid: int) -> None:
        """``intel_pasid_tear_down_entry``: clear P, then the whole entry."""
        gpa = self.pasid_entry_gpa(sid, pasid, create=True)
        self.mem.write_u64(gpa, self.mem.read_u64(gpa) & ~1)
        self.mem.write(gpa, bytes(PASID_ENTRY_SIZE))


# -- page tables ---------------------------------------------------------------------------

_FS_P = FIRST_STAGE_PTE.field("P").mask
_FS_RW = FIRST_STAGE_PTE.field("RW").mask
_FS_US = FIRST_STAGE_PTE.field("US").mask
_FS_A = FIRST_STAGE_PTE.field("A").mask
_FS_D = FIRST_STAGE_PTE.field("D").mask
_FS_PS = FIRST_STAGE_PTE.field("PS").mask
_FS_XD = FIRST_STAGE_PTE.field("XD").mask
_ADDR = FIRST_STAGE_PTE.field("ADDR").mask
_SS_R = SECOND_STAGE_PTE.field("R").mask
_SS_W = SECOND_STAGE_PTE.field("W").mask
_SS_PS = SECOND_STAGE_PTE.field("PS").mask


class _PageTable:
    """Shared radix-tree logic: ``levels`` levels of 512 8-byte entries, 4 KiB leaves."""

    _present_mask = _FS_P
    _large_levels = (2, 3)  # 2 MiB at level 2, 1 GiB at level 3

    def __init__(self, mem: GuestMemory, alloc: PageAllocator, levels: int = 4) -> None:
        if levels not in (3, 4, 5):
            raise ValueError("page tables have 3, 4 or 5 levels")
        self.mem = mem
        self.alloc = alloc
        self.levels = levels
        self.root: int = alloc.alloc()

    def _table_entry(self) -> int:
        raise NotImplementedError

    def _leaf_entry(self, pa: int, level: int, flags: dict[str, bool]) -> int:
        raise NotImplementedError

    def _entry_gpa(self, va: int, level: int, create: bool) -> int | None:
        """GPA of the level-``level`` entry for ``va``, creating tables on the way if asked."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            gpa = table + ((va >> (12 + 9 * (lvl - 1))) & 0x1FF) * PTE_SIZE
            pte = self.mem.read_u64(gpa)
            if not pte & self._present_mask:
                if not create:
                    return None
                new = self.alloc.alloc()
                self.mem.write_u64(gpa, new | self._table_entry())
                pte = self.mem.read_u64(gpa)
            elif lvl in self._large_levels and pte & _FS_PS:
                raise ValueError(f"0x{va:x} is inside a large page")
            table = pte & _ADDR
        return table + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * PTE_SIZE

    def _map(self, va: int, pa: int, size: int, flags: dict[str, bool]) -> None:
        if (va | pa | size) & (PAGE - 1):
            raise ValueError("map needs 4 KiB aligned va, pa and size")
        end = va + size
        while va < end:
            level = 1
            for lvl in (3, 2):
                span = 1 << (12 + 9 * (lvl - 1))
                if lvl in self._large_levels and not (va | pa) & (span - 1) and end - va >= span:
                    level = lvl
                    break
            gpa = self._entry_gpa(va, level, create=True)
            assert gpa is not None
            self.mem.write_u64(gpa, self._leaf_entry(pa, level, flags))
            step = 1 << (12 + 9 * (level - 1))
            va += step
            pa += step

    def unmap(self, va: int, size: int) -> None:
        """Clear the leaf entries of ``[va, va + size)`` (whole large pages only)."""
        end = va + size
        while va < end:
            done = False
            for level in (3, 2, 1):
                span = 1 << (12 + 9 * (level - 1))
                try:
                    gpa = self._entry_gpa(va, level, create=False)
                except ValueError:
                    continue
                if gpa is None:
                    va = (va | (span - 1)) + 1  # nothing mapped in this span
                    done = True
                    break
                pte = self.mem.read_u64(gpa)
                if level == 1 or pte & _FS_PS:
                    if level > 1 and (va & (span - 1) or end - va < span):
                        raise ValueError(f"unmap 0x{va:x} splits a large page")
                    self.mem.write_u64(gpa, 0)
                    va = (va | (span - 1)) + 1
                    done = True
                    break
            if not done:
                va += PAGE


class FirstStagePageTable(_PageTable):
    """x86-64 4/5-level first-stage tables (Linux ``DMA_FL_PTE_*`` bits)."""

    def __init__(self, mem: GuestMemory, alloc: PageAllocator, levels: int = 4) -> None:
        if levels not in (4, 5):
            raise ValueError("first-stage tables have 4 or 5 levels")
        super().__init__(mem, alloc, levels)

    def _table_entry(self) -> int:
        # Linux: DMA_PTE_READ | DMA_PTE_WRITE | DMA_FL_PTE_US | DMA_FL_PTE_ACCESS on non-leaves.
        return _FS_P | _FS_RW | _FS_US | _FS_A

    def _leaf_entry(self, pa: int, level: int, flags: dict[str, bool]) -> int:
        e = pa | _FS_P | _FS_A
        if flags["write"]:
            e |= _FS_RW | _FS_D
        if flags["user"]:
            e |= _FS_US
        if flags["xd"]:
            e |= _FS_XD
        if level > 1:
            e |= _FS_PS
        return e

    def map(
        self,
        va: int,
        pa: int,
        size: int,
        *,
        write: bool = True,
        user: bool = True,
        xd: bool = False,
    ) -> None:
        """Map ``[va, va+size)`` to ``pa``, with 2 MiB / 1 GiB pages where aligned."""
        self._map(va, pa, size, {"write": write, "user": user, "xd": xd})


class SecondStagePageTable(_PageTable):
    """Second-stage tables, ``levels`` = AW + 2 (Linux ``DMA_PTE_READ/WRITE/LARGE_PAGE``)."""

    _present_mask = _SS_R | _SS_W

    def _table_entry(self) -> int:
        return _SS_R | _SS_W

    def _leaf_entry(self, pa: int, level: int, flags: dict[str, bool]) -> int:
        e = pa | _SS_R
        if flags["write"]:
            e |= _SS_W
        if level > 1:
            e |= _SS_PS
        return e

    @property
    def aw(self) -> int:
        return self.levels - 2

    def map(self, iova: int, pa: int, size: int, *, write: bool = True) -> None:
        """Map ``[iova, iova+size)`` to ``pa``, with 2 MiB / 1 GiB pages where aligned."""
        self._map(iova, pa, size, {"write": write})

    def map_identity(self, base: int, size: int, *, write: bool = True) -> None:
        self._map(base, base, size, {"write": write})


__all__ = [
    "ENTRIES_PER_TABLE",
    "FirstStagePageTable",
    "GuestIommuDriver",
    "PageAllocator",
    "SecondStagePageTable",
]
