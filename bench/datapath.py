"""The guest disk's data path piece by piece, without a guest (JSON lines; docs/performance.md).

* translation of a 1 MiB buffer in 4 KiB pages through ``DeviceTranslator`` with the own walk
  of Linux-like first-stage tables in memory: a miss per page as in strict mode (``spans``, the
  synchronous path, one call per page and one call for the whole 1 MiB buffer (the range walk),
  and ``translate`` awaited per page), the cached case, and the walker's ``translate_fast``
  alone (the floor);
* a strict-mode write request's Python work, piece by piece (``request_figures``): the pop of
  a chain whose indirect table holds 128 single-page descriptors (the table's page a fresh
  IOVA: a miss), ``Dma.transfer`` of 85 and 256 single pages at descending IOVAs (all misses,
  and all hits) and of 4 buffers of 64 contiguous pages (a read's shape), applying 85 posted
  invalidations through the DMA gate as the back-end wires it, and ``invalidated_since`` of
  85 buffers against 85 newer invalidations (least of many runs, setup outside the timing);
* the IOTLB invalidation round trip as QEMU sees it: a separate process sends ``IOTLB_MSG``
  invalidations with ``NEED_REPLY`` to a live :class:`VhostUserBlkBackend` and times each ack.

Usage: ``python3 bench/datapath.py [--rounds 2000] [--only request ...]``. Each line carries
``load`` (1-minute load average): the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vioasid.device.translator import DeviceTranslator, VtdRegs, WalkResolver
from vioasid.formats.virtio import VRING_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from vioasid.model.cache import Caches
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker
from vioasid.vhost_user.iotlb_reader import InvalidationGate
from vioasid.vhost_user.virtqueue import Buffer, Dma, SplitQueue

SID = 0x20
IOVA = 0xFFF0_0000  # Linux hands out IOVAs top-down below 4 GiB
PAGES = 256  # one 1 MiB request

CLIENT = r"""
import socket, struct, sys, time
from vioasid.vhost_user.codec import encode
from vioasid.formats.virtio import (VHOST_USER_IOTLB, VHOST_USER_NEED_REPLY, VHOST_USER_VERSION,
    VhostUserRequest as R, IotlbType)
path, rounds = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
def call(req, payload):
    s.sendall(encode(req, payload, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY))
    got = b""
    while len(got) < 20:
        got += s.recv(64)
call(R.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))  # REPLY_ACK
out = []
for i in range(rounds):
    inv = VHOST_USER_IOTLB.build(iova=0x1000 * i, size=0x1000, uaddr=0, perm=0,
                                 type=IotlbType.INVALIDATE)
    t0 = time.perf_counter()
    call(R.IOTLB_MSG, inv)
    out.append(time.perf_counter() - t0)
print(" ".join(f"{x:.9f}" for x in out))
"""


def emit(name: str, value: float, unit: str) -> None:
    rec = {"name": name, "value": round(value, 3), "unit": unit}
    rec["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(rec), flush=True)


def tables() -> tuple[GuestMemory, int]:
    """64 MiB of guest RAM whose first-stage table maps ``PAGES`` scattered pages at IOVA."""
    mem = GuestMemory.from_bytes(64 << 20)
    alloc = PageAllocator(mem, 48 << 20, 8 << 20)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(SID)
    pt = FirstStagePageTable(mem, alloc)
    drv.set_pasid_entry(SID, 0, pgtt=1, did=5, flptptr=pt.root)
    for i in range(PAGES):
        pt.map(IOVA + i * 4096, (1 << 20) + ((i * 7919) % 8192) * 4096, 4096, write=True)
    return mem, drv.rtaddr


def best(fn: object, reps: int) -> float:
    """Best-of-5 seconds for ``reps`` calls of ``fn`` (less noise on a shared machine)."""
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return min(out) / reps


def translation_figures() -> None:
    mem, rtaddr = tables()

    async def regs() -> VtdRegs:
        return VtdRegs(gsts=1 << 31, rtaddr=rtaddr)

    wr = WalkResolver(lambda: mem, SID, regs)
    tr = DeviceTranslator(wr, sid=SID)
    asyncio.run(tr.translate(IOVA, False))  # reads the registers once

    def spans_miss() -> None:
        tr.flush()
        for i in range(PAGES):
            tr.spans(IOVA + i * 4096, 4096, True)

    def spans_range_miss() -> None:
        tr.flush()
        tr.spans(IOVA, PAGES * 4096, True)  # one 1 MiB buffer, as a read request's segment

    def spans_hit() -> None:
        for i in range(PAGES):
            tr.spans(IOVA + i * 4096, 4096, True)

    async def awaited() -> None:
        tr.flush()
        for i in range(PAGES):
            await tr.translate(IOVA + i * 4096, True)

    loop = asyncio.new_event_loop()
    walker = Walker(mem, caches=Caches(enabled=False))

    def floor() -> None:
        for i in range(PAGES):
            walker.translate_fast(rtaddr, SID, IOVA + i * 4096, None, True)

    per = 1e6 / PAGES
    emit("datapath_translate_1mib_spans_miss_us_per_page", best(spans_miss, 20) * per, "us")
    emit(
        "datapath_translate_1mib_buffer_spans_miss_us_per_page",
        best(spans_range_miss, 20) * per,
        "us",
    )
    emit(
        "datapath_translate_1mib_awaited_miss_us_per_page",
        best(lambda: loop.run_until_complete(awaited()), 20) * per,
        "us",
    )
    spans_hit()
    emit("datapath_translate_1mib_spans_hit_us_per_page", best(spans_hit, 20) * per, "us")
    emit("datapath_walker_translate_fast_us_per_page", best(floor, 20) * per, "us")
    loop.close()


RING_IOVA = 0xFFFE_0000  # the ring's two pages (descriptor table + avail ring, used ring)
TABLE_IOVA = 0xFFF0_0000  # the indirect table's page
QSIZE = 128


class Request:
    """A strict-mode write as Linux submits it: an indirect table of ``n`` single 4 KiB pages at
    descending IOVAs below the table's, each mapped to a scattered guest page."""

    def __init__(self, n: int) -> None:
        self.mem = mem = GuestMemory.from_bytes(64 << 20)
        alloc = PageAllocator(mem, 48 << 20, 8 << 20)
        drv = GuestIommuDriver(mem, alloc)
        drv.attach_device(SID)
        pt = FirstStagePageTable(mem, alloc)
        drv.set_pasid_entry(SID, 0, pgtt=1, did=5, flptptr=pt.root)
        self.ring_gpa, table_gpa = 0x10000, 0x20000
        pt.map(RING_IOVA, self.ring_gpa, 0x2000, write=True)
        pt.map(TABLE_IOVA, table_gpa, 0x1000, write=False)
        self.iovas = [TABLE_IOVA - (i + 1) * 0x1000 for i in range(n)]
        for i, a in enumerate(self.iovas):
            pt.map(a, (1 << 20) + ((i * 7919) % 8192) * 4096, 4096, write=True)
            flags = VRING_DESC_F_NEXT if i < n - 1 else 0
            desc = VRING_DESC.build(addr=a, len=4096, flags=flags, next=i + 1)
            mem.write(table_gpa + 16 * i, desc)
        self.head = VRING_DESC.build(addr=TABLE_IOVA, len=16 * n, flags=VRING_DESC_F_INDIRECT)
        rtaddr = drv.rtaddr

        async def regs() -> VtdRegs:
            return VtdRegs(gsts=1 << 31, rtaddr=rtaddr)

        self.tr = DeviceTranslator(WalkResolver(lambda: mem, SID, regs), sid=SID)
        asyncio.run(self.tr.translate(RING_IOVA, False))  # reads the registers once
        self.dma = Dma(lambda: mem, self.tr)
        self.q = SplitQueue(0, num=QSIZE, desc=RING_IOVA, avail=RING_IOVA + 0x800,
                            used=RING_IOVA + 0x1000)  # fmt: skip
        self.q.enabled = self.q.started = True
        self.bufs = [Buffer(a, 4096, True) for a in self.iovas]
        self.avail = 0

    def submit(self) -> None:
        """The head in the ring, the avail index advanced, the table's page not cached (a fresh
        IOVA in strict mode)."""
        self.mem.write(self.ring_gpa, self.head)
        self.mem.write(self.ring_gpa + 0x804 + 2 * (self.avail % QSIZE), bytes(2))
        self.avail += 1
        self.mem.write(self.ring_gpa + 0x802, (self.avail & 0xFFFF).to_bytes(2, "little"))
        self.tr.invalidate(TABLE_IOVA, 0x1000)


def least(setup: Callable[[], object], fn: Callable[[], object], runs: int = 300) -> float:
    """Least seconds of ``runs`` single calls of ``fn``, each after ``setup`` (untimed): the run
    no other process interrupted, on a shared machine."""
    out = []
    for _ in range(runs):
        setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def request_figures() -> None:
    loop = asyncio.new_event_loop()
    r = Request(128)

    def pop() -> None:
        chain = loop.run_until_complete(r.q.pop(r.dma))
        assert chain is not None and len(chain.buffers) == 128

    emit("datapath_pop_indirect_128_us", least(r.submit, pop) * 1e6, "us")
    for n in (85, 256):
        r = Request(n)

        def transfer(r: Request = r) -> None:
            loop.run_until_complete(r.dma.transfer(r.bufs, True, len))

        per = 1e6 / n
        emit(f"datapath_transfer_{n}_single_pages_us_per_page",
             least(r.tr.flush, transfer) * per, "us")  # fmt: skip
        emit(f"datapath_transfer_{n}_single_pages_hit_us_per_page",
             least(lambda: None, transfer) * per, "us")  # fmt: skip
    # a read's shape: 4 buffers of 64 contiguous pages (the range walk's case)
    lo = min(r.iovas)
    segs = [Buffer(lo + k * 64 * 4096, 64 * 4096, True) for k in range(4)]

    def segments() -> None:
        loop.run_until_complete(r.dma.transfer(segs, True, len))

    emit("datapath_transfer_4x64_pages_us_per_page", least(r.tr.flush, segments) * 1e6 / 256, "us")
    loop.close()

    # 85 posted single-page invalidations (the last request's pages), applied on entering the
    # gate as the back-end wires it (one call for all of them where the translator has one)
    r = Request(170)
    tr = r.tr
    ranges = [(a, 0x1000) for a in r.iovas]
    many = getattr(tr, "invalidate_many", None)
    try:
        gate = InvalidationGate(tr.invalidate, many)
    except TypeError:  # the code before the batch: one apply per invalidation
        gate = InvalidationGate(tr.invalidate)

    def posted() -> None:
        for a, n in ranges:  # all 170 pages cached
            tr.spans(a, n, True)
        for iova, size in ranges[:85]:
            gate.post(iova, size)

    emit("datapath_apply_85_invalidations_us", least(posted, gate.drain) * 1e6, "us")

    # a request's 85 buffers against 85 newer invalidations of other pages (none covers them)
    since = tr.generation
    for iova, size in ranges[85:]:
        tr.invalidate(iova, size)
    check = ranges[:85]

    def fresh() -> None:
        assert not tr.invalidated_since(since, check)

    emit("datapath_invalidated_since_85x85_us", least(lambda: None, fresh) * 1e6, "us")


async def ack_figures(rounds: int) -> None:
    from vioasid.vhost_user.backend import VhostUserBlkBackend

    with tempfile.TemporaryDirectory(prefix="vioasid-dp-") as tmp:
        disk = Path(tmp) / "disk.raw"
        disk.write_bytes(b"\0" * (1 << 20))
        sock = Path(tmp) / "vu.sock"
        backend = VhostUserBlkBackend(disk, sock, translate="identity")
        await backend.start()
        serve = asyncio.create_task(backend.serve_forever())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            str(sock),
            str(rounds),
            stdout=subprocess.PIPE,
            env=env,
        )
        out, _ = await proc.communicate()
        await backend.close()
        serve.cancel()
    times = sorted(float(x) for x in out.split())
    if len(times) != rounds:
        raise SystemExit("the IOTLB client failed")
    emit("datapath_iotlb_invalidate_ack_p50_us", 1e6 * statistics.median(times), "us")
    emit("datapath_iotlb_invalidate_ack_p90_us", 1e6 * times[int(0.9 * len(times))], "us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2000, help="IOTLB invalidations timed")
    ap.add_argument("--only", choices=("translation", "request", "ack"), action="append",
                    help="run only these parts (repeatable; default all)")  # fmt: skip
    args = ap.parse_args()
    parts = args.only or ["translation", "request", "ack"]
    if "translation" in parts:
        translation_figures()
    if "request" in parts:
        request_figures()
    if "ack" in parts:
        asyncio.run(ack_figures(args.rounds))


if __name__ == "__main__":
    main()
