"""PASID DMA functions for a QEMU guest: the engine, one vfio-user server per function, wiring.

``vioasid boot --dma-device TYPE[,function=RID]`` and ``vioasid demo`` run this in-process:

1. :func:`parse_dma_device` reads each ``--dma-device`` (TYPE: dedicated | translating | mdev |
   enqcmd; ``function=BB:DD.F`` picks the host function).
2. :class:`PasidDmaRig` builds the engine :class:`~vioasid.model.engine.Host` (from ``--host
   FILE.toml``'s ``[[host]]`` table, or a default host with one function per type), creates the
   guest's RAM file itself (the ``memory-backend-file`` QEMU then opens, so the engine maps the
   VM's RAM, GPA == file offset, before QEMU starts), places the VM, attaches one engine device
   per function at its guest RID (slot 05.0, 06.0, ... on pcie.0) and starts one
   :class:`~vioasid.vfio_user.server.FunctionServer` per function.
3. :meth:`PasidDmaRig.devices` gives the ``vfio-user-pci`` devices for the VmSpec; once QMP is
   up, :meth:`PasidDmaRig.set_registers` follows the guest's RTADDR/GSTS (QMP ``xp`` polls,
   :mod:`qemu_glue.qemu.vtd_regs`) into the engine VM, in the background: a vfio-user message must
   never wait on QMP (the vCPU waits for its reply holding QEMU's lock). It also starts the
   plain-``migrate`` guard (:mod:`qemu_glue.migration.guard`) on that monitor.
4. :meth:`PasidDmaRig.summary` is the JSON the commands print (bindings, jobs, faults).
5. With ``status_socket`` the rig also serves its engine with the daemon's own server (the code
   of ``vioasid serve``) there, reporting its functions (:meth:`PasidDmaRig.function_report`)
   in the dump's ``pasid_functions``: ``vioasid status --socket PATH`` shows them live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu_glue.lifecycle import StartClose
from qemu_glue.migration.guard import MigrationGuard
from qemu_glue.qemu.vmspec import VfioUserPci
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.daemon.hostconfig import HostConfigError, load_host
from vioasid.daemon.server import Server
from vioasid.daemon.service import Service
from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.formats.pasid_dma import FunctionType
from vioasid.model.engine import Host, guest_fault_json
from vioasid.model.faults import bdf_str, parse_bdf
from vioasid.model.memory import GuestMemory
from vioasid.vfio_user.server import FunctionServer

log = logging.getLogger(__name__)

VM_NAME = "guest"
FIRST_SLOT = 5  # 00:05.0, 00:06.0, ... on pcie.0
MAX_FUNCTIONS = 16
RTADDR_POLL_S = 0.2
MAX_RAM_MIB = 2048  # q35 keeps all RAM below 4 GiB up to here: GPA == file offset
TYPES = tuple(t.word for t in FunctionType)

# The default host: one function per type (type -> (base RID, enqcmd, translating, assign)).
_DEFAULT_FN: dict[FunctionType, tuple[int, bool, bool, str]] = {
    FunctionType.DEDICATED: (0x3A00, False, False, "vfio-pci"),
    FunctionType.TRANSLATING: (0x3B00, False, True, "vfio-pci"),
    FunctionType.MDEV: (0x3C00, False, False, "mdev"),
    FunctionType.ENQCMD: (0x5F00, True, True, "vfio-pci"),
}


class DmaDeviceError(ValueError):
    """A ``--dma-device`` / ``--host`` the rig cannot use (one line for the user)."""


@dataclass(frozen=True)
class DmaDeviceArg:
    """One ``--dma-device TYPE[,function=RID]``."""

    type: FunctionType
    function: int | None = None


def parse_dma_device(text: str) -> DmaDeviceArg:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or parts[0] not in TYPES:
        raise DmaDeviceError(f"--dma-device {text!r}: TYPE must be one of {', '.join(TYPES)}")
    fn: int | None = None
    for p in parts[1:]:
        key, _, val = p.partition("=")
        if key != "function" or not val:
            raise DmaDeviceError(f"--dma-device {text!r}: unknown option {p!r} (function=RID)")
        try:
            fn = parse_bdf(val)
        except ValueError:
            raise DmaDeviceError(f"--dma-device {text!r}: function={val} is not BB:DD.F") from None
    return DmaDeviceArg(FunctionType[parts[0].upper()], fn)


@dataclass
class _Placed:
    arg: DmaDeviceArg
    guest_rid: int
    function: int
    assign: str
    slot: int


def _assign_for(t: FunctionType) -> str:
    return "mdev" if t is FunctionType.MDEV else "vfio-pci"


def plan_functions(args: list[DmaDeviceArg], host: Host | None) -> tuple[Host, list[_Placed]]:
    """The engine host and where each function goes (guest RID, host function, assignment)."""
    if len(args) > MAX_FUNCTIONS:
        raise DmaDeviceError(f"at most {MAX_FUNCTIONS} --dma-device")
    h = host if host is not None else Host("host")
    placed: list[_Placed] = []
    used_whole: set[int] = set()
    counts: dict[FunctionType, int] = {}
    for i, a in enumerate(args):
        assign = _assign_for(a.type)
        rid = a.function
        if rid is None:
            if host is None:
                base, enq, tr, _ = _DEFAULT_FN[a.type]
                n = counts.get(a.type, 0)
                counts[a.type] = n + 1
                rid = base if assign == "mdev" else base + n
                if rid not in h.functions:
                    h.add_function(rid, enqcmd=enq, translating=tr)
            else:
                rid = _pick(h, a.type, used_whole)
        elif rid not in h.functions:
            if host is not None:
                raise DmaDeviceError(f"--dma-device: the host file has no function {bdf_str(rid)}")
            _, enq, tr, _ = _DEFAULT_FN[a.type]
            h.add_function(rid, enqcmd=enq, translating=tr)
        fn = h.functions[rid]
        if a.type is FunctionType.ENQCMD and not fn.enqcmd:
            raise DmaDeviceError(f"--dma-device enqcmd: function {fn.bdf} has no shared work queue")
        if assign == "vfio-pci":
            if rid in used_whole:
                raise DmaDeviceError(f"function {fn.bdf} is given whole twice")
            used_whole.add(rid)
        slot = FIRST_SLOT + i
        placed.append(_Placed(a, slot << 3, rid, assign, slot))
    return h, placed


def _pick(h: Host, t: FunctionType, used: set[int]) -> int:
    want_enq = t is FunctionType.ENQCMD
    want_tr = t is FunctionType.TRANSLATING
    for rid, fn in sorted(h.functions.items()):
        if fn.enqcmd != want_enq or (want_tr and not fn.translating):
            continue
        if _assign_for(t) == "vfio-pci" and rid in used:
            continue
        return rid
    raise DmaDeviceError(f"--dma-device {t.word}: the host file has no free function for it")


class PasidDmaRig(StartClose):
    """The engine + one vfio-user server per PASID DMA function, for one QEMU guest."""

    def __init__(
        self,
        args: list[DmaDeviceArg],
        *,
        host_file: str | None = None,
        memory_mib: int = 512,
        engine: Host | None = None,
        posted_writes: bool = True,
        status_socket: Path | None = None,
    ) -> None:
        """``posted_writes``: QEMU posts BAR writes (its default): a job's nine register writes
        cost no round trip each; the driver's PORTAL_STATUS read waits for the job, since one
        function's messages are handled strictly in order (docs/pasid-dma.md).
        ``engine``: place the VM on this host (one side of a live migration, whose functions
        and other VMs are already there) instead of a host of the rig's own."""
        if memory_mib > MAX_RAM_MIB:
            raise DmaDeviceError(f"--dma-device needs --memory <= {MAX_RAM_MIB} MiB")
        host = engine
        if host_file is not None:
            try:
                host = load_host(host_file)
            except HostConfigError as e:
                raise DmaDeviceError(str(e)) from None
        self.host, self.placed = plan_functions(args, host)
        # a scalable-ss guest writes second-stage (PGTT=2) entries: translated in software
        self.host.guest_second_stage = True
        self.memory_mib = memory_mib
        self.posted_writes = posted_writes
        self.status_socket = status_socket
        self.status_server: Server | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="vioasid-dma-"))
        shm = Path("/dev/shm")
        self.ram_path = (shm if shm.is_dir() else self.tmp) / f"{self.tmp.name}-ram"
        self.functions: list[PasidDmaFunction] = []
        self.servers: list[FunctionServer] = []
        self._watch: asyncio.Task[None] | None = None
        self.guard: MigrationGuard | None = None
        self._memory: GuestMemory | None = None

    async def start(self) -> None:
        """Create the RAM file, place the VM and its devices, start the servers."""
        fd = os.open(self.ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.memory_mib << 20)
        finally:
            os.close(fd)
        self._memory = GuestMemory.from_file(self.ram_path, writable=True)
        self.host.add_vm(VM_NAME, self._memory)
        for p in self.placed:
            self.host.attach_device(VM_NAME, p.guest_rid, p.function, p.assign)  # type: ignore[arg-type]
            fn = PasidDmaFunction(self.host, VM_NAME, p.guest_rid, p.arg.type)
            srv = FunctionServer(fn, self.tmp / f"dma{len(self.servers)}.sock")
            await srv.start()
            self.functions.append(fn)
            self.servers.append(srv)
        if self.status_socket is not None:
            service = Service(self.host)
            service.reports["pasid_functions"] = self.function_report
            self.status_server = Server(service, self.status_socket)
            await self.status_server.start()

    @property
    def memory(self) -> GuestMemory:
        """The guest's RAM as the engine maps it (after :meth:`start`)."""
        assert self._memory is not None
        return self._memory

    def devices(self) -> tuple[VfioUserPci, ...]:
        return tuple(
            VfioUserPci(
                socket=s.path,
                id=f"dma{i}",
                addr=f"{p.slot:02x}.0",
                no_posted_writes=not self.posted_writes,
            )
            for i, (s, p) in enumerate(zip(self.servers, self.placed, strict=True))
        )

    def set_registers(self, reader: VtdRegisterReader | None) -> None:
        """Follow the guest's RTADDR (QMP ``xp`` polls, in the background: never from a
        vfio-user message, where QEMU's vCPU waits for our reply holding its lock)."""
        if reader is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow(reader))
        if reader is not None and self.guard is None:  # no plain `migrate` of this VM
            self.guard = MigrationGuard(reader.qmp, VM_NAME)
            self.guard.start()

    async def _follow(self, reader: VtdRegisterReader) -> None:
        try:
            async with contextlib.aclosing(reader.watch(RTADDR_POLL_S)) as regs:
                async for r in regs:
                    rt = r.rtaddr if r.root_table_set else 0  # the register (TTM too)
                    if rt != self.host.vm(VM_NAME).rtaddr:
                        log.info("guest RTADDR %#x (GSTS %#x)", rt, r.gsts)
                        self.host.set_rtaddr(VM_NAME, rt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # QEMU went away: nothing more to follow
            log.info("stopped following the guest's RTADDR: %r", e)

    async def close(self) -> None:
        if self.guard is not None:
            await self.guard.close()
            self.guard = None
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
            self._watch = None
        if self.status_server is not None:
            await self.status_server.close()
            self.status_server = None
        for s in self.servers:
            await s.close()
        if VM_NAME in self.host.vms:  # a shared (migration) engine outlives this rig
            self.host.remove_vm(VM_NAME)
        with contextlib.suppress(FileNotFoundError):
            self.ram_path.unlink()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def function_report(self) -> list[dict[str, Any]]:
        """Each function as ``vioasid status`` lists it: VM, guest device, type, host function,
        its vfio-user socket and connection, jobs, faults, the device TLB and the bindings."""
        return [
            {
                "vm": VM_NAME,
                "device": bdf_str(f.guest_rid),
                "type": f.ftype.word,
                "function": bdf_str(f.function_rid),
                "socket": str(s.path),
                "connected": s.connected.is_set(),
                "pasid_enabled": f.pasid_enabled,
                "doorbells": f.doorbells,
                "jobs": {"ok": f.jobs_ok, "failed": f.jobs_failed},
                "faults": len(f.faults),
                "tlb": {"pages": f.tlb.pages, "hits": f.tlb.stats.hits},
                "bindings": [{k: b[k] for k in ("vpasid", "ppasid", "tag")} for b in f.bindings()],
            }
            for f, s in zip(self.functions, self.servers, strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        """``bindings`` [{device, type, vpasid, ppasid, tag}], jobs, faults (guest terms)."""
        bindings = [b for f in self.functions for b in f.bindings()]
        faults = [guest_fault_json(x) for f in self.functions for x in f.faults]
        return {
            "functions": [
                {
                    **f.stats(),
                    "function": bdf_str(f.function_rid),
                    "pasid_enabled": f.pasid_enabled,
                    "connected": s.connected.is_set(),
                    "messages": s.messages,
                    "posted": s.posted,
                }
                for f, s in zip(self.functions, self.servers, strict=True)
            ],
            "bindings": bindings,
            "bind_log": [e for f in self.functions for e in f.bind_log],
            "jobs": {
                "ok": sum(f.jobs_ok for f in self.functions),
                "failed": sum(f.jobs_failed for f in self.functions),
            },
            "faults": faults,
        }
