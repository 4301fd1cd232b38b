"""``DeviceTranslator.spans`` with the range walk (``WalkResolver.resolve_range_now``) against
the same translator resolving page by page: the same spans, faults, statistics, device IOTLB
(keys, permissions) and trace, over random buffers, accesses, PASIDs and invalidations on random
first-stage tables (holes, read-only pages, pages outside guest RAM, 2 MiB pages, leaf-table
boundaries)."""

from __future__ import annotations

import asyncio
import io
import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.device.translator import (
    DeviceTranslator,
    DmaFault,
    Resolved,
    VtdRegs,
    WalkResolver,
)
from vioasid.model.cache import Caches
from vioasid.model.faults import Fault
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker

SID = 0x20
MIB = 1 << 20
RAM = 8 * MIB
BASE = 0x4000_0000 - 0x100000  # the window straddles a 1 GiB (and 2 MiB) boundary
WINDOW_PAGES = 768


class PerPage:
    """The walk resolver without its range walk: what ``spans`` did before, page by page."""

    name = "walk"

    def __init__(self, inner: WalkResolver) -> None:
        self.inner = inner

    def resolve_now(
        self, iova: int, write: bool, pasid: int | None = None
    ) -> Resolved | Fault | None:
        return self.inner.resolve_now(iova, write, pasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        return await self.inner.resolve(iova, write, pasid)

    async def refresh(self) -> None:
        await self.inner.refresh()


def tables(rng: random.Random, odd: float = 1.0) -> tuple[GuestMemory, int]:
    """Two PASIDs' first-stage tables over the window; ``odd`` scales how often a page is
    absent, read-only or outside guest RAM."""
    mem = GuestMemory.from_bytes(RAM)
    alloc = PageAllocator(mem, 6 * MIB, 2 * MIB)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(SID, rid_pasid=3)
    for pasid in (1, 3):
        pt = FirstStagePageTable(mem, alloc)
        drv.set_pasid_entry(SID, pasid, pgtt=1, did=pasid, flptptr=pt.root)
        page = 0
        while page < WINDOW_PAGES:
            va = BASE + (page << 12)
            if not va & 0x1FFFFF and rng.random() < 0.2:
                pt.map(va, rng.randrange(0, 4) << 21, 0x200000, write=rng.random() >= 0.2 * odd)
                page += 512
                continue
            if rng.random() >= 0.01 * odd:
                # mostly RAM, now and then a page beyond it (the walk maps it: not guest RAM)
                pa = rng.randrange(0, (2 * RAM if rng.random() < 0.005 * odd else RAM) >> 12) << 12
                pt.map(va, pa, 0x1000, write=rng.random() >= 0.03 * odd)
            page += 1
    return mem, drv.rtaddr


def translator(
    mem: GuestMemory, rtaddr: int, ranged: bool, cache: bool, traced: bool = True
) -> DeviceTranslator:
    async def regs() -> VtdRegs:
        return VtdRegs(gsts=1 << 31, rtaddr=rtaddr)

    wr = WalkResolver(lambda: mem, SID, regs)
    asyncio.run(wr.resolve(BASE, False))  # the registers read
    primary = wr if ranged else PerPage(wr)
    return DeviceTranslator(primary, sid=SID, cache=cache, trace=io.StringIO() if traced else None)


def run(tr: DeviceTranslator, op: tuple[Any, ...]) -> object:
    if op[0] == "invalidate":
        tr.invalidate(op[1], op[2])
        return None
    try:
        return tr.spans(*op[1:])
    except DmaFault as exc:
        return exc.fault


def expected(mem: GuestMemory, rtaddr: int, op: tuple[Any, ...]) -> object:
    """What ``spans`` must answer, from the general walk (no direct path, no range walk, no
    IOTLB): the merged runs, or None when a page faults or is not guest RAM."""
    _, iova, length, write, pasid = op
    walker = Walker(mem, caches=Caches(enabled=False))
    walker.direct = False
    starts = [iova, *range((iova | 0xFFF) + 1, iova + length, 0x1000)]
    answers = [walker.translate_fast(rtaddr, SID, a, pasid, write) for a in starts]
    gpas = [g for g in answers if isinstance(g, int) and mem.contains(g & ~0xFFF, 0x1000)]
    if len(gpas) != len(answers):
        return None
    out: list[list[int]] = []  # [gpa, length] runs
    for a, b, g in zip(starts, [*starts[1:], iova + length], gpas, strict=True):
        if out and sum(out[-1]) == g:
            out[-1][1] += b - a
        else:
            out.append([int(g), b - a])
    return [(g, n) for g, n in out]


def state(tr: DeviceTranslator) -> object:
    return tr.stats.to_json(), dict(tr._iotlb), set(tr._pasid_keys), tr.generation


def trace(tr: DeviceTranslator) -> list[dict[str, Any]]:
    if tr.trace is None:
        return []
    assert isinstance(tr.trace, io.StringIO)
    lines = [json.loads(x) for x in tr.trace.getvalue().splitlines()]
    for x in lines:
        x.pop("t")
    return lines


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_spans_with_the_range_walk_equal_spans_page_by_page(
    seed: int, cache: bool, traced: bool
) -> None:
    rng = random.Random(seed)
    mem, rtaddr = tables(rng)
    ranged = translator(mem, rtaddr, True, cache, traced)
    plain = translator(mem, rtaddr, False, cache, traced)
    assert hasattr(ranged.primary, "resolve_range_now")
    assert not hasattr(plain.primary, "resolve_range_now")
    for _ in range(40):
        start = BASE + rng.randrange(0, WINDOW_PAGES << 12)
        if rng.random() < 0.15:
            op: tuple[Any, ...] = ("invalidate", start & ~0xFFF, rng.randrange(1, 64) << 12)
        else:
            length = rng.choice((rng.randrange(1, 0x2000), rng.randrange(1, 0x180000)))
            op = ("spans", start, length, rng.random() < 0.5, rng.choice((None, 1, 3)))
        got = run(ranged, op)
        assert got == run(plain, op), op
        if op[0] == "spans":
            assert got == expected(mem, rtaddr, op), op
        assert state(ranged) == state(plain)
    assert trace(ranged) == trace(plain)


def test_a_1mib_buffer_is_one_range_walk_and_the_same_iotlb() -> None:
    mem, rtaddr = tables(random.Random(7), odd=0)
    tr = translator(mem, rtaddr, True, True)
    calls: list[tuple[int, int]] = []
    wr = tr.primary
    assert isinstance(wr, WalkResolver)
    real = wr.resolve_range_now

    def counted(iova: int, count: int, write: bool, pasid: int | None = None) -> Any:
        calls.append((iova, count))
        return real(iova, count, write, pasid)

    wr.resolve_range_now = counted  # type: ignore[method-assign]
    got = tr.spans(BASE, 256 << 12, False, 1)
    want = translator(mem, rtaddr, False, True).spans(BASE, 256 << 12, False, 1)
    assert got == want
    assert got is not None and calls == [(BASE, 256)]  # one walk for the whole buffer
    assert tr.stats.misses == 256 and len(tr._iotlb) == 256
    # a second pass is all hits: no walk
    assert tr.spans(BASE, 256 << 12, False, 1) == got
    assert calls == [(BASE, 256)] and tr.stats.hits == 256
