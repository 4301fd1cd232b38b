"""The seed demo's rig: one in-process engine, several QEMU guests, PASID DMA functions.

:class:`SeedRig` holds one engine :class:`SeedEngine` (a :class:`~vioasid.model.engine.Host`
that also checks every DMA lands in the requesting VM's own host range) and any number of
:class:`SeedVm` (one QEMU each: its RAM file, its PASID DMA functions over vfio-user, the RTADDR
follower). Two guests given mdev slices of one host function share that function's one PASID
table here, in one process. The functions are served in-process (as ``vioasid boot
--dma-device`` does), not by a ``vioasid serve`` daemon: the daemon does not host vfio-user
functions yet (docs/seed-demo.md).

:class:`SeedFunction` is the PASID DMA device model with the host-side checks of every bind
command: the engine's invariants after it, and for a refused bind that nothing in any table
changed (``Host.snapshot()`` before == after). Each command and job can go to a ``--trace``
file as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qemu_glue.lifecycle import StartClose
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.process import QemuProcess, launch
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, VfioUserPci, VmSpec, kernel_cmdline
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.daemon.server import Server
from vioasid.daemon.service import Service
from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.formats.pasid_dma import BindStatus, FunctionType
from vioasid.model.engine import DmaResult, Host
from vioasid.model.faults import bdf_str
from vioasid.model.memory import GuestMemory
from vioasid.model.policy import Policy
from vioasid.vfio_user.server import FunctionServer

log = logging.getLogger(__name__)

FIRST_SLOT = 5  # dma0 at 00:05.0, dma1 at 00:06.0, ...
RTADDR_POLL_S = 0.2
MEMORY_MIB = 256


class SeedEngine(Host):
    """The engine, plus: every translated DMA must land in the requesting VM's host range."""

    def __init__(self, name: str = "host", *, allocation: Policy = "per-device") -> None:
        super().__init__(name, allocation=allocation)
        self.requester: str | None = None  # the VM whose function is running a descriptor
        self.cross_vm: list[str] = []  # DMAs that landed outside the requester's RAM
        self.dmas: dict[str, int] = {}
        self.on_dma = self._landed

    def _landed(self, r: DmaResult) -> None:
        who = self.requester
        if who is not None and r.hpa is not None:
            self.dmas[who] = self.dmas.get(who, 0) + 1
            v = self.vms.get(who)
            outside = v is None or not v.hpa <= r.hpa < v.hpa + v.memory_size
            if outside and len(self.cross_vm) < 100:
                self.cross_vm.append(f"VM {who}: DMA (tag {r.tag}) landed at HPA {r.hpa:#x}")


@dataclass
class CommandRecord:
    """One bind/unbind command as the host saw it, with the checks made around it."""

    vm: str
    dev: str  # dmaN
    guest_rid: int
    cmd: str
    vpasid: int
    status: str
    ppasid: int | None
    space: str | None
    tag: int | None
    in_the_way: int | None
    bindings_before: int
    unchanged: bool | None  # refused: every table as before (None for a successful command)
    invariants: list[str]
    cpu_table: dict[int, int]  # the VM's CPU PASID translation table after the command
    tables: dict[str, Any]  # the engine's dump after it (what ``vioasid status --json`` shows)
    t: float

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("t", "tables")}


class SeedFunction(PasidDmaFunction):
    """The PASID DMA function with the seed demo's host-side checks and trace."""

    def __init__(
        self,
        engine: SeedEngine,
        vm: str,
        guest_rid: int,
        ftype: FunctionType,
        *,
        index: int,
        log_to: list[CommandRecord],
        trace: TextIO | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__(engine, vm, guest_rid, ftype, width=width)
        self.engine = engine
        self.index = index
        self.log_to = log_to
        self.trace = trace

    @property
    def dev(self) -> str:
        return f"dma{self.index}"

    def bind_command(self, cmd: int, pasid: int) -> BindStatus:
        h = self.engine
        before = h.snapshot()
        n_before = sum(1 for _ in h.bindings())
        st = super().bind_command(cmd, pasid)
        word = "bind" if cmd == 1 else "unbind" if cmd == 2 else str(cmd)
        dev = h.vm(self.vm).devices[self.guest_rid]
        pp = self.bound.get(pasid) if st is BindStatus.OK and cmd == 1 else None
        rec = CommandRecord(
            vm=self.vm,
            dev=self.dev,
            guest_rid=self.guest_rid,
            cmd=word,
            vpasid=pasid,
            status=st.word,
            ppasid=pp,
            space=dev.rule.space if pp is not None else None,
            tag=pp,
            in_the_way=self.bind_info if st is BindStatus.PASID_CONFLICT else None,
            bindings_before=n_before,
            unchanged=None if st is BindStatus.OK else h.snapshot() == before,
            invariants=h.check_invariants(),
            cpu_table=dict(h.vm(self.vm).cpu_table),
            tables=h.dump(),
            t=time.monotonic(),
        )
        self.log_to.append(rec)
        self._trace(
            {
                "event": "bind-command",
                **rec.to_json(),
                "type": self.ftype.word,
                "function": bdf_str(self.function_rid),
                "row": dev.rule.row,
            }
        )
        return st

    def submit(self, raw: bytes) -> Any:
        h = self.engine
        h.requester = self.vm
        n = len(self.jobs)
        try:
            st = super().submit(raw)
        finally:
            h.requester = None
        if self.trace is not None:
            for j in self.jobs[n:]:
                tag = self.bound.get(j.vpasid)
                if self.ftype is FunctionType.ENQCMD:
                    tag = h.vm(self.vm).cpu_table.get(j.vpasid)
                self._trace(
                    {
                        "event": "job",
                        "vm": self.vm,
                        "dev": self.dev,
                        "type": self.ftype.word,
                        "vpasid": j.vpasid,
                        "tag": tag,
                        "opcode": j.opcode,
                        "status": j.status,
                        "bytes": j.bytes_done,
                    }
                )
            if int(st):
                self._trace(
                    {"event": "portal-refused", "vm": self.vm, "dev": self.dev, "status": int(st)}
                )
        return st

    def _trace(self, obj: dict[str, Any]) -> None:
        if self.trace is not None:
            self.trace.write(json.dumps(obj) + "\n")


@dataclass(frozen=True)
class FnSpec:
    """One PASID DMA function of a guest: its type, the host function, how it is assigned."""

    ftype: FunctionType
    function: int  # host RID
    assign: str  # "vfio-pci" | "mdev"
    width: int | None = None  # PASID width the guest sees (None: the host function's)


@dataclass
class SeedVm:
    """One guest: its RAM file, functions and servers, and (once launched) its QEMU."""

    name: str
    specs: tuple[FnSpec, ...]
    ram_path: Path
    functions: list[SeedFunction] = field(default_factory=list)
    servers: list[FunctionServer] = field(default_factory=list)
    qemu: QemuProcess | None = None
    watch: asyncio.Task[None] | None = None
    console: list[str] = field(default_factory=list)

    def devices(self) -> tuple[VfioUserPci, ...]:
        return tuple(
            VfioUserPci(socket=s.path, id=f"dma{i}", addr=f"{FIRST_SLOT + i:02x}.0")
            for i, s in enumerate(self.servers)
        )


class SeedRig(StartClose):
    """One engine, its host functions, and the guests (``async with``; everything stopped after)."""

    def __init__(
        self,
        engine: SeedEngine,
        *,
        trace: TextIO | None = None,
        status_socket: Path | None = None,
    ) -> None:
        """``status_socket``: also serve the engine with the daemon's own server (the code of
        ``vioasid serve``) there, so ``vioasid status --socket PATH`` shows its live tables."""
        self.engine = engine
        self.trace = trace
        self.tmp = Path(tempfile.mkdtemp(prefix="vioasid-seed-"))
        self.vms: dict[str, SeedVm] = {}
        self.commands: list[CommandRecord] = []
        self.status_socket = status_socket
        self.server: Server | None = None

    async def start(self) -> None:
        if self.status_socket is not None:
            self.server = Server(Service(self.engine), self.status_socket)
            await self.server.start()

    async def add_vm(self, name: str, specs: tuple[FnSpec, ...]) -> SeedVm:
        shm = Path("/dev/shm")
        ram = (shm if shm.is_dir() else self.tmp) / f"{self.tmp.name}-{name}-ram"
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, MEMORY_MIB << 20)
        finally:
            os.close(fd)
        svm = SeedVm(name, specs, ram)
        self.vms[name] = svm
        self.engine.add_vm(name, GuestMemory.from_file(ram, writable=True))
        for i, s in enumerate(specs):
            rid = (FIRST_SLOT + i) << 3
            self.engine.attach_device(name, rid, s.function, s.assign)  # type: ignore[arg-type]
            fn = SeedFunction(
                self.engine,
                name,
                rid,
                s.ftype,
                index=i,
                log_to=self.commands,
                trace=self.trace,
                width=s.width,
            )
            srv = FunctionServer(fn, self.tmp / f"{name}-dma{i}.sock")
            await srv.start()
            svm.functions.append(fn)
            svm.servers.append(srv)
        return svm

    @contextlib.asynccontextmanager
    async def guest(
        self,
        svm: SeedVm,
        *,
        kernel: Path,
        initrd: Path,
        append_extra: str,
        qemu: QemuChoice | None,
        echo: bool | TextIO = False,
    ) -> Any:
        """Launch the guest's QEMU (TCG, scalable-fs intel-iommu, the functions); follow its
        RTADDR into the engine. Stopped (and its servers' connections gone) on exit."""
        mode = IommuMode.SCALABLE_FS
        spec = VmSpec(
            name=f"seed-{svm.name}",
            memory_mib=MEMORY_MIB,
            iommu=IommuSpec(mode=mode, caching_mode=True, pasid_bits=20),
            devices=svm.devices(),
            kernel=kernel,
            initrd=initrd,
            append=kernel_cmdline(mode, strict=True, tests=["seed"], extra=append_extra),
            qemu_binary=qemu.path if qemu else None,
            qemu_features=qemu.features if qemu else None,
            ram_path=svm.ram_path,
        )
        async with launch(spec, echo=echo) as vm:
            svm.qemu = vm
            vm.on_console(svm.console.append)
            reader = VtdRegisterReader(vm.require_qmp())
            svm.watch = asyncio.get_running_loop().create_task(self._follow(svm.name, reader))
            try:
                yield vm
            finally:
                svm.watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await svm.watch
        await self.disconnected(svm)

    async def disconnected(self, svm: SeedVm, timeout: float = 5.0) -> bool:
        """Wait until every server of ``svm`` saw its QEMU go (its bindings are dropped)."""
        deadline = time.monotonic() + timeout
        while any(s.connected.is_set() for s in svm.servers):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _follow(self, vm: str, reader: VtdRegisterReader) -> None:
        try:
            async with contextlib.aclosing(reader.watch(RTADDR_POLL_S)) as regs:
                async for r in regs:
                    rt = r.rtaddr if r.root_table_set else 0
                    if rt != self.engine.vm(vm).rtaddr:
                        log.info("%s: guest RTADDR %#x", vm, rt)
                        self.engine.set_rtaddr(vm, rt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # QEMU went away
            log.info("%s: stopped following RTADDR: %r", vm, e)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        for svm in self.vms.values():
            for s in svm.servers:
                await s.close()
            with contextlib.suppress(FileNotFoundError):
                svm.ram_path.unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)
