"""Walker throughput: JSON lines {"name", "value", "unit"} on stdout.

* walk_uncached_per_s: full root -> context -> PASID dir -> PASID entry -> 4-level first-stage
  walk per request (caches disabled), through ``Walker.translate_fast``;
* walk_uncached_translation_per_s: the same through ``Walker.translate`` (builds a Translation);
* walk_cached_per_s: IOTLB hit through ``translate_fast``;
* walk_cached_translation_per_s: IOTLB hit through ``translate``;
* walk_nested_uncached_per_s: nested (PGTT=3) walk, caches disabled: every first-stage table
  access and the output go through a 4-level second stage.
Each figure is the best of several timed rounds, per CPU second of this process
(``wall_value``: per wall-clock second, which on a shared machine includes waiting for a core).
"""

from __future__ import annotations

import json
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
from vioasid.model.walker import Request, Walker

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


def emit(name: str, value: tuple[float, float], unit: str = "translations/s") -> None:
    cpu, wall = value
    print(
        json.dumps({"name": name, "value": round(cpu), "unit": unit, "wall_value": round(wall)}),
        flush=True,
    )


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

    def fast(w: Walker, pasid: int) -> Callable[[int], object]:
        tf = w.translate_fast

        def run(n: int) -> None:
            for i in range(n):
                tf(rt, SID, addrs[i & 4095], pasid)

        return run

    def full(w: Walker, pasid: int) -> Callable[[int], object]:
        reqs = [Request(SID, a, pasid) for a in addrs]
        tr = w.translate

        def run(n: int) -> None:
            for i in range(n):
                tr(rt, reqs[i & 4095])

        return run

    emit("walk_uncached_per_s", rate(fast(unc, 1), 20_000))
    emit("walk_uncached_translation_per_s", rate(full(unc, 1), 20_000))
    emit("walk_cached_per_s", rate(fast(cached, 1), 200_000))
    emit("walk_cached_translation_per_s", rate(full(cached, 1), 50_000))
    emit("walk_nested_uncached_per_s", rate(fast(unc, 2), 5_000))


if __name__ == "__main__":
    main()
