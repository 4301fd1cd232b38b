"""Hostile guest tables (hypothesis): random words everywhere, self-pointing tables, pointers
beyond memory. The walker, the table dump and the IQ processor must always return (a Fault or a
Translation; a dump; an error list), never raise, with bounded work."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vioasid.formats.pasid import PGTT_FIRST_STAGE
from vioasid.model.cache import Caches
from vioasid.model.dump import dump_tables
from vioasid.model.example import TABLE_POOL, build_example
from vioasid.model.faults import Fault, Translation
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.iq import InvalidationQueue
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest

PAGES = 12
SIZE = PAGES * 4096
HAW = 48
MIB = 1 << 20
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hostile_word(rng: random.Random, base: int = 0) -> int:
    """Mostly pointer-shaped words: a page of memory (often the word's own table) plus random
    low flag bits; sometimes beyond memory, sometimes fully random."""
    kind = rng.random()
    low = rng.getrandbits(12)
    if kind < 0.55:
        return (base + rng.randrange(PAGES) * 4096) | low | 1
    if kind < 0.65:
        return (base + rng.randrange(PAGES) * 4096) | (low & 0xF07) | 1  # few reserved bits
    if base and kind < 0.7:
        return low | 1  # into the page at GPA 0, below the region
    if kind < 0.75:
        return (base + SIZE + rng.getrandbits(20) * 4096) | low
    if kind < 0.85:
        return 0
    return rng.getrandbits(64)


def hostile_memory(seed: int, base: int = 0) -> GuestMemory:
    """Hostile words in one region at ``base``; with a base, one more page of them at GPA 0
    (a smaller region, so the direct path reads the based one and the walk may cross)."""
    rng = random.Random(seed)
    raw = struct.pack(f"<{SIZE // 8}Q", *(hostile_word(rng, base) for _ in range(SIZE // 8)))
    mem = GuestMemory()
    mem.add(base, bytearray(raw), name="ram")
    if base:
        low = struct.pack("<512Q", *(hostile_word(rng, base) for _ in range(512)))
        mem.add(0, bytearray(low), name="low")
    return mem


requests = st.builds(
    WalkRequest,
    sid=st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0x18, 0x80, 0xFF])),
    addr=st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 32)),
    pasid=st.one_of(st.none(), st.integers(0, (1 << 20) - 1), st.integers(0, 200)),
    write=st.booleans(),
    supervisor=st.booleans(),
    execute=st.booleans(),
)
rtaddrs = st.one_of(
    st.integers(0, PAGES - 1).map(lambda p: p * 4096 | 0x400),
    st.integers(0, PAGES - 1).map(lambda p: p * 4096),
    st.integers(0, (1 << 64) - 1),
)


def check(res: Translation | Fault, req: WalkRequest) -> None:
    assert isinstance(res, (Translation, Fault))
    if isinstance(res, Translation):
        assert res.page_size in (4096, 1 << 21, 1 << 30)
        if res.pgtt == "pass-through":
            # pass-through hands the input address back unchanged
            assert res.address == req.addr
        else:
            # table-walk outputs come from page frames whose bits above HAW are reserved; they
            # need not be backed by RAM (VT-d allows MMIO targets), but never exceed the HAW
            assert 0 <= res.address < 1 << HAW
            assert res.address & (res.page_size - 1) == req.addr & (res.page_size - 1)
    else:
        assert int(res.reason) > 0 and res.name


@SETTINGS
@given(st.integers(0, 2**32), rtaddrs, st.lists(requests, min_size=1, max_size=8), st.booleans())
def test_walker_never_raises(seed: int, rtaddr: int, reqs: list[WalkRequest], cached: bool) -> None:
    mem = hostile_memory(seed)
    w = Walker(mem, haw=HAW, caches=Caches(enabled=cached))
    for req in reqs:
        check(w.translate(rtaddr, req), req)
        fast = w.translate_fast(rtaddr, req.sid, req.addr, req.pasid, req.write)
        assert isinstance(fast, (int, Fault))


def _assert_direct_agrees_with_general(
    mem: GuestMemory, rtaddr: int, reqs: list[WalkRequest]
) -> None:
    """The walker's direct path and its general walk answer every request alike (both calls)."""
    direct = Walker(mem, haw=HAW, caches=Caches(enabled=False))
    general = Walker(mem, haw=HAW, caches=Caches(enabled=False))
    general.direct = False
    for req in reqs:
        assert direct.translate(rtaddr, req) == general.translate(rtaddr, req)
        a = direct.translate_fast(rtaddr, req.sid, req.addr, req.pasid, req.write)
        assert a == general.translate_fast(rtaddr, req.sid, req.addr, req.pasid, req.write)


@SETTINGS
@given(st.integers(0, 2**32), rtaddrs, st.lists(requests, min_size=1, max_size=8))
def test_direct_path_agrees_with_general_walk(
    seed: int, rtaddr: int, reqs: list[WalkRequest]
) -> None:
    mem = hostile_memory(seed)
    _assert_direct_agrees_with_general(mem, rtaddr, reqs)


@SETTINGS
@given(
    st.integers(0, 2**32),
    st.sampled_from([0x2000, 0x100000, 0x1_0000_0000]),
    st.integers(0, PAGES - 1),
    st.lists(requests, min_size=1, max_size=8),
)
def test_direct_path_agrees_with_general_walk_in_a_based_region(
    seed: int, base: int, page: int, reqs: list[WalkRequest]
) -> None:
    """The rendering for a region that does not start at GPA 0 (reads below it checked)."""
    mem = hostile_memory(seed, base)
    assert mem.largest[0] == base
    rtaddr = (base + page * 4096) | 0x400
    _assert_direct_agrees_with_general(mem, rtaddr, reqs)


def test_tables_below_the_largest_region() -> None:
    """First-stage tables in a small region below the largest one are read there (not at a
    negative offset of the largest region, where a decoy copy maps elsewhere)."""
    mem = GuestMemory()
    mem.add(0, bytearray(MIB), name="low")
    mem.add(MIB, bytearray(8 * MIB), name="ram")
    drv = GuestIommuDriver(mem, PageAllocator(mem, 2 * MIB, MIB))
    drv.attach_device(0x18)
    low = FirstStagePageTable(mem, PageAllocator(mem, 0x80000, 0x10000))
    decoy = FirstStagePageTable(mem, PageAllocator(mem, 0x80000 + 8 * MIB, 0x10000))
    low.map(0x10000, 0x5000, 0x1000)
    decoy.map(0x10000, 0x7000, 0x1000)
    assert decoy.root == low.root + 8 * MIB
    drv.set_pasid_entry(0x18, 1, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=low.root)
    for caches in (Caches(enabled=False), Caches()):
        w = Walker(mem, caches=caches)
        for _ in range(2):
            assert w.translate_fast(drv.rtaddr, 0x18, 0x10008, 1) == 0x5008
            r = w.translate(drv.rtaddr, WalkRequest(0x18, 0x10008, 1))
            assert isinstance(r, Translation) and r.address == 0x5008


def test_pasid_tables_outside_the_largest_region() -> None:
    """The bind path's entry reader finds PASID tables in any region."""
    mem = GuestMemory()
    mem.add(0, bytearray(MIB), name="low")
    mem.add(MIB, bytearray(8 * MIB), name="ram")
    drv = GuestIommuDriver(mem, PageAllocator(mem, 0x40000, 0x40000))
    drv.attach_device(0x18)
    fs = FirstStagePageTable(mem, PageAllocator(mem, 2 * MIB, MIB))
    drv.set_pasid_entry(0x18, 70, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=fs.root)
    w = Walker(mem, caches=Caches(enabled=False))
    ctx = w.context_info(drv.rtaddr, 0x18)
    words = w.first_stage_words(ctx, 70)
    assert words is not None and words == mem.words(drv.pasid_entry_gpa(0x18, 70), 8)
    assert w.first_stage_words(ctx, 71) is None  # not present


def test_empty_memory() -> None:
    w = Walker(GuestMemory(), caches=Caches(enabled=False))
    r = w.translate(0x400, WalkRequest(0x18, 0x1000))
    assert isinstance(r, Fault)
    assert isinstance(w.translate_fast(0x400, 0x18, 0x1000), Fault)


@SETTINGS
@given(st.integers(0, 2**32), st.integers(0, PAGES - 1), requests)
def test_nested_memory_never_raises(seed: int, root_page: int, req: WalkRequest) -> None:
    host = hostile_memory(seed)
    guest = hostile_memory(seed + 1)
    w = Walker(host, nested_memory=guest)
    check(w.translate(root_page * 4096 | 0x400, req), req)


@SETTINGS
@given(st.integers(0, 2**32), st.integers(0, PAGES - 1))
def test_self_pointing_tables_terminate(seed: int, page: int) -> None:
    """Every word of the memory points at one page (itself a table of such words)."""
    rng = random.Random(seed)
    mem = GuestMemory.from_bytes(SIZE)
    mem.write(0, (page * 4096 | rng.getrandbits(12) | 1).to_bytes(8, "little") * (SIZE // 8))
    w = Walker(mem)
    for pasid in (None, 0, 5, 1000):
        req = WalkRequest(rng.getrandbits(16), rng.getrandbits(48), pasid)
        check(w.translate(page * 4096 | 0x400, req), req)
        check(w.translate(page * 4096, WalkRequest(req.sid, req.addr)), req)


@settings(SETTINGS, max_examples=25)
@given(st.integers(0, 2**32), st.integers(0, PAGES - 1), st.booleans())
def test_dump_is_bounded(seed: int, root_page: int, scalable: bool) -> None:
    mem = hostile_memory(seed)
    d = dump_tables(mem, root_page * 4096 | (0x400 if scalable else 0), max_entries=3_000)
    assert d.visited <= 3_000 + 64
    assert isinstance(d.to_json()["devices"], list)


@SETTINGS
@given(
    st.integers(0, 2**32),
    st.integers(0, PAGES - 1),
    st.integers(0, 7),
    st.booleans(),
    st.integers(0, 0x7FFF0),
    st.integers(0, 0x7FFF0),
)
def test_iq_never_raises(seed: int, page: int, qs: int, wide: bool, iqh: int, iqt: int) -> None:
    mem = hostile_memory(seed)
    w = Walker(mem)
    iq = InvalidationQueue(mem, w)
    iqa = page * 4096 | qs | (0x800 if wide else 0)
    head, decoded, errors = iq.process(iqa, iqh & ~0xF, iqt & ~0xF)
    assert 0 <= head < 4096 << qs or errors
    assert len(decoded) <= (4096 << qs) // (32 if wide else 16)
    assert all(e.startswith("IQE") for e in errors)


@SETTINGS
@given(
    st.lists(st.integers(0, 40 * 4096 * 8 - 1), max_size=6),  # the pages the example uses
    st.lists(
        st.tuples(
            st.sampled_from([0x18, 0x20, 0x80]),
            st.sampled_from([0x1234, 0x40001234, 0x2000, 0x100040, 0x00FF_0000_1000, 0x7000]),
            st.sampled_from([None, 0, 5, 9, 12]),
            st.booleans(),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_bit_flipped_example_tables(
    flips: list[int], reqs: list[tuple[int, int, int | None, bool]]
) -> None:
    """Realistic tables with random bit flips in the table pool: the direct path and the
    general walk agree, and nothing raises."""
    mem, rtaddr = build_example()
    for bit in flips:
        gpa = TABLE_POOL[0] + bit // 8
        mem.write(gpa, bytes([mem.read(gpa, 1)[0] ^ (1 << (bit % 8))]))
    direct = Walker(mem, caches=Caches(enabled=False))
    general = Walker(mem, caches=Caches(enabled=False))
    general.direct = False
    cached = Walker(mem)
    for sid, addr, pasid, write in reqs:
        req = WalkRequest(sid, addr, pasid, write)
        want = general.translate(rtaddr, req)
        check(want, req)
        assert direct.translate(rtaddr, req) == want
        got = cached.translate(rtaddr, req)
        if isinstance(want, Translation):
            assert isinstance(got, Translation) and got.address == want.address
        else:
            assert got == want
