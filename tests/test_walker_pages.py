"""The page-list walk (``Walker.translate_pages``) against one ``translate_fast`` per address.

The random tables of ``test_walker_range`` (holes, read-only and supervisor-only pages, reserved
bits, large pages, outputs in the interrupt range, damaged upper levels, every PGTT, 5-level,
legacy, tables in a second region), asked for lists of pages in the orders a request's buffers
come in: descending (Linux's IOVA allocator), ascending, shuffled, with repeats, offsets inside
pages and addresses outside the window; the lists must be equal (up to and including the first
fault, where both end).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_walker_range import SID, WINDOW, build, clean_case

from vioasid.formats.fault import FaultReason as FR
from vioasid.model.faults import Fault
from vioasid.model.walker import Walker


def addresses(rng: random.Random, start: int, pages: int) -> list[int]:
    """Page addresses of one request, in one of the orders guests hand them out."""
    base = [start + (i << 12) for i in range(pages)]
    kind = rng.choice(("descending", "ascending", "shuffled", "sample", "repeats", "far"))
    if kind == "descending":
        out = base[::-1]
    elif kind == "ascending":
        out = base
    elif kind == "shuffled":
        out = base[:]
        rng.shuffle(out)
    elif kind == "sample":
        out = rng.sample(base, min(len(base), rng.randrange(1, 300)))
    elif kind == "repeats":
        out = [rng.choice(base) for _ in range(rng.randrange(1, 300))]
    else:  # anywhere, non-canonical included
        out = [rng.choice((rng.randrange(0, 1 << 64), rng.choice(base))) for _ in range(50)]
    if rng.random() < 0.3:
        out = [a | rng.randrange(0, 0x1000) for a in out]  # offsets inside the pages
    return out


def check(walker: Walker, rtaddr: int, pasid: int | None, addrs: list[int], write: bool) -> None:
    got = walker.translate_pages(rtaddr, SID, addrs, pasid, write)
    want = walker.translate_each(rtaddr, SID, addrs, pasid, write)
    assert got == want, (addrs[: len(want) + 1], write)
    assert len(got) == len(addrs) or isinstance(got[-1], Fault)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_page_list_walk_equals_per_page_walks(seed: int) -> None:
    case = build(seed)
    w = case.walker
    assert w.translate_pages == w._direct_pages
    rng = random.Random(seed ^ 0x5A5A)
    for write in (False, True):
        for _ in range(3):
            check(w, case.rtaddr, case.pasid, addresses(rng, case.start, case.pages), write)


def test_page_list_walk_of_scattered_pages_to_a_fault() -> None:
    case, _ = clean_case()
    w, rt = case.walker, case.rtaddr
    order = [699 - i for i in range(700)]  # descending IOVAs, across a leaf-table boundary
    addrs = [case.start + (i << 12) for i in order]
    assert w.translate_pages(rt, SID, addrs, 1, False) == [((i * 7919) % 2048) << 12 for i in order]
    got = w.translate_pages(rt, SID, addrs, 1, True)  # page 500 is read-only: ends at its fault
    assert len(got) == 200 and isinstance(got[-1], Fault) and got[-1].reason == FR.SM_WRITE
    assert got[-1].addr == case.start + 500 * 4096
    assert w.translate_pages(rt, SID, [], 1, True) == []
    assert w.translate_pages(rt, SID, [WINDOW - 0x1000 + 0x10], 1, False) == w.translate_each(
        rt, SID, [WINDOW - 0x1000 + 0x10], 1, False
    )


def test_page_list_walk_without_direct_or_with_caches_is_per_page() -> None:
    case, _ = clean_case(8)
    w = case.walker
    w.direct = False
    assert w.translate_pages == w.translate_each
    addrs = [case.start + (i << 12) for i in (3, 1, 7)]
    assert w.translate_pages(case.rtaddr, SID, addrs, 1, True) == [
        ((i * 7919) % 2048) << 12 for i in (3, 1, 7)
    ]
    cached = Walker(w.mem)
    assert cached.translate_pages == cached.translate_each
