"""A QEMU guest whose disk is the vioasid vhost-user-blk back-end: start both, wire them up.

:func:`vhost_blk_guest` starts the back-end listening, launches QEMU (``qemu_glue.process``)
with a ``vhost-user-blk-pci`` device on that socket, reads the device's guest RID from QMP
``query-pci`` and gives the back-end a reader of the VT-d GSTS/RTADDR registers
(``qemu_glue.vtd_regs``, QMP ``xp``). Everything is stopped on exit, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from ..process import QemuProcess, launch
from ..translate import VtdRegs
from ..vmspec import Accel, Device, IommuSpec, VhostUserBlk, VmSpec
from ..vtd_regs import VtdRegisterReader
from .backend import VhostUserBlkBackend

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


@dataclass
class BlkGuest:
    vm: QemuProcess
    backend: VhostUserBlkBackend
    regs: VtdRegisterReader | None


@contextlib.asynccontextmanager
async def vhost_blk_guest(opts: GuestOptions) -> AsyncIterator[BlkGuest]:
    """``async with vhost_blk_guest(opts) as g:`` — a running guest with the vioasid disk."""
    tmp = Path(tempfile.mkdtemp(prefix="vioasid-vu-"))
    sock = tmp / "vhost-user-blk.sock"
    qmp_ready = asyncio.Event()
    holder: dict[str, VtdRegisterReader] = {}

    async def read_regs() -> VtdRegs:
        await asyncio.wait_for(qmp_ready.wait(), 30)
        reader = holder["regs"]
        return VtdRegs(gsts=await reader.gsts(), rtaddr=await reader.rtaddr())

    translate = opts.translate if opts.iommu is not None else "identity"
    backend = VhostUserBlkBackend(
        opts.disk,
        sock,
        translate=translate,
        cross_check=opts.cross_check and opts.iommu is not None,
        regs=read_regs if opts.iommu is not None else None,
        trace=opts.trace,
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
    )
    try:
        async with launch(spec, echo=opts.echo, stdin_inherit=opts.stdin_inherit) as vm:
            qmp = vm.require_qmp()
            pci = await qmp.find_pci(DEVICE_ID)
            backend.set_sid(pci.rid)
            log.info("vhost-user-blk device is %s (RID 0x%04x)", pci.bdf, pci.rid)
            reader = VtdRegisterReader(qmp) if opts.iommu is not None else None
            if reader is not None:
                holder["regs"] = reader
                qmp_ready.set()
            yield BlkGuest(vm, backend, reader)
    finally:
        await backend.close()
        serve.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serve
        shutil.rmtree(tmp, ignore_errors=True)
