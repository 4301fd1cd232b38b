"""Walker throughput: JSON lines {"name", "value", "unit"} on stdout.

* walk_uncached_per_s: full root -> context -> PASID dir -> PASID entry -> 4-level first-stage
  walk per request (caches disabled), through ``Walker.translate_fast``;
* walk_uncached_translation_per_s: the same through ``Walker.translate`` (builds a Translation);
* walk_cached_per_s: IOTLB hit through ``translate_fast``;
* walk_cached_translation_per_s: IOTLB hit through ``translate``;
* walk_nested_uncached_per_s: nested (PGTT=3) walk, caches disabled: every first-stage table
  access and the output go through a 4-level second stage;
* walk_range_256_us_per_page: ``Walker.translate_range`` over the 256 mapped pages at once
  (caches disabled: one descent, one read of the leaf entries), CPU microseconds per page;
  ``walk_range_vs_uncached``: its rate / the per-page uncached walk's;
* floor_struct_walk_per_s: the floor of an uncached walk, a bare function over the same tables
  making the walker's reads (one ``struct.unpack_from`` per entry, the words the walker checks)
  and checks (present and reserved bits, PASID range, canonical address, U/S and R/W, large
  pages, the interrupt range; reads past the buffer are struct.error), by hand over one buffer
  from GPA 0: no fault named, no second region, no cache, no fallback; called the same way;
* floor_dict_lookup_per_s: the floor of a cached walk, a bare function answering from one dict
  of pages (no source id, PASID, root or permission), called the same way;
* floor_present_only_walk_per_s: a lower bound below any correct walk (present bits only, fewer
  words read), for scale: ``walk_uncached_vs_present_only`` (no target);
* walk_uncached_vs_floor / walk_cached_vs_floor: floor rate / walker rate from this run
  (1.0 = as fast as the floor; targets <= 1.25 and <= 2.0).
Each figure is the best of several timed rounds, per CPU second of this process
(``wall_value``: per wall-clock second, which on a shared machine includes waiting for a core).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from typing import Protocol

from vioasid.formats.context import SM_CONTEXT_ENTRY
from vioasid.formats.paging import FIRST_STAGE_PDE_2M, FIRST_STAGE_PDPE_1G, FIRST_STAGE_PTE
from vioasid.formats.pasid import PASID_DIR_ENTRY, PASID_ENTRY, PGTT_FIRST_STAGE, PGTT_NESTED
from vioasid.formats.registers import RTADDR, TTM_SCALABLE
from vioasid.formats.root import SM_ROOT_ENTRY
from vioasid.model.cache import Caches
from vioasid.model.guest_driver import (
    FirstStagePageTable,
    GuestIommuDriver,
    PageAllocator,
    SecondStagePageTable,
)
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest

MIB = 1 << 20
SID = 0x18
PAGES = 256


def rate(fn: Callable[[int], object], n: int, rounds: int = 5) -> tuple[float, float]:
    """Best (CPU-time rate, wall-clock rate) over ``rounds`` runs of ``n`` translations.

    The value reported is per CPU second of this process (``time.process_time``): on a
    machine shared with other jobs the wall clock also counts time spent waiting for a core.
    """
    best_cpu = best_wall = 0.0
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(n)
        dc, dw = time.process_time() - c0, time.perf_counter() - w0
        best_cpu = max(best_cpu, n / max(dc, 1e-9))
        best_wall = max(best_wall, n / dw)
    return best_cpu, best_wall


def paired(
    fns: list[Callable[[int], object]], n: int, rounds: int = 15
) -> list[tuple[float, float]]:
    """Best rates of each of ``fns`` timed in alternating rounds (a neighbour's load weighs on
    all alike)."""
    best = [(0.0, 0.0)] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            x = rate(fn, n, 1)
            best[i] = (max(best[i][0], x[0]), max(best[i][1], x[1]))
    return best


def ratio(name: str, value: float, target: float | None) -> None:
    line: dict[str, object] = {"name": name, "value": round(value, 3), "unit": "x"}
    if target is not None:
        line["target"] = target
    print(json.dumps(line), flush=True)


def emit(name: str, value: tuple[float, float], unit: str = "translations/s") -> None:
    cpu, wall = (round(x) if x >= 100 else round(x, 3) for x in value)
    print(json.dumps({"name": name, "value": cpu, "unit": unit, "wall_value": wall}), flush=True)


def bare_present_walker(buf: memoryview) -> Callable[[int, int, int, int | None], int | None]:
    """A lower bound, not a walker: scalable root -> context -> PASID dir -> PASID entry ->
    4-level first stage, present bits only (no reserved bits, PASID range, permissions or
    canonical check; qw0 of the context entry, qw0 and qw2 of the PASID entry), over one
    buffer holding guest memory from GPA 0."""
    unpack = struct.Struct("<Q").unpack_from
    ptr = 0x000F_FFFF_FFFF_F000

    def walk(rt: int, sid: int, addr: int, pasid: int | None) -> int | None:
        assert pasid is not None
        half = unpack(buf, (rt & ~0xFFF) + (sid >> 8) * 16 + ((sid >> 4) & 8))[0]
        if not half & 1:
            return None
        c0 = unpack(buf, (half & ptr) + (sid & 0x7F) * 32)[0]
        if not c0 & 1:
            return None
        pde = unpack(buf, (c0 & ptr) + (pasid >> 6) * 8)[0]
        if not pde & 1:
            return None
        pe = (pde & ptr) + (pasid & 0x3F) * 64
        if not unpack(buf, pe)[0] & 1:
            return None
        t: int = unpack(buf, pe + 16)[0]
        t = unpack(buf, (t & ptr) + ((addr >> 36) & 0xFF8))[0]
        if not t & 1:
            return None
        t = unpack(buf, (t & ptr) + ((addr >> 27) & 0xFF8))[0]
        if not t & 1:
            return None
        t = unpack(buf, (t & ptr) + ((addr >> 18) & 0xFF8))[0]
        if not t & 1:
            return None
        t = unpack(buf, (t & ptr) + ((addr >> 9) & 0xFF8))[0]
        if not t & 1:
            return None
        return (t & ptr) | (addr & 0xFFF)

    return walk


class StructWalk(Protocol):
    """What :func:`bare_struct_walker` returns: a walk whose ``write`` defaults to a read."""

    def __call__(
        self, rt: int, sid: int, addr: int, pasid: int | None, write: bool = False
    ) -> int | None: ...


def bare_struct_walker(buf: memoryview) -> StructWalk:
    """The floor of an uncached walk: by hand, the reads and checks the walker must make for a
    user request on a scalable-mode, 4-level first-stage path (host address width 48), and
    nothing else: TTM; the root half (present, reserved bits incl. above the host width); the
    256-bit context entry (P, reserved bits of all four words, PASIDE, PDTS); the
    PASID-directory entry (P, reserved); the PASID entry's qw0-qw2 (P, PGTT = first stage,
    reserved, FLPM = 4-level); a canonical address; four paging levels (P, reserved, PS at each
    level, large-page reserved bits); U/S and R/W on every level; the interrupt range. One
    buffer holding guest memory from GPA 0; a read past its end is struct.error; None for
    anything else (no fault named). Its literal masks are checked against the layouts in
    :func:`check_floor_masks`."""
    q1 = struct.Struct("<Q").unpack_from
    q3 = struct.Struct("<3Q").unpack_from
    q4 = struct.Struct("<4Q").unpack_from
    err = struct.error

    def walk(rt: int, sid: int, addr: int, pasid: int | None, write: bool = False) -> int | None:
        try:
            if rt & 0xC00 != 0x400:
                return None
            g = (rt & 0xFFFF_FFFF_FFFF_F000) + (sid >> 8) * 16 + ((sid >> 4) & 8)
            if g < 0:
                return None
            half = q1(buf, g)[0]
            if half & 0xFFFF_0000_0000_0FFF != 1:
                return None
            c0, c1, c2, c3 = q4(buf, (half & 0xFFFF_FFFF_FFFF_F000) + (sid & 0x7F) * 32)
            if c0 & 0xFFFF_0000_0000_01E1 != 1 or c1 & 0xFFFF_FFFF_FFE0_0000 or c2 or c3:
                return None
            if pasid is None or not c0 & 8 or not 0 <= pasid < 0x100000:
                return None
            if pasid >> (((c0 >> 9) & 7) + 13):
                return None
            pde = q1(buf, (c0 & 0xFFFF_FFFF_FFFF_F000) + (pasid >> 6) * 8)[0]
            if pde & 0xFFFF_0000_0000_0FFD != 1:
                return None
            w0, _, w2 = q3(buf, (pde & 0xFFFF_FFFF_FFFF_F000) + (pasid & 0x3F) * 64)
            if w0 & 0xFFFF_0000_0000_0DC1 != 0x41 or w2 & 0xFFFF_0000_0000_000C:
                return None
            top = addr >> 47
            if top and top != 0x1FFFF:
                return None
            t4: int = q1(buf, (w2 & 0xFFFF_FFFF_FFFF_F000) + ((addr >> 36) & 0xFF8))[0]
            if t4 & 0xF_0000_0000_0081 != 1:
                return None
            t3: int = q1(buf, (t4 & 0xF_FFFF_FFFF_F000) + ((addr >> 27) & 0xFF8))[0]
            if t3 & 0xF_0000_0000_0001 != 1:
                return None
            if t3 & 0x80:
                if t3 & 0xF_0000_3FFF_E000:
                    return None
                size, pa, acc = 0x4000_0000, t3 & 0xF_FFFF_C000_0000, t4 & t3
            else:
                t2: int = q1(buf, (t3 & 0xF_FFFF_FFFF_F000) + ((addr >> 18) & 0xFF8))[0]
                if t2 & 0xF_0000_0000_0001 != 1:
                    return None
                if t2 & 0x80:
                    if t2 & 0xF_0000_001F_E000:
                        return None
                    size, pa, acc = 0x20_0000, t2 & 0xF_FFFF_FFE0_0000, t4 & t3 & t2
                else:
                    t1: int = q1(buf, (t2 & 0xF_FFFF_FFFF_F000) + ((addr >> 9) & 0xFF8))[0]
                    if t1 & 0xF_0000_0000_0001 != 1:
                        return None
                    size, pa, acc = 0x1000, t1 & 0xF_FFFF_FFFF_F000, t4 & t3 & t2 & t1
            if not acc & 4 or (write and not acc & 2):
                return None
            if pa <= 0xFEEF_FFFF and pa + size > 0xFEE0_0000:
                return None
            return pa | (addr & (size - 1))
        except err:
            return None

    return walk


def check_floor_masks() -> None:
    """The floor's literal masks are the layouts' (host address width 48)."""
    above = ((1 << 64) - 1) & ~((1 << 48) - 1)
    r = above & FIRST_STAGE_PTE.mask("ADDR")
    ce, pe, fs = SM_CONTEXT_ENTRY, PASID_ENTRY, FIRST_STAGE_PTE
    want = {
        0xC00: RTADDR.mask("TTM"),
        0x400: RTADDR.field("TTM").put(TTM_SCALABLE),
        0xFFFF_FFFF_FFFF_F000: RTADDR.mask("RTA"),
        0xFFFF_0000_0000_0FFF: SM_ROOT_ENTRY.mask("LP") | SM_ROOT_ENTRY.reserved[0] | above,
        0xFFFF_0000_0000_01E1: ce.mask("P") | ce.reserved[0] | above,
        0xFFFF_FFFF_FFE0_0000: ce.reserved[1],
        (1 << 64) - 1: ce.reserved[2] & ce.reserved[3],
        8: ce.mask("PASIDE"),
        0xFFFF_0000_0000_0FFD: PASID_DIR_ENTRY.mask("P") | PASID_DIR_ENTRY.reserved[0] | above,
        0xFFFF_0000_0000_0DC1: pe.mask("P") | pe.mask("PGTT") | pe.reserved[0] | above,
        0x41: pe.mask("P") | pe.field("PGTT").put(PGTT_FIRST_STAGE),
        0xFFFF_0000_0000_000C: pe.reserved[2] | above | pe.mask("FLPM"),
        0xF_0000_0000_0081: fs.mask("P") | r | fs.mask("PS"),
        0xF_0000_0000_0001: fs.mask("P") | r,
        0xF_0000_3FFF_E000: r | FIRST_STAGE_PDPE_1G.reserved[0],
        0xF_0000_001F_E000: r | FIRST_STAGE_PDE_2M.reserved[0],
        0xF_FFFF_C000_0000: FIRST_STAGE_PDPE_1G.mask("ADDR"),
        0xF_FFFF_FFE0_0000: FIRST_STAGE_PDE_2M.mask("ADDR"),
        0xF_FFFF_FFFF_F000: fs.mask("ADDR"),
        0x80 | 4 | 2: fs.mask("PS") | fs.mask("US") | fs.mask("RW"),
    }
    bad = {hex(k): hex(v) for k, v in want.items() if k != v}
    assert not bad, f"floor masks differ from the layouts: {bad}"
    assert pe.reserved[1] == 0 and ce.field("PDTS").lo == 9 and ce.field("PDTS").vmask == 7


def bare_dict_lookup(pages: dict[int, int]) -> Callable[[int, int, int, int | None], int | None]:
    """The floor of a cache: one dict of 4 KiB pages, nothing else."""

    def lookup(rt: int, sid: int, addr: int, pasid: int | None) -> int | None:
        base = pages.get(addr >> 12)
        return None if base is None else base | (addr & 0xFFF)

    return lookup


def main() -> None:
    mem = GuestMemory.from_bytes(64 * MIB)
    alloc = PageAllocator(mem, 32 * MIB, 16 * MIB)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(SID)
    fs = FirstStagePageTable(mem, alloc)
    fs.map(0x10000000, 0x100000, PAGES * 4096)
    drv.set_pasid_entry(SID, 1, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=fs.root)
    ss = SecondStagePageTable(mem, alloc)
    ss.map_identity(0, 32 * MIB)
    ss.map_identity(32 * MIB, 16 * MIB)
    drv.set_pasid_entry(SID, 2, pgtt=PGTT_NESTED, did=2, flptptr=fs.root, ssptptr=ss.root)
    rt = drv.rtaddr
    addrs = [0x10000000 + (i % PAGES) * 4096 + 8 for i in range(4096)]

    unc = Walker(mem, caches=Caches(enabled=False))
    cached = Walker(mem)
    for a in addrs[:PAGES]:
        assert cached.translate_fast(rt, SID, a, 1) == a - 0x10000000 + 0x100000
        assert unc.translate_fast(rt, SID, a, 2) == a - 0x10000000 + 0x100000
    assert unc.translate_range(rt, SID, addrs[0], PAGES, 1) == [
        a - 0x0FF00000 for a in addrs[:PAGES]
    ]

    check_floor_masks()
    floor_walk = bare_struct_walker(mem.regions[0].buf)
    floor_present = bare_present_walker(mem.regions[0].buf)
    floor_dict = bare_dict_lookup({a >> 12: (a - 0x10000000 + 0x100000) & ~0xFFF for a in addrs})
    for a in addrs[:PAGES]:
        want = a - 0x10000000 + 0x100000
        assert floor_walk(rt, SID, a, 1) == floor_present(rt, SID, a, 1) == want
        assert floor_dict(rt, SID, a, 1) == want

    def floor(f: Callable[[int, int, int, int | None], object]) -> Callable[[int], object]:
        def run(n: int) -> None:
            for i in range(n):
                f(rt, SID, addrs[i & 4095], 1)

        return run

    def fast(w: Walker, pasid: int) -> Callable[[int], object]:
        tf = w.translate_fast

        def run(n: int) -> None:
            for i in range(n):
                tf(rt, SID, addrs[i & 4095], pasid)

        return run

    def ranged(w: Walker, pasid: int) -> Callable[[int], object]:
        tr = w.translate_range

        def run(n: int) -> None:
            for _ in range(n // PAGES):
                tr(rt, SID, addrs[0], PAGES, pasid)

        return run

    def full(w: Walker, pasid: int) -> Callable[[int], object]:
        reqs = [WalkRequest(SID, a, pasid) for a in addrs]
        tr = w.translate

        def run(n: int) -> None:
            for i in range(n):
                tr(rt, reqs[i & 4095])

        return run

    # Each walker figure and its floor are timed in alternating rounds, so a neighbour's load
    # weighs on both alike.
    unc_rate, floor_walk_rate, floor_present_rate = paired(
        [fast(unc, 1), floor(floor_walk), floor(floor_present)], 10_000
    )
    cached_rate, floor_dict_rate = paired([fast(cached, 1), floor(floor_dict)], 100_000)
    emit("walk_uncached_per_s", unc_rate)
    emit("walk_uncached_translation_per_s", rate(full(unc, 1), 20_000))
    emit("walk_cached_per_s", cached_rate)
    emit("walk_cached_translation_per_s", rate(full(cached, 1), 50_000))
    emit("walk_nested_uncached_per_s", rate(fast(unc, 2), 5_000))
    range_rate = rate(ranged(unc, 1), 50 * PAGES, 10)
    emit("walk_range_256_us_per_page", (1e6 / range_rate[0], 1e6 / range_rate[1]), "us")
    emit("floor_struct_walk_per_s", floor_walk_rate)
    emit("floor_dict_lookup_per_s", floor_dict_rate)
    emit("floor_present_only_walk_per_s", floor_present_rate)
    ratio("walk_uncached_vs_floor", floor_walk_rate[0] / unc_rate[0], 1.25)
    ratio("walk_cached_vs_floor", floor_dict_rate[0] / cached_rate[0], 2.0)
    ratio("walk_uncached_vs_present_only", floor_present_rate[0] / unc_rate[0], None)
    ratio("walk_range_vs_uncached", range_rate[0] / unc_rate[0], None)


if __name__ == "__main__":
    main()
