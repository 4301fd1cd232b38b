"""``DeviceTranslator.spans_many`` (a request's buffers translated together: the misses in one
``Walker.translate_pages`` walk) against ``spans`` called once per buffer, and ``Dma.transfer``
against the views of each buffer in turn.

Random first-stage tables of two PASIDs (holes, read-only pages, pages outside guest RAM,
2 MiB pages, a 1 GiB boundary: ``test_device_translator_range.tables``) and random requests: single
pages at descending IOVAs (Linux's IOVA allocator), multi-page buffers, repeats, empty buffers,
unaligned ones, with invalidations and flushes in between. Both sides must agree on every
answer, on where a request stops (the buffer the awaited path must take), and on the device
IOTLB, its PASID keys, the statistics and the generation afterwards.
"""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_device_translator_range import BASE, WINDOW_PAGES, state, tables, translator

from vioasid.device.translator import DeviceTranslator, DmaFault
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user.virtqueue import Buffer, Dma


def request(rng: random.Random) -> list[tuple[int, int]]:
    """One request's buffers (IOVA, length)."""
    top = BASE + rng.randrange(64, WINDOW_PAGES) * 0x1000
    kind = rng.choice(("descending", "descending", "mixed", "big"))
    n = rng.randrange(1, 130)
    if kind == "descending":  # single pages, each a fresh IOVA below the one before
        return [(top - (i + 1) * 0x1000, 0x1000) for i in range(n)]
    out = []
    for _ in range(n if kind == "mixed" else rng.randrange(1, 6)):
        start = BASE + rng.randrange(0, WINDOW_PAGES << 12)
        if kind == "big":
            length = rng.randrange(1, 0x100000)
        else:
            length = rng.choice((0x1000, 0x1000, 16, 1, 0, rng.randrange(1, 0x4000)))
            if rng.random() < 0.5:
                start &= ~0xFFF
        out.append((start, length))
        if rng.random() < 0.1 and out:
            out.append(rng.choice(out))  # the same buffer (or page) twice
    return out


def one_by_one(tr: DeviceTranslator, bufs: list[tuple[int, int]], write: bool,
               pasid: int | None) -> list[list[tuple[int, int]]]:  # fmt: skip
    """What ``spans_many`` must answer: ``spans`` per buffer, up to the first None."""
    out = []
    for iova, length in bufs:
        got = tr.spans(iova, length, write, pasid)
        if got is None:
            break
        out.append(got)
    return out


def run(tr: DeviceTranslator, op: tuple[Any, ...], batched: bool) -> object:
    kind = op[0]
    if kind == "invalidate":
        tr.invalidate(op[1], op[2])
        return None
    if kind == "flush":
        tr.flush()
        return None
    _, bufs, write, pasid = op
    try:
        if batched:
            return tr.spans_many(bufs, write, pasid)
        return one_by_one(tr, bufs, write, pasid)
    except DmaFault as exc:
        return exc.fault


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_spans_many_equals_spans_per_buffer(seed: int, cache: bool) -> None:
    rng = random.Random(seed)
    mem, rtaddr = tables(rng, odd=rng.choice((0.0, 0.3, 1.0, 3.0)))
    batched = translator(mem, rtaddr, True, cache, traced=False)
    plain = translator(mem, rtaddr, True, cache, traced=False)
    for _ in range(30):
        r = rng.random()
        op: tuple[Any, ...]
        if r < 0.15:
            op = ("invalidate", BASE + rng.randrange(0, WINDOW_PAGES) * 0x1000,
                  rng.randrange(1, 64) << 12)  # fmt: skip
        elif r < 0.18:
            op = ("flush",)
        else:
            op = ("spans", request(rng), rng.random() < 0.5, rng.choice((None, 1, 3)))
        got = run(batched, op, True)
        assert got == run(plain, op, False), op
        assert state(batched) == state(plain)
    assert batched.stats.translations == plain.stats.translations


def test_spans_many_with_a_trace_writes_the_same_lines() -> None:
    mem, rtaddr = tables(random.Random(11))
    batched = translator(mem, rtaddr, True, True, traced=True)
    plain = translator(mem, rtaddr, True, True, traced=True)
    rng = random.Random(12)
    for _ in range(10):
        bufs, write = request(rng), rng.random() < 0.5
        assert run(batched, ("spans", bufs, write, 1), True) == run(
            plain, ("spans", bufs, write, 1), False
        )
    assert isinstance(batched.trace, io.StringIO) and isinstance(plain.trace, io.StringIO)
    strip = [line.split('"t":')[0] for line in batched.trace.getvalue().splitlines()]
    assert strip == [line.split('"t":')[0] for line in plain.trace.getvalue().splitlines()]


def test_scattered_single_pages_are_one_walk_sharing_the_upper_levels() -> None:
    mem, rtaddr = tables(random.Random(7), odd=0)
    tr = translator(mem, rtaddr, True, True, traced=False)
    walker = tr.primary._get_walker(mem)  # type: ignore[attr-defined]
    calls: list[int] = []
    real = walker.translate_pages

    def counted(*args: Any) -> Any:
        calls.append(len(args[2]))
        return real(*args)

    walker.translate_pages = counted
    bufs = [(BASE + 0x80000 - (i + 1) * 0x1000, 0x1000) for i in range(85)]
    got = tr.spans_many(bufs, True, 1)
    assert got == one_by_one(translator(mem, rtaddr, True, True, traced=False), bufs, True, 1)
    assert calls == [85] and tr.stats.misses == 85
    assert tr.spans_many(bufs, True, 1) == got and calls == [85]  # then all hits, no walk
    assert tr.stats.hits == 85


def filled(mem: GuestMemory, seed: int) -> None:
    """Guest RAM with distinct bytes everywhere (a view's contents name where it points)."""
    rng = random.Random(seed)
    for r in mem.regions:
        r.buf[:] = rng.randbytes(len(r.buf))


async def reference_views(dma: Dma, bufs: list[Buffer], write: bool) -> list[bytes]:
    out: list[bytes] = []
    for b in bufs:
        out += [bytes(v) for v in await dma.views(b.addr, b.len, write)]
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_transfer_equals_the_views_of_each_buffer_in_turn(seed: int) -> None:
    rng = random.Random(seed)
    mem, rtaddr = tables(rng, odd=rng.choice((0.0, 1.0)))
    filled(mem, seed)
    a = Dma(lambda: mem, translator(mem, rtaddr, True, True, traced=False))
    b = Dma(lambda: mem, translator(mem, rtaddr, True, True, traced=False))

    async def go() -> None:
        for _ in range(8):
            bufs = [Buffer(i, n, True) for i, n in request(rng)]
            write = rng.random() < 0.5
            try:
                got: object = await a.transfer(bufs, write, lambda vs: [bytes(v) for v in vs])
            except DmaFault as exc:
                got = exc.fault
            try:
                want: object = await reference_views(b, bufs, write)
            except DmaFault as exc:
                want = exc.fault
            assert got == want
            assert a.translator.stats == b.translator.stats  # type: ignore[attr-defined]

    asyncio.run(go())
