"""Caches: stale entries survive table changes until the matching invalidation drops them."""

from __future__ import annotations

import pytest

from vioasid.formats.fault import FaultReason as FR
from vioasid.formats.pasid import PGTT_FIRST_STAGE, PGTT_SECOND_STAGE
from vioasid.model.cache import Caches
from vioasid.model.faults import Fault, Translation
from vioasid.model.guest_driver import (
    FirstStagePageTable,
    GuestIommuDriver,
    PageAllocator,
    SecondStagePageTable,
)
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest

SID = 0x18
MIB = 1 << 20


class Setup:
    def __init__(self) -> None:
        self.mem = GuestMemory.from_bytes(64 * MIB)
        self.alloc = PageAllocator(self.mem, 32 * MIB, 16 * MIB)
        self.drv = GuestIommuDriver(self.mem, self.alloc)
        self.drv.attach_device(SID)
        self.fs = FirstStagePageTable(self.mem, self.alloc)
        self.fs.map(0x1000, 0x5000, 0x4000)
        self.fs.map(0x200000, 0x400000, 0x200000)
        self.drv.set_pasid_entry(SID, 1, pgtt=PGTT_FIRST_STAGE, did=7, flptptr=self.fs.root)
        self.walker = Walker(self.mem)
        self.c = self.walker.caches

    def addr(self, iova: int, pasid: int | None = 1) -> int | FR:
        """The translation, checked to be the hot path's (``translate_fast``) too."""
        fast = self.walker.translate_fast(self.drv.rtaddr, SID, iova, pasid)
        r = self.walker.translate(self.drv.rtaddr, WalkRequest(SID, iova, pasid))
        want = r.reason if isinstance(r, Fault) else r.address
        assert (fast.reason if isinstance(fast, Fault) else fast) == want
        return want

    def remap(self) -> None:
        self.fs.unmap(0x1000, 0x4000)
        self.fs.unmap(0x200000, 0x200000)
        self.fs.map(0x1000, 0x9000, 0x4000)
        self.fs.map(0x200000, 0x800000, 0x200000)


@pytest.fixture
def s() -> Setup:
    return Setup()


def test_iotlb_hit_is_marked_cached(s: Setup) -> None:
    r1 = s.walker.translate(s.drv.rtaddr, WalkRequest(SID, 0x1000, 1))
    r2 = s.walker.translate(s.drv.rtaddr, WalkRequest(SID, 0x1008, 1))
    assert isinstance(r1, Translation) and not r1.cached
    assert isinstance(r2, Translation) and r2.cached and r2.address == 0x5008


def test_piotlb_page_selective(s: Setup) -> None:
    assert s.addr(0x1000) == 0x5000 and s.addr(0x2000) == 0x6000
    s.remap()
    assert s.addr(0x1000) == 0x5000  # stale until invalidated
    s.c.invalidate_piotlb_page(7, 1, 0x1000, 0)
    assert s.addr(0x1000) == 0x9000
    assert s.addr(0x2000) == 0x6000  # outside the invalidated page
    s.c.invalidate_piotlb_page(7, 1, 0x0, 2)  # AM=2: pages 0..3
    assert s.addr(0x2000) == 0xA000


def test_large_page_entry_dropped_by_any_overlap(s: Setup) -> None:
    assert s.addr(0x234000) == 0x434000
    assert s.addr(0x3FF000) == 0x5FF000
    s.remap()
    s.c.invalidate_piotlb_page(7, 1, 0x300000, 0)  # one 4 KiB page inside the 2 MiB page
    assert s.addr(0x234000) == 0x834000
    assert s.addr(0x3FF000) == 0x9FF000


def test_piotlb_all_in_pasid_and_wrong_did(s: Setup) -> None:
    assert s.addr(0x1000) == 0x5000
    s.remap()
    s.c.invalidate_piotlb_pasid(8, 1)  # other domain: nothing
    assert s.addr(0x1000) == 0x5000
    s.c.invalidate_piotlb_pasid(7, 2)  # other PASID: nothing
    assert s.addr(0x1000) == 0x5000
    s.c.invalidate_piotlb_pasid(7, 1)
    assert s.addr(0x1000) == 0x9000


@pytest.mark.parametrize("how", ["global", "domain", "page"])
def test_iotlb_invalidations(s: Setup, how: str) -> None:
    assert s.addr(0x1000) == 0x5000
    s.remap()
    if how == "global":
        s.c.invalidate_iotlb_global()
    elif how == "domain":
        s.c.invalidate_iotlb_domain(7)
    else:
        s.c.invalidate_iotlb_page(7, 0x1000, 0)
    assert s.addr(0x1000) == 0x9000


@pytest.mark.parametrize("how", ["global", "dsi", "pasid"])
def test_pasid_cache_invalidations(s: Setup, how: str) -> None:
    assert s.addr(0x1000) == 0x5000
    ss = SecondStagePageTable(s.mem, s.alloc)
    ss.map(0x1000, 0xF000, 0x1000)
    s.drv.set_pasid_entry(SID, 1, pgtt=PGTT_SECOND_STAGE, did=7, ssptptr=ss.root)
    s.c.invalidate_piotlb_pasid(7, 1)
    assert s.addr(0x1000) == 0x5000  # the PASID entry is still cached (first stage)
    s.c.invalidate_pasid_pasid(7, 2)
    s.c.invalidate_pasid_domain(8)
    assert s.addr(0x1000) == 0x5000
    if how == "global":
        s.c.invalidate_pasid_global()
    elif how == "dsi":
        s.c.invalidate_pasid_domain(7)
    else:
        s.c.invalidate_pasid_pasid(7, 1)
    s.c.invalidate_piotlb_pasid(7, 1)
    assert s.addr(0x1000) == 0xF000


@pytest.mark.parametrize("how", ["global", "domain", "device", "device-fm"])
def test_context_cache_invalidations(s: Setup, how: str) -> None:
    assert s.addr(0x1000) == 0x5000
    s.drv.detach_device(SID)
    s.c.invalidate_context_device(0x20)  # another device
    assert s.addr(0x1000) == 0x5000
    if how == "global":
        s.c.invalidate_context_global()
    elif how == "domain":
        s.c.invalidate_context_domain(7)
    elif how == "device":
        s.c.invalidate_context_device(SID)
    else:
        s.c.invalidate_context_device(SID | 7, fm=3)  # mask function bits 2:0
    s.c.invalidate_iotlb_global()
    assert s.addr(0x1000) == FR.CONTEXT_ENTRY_P


def test_new_rtaddr_flushes(s: Setup) -> None:
    assert s.addr(0x1000) == 0x5000
    r = s.walker.translate(s.drv.rtaddr + 0x1000, WalkRequest(SID, 0x1000, 1))
    assert isinstance(r, Fault)  # a different (empty) root table: nothing reused


def test_permission_miss_rewalks(s: Setup) -> None:
    s.fs.map(0x10000, 0x30000, 0x1000, write=False)
    assert s.addr(0x10000) == 0x30000
    r = s.walker.translate(s.drv.rtaddr, WalkRequest(SID, 0x10000, 1, write=True))
    assert isinstance(r, Fault) and r.reason == FR.SM_WRITE


def test_hot_path_keeps_permissions(s: Setup) -> None:
    """A page cached by a read is not a write hit; a writable page is, read or write."""
    s.fs.map(0x10000, 0x30000, 0x1000, write=False)
    rt = s.drv.rtaddr
    fast = s.walker.translate_fast
    for _ in range(2):
        assert fast(rt, SID, 0x10008, 1) == 0x30008
        r = fast(rt, SID, 0x10008, 1, True)
        assert isinstance(r, Fault) and r.reason == FR.SM_WRITE
        assert fast(rt, SID, 0x1008, 1, True) == 0x5008
        assert fast(rt, SID, 0x1010, 1) == 0x5010
    assert s.c.user[(7, 1)][0].keys() == {0x1, 0x10}  # read pages
    assert s.c.user[(7, 1)][1].keys() == {0x1}  # write pages
    r = fast(rt, SID, 0x10008, None)  # no PASID: RID_PASID 0 is not set up
    assert isinstance(r, Fault)
    r = fast(rt + 0x1000, SID, 0x1008, 1)  # another root table
    assert isinstance(r, Fault)


def test_hot_path_after_a_full_iotlb() -> None:
    """The IOTLB wipes when full; the hot path then misses and refills, never stale."""
    s = Setup()
    s.walker = Walker(s.mem, caches=Caches(iotlb_limit=2))
    s.c = s.walker.caches
    for _ in range(3):
        for page in range(4):
            assert s.addr(0x1000 + page * 0x1000 + 4) == 0x5004 + page * 0x1000
    s.remap()
    s.c.invalidate_piotlb_pasid(7, 1)
    assert [s.addr(0x1000 + page * 0x1000) for page in range(4)] == [0x9000, 0xA000, 0xB000,
                                                                      0xC000]  # fmt: skip
    assert s.c.stats["iotlb_wipe"] >= 4


def test_device_tlb_counted_and_limit() -> None:
    c = Caches(iotlb_limit=4)
    c.note_device_tlb("devtlb")
    assert c.stats["devtlb"] == 1
    for i in range(6):
        c.iotlb_insert((1, 0), i, (i << 12, 4096, 1, "first-stage", 1))
    assert sum(len(v) for v in c.iotlb.values()) <= 4
    assert c.stats["iotlb_wipe"] == 1


def test_legacy_mode_cached() -> None:
    mem = GuestMemory.from_bytes(16 * MIB)
    alloc = PageAllocator(mem, 8 * MIB, 4 * MIB)
    drv = GuestIommuDriver(mem, alloc, scalable=False)
    ss = SecondStagePageTable(mem, alloc, levels=4)
    ss.map(0x1000, 0x5000, 0x1000)
    drv.set_legacy_context(SID, did=3, ssptptr=ss.root, aw=2)
    w = Walker(mem)
    assert w.translate_fast(drv.rtaddr, SID, 0x1010) == 0x5010
    ss.unmap(0x1000, 0x1000)
    ss.map(0x1000, 0x6000, 0x1000)
    assert w.translate_fast(drv.rtaddr, SID, 0x1010) == 0x5010  # cached
    r = w.translate(drv.rtaddr, WalkRequest(SID, 0x1010))
    assert isinstance(r, Translation) and r.cached and r.pasid is None
    w.caches.invalidate_iotlb_page(3, 0x1000, 0)
    assert w.translate_fast(drv.rtaddr, SID, 0x1010) == 0x6010
