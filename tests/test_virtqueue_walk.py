"""The virtqueue and virtio-blk path on top of vioasid's own walk of VT-d tables (no QEMU).

Tables are laid out by ``GuestIommuDriver`` the way Linux does (scalable mode, first stage,
PASID 0 = RID_PASID); the device translator walks them with ``vioasid.model.walker``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vioasid.device.translator import DeviceTranslator, VtdRegs, WalkResolver
from vioasid.formats.fault import FaultReason
from vioasid.formats.virtio import (
    BLK_REQ_HDR,
    VRING_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BlkStatus,
    BlkType,
)
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user.blk import BlkDevice
from vioasid.vhost_user.virtqueue import Dma, SplitQueue

SID = 0x20  # 00:04.0
RING_GPA, HDR_GPA, DATA_GPA, RO_GPA, STATUS_GPA = 0x10000, 0x20000, 0x30000, 0x40000, 0x50000
IOVA = 0xFFFF_0000  # where the "driver" maps its buffers (Linux allocates IOVAs top-down)
DESC, AVAIL, USED = 0, 0x800, 0xC00  # inside the one ring page


class World:
    def __init__(self, disk: Path) -> None:
        self.mem = GuestMemory.from_bytes(4 << 20)
        alloc = PageAllocator(self.mem, 0x200000, 0x100000)
        self.drv = GuestIommuDriver(self.mem, alloc)
        self.drv.attach_device(SID)
        self.pt = FirstStagePageTable(self.mem, alloc)
        self.drv.set_pasid_entry(SID, 0, pgtt=1, did=5, flptptr=self.pt.root)
        self.iova = {}
        for k, (gpa, write) in enumerate(
            [
                (RING_GPA, True),
                (HDR_GPA, False),
                (DATA_GPA, True),
                (RO_GPA, False),
                (STATUS_GPA, True),
            ]
        ):
            self.iova[gpa] = IOVA + k * 0x1000
            self.pt.map(self.iova[gpa], gpa, 0x1000, write=write)
        rtaddr = self.drv.rtaddr

        async def regs() -> VtdRegs:
            return VtdRegs(gsts=1 << 31, rtaddr=rtaddr)

        self.resolver = WalkResolver(lambda: self.mem, SID, regs)
        self.tr = DeviceTranslator(self.resolver, sid=SID)
        self.dma = Dma(lambda: self.mem, self.tr)
        ring = self.iova[RING_GPA]
        self.q = SplitQueue(0, num=8, desc=ring + DESC, avail=ring + AVAIL, used=ring + USED)
        self.q.enabled = self.q.started = True
        self.blk = BlkDevice(disk)
        self.avail = 0

    def request(self, rtype: int, data_gpa: int, write: bool) -> None:
        self.mem.write(HDR_GPA, BLK_REQ_HDR.build(type=rtype, sector=4))
        chain = [
            (self.iova[HDR_GPA], 16, VRING_DESC_F_NEXT),
            (self.iova[data_gpa], 4096, (VRING_DESC_F_WRITE if write else 0) | VRING_DESC_F_NEXT),
            (self.iova[STATUS_GPA], 1, VRING_DESC_F_WRITE),
        ]
        for i, (a, n, f) in enumerate(chain):
            self.mem.write(
                RING_GPA + DESC + 16 * i, VRING_DESC.build(addr=a, len=n, flags=f, next=i + 1)
            )
        self.mem.write(RING_GPA + AVAIL + 4 + 2 * (self.avail % 8), (0).to_bytes(2, "little"))
        self.avail += 1
        self.mem.write(RING_GPA + AVAIL + 2, self.avail.to_bytes(2, "little"))
        self.mem.write(STATUS_GPA, b"\xff")

    async def serve(self) -> int:
        chain = await self.q.pop(self.dma)
        assert chain is not None
        n = await self.blk.handle(self.dma, chain)
        await self.q.push(self.dma, chain.head, n)
        return self.mem.read(STATUS_GPA, 1)[0]


@pytest.fixture
def world(tmp_path: Path) -> World:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 16))
    return World(disk)


@pytest.mark.asyncio
async def test_read_and_write_through_first_stage_tables(world: World) -> None:
    world.request(BlkType.IN, DATA_GPA, True)
    assert await world.serve() == BlkStatus.OK
    disk = world.blk.path
    assert world.mem.read(DATA_GPA, 4096) == Path(disk).read_bytes()[2048 : 2048 + 4096]
    world.mem.write(RO_GPA, b"\x5a" * 4096)
    world.request(BlkType.OUT, RO_GPA, False)  # the device may read a read-only mapping
    assert await world.serve() == BlkStatus.OK
    assert Path(disk).read_bytes()[2048 : 2048 + 4096] == b"\x5a" * 4096
    assert world.tr.stats.faults == 0 and world.tr.stats.hits > 0


@pytest.mark.asyncio
async def test_write_into_read_only_mapping_faults(world: World) -> None:
    """Only an own walk sees read-only mappings (QEMU's IOTLB updates always say RW)."""
    world.mem.write(RO_GPA, b"\x11" * 4096)
    world.request(BlkType.IN, RO_GPA, True)
    assert await world.serve() == BlkStatus.IOERR
    assert world.mem.read(RO_GPA, 4096) == b"\x11" * 4096
    (fault,) = world.tr.stats.fault_log
    assert fault["addr"] == hex(world.iova[RO_GPA]) and fault["write"] is True
    assert fault["reason"] == FaultReason.SM_WRITE


@pytest.mark.asyncio
async def test_unmap_needs_the_invalidation_then_faults(world: World) -> None:
    world.request(BlkType.IN, DATA_GPA, True)
    assert await world.serve() == BlkStatus.OK
    world.pt.unmap(world.iova[DATA_GPA], 0x1000)
    world.mem.write(DATA_GPA, bytes(4096))
    world.request(BlkType.IN, DATA_GPA, True)
    assert await world.serve() == BlkStatus.OK  # stale device IOTLB: why invalidations matter
    world.tr.invalidate(world.iova[DATA_GPA], 0x1000)  # what QEMU forwards (IOTLB_MSG type 3)
    world.mem.write(DATA_GPA, bytes(4096))
    world.request(BlkType.IN, DATA_GPA, True)
    assert await world.serve() == BlkStatus.IOERR
    assert world.mem.read(DATA_GPA, 4096) == bytes(4096)
    assert world.tr.stats.fault_log[-1]["reason"] == FaultReason.FS_PAGING_ENTRY_P
    assert world.resolver.regs_reads == 2  # the fault re-read GSTS/RTADDR once, then retried
