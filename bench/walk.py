"""Walker throughput: JSON lines {"name", "value", "unit"} on stdout.

* walk_uncached_per_s: full root -> context -> PASID dir -> PASID entry -> 4-level first-stage
  walk per request (caches disabled), through ``Walker.translate_fast``;
* walk_uncached_translation_per_s: the same through ``Walker.translate`` (builds a Translation);
* walk_cached_per_s: IOTLB hit through ``translate_fast``;
* walk_cached_translation_per_s: IOTLB hit through ``translate``;
* walk_nested_uncached_per_s: nested (PGTT=3) walk, caches disabled: every first-stage table
  access and the output go through a 4-level second stage;
* floor_struct_walk_per_s: the floor of an uncached walk, a bare function over the same tables
  (one ``struct.unpack_from`` per level, present bits only: no reserved bits, bounds,
  permissions or faults), called the same way;
* floor_dict_lookup_per_s: the floor of a cached walk, a bare function answering from one dict
  of pages, called the same way;
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

from vioasid.formats.pasid import PGTT_FIRST_STAGE, PGTT_NESTED
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
    a: Callable[[int], object], b: Callable[[int], object], n: int, rounds: int = 7
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best rates of ``a`` and ``b`` timed in alternating rounds."""
    ra, rb = (0.0, 0.0), (0.0, 0.0)
    for _ in range(rounds):
        x, y = rate(a, n, 1), rate(b, n, 1)
        ra, rb = (max(ra[0], x[0]), max(ra[1], x[1])), (max(rb[0], y[0]), max(rb[1], y[1]))
    return ra, rb


def ratio(name: str, value: float, target: float) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": "x", "target": target}))


def emit(name: str, value: tuple[float, float], unit: str = "translations/s") -> None:
    cpu, wall = value
    print(
        json.dumps({"name": name, "value": round(cpu), "unit": unit, "wall_value": round(wall)}),
        flush=True,
    )


def bare_struct_walker(buf: memoryview) -> Callable[[int, int, int, int | None], int | None]:
    """The floor: scalable root -> context -> PASID dir -> PASID entry -> 4-level first stage,
    present bits only, over one buffer holding guest memory from GPA 0."""
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
        t = unpack(buf, pe + 16)[0]
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

    floor_walk = bare_struct_walker(mem.regions[0].buf)
    floor_dict = bare_dict_lookup({a >> 12: (a - 0x10000000 + 0x100000) & ~0xFFF for a in addrs})
    for a in addrs[:PAGES]:
        assert floor_walk(rt, SID, a, 1) == floor_dict(rt, SID, a, 1) == a - 0x10000000 + 0x100000

    def floor(f: Callable[[int, int, int, int | None], int | None]) -> Callable[[int], object]:
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

    def full(w: Walker, pasid: int) -> Callable[[int], object]:
        reqs = [WalkRequest(SID, a, pasid) for a in addrs]
        tr = w.translate

        def run(n: int) -> None:
            for i in range(n):
                tr(rt, reqs[i & 4095])

        return run

    # Each walker figure and its floor are timed in alternating rounds, so a neighbour's load
    # weighs on both alike.
    unc_rate, floor_walk_rate = paired(fast(unc, 1), floor(floor_walk), 20_000)
    cached_rate, floor_dict_rate = paired(fast(cached, 1), floor(floor_dict), 200_000)
    emit("walk_uncached_per_s", unc_rate)
    emit("walk_uncached_translation_per_s", rate(full(unc, 1), 20_000))
    emit("walk_cached_per_s", cached_rate)
    emit("walk_cached_translation_per_s", rate(full(cached, 1), 50_000))
    emit("walk_nested_uncached_per_s", rate(fast(unc, 2), 5_000))
    emit("floor_struct_walk_per_s", floor_walk_rate)
    emit("floor_dict_lookup_per_s", floor_dict_rate)
    ratio("walk_uncached_vs_floor", floor_walk_rate[0] / unc_rate[0], 1.25)
    ratio("walk_cached_vs_floor", floor_dict_rate[0] / cached_rate[0], 2.0)


if __name__ == "__main__":
    main()
