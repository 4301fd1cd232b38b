"""The device translator: (PASID, page) keys, the synchronous ``spans`` path, permissions,
invalidation history, re-translation after an invalidation, and the engine-backed resolver."""

from __future__ import annotations

import asyncio
import struct

import pytest
from engine_support import Lab

from vioasid.device.translator import (
    DeviceTranslator,
    DmaFault,
    EngineResolver,
    Resolved,
    VtdRegs,
    WalkResolver,
    iotlb_key,
)
from vioasid.formats.fault import FaultReason
from vioasid.formats.invalidation import PIOTLB_DESC, PIOTLB_PSI_IN_PASID, build_desc
from vioasid.model.faults import Fault
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.iq import decode
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user.virtqueue import YIELD_EVERY, Buffer, Dma

SID = 0x20


class PasidResolver:
    """GPA = page + 0x100000 * PASID (None counts as 0); pages in ``ro`` are read-only."""

    name = "pasid"

    def __init__(self, ro: frozenset[int] = frozenset(), wait: bool = False) -> None:
        self.ro = ro
        self.wait = wait
        self.calls: list[tuple[int, bool, int | None]] = []
        self.gate = asyncio.Event()
        self.shift = 0

    def _answer(self, iova: int, write: bool, pasid: int | None) -> Resolved | Fault:
        self.calls.append((iova & ~0xFFF, write, pasid))
        page = iova & ~0xFFF
        if write and page in self.ro:
            return Fault(FaultReason.SM_WRITE, iova, SID, pasid, write, "read-only")
        gpa = page + 0x100000 * (pasid or 0) + self.shift
        return Resolved(gpa, not write, write, "pasid", pasid)

    def resolve_now(
        self, iova: int, write: bool, pasid: int | None = None
    ) -> Resolved | Fault | None:
        return None if self.wait else self._answer(iova, write, pasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        if self.wait:
            await self.gate.wait()
        return self._answer(iova, write, pasid)

    async def refresh(self) -> None:
        return None


def test_keys_are_pasid_and_page() -> None:
    assert iotlb_key(None, 5) != iotlb_key(0, 5) != iotlb_key(1, 5)
    assert iotlb_key(3, 5) == iotlb_key(3, 5)


def test_same_iova_in_two_pasids_resolves_and_caches_separately() -> None:
    res = PasidResolver()
    tr = DeviceTranslator(res, sid=SID)
    assert tr.spans(0x4000, 16, False, pasid=1) == [(0x104000, 16)]
    assert tr.spans(0x4000, 16, False, pasid=2) == [(0x204000, 16)]
    assert tr.spans(0x4000, 16, False, pasid=1) == [(0x104000, 16)]  # a hit
    assert len(res.calls) == 2
    # a page-selective PASID-IOTLB invalidation in PASID 1 leaves PASID 2's entry alone
    tr.on_iq_descriptor(
        decode(struct.unpack("<4Q", build_desc(PIOTLB_DESC, {"G": PIOTLB_PSI_IN_PASID, "DID": 1,
                                                             "PASID": 1, "ADDR": 0x4000})))
    )  # fmt: skip
    tr.spans(0x4000, 16, False, pasid=2)
    assert len(res.calls) == 2
    tr.spans(0x4000, 16, False, pasid=1)
    assert len(res.calls) == 3
    # QEMU's IOTLB_MSG carries no PASID: it drops the page in every PASID
    tr.invalidate(0x4000, 0x1000)
    tr.spans(0x4000, 16, False, pasid=1)
    tr.spans(0x4000, 16, False, pasid=2)
    assert len(res.calls) == 5


def test_spans_merge_contiguous_pages_and_split_at_discontinuities() -> None:
    res = PasidResolver()
    tr = DeviceTranslator(res, sid=SID)
    assert tr.spans(0x1800, 0x2000, False) == [(0x1800, 0x2000)]
    res.shift = 0x10_0000  # later misses land elsewhere: the cached pages keep their GPAs
    assert tr.spans(0x1000, 0x4000, False) == [(0x1000, 0x3000), (0x104000, 0x1000)]


def test_a_page_resolved_for_reading_is_walked_again_before_a_write() -> None:
    res = PasidResolver(ro=frozenset({0x7000}))
    tr = DeviceTranslator(res, sid=SID)
    tr.spans(0x7000, 8, False)
    tr.spans(0x8000, 8, False)
    assert tr.spans(0x8000, 8, True) == [(0x8000, 8)]
    assert res.calls[-1] == (0x8000, True, None)
    assert tr.spans(0x8000, 8, False) == [(0x8000, 8)]  # now known for both: no new walk
    assert len(res.calls) == 3
    assert tr.spans(0x7000, 8, True) is None  # the write faults: the awaited path reports it
    with pytest.raises(DmaFault) as exc:
        asyncio.run(tr.translate(0x7000, True))
    assert exc.value.fault.reason == FaultReason.SM_WRITE
    assert tr.stats.faults == 1


def test_spans_leave_a_waiting_resolver_to_the_awaited_path() -> None:
    res = PasidResolver(wait=True)
    tr = DeviceTranslator(res, sid=SID)
    assert tr.spans(0x1000, 8, False) is None
    assert tr.stats.translations == 0


def test_invalidated_since_tracks_ranges_and_history() -> None:
    tr = DeviceTranslator(PasidResolver(), sid=SID)
    g = tr.generation
    assert not tr.invalidated_since(g, [(0x5000, 0x1000)])
    tr.invalidate(0x9000, 0x2000)
    assert tr.generation == g + 1
    assert not tr.invalidated_since(g, [(0x5000, 0x1000), (0xB000, 0x10)])
    assert tr.invalidated_since(g, [(0xA800, 0x10)])
    for i in range(2000):  # more than the history keeps
        tr.invalidate(0x100000000 + i * 0x1000, 0x1000)
    assert tr.invalidated_since(g, [(0x5000, 0x1000)])  # cannot tell any more: assume so
    g = tr.generation
    tr.flush()
    assert tr.invalidated_since(g, [(0x5000, 0x1000)])


def test_buffers_are_translated_again_when_an_invalidation_lands_while_waiting() -> None:
    mem = GuestMemory.from_bytes(1 << 22)
    res = PasidResolver()
    tr = DeviceTranslator(res, sid=SID)
    dma = Dma(lambda: mem, tr)
    bufs = [Buffer(0x1000, 0x1000, True), Buffer(0x3000, 0x1000, True)]

    async def go() -> list[memoryview]:
        tr.spans(0x1000, 0x1000, True)  # buffer 1 cached; buffer 2 will wait on its miss
        res.wait = True
        task = asyncio.ensure_future(dma.buffer_views(bufs, True))
        await asyncio.sleep(0)
        # meanwhile the guest unmaps buffer 1's page and maps it elsewhere
        res.shift = 0x20_0000
        tr.invalidate(0x1000, 0x1000)
        res.gate.set()
        return await task

    views = asyncio.run(go())
    views[0][:4] = b"new!"
    assert mem.read(0x201000, 4) == b"new!"  # the new mapping, not the invalidated one
    assert mem.read(0x1000, 4) == b"\0\0\0\0"


def test_walk_resolver_enforces_read_only_pages_from_the_guest_tables() -> None:
    mem = GuestMemory.from_bytes(1 << 22)
    alloc = PageAllocator(mem, 0x200000, 0x100000)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(SID)
    pt = FirstStagePageTable(mem, alloc)
    drv.set_pasid_entry(SID, 0, pgtt=1, did=5, flptptr=pt.root)
    pt.map(0x40000000, 0x10000, 0x1000, write=False)
    pt.map(0x40001000, 0x11000, 0x1000, write=True)

    async def regs() -> VtdRegs:
        return VtdRegs(gsts=1 << 31, rtaddr=drv.rtaddr)

    wr = WalkResolver(lambda: mem, SID, regs)
    tr = DeviceTranslator(wr, sid=SID)
    assert tr.spans(0x40000000, 0x2000, False) is None  # registers not read yet
    assert asyncio.run(tr.translate(0x40000000, False)) == 0x10000
    assert tr.spans(0x40000000, 0x2000, False) == [(0x10000, 0x2000)]
    assert tr.spans(0x40001010, 0x10, True) == [(0x11010, 0x10)]
    with pytest.raises(DmaFault):
        asyncio.run(tr.translate(0x40000000, True))
    pt.unmap(0x40001000, 0x1000)
    tr.invalidate(0x40001000, 0x1000)
    with pytest.raises(DmaFault):
        asyncio.run(tr.translate(0x40001000, False))


def test_engine_resolver_translates_a_vpasid_through_the_host() -> None:
    lab = Lab()
    lab.host("h", functions=(("01:00.0", False, False),))
    lab.vm("vm", "h", (("00:05.0", "01:00.0", "vfio-pci"),))
    lab.map("vm", 7, 0x7000_0000, 0x30000, 0x2000, write=True)
    lab.map("vm", 7, 0x7000_2000, 0x50000, 0x1000, write=False)
    lab.bind("vm", "00:05.0", 7)
    host = lab.where("vm")
    tr = DeviceTranslator(EngineResolver(host, "vm", 0x28), sid=0x28)
    assert tr.spans(0x7000_0800, 0x1800, True, pasid=7) == [(0x30800, 0x1800)]
    assert tr.spans(0x7000_2000, 8, False, pasid=7) == [(0x50000, 8)]
    with pytest.raises(DmaFault) as exc:
        asyncio.run(tr.translate(0x7000_2000, True, pasid=7))
    assert exc.value.fault.pasid == 7
    with pytest.raises(DmaFault):  # a vPASID the device has no binding for
        asyncio.run(tr.translate(0x7000_0000, False, pasid=8))
    assert host.drain_faults("vm")  # the guest hears of them with its vPASID


def test_an_invalidation_answered_at_a_yield_inside_a_request_retranslates_it() -> None:
    mem = GuestMemory.from_bytes(1 << 22)
    res = PasidResolver()
    tr = DeviceTranslator(res, sid=SID)
    dma = Dma(lambda: mem, tr)
    bufs = [Buffer(0x1000 * (i + 1), 0x1000, True) for i in range(2 * YIELD_EVERY)]
    seen: list[int] = []

    async def qemu() -> None:  # runs at the first yield: the guest remapped buffer 0's page
        res.shift = 0x20_0000
        tr.invalidate(0x1000, 0x1000)
        seen.append(tr.generation)

    async def go() -> list[memoryview]:
        task = asyncio.ensure_future(qemu())
        views = await dma.buffer_views(bufs, True)
        await task
        return views

    views = asyncio.run(go())
    assert seen  # the invalidation did come in during the request
    views[0][:2] = b"ok"
    assert mem.read(0x201000, 2) == b"ok"
