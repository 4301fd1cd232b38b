"""vPASID engine benchmark: binds, nested DMA, migration export/import, state size, memory.

Prints JSON lines ``{"name": ..., "value": ..., "unit": ...}`` (extra keys say the size):

* ``bind_per_s``: :meth:`Host.bind` calls per second (guest entry read from guest RAM, policy,
  conflict checks, allocation, nested host entry written), 100k bindings on one mdev (per-RID
  space); ``bind_per_s`` with ``"n"`` for every size (linearity), ``bind_many_per_s`` for the
  batched path the migration import uses;
* ``dma_per_s_nested_uncached`` / ``dma_per_s_nested_cached``: :meth:`Host.dma` requests per
  second, each a nested walk of the host PASID table (guest first stage, then the VM's second
  stage) without / with the IOTLB; ``dma_fast_per_s_cached``: the daemon's hot path
  (:meth:`Host.dma_fast`);
* ``export_import_100k_bindings_s``: export on one host + import on another (re-allocating every
  pPASID), 100k bindings; ``export_import_s`` with ``"n"`` for every size;
* ``state_bytes_per_binding``: migration stream bytes / bindings (target <= 32);
* ``rss_mb_per_100k_bindings``: resident memory the engine adds per 100k bindings (host tables
  + model state; guest RAM excluded).

Rates and times are CPU time of this process (``time.process_time``): on a shared 2-core
machine wall-clock figures mostly measure the neighbours.

Usage: ``python3 bench/engine.py [--sizes 10000,100000,1000000] [--dma N]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import time
from typing import Any

from vioasid.formats.pasid import PASID_ENTRY, PGTT_FIRST_STAGE
from vioasid.model.engine import Host
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.model.migration import export_vm, import_vm

SID = 0x18
FN_SRC = 0x3A00
FN_DST = 0x5E00
PAGE = 4096


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def clock() -> float:
    """CPU seconds of this process: the machine's cores are shared with other work, and the
    figures should describe this code, not the neighbours' load."""
    return time.process_time()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Guest:
    """Guest RAM with a Linux-like IOMMU driver; ``n`` PASID entries on device 00:03.0."""

    def __init__(self, n: int) -> None:
        tables = (n // 64 + 64) * PAGE  # leaf PASID tables
        self.size = max(64 << 20, 1 << (2 * tables + (8 << 20)).bit_length())
        self.memory = GuestMemory()
        self.memory.add(0, mmap.mmap(-1, self.size), name="ram")
        pool = self.size // 2
        self.pages = PageAllocator(self.memory, self.size - pool, pool)
        self.driver = GuestIommuDriver.for_pasid_bits(self.memory, self.pages, 20)
        self.driver.attach_device(SID)
        self.fs = FirstStagePageTable(self.memory, self.pages)
        self.fs.map(0x4000_0000, 0x10_0000, 256 * PAGE)

    def write_entries(self, xs: range) -> None:
        """Every vPASID points at the same first-stage table (an SVA-like guest)."""
        raw = PASID_ENTRY.build(
            {"P": 1, "PGTT": PGTT_FIRST_STAGE, "DID": 1, "AW": 2, "FLPTPTR": self.fs.root}
        )
        mem, gpa_of = self.memory, self.driver.pasid_entry_gpa
        for x in xs:
            mem.write(gpa_of(SID, x, create=True), raw)


def host(name: str, rid: int, *, caches: bool = True) -> Host:
    h = Host(name, caches=caches)
    h.add_function(rid)
    return h


def bench_size(n: int) -> dict[str, float]:
    gc.collect()
    guest = Guest(n)
    xs = range(1, n + 1)
    guest.write_entries(xs)
    src = host("src", FN_SRC)
    src.add_vm("vm", guest.memory, rtaddr=guest.driver.rtaddr)
    src.attach_device("vm", SID, FN_SRC, "mdev")
    gc.collect()
    rss0 = rss_bytes()
    bind = src.bind
    t0 = clock()
    for x in xs:
        bind("vm", SID, x)
    t_bind = clock() - t0
    gc.collect()
    rss_state = rss_bytes() - rss0

    t0 = clock()
    stream = export_vm(src, "vm")
    t_export = clock() - t0
    dst = host("dst", FN_DST)
    # The destination's function is busy with another tenant: every pPASID shifts by 7.
    other = GuestMemory()
    other.add(0, mmap.mmap(-1, 8 << 20), name="ram")
    pages = PageAllocator(other, 4 << 20, 4 << 20)
    drv = GuestIommuDriver.for_pasid_bits(other, pages, 20)
    drv.attach_device(SID)
    dst.add_vm("tenant", other, rtaddr=drv.rtaddr)
    dst.attach_device("tenant", SID, FN_DST, "mdev")
    fs = FirstStagePageTable(other, pages)
    for x in range(1, 8):
        drv.set_pasid_entry(SID, x, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=fs.root)
        dst.bind("tenant", SID, x)
    t0 = clock()
    vm = import_vm(dst, stream, guest.memory, {SID: FN_DST})
    t_import = clock() - t0
    assert vm.devices[SID].ppasids[1] == 8 and len(vm.devices[SID].ppasids) == n

    # The batched path alone, on a fresh host.
    third = host("third", FN_SRC)
    third.add_vm("vm", guest.memory, rtaddr=guest.driver.rtaddr)
    third.attach_device("vm", SID, FN_SRC, "mdev")
    t0 = clock()
    third.bind_many("vm", SID, xs)
    t_many = clock() - t0
    return {
        "bind_per_s": n / t_bind,
        "bind_many_per_s": n / t_many,
        "export_s": t_export,
        "import_s": t_import,
        "export_import_s": t_export + t_import,
        "stream_bytes": len(stream),
        "rss_mb": rss_state / (1 << 20),
    }


def bench_dma(requests: int) -> dict[str, float]:
    guest = Guest(16)
    guest.write_entries(range(5, 6))
    out: dict[str, float] = {}
    for cached in (False, True):
        h = host("h", FN_SRC, caches=cached)
        h.add_vm("vm", guest.memory, rtaddr=guest.driver.rtaddr)
        h.attach_device("vm", SID, FN_SRC, "vfio-pci")
        h.bind("vm", SID, 5)
        addrs = [0x4000_0000 + (i % 256) * PAGE + 8 for i in range(requests)]
        dma = h.dma
        for a in addrs[:512]:
            r = dma("vm", SID, 5, a)
            assert r.ok and r.gpa == 0x10_0000 + (a - 0x4000_0000)
        t0 = clock()
        for a in addrs:
            dma("vm", SID, 5, a)
        out["cached" if cached else "uncached"] = requests / (clock() - t0)
        if cached:
            fast = h.dma_fast
            t0 = clock()
            for a in addrs:
                fast(FN_SRC, 5, a)
            out["fast"] = requests / (clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="binding counts")
    ap.add_argument("--dma", type=int, default=100_000, help="requests per DMA figure")
    args = ap.parse_args()

    d = bench_dma(args.dma)
    emit("dma_per_s_nested_uncached", d["uncached"], "req/s")
    emit("dma_per_s_nested_cached", d["cached"], "req/s")
    emit("dma_fast_per_s_cached", d["fast"], "req/s")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    for n in sizes:
        r = bench_size(n)
        if n == 100_000:
            emit("bind_per_s", r["bind_per_s"], "binds/s")
            emit("export_import_100k_bindings_s", r["export_import_s"], "s",
                 export_s=round(r["export_s"], 3), import_s=round(r["import_s"], 3))  # fmt: skip
            emit("state_bytes_per_binding", r["stream_bytes"] / n, "bytes")
            emit("rss_mb_per_100k_bindings", r["rss_mb"], "MiB")
        emit("bind_per_s", r["bind_per_s"], "binds/s", n=n)
        emit("bind_many_per_s", r["bind_many_per_s"], "binds/s", n=n)
        emit("export_import_s", r["export_import_s"], "s", n=n)
        emit("state_bytes_per_binding", r["stream_bytes"] / n, "bytes", n=n)
        emit("rss_mb_per_100k_bindings", r["rss_mb"] * 100_000 / n, "MiB", n=n)


if __name__ == "__main__":
    main()
