"""A QEMU guest whose disk is the vioasid vhost-user-blk back-end: start both, wire them up.

:func:`vhost_blk_guest` starts the back-end listening, launches QEMU (``qemu_glue.qemu.process``)
with a ``vhost-user-blk-pci`` device on that socket, reads the device's guest RID from QMP
``query-pci`` and gives the back-end a reader of the VT-d GSTS/RTADDR registers
(``qemu_glue.qemu.vtd_regs``, QMP ``xp``). With ``pin`` other than ``off`` it places QEMU's
vCPU threads and the back-end's IOTLB reader thread on one CPU set and every other thread on the
rest (``qemu_glue.qemu.placement``). Everything is stopped on exit, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from qemu_glue.iq_follower import IqFollower
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.placement import Pinned, pin_vm, plan
from qemu_glue.qemu.process import QemuProcess, launch
from qemu_glue.qemu.vmspec import Accel, Device, IommuSpec, VhostUserBlk, VmSpec
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.device.translator import VtdRegs
from vioasid.formats.registers import REG_IQA, REG_IQT
from vioasid.vhost_user.backend import VhostUserBlkBackend

log = logging.getLogger(__name__)

DEVICE_ID = "vublk0"
DEVICE_ADDR = "04.0"


@dataclass
class GuestOptions:
    """What to boot and how the vioasid disk translates."""

    kernel: Path
    initrd: Path | None
    append: str
    disk: Path
    iommu: IommuSpec | None = field(default_factory=IommuSpec)
    accel: Accel = Accel.TCG
    memory_mib: int = 512
    translate: str = "walk"  # walk | qemu | identity
    cross_check: bool = False
    trace: IO[str] | None = None
    echo: bool | TextIO = False
    stdin_inherit: bool = False
    extra_devices: tuple[Device, ...] = ()
    name: str = "vioasid-blk"
    inject_bad_iova: int | None = None  # tests: see VhostUserBlkBackend
    follow_iq: bool = True  # decode the guest's invalidation queue too (IqFollower)
    qemu: QemuChoice | None = None  # None: qemu_glue.qemu.binary.choose() at launch
    ram_path: Path | None = None  # the memory-backend file (None: the launcher picks one)
    pin: str = "off"  # off | auto | CPU list (qemu_glue.qemu.placement)


@dataclass
class BlkGuest:
    vm: QemuProcess
    backend: VhostUserBlkBackend
    regs: VtdRegisterReader | None
    pinned: Pinned | None = None


@contextlib.asynccontextmanager
async def vhost_blk_guest(opts: GuestOptions) -> AsyncIterator[BlkGuest]:
    """``async with vhost_blk_guest(opts) as g:`` — a running guest with the vioasid disk."""
    tmp = Path(tempfile.mkdtemp(prefix="vioasid-vu-"))
    sock = tmp / "vhost-user-blk.sock"
    qmp_ready = asyncio.Event()
    holder: dict[str, VtdRegisterReader] = {}

    async def read_regs() -> VtdRegs:
        async with asyncio.timeout(30):
            await qmp_ready.wait()
        reader = holder["regs"]
        return VtdRegs(gsts=await reader.gsts(), rtaddr=await reader.rtaddr())

    translate = opts.translate if opts.iommu is not None else "identity"
    placement = plan(opts.pin, os.sched_getaffinity(0))  # PinError before anything starts
    backend = VhostUserBlkBackend(
        opts.disk,
        sock,
        translate=translate,
        cross_check=opts.cross_check and opts.iommu is not None,
        regs=read_regs if opts.iommu is not None else None,
        trace=opts.trace,
        inject_bad_iova=opts.inject_bad_iova,
    )
    await backend.start()
    serve = asyncio.create_task(backend.serve_forever())
    spec = VmSpec(
        name=opts.name,
        memory_mib=opts.memory_mib,
        accel=opts.accel,
        iommu=opts.iommu,
        devices=(VhostUserBlk(socket=sock, id=DEVICE_ID, addr=DEVICE_ADDR), *opts.extra_devices),
        kernel=opts.kernel,
        initrd=opts.initrd,
        append=opts.append,
        qemu_binary=opts.qemu.path if opts.qemu else None,
        qemu_features=opts.qemu.features if opts.qemu else None,
        ram_path=opts.ram_path,
    )
    try:
        async with launch(spec, echo=opts.echo, stdin_inherit=opts.stdin_inherit) as vm:
            qmp = vm.require_qmp()
            pci = await qmp.find_pci(DEVICE_ID)
            backend.set_sid(pci.rid)
            log.info("vhost-user-blk device is %s (RID 0x%04x)", pci.bdf, pci.rid)
            pinned = None
            if placement is not None:
                backend.reader_cpus = set(placement.vcpu_cpus)
                tid = backend.reader_thread_id()
                pinned = await pin_vm(
                    qmp, vm.pid, placement, readers=[tid] if tid else [], own=True
                )
            reader = VtdRegisterReader(qmp) if opts.iommu is not None else None
            follower = None
            if reader is not None:
                holder["regs"] = reader
                qmp_ready.set()
                if opts.follow_iq:
                    follower = IqFollower(
                        lambda: reader.read_u64(REG_IQA),
                        lambda: reader.read_u64(REG_IQT),
                        backend.get_memory,
                        backend.translator.on_iq_descriptor,
                    )
                    backend.on_invalidate = follower.poke
            try:
                yield BlkGuest(vm, backend, reader, pinned)
            finally:
                backend.on_invalidate = None
                backend.reader_cpus = None
                if pinned is not None:
                    pinned.restore()
                if follower is not None:
                    await follower.close()
    finally:
        await backend.close()
        serve.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serve
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class BlkRunResult:
    """One boot → guest disk tests → power-off run with the vioasid disk."""

    accel: str
    iommu: str
    translate: str
    cross_check: bool
    init_s: float | None
    tests_done_s: float | None
    exit_s: float | None
    passed: int
    failed: int
    failures: list[dict[str, object]]
    errors: list[str]
    timed_out: bool
    returncode: int | None
    disk_ok: bool
    disk_mismatches: list[str]
    backend: dict[str, object]
    console_tail: list[str] = field(default_factory=list)
    guest_io_errors: list[str] = field(default_factory=list)  # kernel "I/O error" lines
    placement: dict[str, object] | None = None  # what --pin placed (Pinned.to_json)

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and self.failed == 0
            and self.passed > 0
            and not self.errors
            and self.disk_ok
            and self.disagreements == 0
        )

    @property
    def disagreements(self) -> int:
        """Translations where vioasid's walk and QEMU differed (cross-check mode)."""
        agreement = self.backend.get("qemu_agreement")
        if isinstance(agreement, dict):
            return int(agreement.get("disagree", 0))
        return 0

    def to_json(self) -> dict[str, object]:
        b = self.backend
        return {
            "ok": self.ok,
            "accel": self.accel,
            "iommu": self.iommu,
            "translate": self.translate,
            "cross_check": self.cross_check,
            "boot_seconds": _r(self.init_s),
            "tests_done_seconds": _r(self.tests_done_s),
            "total_seconds": _r(self.exit_s),
            "guest_tests": {"passed": self.passed, "failed": self.failed},
            "failures": self.failures,
            "guest_errors": self.errors,
            "timed_out": self.timed_out,
            "disk_matches": self.disk_ok,
            "disk_mismatches": self.disk_mismatches,
            "translations": b.get("translations", 0),
            "iotlb_hit_rate": b.get("iotlb_hit_rate", 0.0),
            "invalidations": b.get("invalidations", 0),
            "faults": b.get("faults", 0),
            "qemu_agreement": b.get("qemu_agreement", {"agree": 0, "disagree": 0}),
            "guest_io_errors": len(self.guest_io_errors),
            "placement": self.placement,
            "backend": b,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


async def run_guest_tests(
    opts: GuestOptions,
    timeout: float = 300.0,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[BlkGuest], None] | None = None,
) -> BlkRunResult:
    """Boot the test guest with the vioasid disk, follow its markers, check the backing file.

    ``opts.disk`` must be a disk made by ``images.guest.patterns.make_disk`` (the guest tests
    write their patterns to it; the host then compares).
    """
    from images.guest import patterns
    from qemu_glue.guest_runner import watch_guest

    async with vhost_blk_guest(opts) as g:
        if on_start is not None:
            on_start(g)
        if on_line is not None:
            g.vm.on_console(on_line)
        run = await watch_guest(g.vm, timeout)
        summary = g.backend.summary()
        placement = g.pinned.to_json() if g.pinned is not None else None
        tail = [line.text for line in g.vm.console[-40:]]
        io_errors = [line.text for line in g.vm.console if "I/O error" in line.text]
    mismatches = patterns.check_disk(opts.disk) if run.report.done else []
    disk_ok = bool(run.report.done) and not mismatches
    return BlkRunResult(
        accel=str(opts.accel),
        iommu=str(opts.iommu.mode) if opts.iommu is not None else "none",
        translate=opts.translate if opts.iommu is not None else "identity",
        cross_check=opts.cross_check,
        init_s=run.init_s,
        tests_done_s=run.tests_done_s,
        exit_s=run.exit_s,
        passed=run.report.passed,
        failed=run.report.failed,
        failures=[{"name": r.name, "detail": r.detail} for r in run.report.results if not r.passed],
        errors=list(run.report.errors),
        timed_out=run.timed_out,
        returncode=run.returncode,
        disk_ok=disk_ok,
        disk_mismatches=[f"{m.test}@0x{m.first_bad:x}" for m in mismatches],
        backend=summary,
        console_tail=tail,
        guest_io_errors=io_errors,
        placement=placement,
    )
