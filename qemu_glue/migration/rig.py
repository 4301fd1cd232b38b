"""Two hosts on one machine, for migration runs: daemons, QEMUs with vioasid disks, consoles.

* :class:`Daemon` — ``vioasid serve`` as a subprocess with its own socket and host file: one
  "host". :func:`host_toml` writes a host file.
* :class:`BlkVm` — one QEMU (its own shared RAM file and serial file) whose ``vhost-user-blk``
  disk is served by its own :class:`~vioasid.vhost_user.backend.VhostUserBlkBackend` (own
  socket, walking that QEMU's VT-d tables), on a backing file both hosts share. ``incoming``
  starts it as a migration destination (``-incoming defer``).
* :class:`SerialChain` — the guest's serial console across migrations: the source's serial
  file, then the destination's, as one byte stream (a line the guest was printing when it was
  stopped ends on the next host), fed to a :class:`~images.guest.markers.GuestReport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images.guest.markers import GuestReport, Marker
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.process import QemuProcess, read_line
from qemu_glue.qemu.qmp import Qmp
from qemu_glue.qemu.vmspec import Accel, Device, IommuSpec, VhostUserBlk, VmSpec
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.client import Client, MemoryRegion
from vioasid.device.translator import VtdRegs
from vioasid.model.faults import bdf_str
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user.backend import VhostUserBlkBackend

log = logging.getLogger(__name__)

DEVICE_ID = "vublk0"
DEVICE_ADDR = "04.0"
DEVICE_RID = 0x20  # 00:04.0
BACKEND_MAIN = "import sys; from qemu_glue.blk_process import main; sys.exit(main())"
SHM = Path("/dev/shm")

CLI_MAIN = "import sys; from vioasid.cli import main; sys.exit(main())"
"""``python -c`` program running the vioasid CLI (``-m vioasid.cli`` would load cli.py twice)."""
FunctionSpec = tuple[int, bool, bool]  # (rid, enqcmd, translating)


def host_toml(name: str, functions: Sequence[FunctionSpec], allocation: str = "per-device") -> str:
    """A ``[[host]]`` file for ``vioasid serve --host``."""
    lines = ["[[host]]", f'name = "{name}"', f'allocation = "{allocation}"', ""]
    for rid, enq, tr in functions:
        lines += [
            "  [[host.function]]",
            f'  rid = "{bdf_str(rid)}"',
            f"  enqcmd = {'true' if enq else 'false'}",
            f"  translating = {'true' if tr else 'false'}",
            "",
        ]
    return "\n".join(lines)


class Daemon:
    """``vioasid serve`` in a subprocess: one host of the migration."""

    def __init__(self, name: str, workdir: Path, toml: str) -> None:
        self.name = name
        self.socket = workdir / f"{name}.sock"
        self.host_file = workdir / f"{name}.toml"
        self.host_file.write_text(toml)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLI_MAIN,
            "serve",
            "--socket",
            str(self.socket),
            "--host",
            str(self.host_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def connect(self) -> Client:
        return await Client.connect(self.socket, timeout=20.0)

    async def close(self) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            async with asyncio.timeout(5.0):
                await p.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


@dataclass
class VmOptions:
    """What every QEMU of the run is started with (source and destinations alike)."""

    kernel: Path
    initrd: Path | None
    append: str
    disk: Path
    iommu: IommuSpec
    accel: Accel = Accel.TCG
    memory_mib: int = 256
    name: str = "vioasid-mig"
    qemu: QemuChoice | None = None  # None: qemu_glue.qemu.binary.choose() at launch


class BlkVm:
    """One QEMU with its own RAM file, serial file and vioasid vhost-user-blk back-end.

    ``backend="process"`` (default) runs the back-end as a process of its own
    (:mod:`qemu_glue.blk_process`, reading VT-d registers through a QMP monitor of its own);
    ``"inproc"`` serves it from this event loop.
    """

    def __init__(
        self,
        opts: VmOptions,
        tag: str,
        workdir: Path,
        *,
        backend: str = "process",
        devices: tuple[Device, ...] = (),
        ram_path: Path | None = None,
    ) -> None:
        """``devices``: more devices (a PASID DMA rig's vfio-user functions); ``ram_path``:
        the RAM file (a PASID DMA rig creates its own before QEMU starts)."""
        if backend not in ("process", "inproc"):
            raise ValueError("backend is process or inproc")
        self.opts = opts
        self.tag = tag
        self.workdir = workdir
        self.mode = backend
        self.extra_devices = devices
        if ram_path is not None:
            self.ram_path = ram_path
        else:
            self.ram_path = SHM / f"{workdir.name}-{tag}-ram" if SHM.is_dir() else workdir / "ram"
        self.serial_path = workdir / f"{tag}.serial"
        self.vhost_socket = workdir / f"{tag}.vhost.sock"
        self.qmp2_socket = workdir / f"{tag}.qmp2.sock"  # a second monitor, for other tools
        self.backend_qmp = workdir / f"{tag}.qmp-be.sock"  # the back-end process's monitor
        self.qemu: QemuProcess | None = None
        self.reader: VtdRegisterReader | None = None
        self._qmp_ready = asyncio.Event()
        self.backend: VhostUserBlkBackend | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.summary: dict[str, Any] = {}
        if backend == "inproc":
            self.backend = VhostUserBlkBackend(
                opts.disk, self.vhost_socket, translate="walk", regs=self._read_regs
            )
        self._serve: asyncio.Task[None] | None = None
        self._ram: GuestMemory | None = None
        self._ram_fd = -1

    async def _read_regs(self) -> VtdRegs:
        async with asyncio.timeout(60):
            await self._qmp_ready.wait()
        assert self.reader is not None
        return VtdRegs(gsts=await self.reader.gsts(), rtaddr=await self.reader.rtaddr())

    @property
    def qmp(self) -> Qmp:
        assert self.qemu is not None
        return self.qemu.require_qmp()

    @property
    def dirty_pages_marked(self) -> int:
        """Pages the back-end logged (a back-end process reports it when it stops)."""
        if self.backend is not None:
            return self.backend.dirty.marked
        return int(self.summary.get("dirty_pages_marked", 0))

    @property
    def dirty_logging(self) -> tuple[int, int]:
        """(logs QEMU mapped, times it turned logging on) for this back-end."""
        if self.backend is not None:
            return self.backend.dirty.logs_mapped, self.backend.dirty.enables
        s = self.summary
        return int(s.get("dirty_logs_mapped", 0)), int(s.get("dirty_log_enables", 0))

    async def _start_backend(self) -> None:
        if self.backend is not None:
            await self.backend.start()
            self._serve = asyncio.create_task(self.backend.serve_forever())
            return
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            BACKEND_MAIN,
            "--socket",
            str(self.vhost_socket),
            "--disk",
            str(self.opts.disk),
            "--qmp",
            str(self.backend_qmp),
            "--sid",
            hex(DEVICE_RID),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(60.0):
            line = await read_line(self.proc.stdout)
        if line.strip() != b"READY":
            raise RuntimeError(f"vhost-user-blk back-end did not start: {line!r}")

    async def start(self, *, incoming: bool = False, paused: bool = False) -> BlkVm:
        """``incoming``: a migration destination (``-incoming defer``); ``paused``: ``-S``
        (the destination of a PASID DMA migration runs only once vioasid restored it)."""
        o = self.opts
        self.serial_path.write_bytes(b"")
        extra = ["-qmp", f"unix:{self.qmp2_socket},server=on,wait=off"]
        if paused:
            extra.append("-S")
        if self.backend is None:
            extra += ["-qmp", f"unix:{self.backend_qmp},server=on,wait=off"]
        spec = VmSpec(
            name=f"{o.name}-{self.tag}",
            memory_mib=o.memory_mib,
            accel=o.accel,
            iommu=o.iommu,
            devices=(
                VhostUserBlk(socket=self.vhost_socket, id=DEVICE_ID, addr=DEVICE_ADDR),
                *self.extra_devices,
            ),
            kernel=o.kernel,
            initrd=o.initrd,
            append=o.append,
            ram_path=self.ram_path,
            serial_file=self.serial_path,
            incoming_defer=incoming,
            extra_args=tuple(extra),
            qemu_binary=o.qemu.path if o.qemu else None,
            qemu_features=o.qemu.features if o.qemu else None,
        )
        try:
            await self._start_backend()
            self.qemu = await QemuProcess.start(spec)
            pci = await self.qmp.find_pci(DEVICE_ID)
            if pci.rid != DEVICE_RID:
                raise RuntimeError(f"vhost-user-blk device is {pci.bdf}, expected {DEVICE_ADDR}")
            if self.backend is not None:
                self.backend.set_sid(pci.rid)
                self.reader = VtdRegisterReader(self.qmp)
                self._qmp_ready.set()
        except BaseException:
            await self.close()
            raise
        return self

    def ram(self) -> GuestMemory:
        """The guest's RAM, mapped read-write (file offset == guest-physical address)."""
        if self._ram is None:
            self._ram_fd = os.open(self.ram_path, os.O_RDWR)
            mem = GuestMemory()
            mem.add_fd(self._ram_fd, 0, os.fstat(self._ram_fd).st_size, 0, name=self.tag)
            self._ram = mem
        return self._ram

    def ram_region(self) -> MemoryRegion:
        """The RAM as one daemon memory region (the fd is this object's; the daemon dups)."""
        self.ram()
        return MemoryRegion(self._ram_fd, gpa=0, size=os.fstat(self._ram_fd).st_size)

    async def _stop_backend(self) -> None:
        if self.backend is not None:
            await self.backend.close()
            if self._serve is not None:
                self._serve.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._serve
                self._serve = None
            return
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        try:
            async with asyncio.timeout(10.0):
                out, _ = await p.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            out, _ = await p.communicate()
        for raw in reversed((out or b"").splitlines()):
            with contextlib.suppress(ValueError):
                doc = json.loads(raw)
                if isinstance(doc, dict):
                    self.summary = doc
                    break

    async def close(self) -> None:
        if self.qemu is not None:
            with contextlib.suppress(Exception):
                await self.qemu.close()
        await self._stop_backend()
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        if self._ram_fd >= 0:
            os.close(self._ram_fd)
            self._ram_fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.ram_path.unlink()


class SerialChain:
    """The guest console across hosts: serial files read in order, as one stream."""

    def __init__(self) -> None:
        self.report = GuestReport()
        self.files: list[Path] = []
        self._pos = 0
        self._buf = b""
        self.lines: list[str] = []
        self.markers: list[Marker] = []
        self.passed_per_file: list[int] = []  # passed test results printed on each host

    def add(self, path: Path) -> None:
        """The guest continues on the host whose serial file is ``path`` (the previous one has
        nothing more to say: its guest was stopped at switch-over)."""
        self.poll()
        self.files.append(path)
        self.passed_per_file.append(0)
        self._pos = 0

    def poll(self) -> list[Marker]:
        """Read what arrived; the markers of the complete lines."""
        if not self.files:
            return []
        try:
            with open(self.files[-1], "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        self._buf += data
        *complete, self._buf = self._buf.split(b"\n")
        out: list[Marker] = []
        for raw in complete:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append(text)
            mk = self.report.feed(text)
            if mk is not None:
                out.append(mk)
                self.markers.append(mk)
                if mk.kind == "VIOASID-TEST" and mk.fields.get("result") == "pass":
                    self.passed_per_file[-1] += 1
        return out

    async def wait(
        self, kind: str, timeout: float, predicate: Callable[[Marker], bool] | None = None
    ) -> Marker:
        """Poll until a new marker of ``kind`` (optionally ``predicate(marker)``) arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for mk in self.poll():
                if mk.kind == kind and (predicate is None or predicate(mk)):
                    return mk
            if loop.time() >= deadline:
                raise TimeoutError(f"no {kind} on the guest console within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    def tail(self, n: int = 20) -> list[str]:
        return self.lines[-n:]


@contextlib.asynccontextmanager
async def workdir() -> AsyncIterator[Path]:
    """A temporary directory for sockets, host files and serial logs (removed after)."""
    d = Path(tempfile.mkdtemp(prefix="vioasid-mig-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def with_append(opts: VmOptions, extra: str) -> VmOptions:
    return dataclasses.replace(opts, append=f"{opts.append} {extra}".strip())


__all__ = [
    "BlkVm",
    "Daemon",
    "SerialChain",
    "VmOptions",
    "host_toml",
]
