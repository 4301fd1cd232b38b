"""Live-migration figures as JSON lines (``{"name", "value", "unit", ...}``).

* ``vpasid_state_ms`` — the vPASID hand-over done cold at switch-over: the source daemon's
  export, the transfer, the destination daemon's import (re-allocating every pPASID under a
  tenant's occupancy), for 1, 1,000 and 100,000 bindings, through two ``vioasid serve``
  processes. ``vpasid_export_ms`` / ``vpasid_import_ms`` split it.
* ``vpasid_switchover_ms`` — what the hand-over adds to the downtime as ``vioasid migrate`` does
  it: the import was pre-copied while the VM ran, so at switch-over only the final export and
  its comparison with the pre-copied stream remain.
* ``downtime_ms`` — QEMU's downtime of whole real migrations (TCG guest running its disk tests,
  vioasid vhost-user-blk disk, 48 and 1,002 vPASIDs), plus ``observed_downtime_ms`` (source STOP →
  destination RESUME) and the vPASID switch-over of those runs. ``--no-qemu`` skips them.

* ``pasid_downtime_ms`` (``--pasid 1,100,1000``) — a real guest's own bindings on PASID DMA
  functions (QEMU 11.1 vfio-user; :mod:`qemu_glue.migration.pasid_demo`), A → B → A: the
  observed downtime (source STOP → the destination's ``cont`` returned), split into
  ``pasid_downtime_vioasid_ms`` (vioasid's work while the VM is stopped: final export and
  compare at pre-switchover, then the DMA-written pages and config before ``cont``) and
  ``pasid_downtime_qemu_ms`` (the rest: QEMU's final RAM and device state, its load, ``cont``).

Usage: ``python3 bench/migrate.py [--sizes 1,1000,100000] [--repeat 5] [--vpasids 16,334]
[--no-qemu] [--no-state] [--pasid 1,100,1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qemu_glue.migration.demo import FUNCTIONS, DemoOptions, run_migration_demo  # noqa: E402
from qemu_glue.migration.rig import Daemon, host_toml, workdir  # noqa: E402
from qemu_glue.migration.vpasid_reserve import VirtualDevice, VpasidTables, register  # noqa: E402
from vioasid.client import Client, MemoryRegion  # noqa: E402
from vioasid.daemon.hostconfig import host_from_doc  # noqa: E402
from vioasid.model.faults import parse_bdf  # noqa: E402
from vioasid.model.memory import GuestMemory  # noqa: E402
from vioasid.model.migration import export_vm, import_vm  # noqa: E402

RAM = 64 << 20
BASE, SIZE = 8 << 20, 48 << 20
TENANT = 5


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


class MemfdRam:
    def __init__(self) -> None:
        self.fd = os.memfd_create("vioasid-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, RAM)
        self.mem = GuestMemory()
        self.mem.add_fd(self.fd, 0, RAM, 0)

    def region(self) -> MemoryRegion:
        return MemoryRegion(self.fd, 0, RAM)


async def _source_vm(client: Client, n: int) -> tuple[int, MemfdRam]:
    """A VM with ``n`` bindings on one mdev of a plain function (set up by import when large:
    one PASID_ENTRY request per binding is slow to set up, not what is measured)."""
    ram = MemfdRam()
    tables = VpasidTables(ram.mem, BASE, SIZE)
    tables.add(VirtualDevice(parse_bdf("00:10.0"), 0x3A00, "mdev", tuple(range(1, n + 1))))
    if n <= 2000:
        return await register(client, "vm", [ram.region()], tables), ram
    host = host_from_doc({"host": [{"name": "local", "function": [{"rid": "3a:00.0"}]}]})
    host.add_vm("vm", ram.mem, rtaddr=tables.rtaddr)
    host.attach_device("vm", 0x80, 0x3A00, "mdev")
    for x in range(1, n + 1):
        host.bind("vm", 0x80, x)
    stream = export_vm(host, "vm")
    res = await client.import_vm("vm", stream, [ram.region()])
    return res.vm, ram


def _engine_import_ms(mem: GuestMemory, n: int) -> float:
    """The engine's import alone (in-process, no daemon, no wire): the cold path's floor."""
    doc = {"host": [{"name": "e", "function": [{"rid": "3a:00.0"}]}]}
    src, dst = host_from_doc(doc), host_from_doc(doc)
    stream = _engine_stream(src, mem, n)
    t0 = time.perf_counter()
    import_vm(dst, stream, mem, {0x80: 0x3A00})
    return (time.perf_counter() - t0) * 1e3


def _engine_stream(host: Any, mem: GuestMemory, n: int) -> bytes:
    tables = VpasidTables(mem, BASE, SIZE)
    tables.add(VirtualDevice(parse_bdf("00:10.0"), 0x3A00, "mdev", tuple(range(1, n + 1))))
    host.add_vm("vm", mem, rtaddr=tables.rtaddr)
    host.attach_device("vm", 0x80, 0x3A00, "mdev")
    for x in range(1, n + 1):
        host.bind("vm", 0x80, x)
    stream: bytes = export_vm(host, "vm")
    return stream


async def _tenant(client: Client) -> None:
    ram = MemfdRam()
    tables = VpasidTables(ram.mem, BASE, SIZE)
    tables.add(VirtualDevice(parse_bdf("00:05.0"), 0x3A00, "mdev", tuple(range(1, TENANT + 1))))
    await register(client, "tenant", [ram.region()], tables)


async def bench_state(sizes: list[int], repeat: int) -> None:
    async with workdir() as wd:
        daemons = [Daemon(n, wd, host_toml(n, FUNCTIONS)) for n in ("bench-a", "bench-b")]
        for d in daemons:
            await d.start()
        try:
            a, b = [await d.connect() for d in daemons]
            tenant = await daemons[1].connect()
            await _tenant(tenant)
            for n in sizes:
                vm, ram = await _source_vm(a, n)
                reps = repeat if n <= 2000 else 1
                cold, exp, imp, sw = [], [], [], []
                size = 0
                for _ in range(reps):
                    t0 = time.perf_counter()
                    stream = await a.export_vm(vm)
                    t1 = time.perf_counter()
                    res = await b.import_vm("vm", stream, [ram.region()])
                    t2 = time.perf_counter()
                    cold.append((t2 - t0) * 1e3)
                    exp.append((t1 - t0) * 1e3)
                    imp.append((t2 - t1) * 1e3)
                    size = len(stream)
                    # the switch-over after a pre-copy: final export + compare
                    t3 = time.perf_counter()
                    final = await a.export_vm(vm)
                    same = final == stream
                    sw.append((time.perf_counter() - t3) * 1e3)
                    assert same and len(res.bindings) == n
                    moved = sum(1 for x in res.bindings if x.ppasid != x.vpasid)
                    await b.unregister_vm(res.vm)
                common = {"bindings": n, "stream_bytes": size, "repeat": reps}
                emit("vpasid_state_ms", statistics.median(cold), "ms", **common)
                emit("vpasid_export_ms", statistics.median(exp), "ms", **common)
                emit("vpasid_import_ms", statistics.median(imp), "ms", **common)
                emit("vpasid_switchover_ms", statistics.median(sw), "ms", **common)
                emit("ppasids_reallocated", moved, "bindings", bindings=n)
                emit("vpasid_engine_import_ms", _engine_import_ms(ram.mem, n), "ms", bindings=n)
                await a.unregister_vm(vm)
                ram.mem.close()
                os.close(ram.fd)
            for c in (a, b, tenant):
                await c.close()
        finally:
            for d in daemons:
                await d.close()


async def bench_downtime(count: int, vpasids: int) -> None:
    res = await run_migration_demo(DemoOptions(count=count, vpasids=vpasids))
    for i, att in enumerate(res.migrations, 1):
        r = att.result
        common = {
            "migration": i,
            "from": att.source,
            "to": att.destination,
            "ok": r.ok,
            "bindings": res.bindings,
        }
        if r.downtime_ms is not None:
            emit("downtime_ms", float(r.downtime_ms), "ms", **common)
        if r.observed_downtime_ms is not None:
            emit("observed_downtime_ms", r.observed_downtime_ms, "ms", **common)
        if r.vpasid_switchover_ms is not None:
            emit(
                "migration_vpasid_switchover_ms",
                r.vpasid_switchover_ms,
                "ms",
                precopied=r.precopied,
                **common,
            )
        if r.total_ms is not None:
            emit("migration_total_ms", float(r.total_ms), "ms", **common)
    emit("guest_tests_passed", res.report.passed, "tests", failed=res.report.failed, ok=res.ok)
    if not res.ok or not all(a.result.precopied for a in res.migrations):
        doc = res.to_json()
        doc["console_tail"] = res.console_tail
        print(json.dumps(doc), file=sys.stderr)


async def bench_pasid(bindings: int, count: int) -> None:
    """A real guest's own bindings on PASID DMA functions (QEMU 11.1), A -> B -> A ...:
    the downtime split between QEMU and vioasid."""
    from qemu_glue.migration.pasid_demo import (
        GUEST_FUNCTIONS,
        PasidDemoOptions,
        run_pasid_migration,
    )
    from vioasid.formats.pasid_dma import FunctionType

    types = (FunctionType.MDEV,) if bindings < 4 else tuple(t for t, _ in GUEST_FUNCTIONS)
    extra = max(0, bindings - len(types))
    res = await run_pasid_migration(
        PasidDemoOptions(count=count, types=types, extra_bindings=extra, boot_timeout=900.0)
    )
    for i, att in enumerate(res.migrations, 1):
        r = att.result
        common = {"migration": i, "from": att.source, "to": att.destination, "ok": r.ok,
                  "bindings": len(r.bindings), "precopied": r.precopied}  # fmt: skip
        if not r.ok or r.observed_downtime_ms is None or r.vioasid_downtime_ms is None:
            continue
        vioasid = r.vioasid_downtime_ms
        emit("pasid_downtime_ms", r.observed_downtime_ms, "ms", **common,
             qemu_reported_ms=r.downtime_ms, cont_ms=round(r.cont_ms or 0.0, 3))  # fmt: skip
        emit("pasid_downtime_vioasid_ms", vioasid, "ms", **common,
             switchover_ms=round(r.vioasid_switchover_ms or 0.0, 3),
             resume_ms=round(r.vioasid_resume_ms or 0.0, 3), dma_pages=r.dma_pages)  # fmt: skip
        emit("pasid_downtime_qemu_ms", r.observed_downtime_ms - vioasid, "ms", **common)
    emit("pasid_guest_jobs", res.loop.ok, "jobs", failed=res.loop.failed, ok=res.ok,
         bindings=bindings)  # fmt: skip
    if not res.ok:
        doc = res.to_json()
        doc["console_tail"] = res.console_tail
        print(json.dumps(doc), file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,1000,100000")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--count", type=int, default=2, help="real migrations for downtime_ms")
    p.add_argument(
        "--vpasids",
        default="16,334",
        help="vPASIDs per virtual device (3 devices) for the real migrations (48 and 1,002)",
    )
    p.add_argument("--no-qemu", action="store_true")
    p.add_argument("--no-state", action="store_true", help="skip the daemon-only figures")
    p.add_argument(
        "--pasid",
        default="",
        metavar="N,N",
        help="the PASID DMA function case (QEMU 11.1): a real guest with N bindings of its own "
        "(e.g. 1,100,1000), --count migrations each; only this case when given",
    )
    args = p.parse_args()
    if args.pasid:
        for n in (int(x) for x in args.pasid.split(",") if x):
            asyncio.run(bench_pasid(n, args.count))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not args.no_state:
        asyncio.run(bench_state(sizes, args.repeat))
    if not args.no_qemu:
        for v in (int(x) for x in args.vpasids.split(",") if x):
            asyncio.run(bench_downtime(args.count, v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
