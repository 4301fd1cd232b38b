"""Invalidations applied in batches (``DeviceTranslator.invalidate_many``, what the gate does with
everything the reader thread posted) against one ``invalidate`` each, and ``invalidated_since``
(pairwise or by bisection of the sorted union) against the exact answer.

Random IOTLB contents in several PASIDs, random batches (single pages as strict mode posts them,
repeats, adjacent and overlapping ranges, huge and wrapping ones, sizes 0), flushes and
page-selective IQ descriptors in between: the same IOTLB, statistics and generation; for
generations taken between batches and random buffer lists, ``invalidated_since`` is True exactly
when an invalidation after that generation covered one of the buffers' pages (or when the
history no longer reaches back, where True is the safe answer).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.device.translator import DeviceTranslator, Resolved
from vioasid.model.faults import Fault

U64 = (1 << 64) - 1
SPAN = 4096  # pages the random IOVAs fall in (around a base), so that ranges meet


class Pages:
    """GPA = page, read-write, in any PASID (the IOTLB's contents are what matters here)."""

    name = "pages"

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        return Resolved(iova & ~0xFFF, True, True, "pages", pasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        return self.resolve_now(iova, write, pasid)

    async def refresh(self) -> None:
        return None


def a_range(rng: random.Random, base: int) -> tuple[int, int]:
    r = rng.random()
    if r < 0.6:  # one page, as strict mode posts them
        return base + rng.randrange(0, SPAN) * 0x1000, 0x1000
    if r < 0.9:
        return base + rng.randrange(0, SPAN * 0x1000), rng.randrange(0, 40 * 0x1000)
    if r < 0.95:
        return rng.randrange(0, 1 << 64), rng.randrange(0, 1 << 64)  # huge, may wrap
    return U64 - rng.randrange(0, 0x3000), rng.randrange(1, 0x5000)  # across 2^64


def covered(iova: int, size: int) -> tuple[int, int]:
    """The pages an IOTLB_MSG invalidation covers (as the translator defines them)."""
    first = (iova & U64) >> 12
    return first, min(((iova & U64) + max(size, 1) - 1) >> 12, (1 << 52) - 1)


def exact(log: list[tuple[int, int, int]], since: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether an invalidation after generation ``since`` covered a page of ``ranges``."""
    for gen, first, last in log:
        if gen > since:
            for iova, n in ranges:
                lo, hi = iova >> 12, (iova + max(n, 1) - 1) >> 12
                if lo <= last and hi >= first:
                    return True
    return False


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_batches_equal_one_by_one_and_since_is_exact(seed: int) -> None:
    rng = random.Random(seed)
    base = rng.choice((0, 0xFFF0_0000, 0x7FFF_FFFF_0000))
    batched = DeviceTranslator(Pages(), sid=1)
    plain = DeviceTranslator(Pages(), sid=1)
    log: list[tuple[int, int, int]] = []  # (generation, first, last) of every invalidation
    taken: list[int] = [0]  # generations a caller could have seen (between batches)
    for _ in range(rng.randrange(1, 40)):
        r = rng.random()
        if r < 0.35:  # translations: entries to drop, in PASIDs None, 0 and 5
            pasid = rng.choice((None, 0, 5))
            for _ in range(rng.randrange(1, 60)):
                iova, write = base + rng.randrange(0, SPAN) * 0x1000, rng.random() < 0.5
                got = batched.spans(iova, 0x1000, write, pasid)
                assert got == plain.spans(iova, 0x1000, write, pasid)
        elif r < 0.9:  # a batch as the gate applies it
            batch = [a_range(rng, base) for _ in range(rng.randrange(0, 120))]
            if batch and rng.random() < 0.3:
                batch += rng.sample(batch, min(len(batch), 5))  # repeats
            batched.invalidate_many(batch)
            for iova, size in batch:
                plain.invalidate(iova, size)
                log.append((plain.generation, *covered(iova, size)))
        elif r < 0.95:
            batched.flush()
            plain.flush()
            log.append((plain.generation, 0, (1 << 52) - 1))
        else:  # a page-selective IQ descriptor (its PASID's pages, or every PASID's)
            addr, am = base + rng.randrange(0, SPAN) * 0x1000, rng.randrange(0, 4)
            pasid = rng.choice((None, 0, 5))
            for tr in (batched, plain):
                tr._iq_range(pasid, addr, am)
            log.append((plain.generation, addr >> 12, (addr >> 12) + (1 << am) - 1))
        assert batched.generation == plain.generation
        assert batched._iotlb == plain._iotlb
        assert batched.stats.to_json() == plain.stats.to_json()
        assert batched.stats.invalidated_pages == plain.stats.invalidated_pages
        taken.append(plain.generation)
        for _ in range(3):
            since = rng.choice(taken)
            ranges = [a_range(rng, base) for _ in range(rng.choice((1, 3, 85, 200)))]
            ranges = [(i & U64, n & 0xFFFF_FFFF) for i, n in ranges]  # descriptor fields
            want = exact(log, since, ranges)
            for tr in (batched, plain):
                # exact, or True where the history no longer reaches back (the safe answer)
                assert tr.invalidated_since(since, ranges) == (want or since < tr._forgotten)


def test_since_by_bisection_finds_every_overlap() -> None:
    tr = DeviceTranslator(Pages(), sid=1)
    g = tr.generation
    tr.invalidate_many([(0x1000 * p, 0x1000) for p in range(0, 400, 4)])  # pages 0, 4, 8, ...
    assert tr.generation == g + 100
    for p in range(0, 400):
        ranges = [(0x1000 * q + 0x10, 0x10) for q in range(1000, 1100)] + [(0x1000 * p, 1)]
        assert tr.invalidated_since(g, ranges) == (p % 4 == 0), p  # 101 x 100 pairs: bisection
        assert tr.invalidated_since(g, [(0x1000 * p, 1)]) == (p % 4 == 0)  # pairwise
    assert not tr.invalidated_since(g, [(0x1000 * 1, 0x3000)])  # pages 1..3
    assert tr.invalidated_since(g, [(0x1000 * 1, 0x3001)])  # pages 1..4
    assert not tr.invalidated_since(g, [(0x1000 * 1, 0x3000)] * 100)
    assert tr.invalidated_since(g, [(0x1000 * 1, 0x3000)] * 100 + [(0x1000 * 396, 1)])
    assert not tr.invalidated_since(tr.generation, [(0, 1 << 40)])


def test_history_limit_holds_for_batches() -> None:
    tr = DeviceTranslator(Pages(), sid=1)
    g0 = tr.generation
    tr.invalidate_many([(0x1000 * 2 * p, 0x1000) for p in range(600)])  # 600 runs, one step
    g1 = tr.generation
    tr.invalidate_many([(0x1000 * (2 * p + 1), 0x1000) for p in range(600, 1200)])
    # 1200 runs > HISTORY: the first batch's runs are partly forgotten
    assert tr.invalidated_since(g0, [(0x7000_0000, 1)])  # cannot tell any more: assume so
    assert not tr.invalidated_since(g1, [(0, 1)])  # the second batch is all there
    assert tr.invalidated_since(g1, [(0x1000 * 1201, 1)])
    assert len(tr._recent) == tr.HISTORY
