"""PASID DMA function benchmark (JSON lines ``{"name", "value", "unit", ...}``).

In-process (no QEMU): the device model of docs/pasid-dma.md on in-memory guest RAM with
Linux-like tables, driven as the guest driver drives it (BAR0 writes, 64-byte descriptors,
completion records); every doorbell first drops the engine's cached translations for the
device and re-reads its PASID entry, and every page comes from the device TLB, checked against
the guest's paging entries once per region and job, or from the engine (the function type's tag,
the nested walk of the host table, the guest's first stage and the VM's second stage): the
coherence design of ``vioasid/device/pasid_dma.py`` and ``vioasid/device/pasid_tlb.py``.

* ``pasid_copy_1m_mib_s``: 1 MiB copies through one PASID, MiB/s (one descriptor each);
  ``pasid_copy_1m_uncached_mib_s``: the same with the device TLB emptied before each copy
  (every page walked by the engine);
* ``pasid_jobs_4k_per_s``: 4 KiB copies per second, submitted as batches of 256 descriptors
  (one doorbell per batch); ``pasid_jobs_4k_single_per_s``: one doorbell per job;
* ``memmove_1m_mib_s``: the same bytes moved by this process's own memmove (a bytearray slice
  copy), and ``pasid_copy_vs_memmove_ratio``;
* ``doorbell_refresh_us``: the per-doorbell coherence cost (``Host.invalidate_context`` +
  ``Host.sync_pasid`` + ``Host.invalidate``) in microseconds.

Rates are CPU time of this process (``time.process_time``; the machine is shared). Guest-measured
figures (the same jobs through a real QEMU 11.1 guest's driver) come from the guest PASID tests'
console (``guest_tests/test_pasid_dma.py``) when they run.

With ``--guest`` (QEMU 11.1 and the test image): a real guest measures the same figures itself
(``images/guest/pasid_bench.sh`` through ``vioasid_dma.ko``, ``"mode": "qemu-guest"``:
``pasid_copy_1m_mib_s``, ``pasid_jobs_4k_per_s``, ``pasid_jobs_4k_single_per_s``,
``pasid_jobs_4k_after_inval_per_s``), and the device side reports what it served
(``pasid_guest_device_mib_s``: bytes moved / time spent running descriptors).

Usage: ``python3 bench/pasid_dma.py [--rounds N] [--guest]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# The repository root (vioasid) and tests/ (the rig and its helpers, imported as top-level modules
# the way pytest imports them: tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

from engine_support import MB
from test_pasid_dma_device import CTRL_AREA, CTRL_OFF, DATA, Rig, iova

from vioasid.formats import pasid_dma as pd
from vioasid.formats.pasid_dma import Opcode


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="1 MiB copies to time (default 20)")
    ap.add_argument("--guest", action="store_true", help="also a real QEMU 11.1 guest run")
    args = ap.parse_args()
    if args.guest:
        guest_figures()
    r = Rig("mdev")
    f = r.fns[0]
    p = 1
    r.setup(f, p)
    half = MB // 2
    r.mem.write(DATA, bytes(range(256)) * (MB // 256))

    # 1 MiB copies (within the 1 MiB window: two 512 KiB halves, so src/dst never overlap)
    def copy(n: int, src: int, dst: int) -> None:
        rec = r.job(f, p, opcode=Opcode.COPY, src=iova(p, src), dst=iova(p, dst), size=n)
        assert rec["status"] == 1, rec

    # a 1 MiB copy needs 2 MiB of mapped space: map a second megabyte
    r.map(p, 0x200000, DATA + MB, MB)
    t = time.process_time()
    for _ in range(args.rounds):
        copy(MB, 0, 0x200000)
    dt = time.process_time() - t
    mib_s = args.rounds / dt
    emit("pasid_copy_1m_mib_s", mib_s, "MiB/s", mode="in-process", rounds=args.rounds)
    t = time.process_time()
    for _ in range(args.rounds):
        f.tlb.clear()
        copy(MB, 0, 0x200000)
    emit("pasid_copy_1m_uncached_mib_s", args.rounds / (time.process_time() - t), "MiB/s")

    buf = bytearray(2 * MB)
    t = time.process_time()
    n = 200
    for _ in range(n):
        buf[MB:] = buf[:MB]
    mm = n / (time.process_time() - t)
    emit("memmove_1m_mib_s", mm, "MiB/s")
    emit("pasid_copy_vs_memmove_ratio", mib_s / mm, "ratio")

    # 4 KiB jobs: batches of 256 descriptors per doorbell
    nb = 256
    arr = b"".join(
        pd.DESCRIPTOR.build(pasid=p, opcode=Opcode.COPY, src=iova(p, (i % 128) * 4096),
                            dst=iova(p, half + (i % 128) * 4096), size=4096)
        for i in range(nb)
    )  # fmt: skip
    r.mem.write(CTRL_AREA + 0x4000, arr)
    batches = 8
    t = time.process_time()
    for _ in range(batches):
        rec = r.job(f, p, opcode=Opcode.BATCH, src=iova(p, CTRL_OFF + 0x4000), size=nb)
        assert rec["status"] == 1 and rec["bytes_done"] == nb, rec
    jobs = batches * nb / (time.process_time() - t)
    emit("pasid_jobs_4k_per_s", jobs, "jobs/s", mode="in-process", batch=nb)

    t = time.process_time()
    single = 500
    for i in range(single):
        copy(4096, (i % 128) * 4096, half + (i % 128) * 4096)
    emit("pasid_jobs_4k_single_per_s", single / (time.process_time() - t), "jobs/s")

    t = time.process_time()
    k = 2000
    for _ in range(k):
        f._refresh(p)
    emit("doorbell_refresh_us", (time.process_time() - t) / k * 1e6, "us")
    return 0


def guest_figures() -> None:
    """The guest-measured figures (images/guest/pasid_bench.sh through the driver on one
    dedicated function, real QEMU 11.1 guest under TCG), then what the device side served."""
    import asyncio

    from images.build import ensure_image
    from qemu_glue.pasid_guest import run_pasid_guest
    from qemu_glue.qemu.binary import choose

    img = ensure_image()
    run = asyncio.run(
        run_pasid_guest(
            img.kernel, img.initrd, qemu=choose(), types=("dedicated",), tests=("pasid-bench",)
        )
    )
    for b in run.bench:
        ops, secs = int(b.get("ops", "0")), float(b.get("seconds", "0"))
        name, value, unit = b.get("name", "?"), float(b.get("value", "nan")), b.get("unit", "")
        emit(name, value, unit, mode="qemu-guest", ops=ops, seconds=secs)
    done = run.bench_done or {}
    emit("pasid_guest_bench_ok", float(done.get("ok") == "1"), "bool", detail=done.get("detail"))
    fns = run.host.get("functions", [])
    busy = sum(f["busy_s"] for f in fns)
    if busy > 0:
        moved = sum(f["bytes_moved"] for f in fns)
        emit("pasid_guest_device_mib_s", moved / busy / MB, "MiB/s", mode="device-side")


if __name__ == "__main__":
    raise SystemExit(main())
