"""The migration demo: a guest runs its disk tests continuously while it moves between two hosts.

:func:`run_migration_demo` (behind ``vioasid demo --migrate [--count N]`` and the guest tests):

1. Two daemons (``host-a``, ``host-b``: same functions, different tenants already bound, so
   pPASIDs must change on every hop), a shared backing file, the test guest booted on host A in
   loop mode (``vioasid.loop=1``) with ``memmap=`` reserving the vPASID table range.
2. Once the guest runs, the guest-driver model writes the vPASID tables of three virtual
   devices (mdev on a plain function, vfio-pci on an enqcmd + translating one, mdev on an enqcmd
   one) into the reserved range and binds them on host A's daemon.
3. ``count`` migrations A → B → A ..., each to a fresh destination QEMU with its own RAM, serial
   and vhost-user-blk back-end, through :func:`qemu_glue.migration.live.migrate`. ``failures``
   (tests) first runs refused attempts: ``corrupt`` (a byte of the state stream flipped on the
   way) and ``conflict`` (the destination cannot re-create a binding). After each refused
   attempt the source must still run with its state intact and the destination hold nothing.
4. After every migration: vPASIDs identical, DMA through every device resolves to the same
   guest page under the new pPASIDs; the guest keeps passing its checks. At the end the host
   stops the loop, the guest powers off and the backing file must hold the last generation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from images.guest import patterns
from images.guest.markers import DONE, INIT, STOPPED, TEST, GuestReport
from qemu_glue.migration.attempts import (
    AttemptBase,
    DemoOptionsBase,
    DemoResultBase,
    Progress,
    ensure_kernel,
)
from qemu_glue.migration.live import MigrationResult, Reserve, VpasidHandover, migrate
from qemu_glue.migration.rig import BlkVm, Daemon, SerialChain, VmOptions, host_toml, workdir
from qemu_glue.migration.vpasid_reserve import (
    DATA_IOVA,
    DEFAULT_BASE,
    DEFAULT_SIZE,
    VirtualDevice,
    VpasidTables,
    memmap_param,
    ppasid_table,
    register,
)
from qemu_glue.qemu.vmspec import IommuSpec, kernel_cmdline
from vioasid.client import Client
from vioasid.model.faults import bdf_str, parse_bdf
from vioasid.model.memory import GuestMemory

log = logging.getLogger(__name__)

VM_NAME = "guest"
HOSTS = ("host-a", "host-b")
PLAIN, TRANSLATING, ENQCMD, ENQCMD_TRANSLATING = 0x3A00, 0x3B00, 0x5E00, 0x5F00
FUNCTIONS = ((PLAIN, False, False), (TRANSLATING, False, True), (ENQCMD, True, False),
             (ENQCMD_TRANSLATING, True, True))  # fmt: skip
TENANT_BINDINGS = {"host-a": 2, "host-b": 8}  # other VMs' vPASIDs already bound on each host
FAILURE_MODES = ("corrupt", "conflict")


def guest_devices(vpasids: int) -> list[VirtualDevice]:
    xs = tuple(range(1, vpasids + 1))
    return [
        VirtualDevice(parse_bdf("00:10.0"), PLAIN, "mdev", xs),
        VirtualDevice(parse_bdf("00:11.0"), ENQCMD_TRANSLATING, "vfio-pci", xs),
        VirtualDevice(parse_bdf("00:12.0"), ENQCMD, "mdev", xs),
    ]


@dataclass
class DemoOptions(DemoOptionsBase):
    vpasids: int = 16  # per virtual device


@dataclass
class Attempt(AttemptBase[MigrationResult]):
    """One migration attempt as the demo saw it."""

    dma_ok: int = 0
    dirty_pages_marked: int = 0  # by the source's vhost-user-blk back-end while logging
    dirty_logs_mapped: int = 0  # SET_LOG_BASE the source's back-end received
    dirty_log_enables: int = 0  # times QEMU turned its logging on


@dataclass
class DemoResult(DemoResultBase[Attempt]):
    report: GuestReport = field(default_factory=GuestReport)
    tests_after_migration: int = 0
    disk_ok: bool = False
    disk_mismatches: list[str] = field(default_factory=list)
    bindings: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.attempts_ok
            and self.report.failed == 0
            and self.report.passed > 0
            and not self.report.errors
            and self.tests_after_migration > 0
            and self.disk_ok
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            **self.attempts_json(),
            "guest_tests": {
                "passed": self.report.passed,
                "failed": self.report.failed,
                "after_migration": self.tests_after_migration,
                "generations": len(self.report.done),
            },
            "guest_errors": self.report.errors,
            "disk_matches": self.disk_ok,
            "disk_mismatches": self.disk_mismatches,
            "bindings": self.bindings,
            "problems": self.problems,
            "wall_seconds": round(self.wall_seconds, 3),
        }


def _flip_byte(stream: bytes) -> bytes:
    """A stream with one byte of its body changed (the CRC must catch it)."""
    b = bytearray(stream)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


async def _tenant(daemon: Daemon, bindings: int) -> Client:
    """Another VM on the host holding ``bindings`` vPASIDs on the shared functions."""
    import os

    client = await daemon.connect()
    size = 8 << 20
    fd = os.memfd_create("vioasid-tenant", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.add_fd(fd, 0, size, 0, name="tenant")
    tables = VpasidTables(mem, 1 << 20, 6 << 20)
    xs = tuple(range(1, bindings + 1))
    tables.add(VirtualDevice(parse_bdf("00:05.0"), PLAIN, "mdev", xs))
    tables.add(VirtualDevice(parse_bdf("00:06.0"), ENQCMD, "mdev", xs))
    from vioasid.client import MemoryRegion

    await register(client, f"tenant-{daemon.name}", [MemoryRegion(fd, 0, size)], tables)
    os.close(fd)
    mem.close()
    return client


async def _state(client: Client) -> dict[str, Any]:
    """What a refused migration must leave unchanged on a daemon."""
    d = await client.dump()
    return {"vms": d.get("vms"), "allocators": d.get("allocators"), "global": d.get("global")}


async def _check_dma(client: Client, vm: int, tables: VpasidTables, att: Attempt) -> None:
    """Every binding resolves DATA_IOVA to the same guest page as on the source."""
    from vioasid.client import DmaRequest

    after = att.result.ppasids_after
    for dev in tables.devices:
        reqs = [DmaRequest(dev.rid, x, DATA_IOVA + 0x10) for x in dev.vpasids]
        for i in range(0, len(reqs), 1024):
            for req, r in zip(reqs[i : i + 1024], await client.dma(vm, reqs[i : i + 1024]),
                              strict=True):  # fmt: skip
                want_tag = after.get(bdf_str(dev.rid), {}).get(req.pasid)
                if r.ok and r.gpa == tables.data + 0x10 and r.tag == want_tag:
                    att.dma_ok += 1
                else:
                    att.checks.append(
                        f"DMA {bdf_str(dev.rid)} vPASID {req.pasid}: {r.to_json()} "
                        f"(want gpa {tables.data + 0x10:#x}, tag {want_tag})"
                    )
                    return


async def run_migration_demo(opts: DemoOptions, progress: Progress = lambda _m: None) -> DemoResult:
    """Run the demo (see the module docstring); never raises for a guest or migration
    failure — those end up in the result."""
    t0 = time.monotonic()
    out = DemoResult()
    await ensure_kernel(opts, progress)
    async with workdir() as wd, contextlib.AsyncExitStack() as stack:
        disk = patterns.make_disk(wd / "disk.raw")
        daemons = [Daemon(n, wd, host_toml(n, FUNCTIONS)) for n in HOSTS]
        for daemon in daemons:
            await daemon.start()
            stack.push_async_callback(daemon.close)
        clients = [await daemon.connect() for daemon in daemons]
        for c in clients:
            stack.push_async_callback(c.close)
        for daemon in daemons:
            tc = await _tenant(daemon, TENANT_BINDINGS[daemon.name])
            stack.push_async_callback(tc.close)
        vmopts = VmOptions(
            kernel=opts.kernel,
            initrd=opts.initrd,
            append=kernel_cmdline(opts.iommu, strict=True, loop=True, extra=memmap_param()),
            disk=disk,
            iommu=IommuSpec(mode=opts.iommu),
            accel=opts.accel,
            memory_mib=opts.memory_mib,
            qemu=opts.qemu,
        )
        chain = SerialChain()
        serial = 0
        cur = BlkVm(vmopts, f"q{serial}", wd)
        vms: list[BlkVm] = [cur]

        async def close_all() -> None:
            for v in vms:
                await v.close()

        stack.push_async_callback(close_all)
        progress(f"booting the guest on {HOSTS[0]} ({opts.iommu}, {opts.accel}, loop mode)")
        await cur.start()
        chain.add(cur.serial_path)
        try:
            await chain.wait(INIT, opts.boot_timeout)
            tables = VpasidTables(cur.ram(), DEFAULT_BASE, DEFAULT_SIZE)
            for dev in guest_devices(opts.vpasids):
                tables.add(dev)
            vm_id = await register(clients[0], VM_NAME, [cur.ram_region()], tables)
            out.bindings = sum(len(d.vpasids) for d in tables.devices)
            progress(
                f"{out.bindings} vPASIDs bound on {HOSTS[0]} for {len(tables.devices)} virtual "
                f"devices (tables at {DEFAULT_BASE:#x} in guest RAM, reserved by memmap=)"
            )
            await chain.wait(TEST, opts.timeout)
            plan: list[str | None] = [*opts.failures, *([None] * opts.count)]
            hop = 0
            for forced in plan:
                s, d = hop % 2, (hop + 1) % 2
                serial += 1
                dst = BlkVm(vmopts, f"q{serial}", wd)
                vms.append(dst)
                await dst.start(incoming=True)
                before_src = await _state(clients[s])
                before_dst = await _state(clients[d])
                handover = VpasidHandover(
                    src=clients[s],
                    src_vm=vm_id,
                    name=VM_NAME,
                    dst=clients[d],
                    dst_regions=[dst.ram_region()],
                    reserve=Reserve(cur.ram(), dst.ram(), DEFAULT_BASE, DEFAULT_SIZE),
                    tamper=_flip_byte if forced == "corrupt" else None,
                    functions=(
                        {dev.rid: (PLAIN if dev.function == ENQCMD_TRANSLATING else dev.function)
                         for dev in tables.devices} if forced == "conflict" else None
                    ),
                )  # fmt: skip
                what = f"refused attempt ({forced})" if forced else "migration"
                progress(f"{what} {HOSTS[s]} -> {HOSTS[d]}")
                res = await migrate(
                    cur.qmp, dst.qmp, f"unix:{wd}/migrate-{serial}.sock", vpasid=handover
                )
                att = Attempt(HOSTS[s], HOSTS[d], res, forced)
                out.attempts.append(att)
                if forced is not None:
                    att.refusal_checks()
                    if await _state(clients[s]) != before_src:
                        att.checks.append("source daemon state changed")
                    if await _state(clients[d]) != before_dst:
                        att.checks.append("destination daemon kept state")
                    if dst.qemu is not None:
                        try:
                            await dst.qemu.wait(15.0)
                        except Exception:
                            att.checks.append("destination QEMU still running")
                    await dst.close()
                    vms.remove(dst)
                    progress(f"  refused: {res.error}; source {res.source_status}")
                    await chain.wait(TEST, opts.timeout)  # the guest goes on on the source
                    continue
                if not res.ok:
                    progress(f"  FAILED: {res.error}")
                    break
                if not res.vpasids_identical:
                    att.checks.append("vPASIDs differ between source and destination")
                if res.reserve_intact is False:
                    att.checks.append("reserved range differs on the destination")
                chain.add(dst.serial_path)
                await cur.close()
                att.dirty_pages_marked = cur.dirty_pages_marked
                att.dirty_logs_mapped, att.dirty_log_enables = cur.dirty_logging
                if not (att.dirty_logs_mapped and att.dirty_log_enables):
                    att.checks.append("QEMU did not use the back-end's dirty log")
                vms.remove(cur)
                cur = dst
                assert res.dst_vm is not None
                vm_id = res.dst_vm
                after = ppasid_table(await clients[d].dump(vm_id), VM_NAME)
                if after != res.ppasids_after:
                    att.checks.append("destination dump differs from the import result")
                await _check_dma(clients[d], vm_id, tables, att)
                progress(
                    f"  downtime {res.downtime_ms} ms (QEMU), vPASID hand-over "
                    f"{res.vpasid_switchover_ms:.2f} ms at switch-over, {res.vpasids_carried} "
                    f"vPASIDs carried, {res.ppasids_changed} pPASIDs re-allocated"
                )
                hop += 1
                await chain.wait(TEST, opts.timeout)  # the guest goes on on the destination
            # one whole generation after the last migration, then stop the loop
            gen_now = max((r.gen for r in chain.report.results), default=0)
            await chain.wait(DONE, opts.timeout, lambda mk: mk.int("gen") > gen_now)
            progress("guest finished a whole test pass after the last migration; stopping it")
            patterns.request_stop(disk)
            await chain.wait(STOPPED, opts.timeout)
            if cur.qemu is not None:
                with contextlib.suppress(Exception):
                    await cur.qemu.wait(30.0)
            chain.poll()
        except (TimeoutError, Exception) as exc:  # reported, not raised
            log.exception("migration demo failed")
            out.problems.append(f"{type(exc).__name__}: {exc}")
        out.report = chain.report
        if out.migrations and len(chain.files) > 1:
            out.tests_after_migration = chain.passed_per_file[-1]
        out.console_tail = chain.tail(30)
        if chain.report.done:
            gen = chain.report.last_gen or 0
            bad = patterns.check_disk(disk, gen=gen)
            out.disk_ok = not bad
            out.disk_mismatches = [f"{m.test}@0x{m.first_bad:x}" for m in bad]
    out.wall_seconds = time.monotonic() - t0
    return out


__all__ = ["FAILURE_MODES", "DemoOptions", "DemoResult", "run_migration_demo"]
