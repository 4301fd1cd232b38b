"""A real guest's own vPASIDs on PASID DMA functions, live-migrated A → B → A while jobs run.

:func:`run_pasid_migration` (behind ``vioasid demo --migrate`` on QEMU 11.1 and the guest test
``guest_tests/test_migrate_pasid.py``):

1. Two hosts, each one engine (:class:`~vioasid.model.engine.Host`) with the same functions
   (dedicated ``3a:00.0``, translating ``3b:00.0``, mdev slices of ``3c:00.0``, enqcmd +
   translating ``5f:00.0``) and other VMs ("tenants") already bound on them: 2 vPASIDs on A,
   8 on B, on mdev slices of ``3c:00.0`` and of an enqcmd function ``5e:00.0``, so the pPASIDs
   of the guest's mdev and enqcmd functions must change on every hop (dedicated and translating
   functions keep pPASID == vPASID, as the policy says).
2. The test guest boots on A (``vioasid.tests=pasid-loop``, images/guest/pasid_loop.sh): its
   driver binds one PASID per function and runs random-data copy jobs on all of them in a loop,
   checking each.
3. ``count`` migrations A → B → A ..., each to a fresh destination (a new rig on that host's
   engine, a QEMU started ``-S -incoming defer``) through
   :func:`qemu_glue.migration.pasid.migrate_pasid`; ``failures`` (tests) first runs refused
   attempts. After each: vPASIDs identical, pPASIDs as the destination's engine gave them, the
   guest's jobs going on on the destination.
4. The host writes the disk's stop sector; the guest finishes its round, unbinds, powers off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from images.guest import patterns
from images.guest.markers import parse_prefixed
from qemu_glue.migration.attempts import (
    AttemptBase,
    DemoOptionsBase,
    DemoResultBase,
    Progress,
    ensure_kernel,
)
from qemu_glue.migration.pasid import PasidMigrationResult, migrate_pasid
from qemu_glue.migration.rig import BlkVm, VmOptions, workdir
from qemu_glue.migration.vpasid_reserve import VirtualDevice, VpasidTables
from qemu_glue.pasid_dma import VM_NAME, DmaDeviceArg, PasidDmaRig
from qemu_glue.pasid_guest import pasid_iommu
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.vmspec import kernel_cmdline
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.formats.pasid_dma import FunctionType
from vioasid.model.engine import Host
from vioasid.model.faults import parse_bdf
from vioasid.model.memory import GuestMemory

log = logging.getLogger(__name__)

HOSTS = ("host-a", "host-b")
DEDICATED, TRANSLATING, MDEV, ENQCMD_MDEV, ENQCMD = 0x3A00, 0x3B00, 0x3C00, 0x5E00, 0x5F00
GUEST_FUNCTIONS: tuple[tuple[FunctionType, int], ...] = (
    (FunctionType.DEDICATED, DEDICATED),
    (FunctionType.TRANSLATING, TRANSLATING),
    (FunctionType.MDEV, MDEV),
    (FunctionType.ENQCMD, ENQCMD),
)
TENANT_BINDINGS = {"host-a": 2, "host-b": 8}
FAILURE_MODES = ("exhausted", "conflict", "dst-dies", "dst-dies-late", "import-aborted")
PREFIX = "VIOASID-PASID-"


def make_host(name: str, *, allocation: str = "per-device") -> Host:
    """One side's engine: the guest's functions plus an enqcmd function for tenants."""
    h = Host(name, allocation=allocation)  # type: ignore[arg-type]
    h.add_function(DEDICATED)
    h.add_function(TRANSLATING, translating=True)
    h.add_function(MDEV)
    h.add_function(ENQCMD_MDEV, enqcmd=True)
    h.add_function(ENQCMD, enqcmd=True, translating=True)
    h.guest_second_stage = True
    return h


def add_tenant(host: Host, bindings: int, *, name: str | None = None) -> GuestMemory:
    """Another VM holding ``bindings`` vPASIDs on mdev slices of 3c:00.0 and 5e:00.0."""
    size = 8 << 20
    mem = _memfd(size)
    tables = VpasidTables(mem, 1 << 20, 6 << 20)
    xs = tuple(range(1, bindings + 1))
    tables.add(VirtualDevice(parse_bdf("00:05.0"), MDEV, "mdev", xs))
    tables.add(VirtualDevice(parse_bdf("00:06.0"), ENQCMD_MDEV, "mdev", xs))
    vm = name or f"tenant-{host.name}"
    host.add_vm(vm, mem, rtaddr=tables.rtaddr)
    for dev in tables.devices:
        host.attach_device(vm, dev.rid, dev.function, "mdev")
        host.bind_many(vm, dev.rid, dev.vpasids)
    return mem


def _memfd(size: int) -> GuestMemory:
    import os

    fd = os.memfd_create("vioasid-tenant", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.add_fd(fd, 0, size, 0, name="tenant")
    os.close(fd)
    return mem


def exhaust(host: Host) -> list[int]:
    """Take every free pPASID of the host-wide space (a destination with nothing left for the
    guest's enqcmd function); the values taken (give them back with ``global_alloc.free``)."""
    taken: list[int] = []
    alloc = host.global_alloc.alloc
    while (v := alloc()) is not None:
        taken.append(v)
    return taken


@dataclass
class PasidDemoOptions(DemoOptionsBase):
    count: int = 2
    memory_mib: int = 512
    types: tuple[FunctionType, ...] = tuple(t for t, _ in GUEST_FUNCTIONS)  # the functions
    extra_bindings: int = 0  # more PASIDs the guest binds (no jobs), for bigger migrations
    precopy: bool = True


@dataclass
class PasidAttempt(AttemptBase[PasidMigrationResult]):
    rounds_before: int = 0  # guest rounds done on the source when it stopped
    dst_bindings_after_refusal: int | None = None


@dataclass
class LoopReport:
    """What the guest's pasid_loop.sh printed."""

    binds: list[tuple[str, int]] = field(default_factory=list)
    ready: str | None = None
    rounds: int = 0
    ok: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    done: dict[str, str] | None = None

    def feed(self, text: str) -> None:
        got = parse_prefixed(text, PREFIX)
        if got is None:
            return
        kind, f = got
        if kind == "BIND":
            self.binds.append((f.get("dev", ""), int(f.get("pasid", "0") or 0)))
        elif kind == "LOOP-READY":
            self.ready = f.get("pasids", "")
        elif kind == "ROUND":
            self.rounds = int(f.get("n", "0"))
            self.ok, self.failed = int(f.get("ok", "0")), int(f.get("failed", "0"))
        elif kind == "JOB" and f.get("result") == "fail":
            self.failures.append(f)
        elif kind == "LOOP-DONE":
            self.done = f
            self.rounds = int(f.get("rounds", "0"))
            self.ok, self.failed = int(f.get("ok", "0")), int(f.get("failed", "0"))


@dataclass
class PasidDemoResult(DemoResultBase[PasidAttempt]):
    loop: LoopReport = field(default_factory=LoopReport)
    rounds_after_last: int = 0
    device_jobs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    leftover_bindings: dict[str, int] = field(default_factory=dict)  # guest's, per host, at end

    @property
    def ok(self) -> bool:
        return (
            self.attempts_ok
            and bool(self.migrations)
            and self.loop.done is not None
            and self.loop.failed == 0
            and not self.loop.failures
            and self.loop.ok > 0
            and self.rounds_after_last > 0
            and not any(self.leftover_bindings.values())
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            **self.attempts_json(),
            "pasid": {
                "jobs": {"ok": self.loop.ok, "failed": self.loop.failed},
                "device_jobs": self.device_jobs,
                "rounds": self.loop.rounds,
                "rounds_after_last_migration": self.rounds_after_last,
                "guest_bindings": [{"device": d, "vpasid": p} for d, p in self.loop.binds],
                "job_failures": self.loop.failures,
            },
            "leftover_bindings": self.leftover_bindings,
            "problems": self.problems,
            "wall_seconds": round(self.wall_seconds, 3),
        }


class _Console:
    """The guest console across hosts (serial files in order) fed to a LoopReport."""

    def __init__(self, loop: LoopReport) -> None:
        self.loop = loop
        self.files: list[Path] = []
        self.pos = 0
        self.buf = b""
        self.lines: list[str] = []

    def add(self, p: Path) -> None:
        self.poll()
        self.files.append(p)
        self.pos = 0

    def poll(self) -> None:
        if not self.files:
            return
        try:
            with open(self.files[-1], "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        self.buf += data
        *complete, self.buf = self.buf.split(b"\n")
        for raw in complete:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append(text)
            self.loop.feed(text)

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if cond():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not seen on the guest console within {timeout:.0f} s")
            await asyncio.sleep(0.1)


def guest_args(types: tuple[FunctionType, ...]) -> list[DmaDeviceArg]:
    return [DmaDeviceArg(t, rid) for t, rid in GUEST_FUNCTIONS if t in types]


async def run_pasid_migration(
    opts: PasidDemoOptions,
    progress: Progress = lambda _m: None,
    *,
    hosts: tuple[Host, Host] | None = None,
    on_attempt: Callable[[PasidAttempt, Host, Host], Awaitable[None]] | None = None,
) -> PasidDemoResult:
    """Run it (module docstring); never raises for a guest or migration failure."""
    t_start = time.monotonic()
    out = PasidDemoResult()
    await ensure_kernel(opts, progress)
    sides = hosts or (make_host(HOSTS[0]), make_host(HOSTS[1]))
    tenants = [add_tenant(h, TENANT_BINDINGS.get(h.name, 2)) for h in sides]
    names = [h.name for h in sides]
    console = _Console(out.loop)
    async with workdir() as wd, contextlib.AsyncExitStack() as stack:
        disk = patterns.make_disk(wd / "disk.raw", 16 << 20)
        vmopts = VmOptions(
            kernel=opts.kernel,
            initrd=opts.initrd,
            append=kernel_cmdline(
                opts.iommu,
                strict=True,
                tests=["pasid-loop"],
                extra=f"vioasid.pasid_extra={opts.extra_bindings}" if opts.extra_bindings else "",
            ),
            disk=disk,
            iommu=pasid_iommu(opts.iommu),
            accel=opts.accel,
            memory_mib=opts.memory_mib,
            qemu=opts.qemu,
        )
        live: list[tuple[PasidDmaRig, BlkVm]] = []

        async def close_all() -> None:
            for rig, vm in reversed(live):
                await vm.close()
                await rig.close()

        stack.push_async_callback(close_all)
        serial = 0

        async def side(i: int, *, incoming: bool) -> tuple[PasidDmaRig, BlkVm]:
            nonlocal serial
            serial += 1
            rig = PasidDmaRig(guest_args(opts.types), memory_mib=opts.memory_mib, engine=sides[i])
            await rig.start()
            vm = BlkVm(vmopts, f"q{serial}", wd, devices=rig.devices(), ram_path=rig.ram_path)
            live.append((rig, vm))
            await vm.start(incoming=incoming, paused=incoming)
            return rig, vm

        try:
            progress(f"booting the guest on {names[0]} ({opts.iommu}, {opts.accel})")
            cur_rig, cur = await side(0, incoming=False)
            cur_rig.set_registers(VtdRegisterReader(cur.qmp))
            console.add(cur.serial_path)
            await console.until(lambda: out.loop.ready is not None, opts.boot_timeout, "READY")
            await console.until(lambda: out.loop.rounds >= 2, opts.timeout, "two rounds")
            progress(f"guest bound {out.loop.ready}; jobs running")
            plan: list[str | None] = [*opts.failures, *([None] * opts.count)]
            hop = 0
            for forced in plan:
                s, d = hop % 2, (hop + 1) % 2
                dst_rig, dst = await side(d, incoming=True)
                before_src = _engine_state(sides[s])
                before_dst = _engine_state(sides[d])
                hook = _failure_hook(forced, sides[d], dst)
                progress(f"{'refused attempt (' + forced + ')' if forced else 'migration'} "
                         f"{names[s]} -> {names[d]}")  # fmt: skip
                rounds = out.loop.rounds
                res = await migrate_pasid(
                    cur.qmp, dst.qmp, cur_rig, dst_rig, f"unix:{wd}/mig-{serial}.sock",
                    vfio_user=_has_vfio_user(opts.qemu), timeout=opts.timeout, hook=hook,
                    precopy=opts.precopy,
                )  # fmt: skip
                att = PasidAttempt(names[s], names[d], res, forced, rounds_before=rounds)
                out.attempts.append(att)
                if on_attempt is not None:
                    await on_attempt(att, sides[s], sides[d])
                if forced is not None:
                    _undo_failure(forced, sides[d])
                    att.refusal_checks()
                    if _engine_state(sides[s]) != before_src:
                        att.checks.append("source engine state changed")
                    left = _guest_bindings(sides[d], exclude=None)
                    att.dst_bindings_after_refusal = left
                    await dst.close()
                    await dst_rig.close()
                    live.remove((dst_rig, dst))
                    if _engine_state(sides[d]) != before_dst:
                        att.checks.append("destination engine kept state")
                    progress(f"  refused: {res.error}")
                    await console.until(_more_rounds(out.loop, 2), opts.timeout,
                                        "rounds on the source after a refusal")  # fmt: skip
                    continue
                if not res.ok:
                    progress(f"  FAILED: {res.error}")
                    out.problems.append(f"migration {names[s]} -> {names[d]}: {res.error}")
                    break
                if not res.vpasids_identical:
                    att.checks.append("vPASIDs differ between source and destination")
                att.checks += _policy_checks(res, sides[d])
                console.add(dst.serial_path)
                await cur.close()
                await cur_rig.close()
                live.remove((cur_rig, cur))
                _add_jobs(out, cur_rig)
                cur_rig, cur = dst_rig, dst
                progress(
                    f"  downtime {res.downtime_ms} ms (QEMU), vioasid "
                    f"{res.vioasid_downtime_ms or 0:.2f} ms, "
                    + ", ".join(f"{b.type}:{b.vpasid}:{b.ppasid_before}->{b.ppasid_after}"
                                for b in res.bindings)
                )  # fmt: skip
                hop += 1
                await console.until(_more_rounds(out.loop, 2), opts.timeout,
                                    "rounds on the destination")  # fmt: skip
            last = out.loop.rounds
            patterns.request_stop(disk)
            await console.until(lambda: out.loop.done is not None, opts.timeout, "LOOP-DONE")
            out.rounds_after_last = out.loop.rounds - (
                out.migrations[-1].rounds_before if out.migrations else last
            )
            if cur.qemu is not None:
                with contextlib.suppress(Exception):
                    await cur.qemu.wait(60.0)
            console.poll()
        except (TimeoutError, Exception) as exc:
            log.exception("PASID migration demo failed")
            out.problems.append(f"{type(exc).__name__}: {exc}")
        for rig, _vm in live:
            _add_jobs(out, rig)
        out.console_tail = console.lines[-30:]
    out.leftover_bindings = {h.name: _guest_bindings(h, exclude=None) for h in sides}
    for t in tenants:
        t.close()
    out.wall_seconds = time.monotonic() - t_start
    return out


def _more_rounds(loop: LoopReport, n: int) -> Callable[[], bool]:
    want = loop.rounds + n
    return lambda: loop.rounds >= want


def _has_vfio_user(q: QemuChoice | None) -> bool:
    if q is None:
        from qemu_glue.qemu.binary import choose

        q = choose()
    return bool(q.features.vfio_user)


def _add_jobs(out: PasidDemoResult, rig: PasidDmaRig) -> None:
    if getattr(rig, "_jobs_counted", False):
        return
    rig._jobs_counted = True  # type: ignore[attr-defined]
    out.device_jobs["ok"] += sum(f.jobs_ok for f in rig.functions)
    out.device_jobs["failed"] += sum(f.jobs_failed for f in rig.functions)


def _engine_state(h: Host) -> dict[str, Any]:
    """What a refused migration must leave unchanged on a host (its bindings, allocators)."""
    return {
        "bindings": sorted((b.vm, b.device, b.vpasid, b.ppasid) for b in h.bindings()),
        "global": sorted(h.global_owner.items()),
    }


def _guest_bindings(h: Host, exclude: str | None) -> int:
    return sum(1 for b in h.bindings() if b.vm == VM_NAME and b.vm != exclude)


def _policy_checks(res: PasidMigrationResult, dst: Host) -> list[str]:
    """pPASIDs after = the destination engine's own bindings of the guest."""
    errs: list[str] = []
    own = {(b.device, b.vpasid): b.ppasid for b in dst.bindings() if b.vm == VM_NAME}
    for b in res.bindings:
        rid = parse_bdf(b.device)
        if own.get((rid, b.vpasid)) != b.ppasid_after:
            errs.append(f"{b.device} vPASID {b.vpasid}: result says {b.ppasid_after}, the "
                        f"destination engine {own.get((rid, b.vpasid))}")  # fmt: skip
    return errs


_SAVED: dict[str, Any] = {}


def _failure_hook(forced: str | None, dst_host: Host, dst: BlkVm) -> Any:
    """Set the destination up to fail as ``forced`` says; the hook for migrate_pasid."""
    if forced is None:
        return None
    if forced == "exhausted":
        _SAVED["exhausted"] = exhaust(dst_host)
    elif forced == "conflict":
        # a tenant already holds the guest's dedicated vPASIDs as its global pPASIDs: under the
        # destination's "global" policy the dedicated function needs pPASID == vPASID
        _SAVED["policy"] = dst_host.allocation
        dst_host.allocation = "global"

    async def hook(phase: str) -> None:
        if forced == "dst-dies" and phase == "switchover" and dst.qemu is not None:
            await dst.qemu.kill()
        if forced == "dst-dies-late" and phase == "completed" and dst.qemu is not None:
            await dst.qemu.kill()  # the source sent everything and stopped
        if forced == "import-aborted" and phase == "precopy":
            _break_bind_many(dst_host)

    return hook


def _break_bind_many(h: Host) -> None:
    real = h.bind_many
    calls = {"n": 0}

    def bind_many(vm: str, guest_rid: int, vpasids: Any) -> int:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("destination import killed midway (test)")
        return real(vm, guest_rid, vpasids)

    h.bind_many = bind_many  # type: ignore[method-assign]
    _SAVED["bind_many"] = real


def _undo_failure(forced: str, h: Host) -> None:
    if forced == "exhausted":
        for pp in _SAVED.pop("exhausted", []):
            h.global_alloc.free(pp)
    elif forced == "conflict":
        h.allocation = _SAVED.pop("policy", "per-device")
    elif forced == "import-aborted":
        real = _SAVED.pop("bind_many", None)
        if real is not None:
            h.bind_many = real  # type: ignore[method-assign]


__all__ = [
    "FAILURE_MODES",
    "PasidDemoOptions",
    "PasidDemoResult",
    "add_tenant",
    "make_host",
    "run_pasid_migration",
]
