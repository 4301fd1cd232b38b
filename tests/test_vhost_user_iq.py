"""The guest invalidation-queue follower and the device IOTLB it drops (no QEMU)."""

from __future__ import annotations

import io
import json

import pytest

from qemu_glue.iq_follower import IqFollower
from vioasid.device.translator import DeviceTranslator, IdentityResolver, Resolved
from vioasid.formats.invalidation import PIOTLB_DESC, WAIT_DESC, build_desc
from vioasid.model.iq import Descriptor
from vioasid.model.memory import GuestMemory

IQ_BASE = 0x8000
IQA = IQ_BASE | (1 << 11)  # DW=1 (256-bit descriptors), QS=0: 4 KiB = 128 descriptors


class CountingResolver(IdentityResolver):
    """Every page read-write at its own address, counting the walks the translator asks for."""

    name = "count"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved:
        self.calls += 1
        return Resolved(iova & ~0xFFF, True, True, "count", pasid)


@pytest.mark.asyncio
async def test_follower_decodes_new_descriptors_and_drops_the_iotlb() -> None:
    mem = GuestMemory.from_bytes(1 << 16)
    trace = io.StringIO()
    res = CountingResolver()
    tr = DeviceTranslator(res, sid=0x20, trace=trace)
    for page in range(8):
        await tr.translate(0x10_0000 + page * 4096, False)
    assert res.calls == 8
    tail = 0

    async def iqa() -> int:
        return IQA

    async def iqt() -> int:
        return tail

    fol = IqFollower(iqa, iqt, lambda: mem, tr.on_iq_descriptor)
    assert await fol.catch_up() == 0  # the first catch-up only learns where the queue is
    # the guest queues: P_IOTLB page-selective for 2 pages at 0x102000, then a wait
    piotlb = build_desc(PIOTLB_DESC, {"G": 3, "DID": 3, "PASID": 0, "AM": 1, "ADDR": 0x102000})
    wait = build_desc(WAIT_DESC, {"SW": 1, "STATUS_DATA": 1, "STATUS_ADDR": 0x9000})
    mem.write(IQ_BASE, piotlb + wait)
    before = mem.read(0x9000, 4)
    tail = 64
    assert await fol.catch_up() == 2
    assert mem.read(0x9000, 4) == before  # read-only: QEMU already wrote the wait status
    assert tr.stats.iq_descriptors == 2
    for page in range(8):
        await tr.translate(0x10_0000 + page * 4096, False)
    assert res.calls == 10  # exactly the two invalidated pages were resolved again
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    iq = [e for e in events if e["event"] == "iq-descriptor"]
    assert [e["type"] for e in iq] == ["pasid-iotlb", "wait"]
    assert iq[0]["ADDR"] == "0x102000" and iq[0]["dropped"] == 2
    hits = [e["cache_hit"] for e in events if e["event"] == "translation"]
    assert hits.count(True) == 6


@pytest.mark.asyncio
async def test_follower_wraps_and_survives_a_queue_outside_memory() -> None:
    mem = GuestMemory.from_bytes(1 << 16)
    seen: list[Descriptor] = []
    state = {"iqa": IQA, "tail": 4096 - 32}

    async def iqa() -> int:
        return state["iqa"]

    async def iqt() -> int:
        return state["tail"]

    fol = IqFollower(iqa, iqt, lambda: mem, seen.append)
    await fol.catch_up()
    wait = build_desc(WAIT_DESC, {"STATUS_DATA": 7})
    mem.write(IQ_BASE + 4096 - 32, wait)
    mem.write(IQ_BASE, wait)
    state["tail"] = 32  # wrapped: one at the end, one at the start
    assert await fol.catch_up() == 2
    assert [d.index for d in seen] == [127, 0]
    fol.reset()
    state["iqa"] = (1 << 40) | (1 << 11)  # the guest points IQA outside RAM
    await fol.catch_up()
    state["tail"] = 96
    assert await fol.catch_up() == 0
    assert fol.errors == 1
