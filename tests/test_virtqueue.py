"""Split virtqueue + virtio-blk processing against in-memory guest memory (no QEMU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vioasid.device.translator import DeviceTranslator, DmaFault, IdentityResolver, Resolved
from vioasid.formats.fault import FaultReason
from vioasid.formats.virtio import (
    BLK_REQ_HDR,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    BlkStatus,
    BlkType,
)
from vioasid.model.faults import Fault
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user.blk import BlkDevice
from vioasid.vhost_user.virtqueue import ChainError, Dma, SplitQueue

QSIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
IOVA_BASE = 0x10_0000_0000  # device addresses live far above RAM


class OffsetResolver:
    """A toy IOMMU: IOVA = GPA + IOVA_BASE for mapped pages; anything else faults."""

    name = "offset"

    def __init__(self, mapped: set[int]) -> None:
        self.mapped = mapped
        self.calls = 0

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> None:
        return None  # this toy always makes the translator await (the QEMU-miss path's shape)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        self.calls += 1
        gpa = (iova - IOVA_BASE) & ~0xFFF
        if gpa not in self.mapped:
            return Fault(FaultReason.FS_PAGING_ENTRY_P, iova, 0x20, pasid, write, "unmapped")
        return Resolved(gpa, True, True, "offset")

    async def refresh(self) -> None:
        return None


class Guest:
    """Driver side of one split ring in a bytearray guest."""

    def __init__(self, mem: GuestMemory, iova: int = 0) -> None:
        self.mem = mem
        self.iova = iova
        self.free = 0
        self.avail_idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(
            DESC + 16 * i, VRING_DESC.build(addr=addr, len=length, flags=flags, next=nxt)
        )

    def chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        head = self.free
        for k, (addr, length, w) in enumerate(bufs):
            i = self.free
            last = k == len(bufs) - 1
            flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.desc(i, self.iova + addr, length, flags, (i + 1) % QSIZE)
            self.free = (self.free + 1) % QSIZE
        return head

    def submit(self, head: int) -> None:
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head.to_bytes(2, "little"))
        self.avail_idx += 1
        self.mem.write(AVAIL + 2, (self.avail_idx & 0xFFFF).to_bytes(2, "little"))

    def used(self, n: int) -> tuple[int, int]:
        return VRING_USED_ELEM.packer.unpack(self.mem.read(USED + 4 + 8 * n, 8))

    def used_idx(self) -> int:
        return int.from_bytes(self.mem.read(USED + 2, 2), "little")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(os.urandom(1 << 20))
    return p


def make(
    mem: GuestMemory, resolver: object, iova: int = 0
) -> tuple[SplitQueue, Dma, DeviceTranslator]:
    tr = DeviceTranslator(resolver, sid=0x20)  # type: ignore[arg-type]
    q = SplitQueue(0, num=QSIZE, desc=iova + DESC, avail=iova + AVAIL, used=iova + USED)
    q.enabled = q.started = True
    return q, Dma(lambda: mem, tr), tr


def ring(
    resolver: object | None = None, iova: int = 0
) -> tuple[GuestMemory, Guest, SplitQueue, Dma, DeviceTranslator]:
    """1 MiB of guest RAM, the driver side of its ring at ``iova`` and the device's queue,
    translated by ``resolver`` (identity over that RAM unless given)."""
    mem = GuestMemory.from_bytes(1 << 20)
    if resolver is None:
        resolver = IdentityResolver(lambda: mem)
    q, dma, tr = make(mem, resolver, iova)
    return mem, Guest(mem, iova), q, dma, tr


@pytest.fixture
def blk(disk: Path) -> Iterator[BlkDevice]:
    """A virtio-blk device on the test disk, closed after the test."""
    dev = BlkDevice(disk)
    yield dev
    dev.close()


def hdr(t: int, sector: int) -> bytes:
    return BLK_REQ_HDR.build(type=t, sector=sector)


async def serve(q: SplitQueue, dma: Dma, blk: BlkDevice) -> int:
    n = 0
    while (chain := await q.pop(dma)) is not None:
        written = await blk.handle(dma, chain)
        await q.push(dma, chain.head, written)
        n += 1
    return n


@pytest.mark.asyncio
async def test_write_then_read_roundtrip_identity(disk: Path, blk: BlkDevice) -> None:
    mem, g, q, dma, tr = ring()
    payload = os.urandom(3 * 4096 + 512)  # multi-page, crosses page boundaries
    mem.write(0x10000, hdr(BlkType.OUT, 8))
    mem.write(0x10800, payload)  # unaligned start inside a page
    g.submit(g.chain([(0x10000, 16, False), (0x10800, len(payload), False), (0x20000, 1, True)]))
    mem.write(0x30000, hdr(BlkType.IN, 8))
    g.submit(g.chain([(0x30000, 16, False), (0x40100, len(payload), True), (0x50000, 1, True)]))
    assert await serve(q, dma, blk) == 2
    assert g.used_idx() == 2
    assert mem.read(0x20000, 1) == bytes([BlkStatus.OK])
    assert mem.read(0x50000, 1) == bytes([BlkStatus.OK])
    assert mem.read(0x40100, len(payload)) == payload
    assert g.used(1)[1] == len(payload) + 1
    assert disk.read_bytes()[8 * 512 : 8 * 512 + len(payload)] == payload
    assert tr.stats.translations > 0


@pytest.mark.asyncio
async def test_translated_addresses_and_fault_gives_ioerr(disk: Path, blk: BlkDevice) -> None:
    mapped = {0x1000, 0x2000, 0x3000, 0x10000, 0x11000, 0x20000}
    res = OffsetResolver(mapped)
    mem, g, q, dma, tr = ring(res, IOVA_BASE)
    before = disk.read_bytes()
    mem.write(0x10000, hdr(BlkType.IN, 0))
    mem.write(0x60000, b"\xaa" * 8192)  # unmapped target: must stay untouched
    # data buffer spans one mapped page (0x11000) and one unmapped (0x12000)
    g.submit(g.chain([(0x10000, 16, False), (0x11800, 4096, True), (0x20000, 1, True)]))
    g.submit(g.chain([(0x10000, 16, False), (0x60000, 4096, True), (0x20010, 1, True)]))
    assert await serve(q, dma, blk) == 2
    assert mem.read(0x20000, 1) == bytes([BlkStatus.IOERR])
    assert mem.read(0x20010, 1) == bytes([BlkStatus.IOERR])
    assert mem.read(0x11800, 2048) == bytes(2048)  # nothing written to the mapped half either
    assert mem.read(0x60000, 8192) == b"\xaa" * 8192
    assert tr.stats.faults == 2
    assert tr.stats.fault_log[0]["reason"] == FaultReason.FS_PAGING_ENTRY_P
    assert disk.read_bytes() == before


@pytest.mark.asyncio
async def test_iotlb_hits_and_invalidation(blk: BlkDevice) -> None:
    res = OffsetResolver({0x1000, 0x2000, 0x3000, 0x10000, 0x20000})
    mem, g, q, dma, tr = ring(res, IOVA_BASE)
    mem.write(0x10000, hdr(BlkType.GET_ID, 0))
    for _ in range(3):
        g.submit(g.chain([(0x10000, 16, False), (0x20100, 20, True), (0x20000, 1, True)]))
    assert await serve(q, dma, blk) == 3
    assert mem.read(0x20100, 8) == b"vioasid-"
    calls = res.calls
    assert tr.stats.hits > tr.stats.misses
    tr.invalidate(IOVA_BASE + 0x20000, 4096)
    g.submit(g.chain([(0x10000, 16, False), (0x20100, 20, True), (0x20000, 1, True)]))
    await serve(q, dma, blk)
    assert res.calls == calls + 1  # only the invalidated page is walked again


@pytest.mark.asyncio
async def test_corrupt_descriptor_address_faults_not_crashes(blk: BlkDevice) -> None:
    mem, g, q, dma, tr = ring()
    mem.write(0x10000, hdr(BlkType.OUT, 0))
    g.submit(g.chain([(0x10000, 16, False), (0xDEAD_0000_0000, 4096, False), (0x20000, 1, True)]))
    assert await serve(q, dma, blk) == 1
    assert mem.read(0x20000, 1) == bytes([BlkStatus.IOERR])
    assert tr.stats.faults == 1


@pytest.mark.asyncio
async def test_indirect_and_loop_detection(disk: Path, blk: BlkDevice) -> None:
    mem, g, q, dma, _ = ring()
    table = 0x70000
    mem.write(0x10000, hdr(BlkType.IN, 1))
    for i, (a, n, f) in enumerate(
        [
            (0x10000, 16, VRING_DESC_F_NEXT),
            (0x40000, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
            (0x20000, 1, VRING_DESC_F_WRITE),
        ]
    ):
        mem.write(table + 16 * i, VRING_DESC.build(addr=a, len=n, flags=f, next=i + 1))
    g.desc(0, table, 48, VRING_DESC_F_INDIRECT)
    g.submit(0)
    assert await serve(q, dma, blk) == 1
    assert mem.read(0x40000, 512) == disk.read_bytes()[512:1024]
    # a descriptor chain that loops forever is refused, bounded
    g.desc(1, 0x10000, 16, VRING_DESC_F_NEXT, 2)
    g.desc(2, 0x20000, 1, VRING_DESC_F_NEXT, 1)
    g.submit(1)
    with pytest.raises(ChainError):
        await q.pop(dma)


@pytest.mark.asyncio
async def test_ring_itself_unmapped_raises_dmafault(disk: Path) -> None:
    mem = GuestMemory.from_bytes(1 << 20)
    q, dma, tr = make(mem, OffsetResolver(set()), IOVA_BASE)
    with pytest.raises(DmaFault):
        await q.pop(dma)
    assert tr.stats.faults == 1


@pytest.mark.asyncio
async def test_huge_indirect_table_is_bounded_by_queue_size(disk: Path) -> None:
    mem, g, q, dma, _ = ring()
    table = 0x70000
    for i in range(QSIZE + 4):  # a chain of QSIZE + 4 entries inside one indirect table
        flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
        mem.write(table + 16 * i, VRING_DESC.build(addr=0x40000, len=1, flags=flags, next=i + 1))
    g.desc(0, table, 0x10000, VRING_DESC_F_INDIRECT)  # claims 4096 entries
    g.submit(0)
    with pytest.raises(ChainError):
        await q.pop(dma)


class FixedResolver(IdentityResolver):
    """Answers every page with GPA = IOVA + shift (a stand-in for QEMU in cross-check)."""

    name = "fixed"

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved:
        return Resolved((iova & ~0xFFF) + self.shift, True, True, "fixed")


@pytest.mark.asyncio
async def test_cross_check_counts_agreement_and_disagreement() -> None:
    mem = GuestMemory.from_bytes(1 << 20)
    same = DeviceTranslator(IdentityResolver(lambda: mem), reference=FixedResolver(0))
    other = DeviceTranslator(IdentityResolver(lambda: mem), reference=FixedResolver(0x1000))
    for tr in (same, other):
        for page in range(4):
            await tr.translate(page * 4096 + 8, False)
        await tr.translate(8, False)  # an IOTLB hit is not asked twice
    assert (same.stats.agree, same.stats.disagree) == (4, 0)
    assert (other.stats.agree, other.stats.disagree) == (0, 4)
    assert other.stats.disagreements[0]["qemu"]["gpa"] == "0x1000"
    assert other.stats.to_json()["qemu_agreement"] == {"agree": 0, "disagree": 4}
