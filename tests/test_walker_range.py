"""The range walk (``Walker.translate_range``) against one ``translate_fast`` per page.

Random tables laid out by guest_driver, then damaged entry by entry: pages not present, read-only
or supervisor-only, reserved bits, large pages, outputs in the interrupt range, upper levels
denying or absent, ranges across leaf-table and large-page boundaries, every PGTT, 5-level, the
legacy mode, tables in a second region; the range walk's list must equal the per-page one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.formats.fault import FaultReason as FR
from vioasid.formats.paging import FIRST_STAGE_PTE, SECOND_STAGE_PTE
from vioasid.formats.pasid import (
    PGTT_FIRST_STAGE,
    PGTT_NESTED,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
)
from vioasid.model.cache import Caches
from vioasid.model.faults import Fault
from vioasid.model.guest_driver import (
    FirstStagePageTable,
    GuestIommuDriver,
    PageAllocator,
    SecondStagePageTable,
)
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker

SID = 0x18
MIB = 1 << 20
RAM = 16 * MIB
TABLES = 8 * MIB  # page tables are allocated from here (in the largest region)
WINDOW = 0x4000_0000  # IOVA of the 1 GiB boundary the random ranges sit around
FS_BITS = {n: FIRST_STAGE_PTE.mask(n) for n in ("P", "RW", "US", "PS", "XD", "ADDR")}
SS_BITS = {n: SECOND_STAGE_PTE.mask(n) for n in ("R", "W", "PS", "ADDR")}
MODES = ("fs", "fs", "fs", "fs5", "ss", "nested", "pt", "legacy", "far-tables")


@dataclass
class Case:
    walker: Walker
    rtaddr: int
    pasid: int | None
    start: int  # first IOVA of the ranges checked
    pages: int


def entry_gpa(mem: GuestMemory, root: int, va: int, level: int, levels: int) -> int | None:
    """GPA of the level-``level`` entry for ``va`` (None: a table on the way is absent)."""
    table = root
    for lvl in range(levels, level, -1):
        gpa = table + ((va >> (9 * lvl)) & 0xFF8)
        pte = mem.read_u64(gpa) if mem.contains(gpa, 8) else 0  # damaged already
        if not pte & 3 or (pte & FS_BITS["PS"] and lvl <= 3):  # FS P / SS R|W; a large page
            return None
        table = pte & FS_BITS["ADDR"]
    gpa = table + ((va >> (9 * level)) & 0xFF8)
    return gpa if mem.contains(gpa, 8) else None


def damage(rng: random.Random, mem: GuestMemory, gpa: int | None, first_stage: bool) -> None:
    """Change one entry the way a hostile or buggy guest might."""
    if gpa is None:
        return
    e = mem.read_u64(gpa)
    bits = FS_BITS if first_stage else SS_BITS
    kind = rng.choice((0, 1, 1, 1, 2, 3, 4, 5, 5, 6, 7))
    if kind == 0:
        e = 0  # not present
    elif kind == 1:
        e |= 1 << rng.choice((51, 50, 49, 48))  # above the host address width: reserved
    elif kind == 2:
        e &= ~(bits["RW"] if first_stage else bits["W"])  # read-only
    elif kind == 3:
        e &= ~(bits["US"] if first_stage else bits["R"])  # supervisor only / write only
    elif kind == 4 and first_stage:
        e |= bits["XD"]
    elif kind == 5:
        e = (e & ~bits["ADDR"]) | 0xFEE0_0000 | rng.randrange(0, 0x100) << 12  # interrupts
    elif kind == 6:
        e |= bits["PS"]  # PS where it is reserved (L4) or a large page of garbage
    else:
        e ^= 1 << rng.randrange(0, 64)  # any one bit
    mem.write_u64(gpa, e)


def build(seed: int) -> Case:
    rng = random.Random(seed)
    mode = rng.choice(MODES)
    mem = GuestMemory.from_bytes(RAM)
    far = mode == "far-tables"
    if far:  # the tables in a small second region, the largest one holding only data
        mem = GuestMemory.from_bytes(32 * MIB)
        mem.add(0x1_0000_0000, bytearray(4 * MIB))
        alloc = PageAllocator(mem, 0x1_0000_0000, 4 * MIB)
    else:
        alloc = PageAllocator(mem, TABLES, RAM - TABLES)
    legacy = mode == "legacy"
    drv = GuestIommuDriver(mem, alloc, scalable=not legacy)
    start = WINDOW - rng.randrange(0, 700) * 4096 + rng.choice((0, 0, 8, 0xFFF))
    pages = rng.randrange(1, 1200)
    lo, hi = (start >> 12) - 2, (start >> 12) + pages + 2
    levels = 5 if mode == "fs5" else 4
    first_stage = mode in ("fs", "fs5", "nested", "far-tables")
    table: FirstStagePageTable | SecondStagePageTable
    table = (
        FirstStagePageTable(mem, alloc, levels=levels)
        if first_stage
        else SecondStagePageTable(mem, alloc)
    )
    page = lo
    if rng.random() < 0.2:  # a 1 GiB page from WINDOW on
        table.map(WINDOW, rng.randrange(1, 8) << 30, 1 << 30)
        hi = min(hi, WINDOW >> 12)
    while page < hi:  # runs of 4 KiB pages, holes and the odd 2 MiB page
        big = not page & 0x1FF and rng.random() < 0.15
        size = 0x200000 if big else 0x1000 * rng.randrange(1, 40)
        if rng.random() < 0.96:
            pa = rng.randrange(0, RAM >> 21) << 21 if big else rng.randrange(0, RAM >> 12) << 12
            kw = {"write": rng.random() < 0.8}
            if isinstance(table, FirstStagePageTable):
                kw["user"] = rng.random() < 0.97
            table.map(page << 12, pa, min(size, (hi - page) << 12), **kw)
        page += size >> 12
    for _ in range(rng.randrange(0, 6)):  # damaged leaves and upper levels
        va = rng.randrange(lo, hi) << 12
        level = rng.choice((1, 1, 1, 1, 2, 2, 3, levels))
        damage(rng, mem, entry_gpa(mem, table.root, va, level, table.levels), first_stage)
    pasid: int | None = rng.choice((None, 1))
    if legacy:
        pasid = None
        drv.set_legacy_context(SID, did=3, ssptptr=table.root, aw=table.levels - 2)
    else:
        drv.attach_device(SID, rid_pasid=1)
        if mode == "nested":
            ss = SecondStagePageTable(mem, alloc)
            ss.map_identity(0, RAM)
            drv.set_pasid_entry(SID, 1, pgtt=PGTT_NESTED, did=2, flptptr=table.root,
                                ssptptr=ss.root)  # fmt: skip
        elif mode == "ss":
            drv.set_pasid_entry(SID, 1, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=table.root)
        elif mode == "pt":
            drv.set_pasid_entry(SID, 1, pgtt=PGTT_PASS_THROUGH, did=2)
        else:
            drv.set_pasid_entry(SID, 1, pgtt=PGTT_FIRST_STAGE, did=2, flptptr=table.root,
                                flpm=levels - 4, wpe=rng.random() < 0.5)  # fmt: skip
    return Case(Walker(mem, caches=Caches(enabled=False)), drv.rtaddr, pasid, start, pages)


def check(case: Case, write: bool) -> list[int | Fault]:
    w = case.walker
    got = w.translate_range(case.rtaddr, SID, case.start, case.pages, case.pasid, write)
    want = w.translate_by_page(case.rtaddr, SID, case.start, case.pages, case.pasid, write)
    assert got == want
    return got


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_range_walk_equals_per_page_walks(seed: int) -> None:
    case = build(seed)
    assert case.walker.translate_range == case.walker._direct_range
    for write in (False, True):
        check(case, write)
        # every sub-range starting inside it too (the first page at a fault, past a boundary)
        skip = random.Random(seed).randrange(1, max(2, case.pages))
        check(
            Case(case.walker, case.rtaddr, case.pasid, case.start + (skip << 12), case.pages),
            write,
        )


def clean_case(pages: int = 700) -> tuple[Case, FirstStagePageTable]:
    mem = GuestMemory.from_bytes(RAM)
    alloc = PageAllocator(mem, TABLES, RAM - TABLES)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(SID)
    fs = FirstStagePageTable(mem, alloc)
    drv.set_pasid_entry(SID, 1, pgtt=PGTT_FIRST_STAGE, did=2, flptptr=fs.root)
    start = WINDOW - 300 * 4096
    for i in range(pages):
        fs.map(start + i * 4096, ((i * 7919) % 2048) << 12, 4096, write=i != 500)
    return Case(Walker(mem, caches=Caches(enabled=False)), drv.rtaddr, 1, start, pages), fs


def test_range_walk_across_a_leaf_table_and_to_a_fault() -> None:
    case, _ = clean_case()
    got = check(case, False)
    assert got == [((i * 7919) % 2048) << 12 for i in range(700)]
    got = check(case, True)  # page 500 is read-only: the list ends with its fault
    assert len(got) == 501 and isinstance(got[-1], Fault) and got[-1].reason == FR.SM_WRITE
    assert got[-1].addr == case.start + 500 * 4096
    assert got[:-1] == [((i * 7919) % 2048) << 12 for i in range(500)]


def test_range_walk_offset_and_empty() -> None:
    case, _ = clean_case(4)
    w, rt = case.walker, case.rtaddr
    assert w.translate_range(rt, SID, case.start + 0x10, 3, 1) == [
        (((i * 7919) % 2048) << 12) | 0x10 for i in range(3)
    ]
    assert w.translate_range(rt, SID, case.start, 0, 1) == []
    assert w.translate_range(rt, SID, case.start, -3, 1) == []


def test_range_walk_without_direct_or_with_caches_is_per_page() -> None:
    case, _ = clean_case(8)
    w = case.walker
    w.direct = False
    assert w.translate_range == w.translate_by_page
    assert check(case, True) == [((i * 7919) % 2048) << 12 for i in range(8)]
    cached = Walker(w.mem)
    assert cached.translate_range == cached.translate_by_page
