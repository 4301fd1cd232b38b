"""The guest disk's data path piece by piece, without a guest (JSON lines; docs/performance.md).

* translation of a 1 MiB buffer in 4 KiB pages through ``DeviceTranslator`` with the own walk
  of Linux-like first-stage tables in memory: a miss per page as in strict mode (``spans``, the
  synchronous path, one call per page and one call for the whole 1 MiB buffer (the range walk),
  and ``translate`` awaited per page), the cached case, and the walker's ``translate_fast``
  alone (the floor);
* the IOTLB invalidation round trip as QEMU sees it: a separate process sends ``IOTLB_MSG``
  invalidations with ``NEED_REPLY`` to a live :class:`VhostUserBlkBackend` and times each ack.

Usage: ``python3 bench/datapath.py [--rounds 2000]``. Each line carries ``load`` (1-minute
load average): the machine is shared.
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
from pathlib import Path

from vioasid.device.translator import DeviceTranslator, VtdRegs, WalkResolver
from vioasid.model.cache import Caches
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker

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
    args = ap.parse_args()
    translation_figures()
    asyncio.run(ack_figures(args.rounds))


if __name__ == "__main__":
    main()
