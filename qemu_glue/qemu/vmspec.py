"""A typed description of a QEMU VM (q35 + intel-iommu) and its translation into a QEMU argv.

Pure data and string building: nothing here starts a process or touches a file. Guest RAM is
always a ``memory-backend-file,share=on`` (by default in /dev/shm) so vioasid can map it; virtio
devices get ``disable-legacy=on`` and ``iommu_platform=on`` (QEMU's words) so their DMA goes
through the vIOMMU. See shared/design/qemu-notes.md for the command line this mirrors.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu_glue.qemu.binary import QEMU_10_FEATURES, QemuFeatures

QEMU_BINARY = "qemu-system-x86_64"
DEFAULT_SHM_DIR = Path("/dev/shm")


class IommuMode(enum.StrEnum):
    """How the emulated intel-iommu presents itself to the guest."""

    SCALABLE_SS = "scalable-ss"  # scalable-mode=on (10.0: x-scalable-mode): second stage (PGTT=2)
    SCALABLE_FS = "scalable-fs"  # + fsts=on (10.0: x-flts), aw-bits=48: first stage (PGTT=1)
    LEGACY = "legacy"  # legacy (non-scalable) root/context tables

    @property
    def scalable(self) -> bool:
        return self is not IommuMode.LEGACY


class Accel(enum.StrEnum):
    """Resolved accelerator (``auto`` is resolved by :mod:`qemu_glue.qemu.accel` before argv)."""

    TCG = "tcg"
    KVM = "kvm"


@dataclass(frozen=True)
class IommuSpec:
    """``-device intel-iommu,...``."""

    mode: IommuMode = IommuMode.SCALABLE_SS
    caching_mode: bool = False
    intremap: bool = True
    aw_bits: int | None = None  # None: 48 for scalable-fs (required by x-flts), QEMU default else
    device_iotlb: bool = False
    pasid_bits: int | None = None  # pasid-bits=N (QEMU 11.1): PASID support for PCIe functions
    extra: tuple[tuple[str, str], ...] = ()  # more intel-iommu properties, e.g. (("pt", "on"),)

    def device_arg(self, features: QemuFeatures = QEMU_10_FEATURES) -> str:
        """The ``-device intel-iommu,...`` value in the property names ``features`` has.

        A property the QEMU lacks is a one-line :class:`~qemu_glue.qemu.binary.QemuNotFound`
        naming it and the version that has it (never a QEMU error mid-boot).
        """
        props = ["intel-iommu"]
        if self.intremap:
            props.append("intremap=on")
        if self.mode.scalable:
            scalable = features.scalable_prop
            features.require("intel-iommu scalable mode", scalable is not None, "10.0")
            props.append(f"{scalable}=on")
        if self.mode is IommuMode.SCALABLE_FS:
            fsts = features.fsts_prop
            features.require("intel-iommu first-stage translation (fsts)", fsts is not None, "10.0")
            props.append(f"{fsts}=on")
        aw = self.aw_bits
        if aw is None and self.mode is IommuMode.SCALABLE_FS:
            aw = 48
        if aw is not None:
            props.append(f"aw-bits={aw}")
        if self.caching_mode:
            props.append("caching-mode=on")
        if self.device_iotlb:
            props.append("device-iotlb=on")
        if self.pasid_bits is not None:
            features.require("intel-iommu pasid-bits", features.has_iommu("pasid-bits"), "11.1")
            props.append(f"pasid-bits={self.pasid_bits}")
        props.extend(f"{k}={v}" for k, v in self.extra)
        return ",".join(props)


@dataclass(frozen=True)
class VirtioBlk:
    """QEMU's built-in ``virtio-blk-pci`` on a drive file (the reference device)."""

    path: Path
    id: str = "disk0"
    format: str = "raw"
    readonly: bool = False
    iommu_platform: bool = True
    addr: str | None = None  # PCI slot on the root bus, e.g. "04.0"
    cache: str | None = None  # QEMU -drive cache= mode (None: QEMU's default, writeback)
    serial: str | None = None

    def args(self) -> list[str]:
        drive = [
            f"file={self.path}",
            f"format={self.format}",
            "if=none",
            f"id=drv-{self.id}",
        ]
        if self.readonly:
            drive.append("readonly=on")
        if self.cache:
            drive.append(f"cache={self.cache}")
        dev = ["virtio-blk-pci", f"id={self.id}", f"drive=drv-{self.id}", "disable-legacy=on"]
        dev.append(f"iommu_platform={'on' if self.iommu_platform else 'off'}")
        if self.addr:
            dev.append(f"addr={self.addr}")
        if self.serial:
            dev.append(f"serial={self.serial}")
        return ["-drive", ",".join(drive), "-device", ",".join(dev)]


@dataclass(frozen=True)
class VhostUserBlk:
    """``vhost-user-blk-pci`` whose back-end (vioasid) listens on ``socket``.

    QEMU connects to the socket as a client (the back-end must be listening before launch),
    unless ``server`` is true, in which case QEMU listens and waits for the back-end.
    """

    socket: Path
    id: str = "vublk0"
    num_queues: int = 1
    queue_size: int | None = None
    iommu_platform: bool = True
    ats: bool = False
    addr: str | None = None
    server: bool = False
    reconnect_s: int | None = None  # chardev reconnect= (client mode)

    def args(self) -> list[str]:
        chardev = ["socket", f"id=chr-{self.id}", f"path={self.socket}"]
        if self.server:
            chardev += ["server=on", "wait=on"]
        elif self.reconnect_s is not None:
            chardev.append(f"reconnect={self.reconnect_s}")
        dev = [
            "vhost-user-blk-pci",
            f"id={self.id}",
            f"chardev=chr-{self.id}",
            f"num-queues={self.num_queues}",
            "disable-legacy=on",
            f"iommu_platform={'on' if self.iommu_platform else 'off'}",
        ]
        if self.queue_size is not None:
            dev.append(f"queue-size={self.queue_size}")
        if self.ats:
            dev.append("ats=on")
        if self.addr:
            dev.append(f"addr={self.addr}")
        return ["-chardev", ",".join(chardev), "-device", ",".join(dev)]


@dataclass(frozen=True)
class RawArgs:
    """Escape hatch: arguments passed to QEMU as they are."""

    argv: tuple[str, ...]

    def args(self) -> list[str]:
        return list(self.argv)


@dataclass(frozen=True)
class VfioUserPci:
    """``vfio-user-pci`` (QEMU 11.1): a whole PCIe function served by vioasid on ``socket``.

    QEMU connects to the socket at device realize (the server must be listening before
    launch). Written in QEMU's JSON ``-device`` form (the socket is a SocketAddress). Behind
    intel-iommu QEMU needs ``caching-mode=on``. ``no_posted_writes`` sets QEMU's
    ``x-no-posted-writes=on``: every BAR write waits for the server's reply, so a doorbell's
    job is done before the guest's next instruction (docs/pasid-dma.md).
    """

    socket: Path
    id: str = "vfiouser0"
    bus: str = "pcie.0"
    addr: str | None = None  # slot on the root bus, e.g. "05.0"
    no_posted_writes: bool = True

    def args(self) -> list[str]:
        dev: dict[str, object] = {"driver": "vfio-user-pci", "id": self.id, "bus": self.bus}
        if self.addr:
            dev["addr"] = self.addr
        dev["socket"] = {"type": "unix", "path": str(self.socket)}
        if self.no_posted_writes:
            dev["x-no-posted-writes"] = True
        return ["-device", json.dumps(dev, separators=(",", ":"))]


Device = VirtioBlk | VhostUserBlk | VfioUserPci | RawArgs


def kernel_cmdline(
    mode: IommuMode | None = IommuMode.SCALABLE_SS,
    *,
    strict: bool = True,
    tests: Sequence[str] | None = None,
    loop: bool = False,
    extra: str = "",
) -> str:
    """The guest kernel command line the test guest expects.

    ``mode`` None leaves the IOMMU off in the guest. ``tests`` becomes ``vioasid.tests=a,b``
    (guest_tests/init reads it; None runs every test), ``loop`` sets ``vioasid.loop=1``.
    """
    # no_timer_check: on a loaded TCG host the guest's boot-time IO-APIC timer check can miss
    # ("timer doesn't work through Interrupt-remapped IO-APIC") and panic the guest.
    parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", "no_timer_check"]
    if mode is not None:
        parts.append("intel_iommu=on,sm_on" if mode.scalable else "intel_iommu=on,sm_off")
        parts.append(f"iommu.strict={1 if strict else 0}")
    if tests is not None:
        parts.append("vioasid.tests=" + (",".join(tests) if tests else "none"))
    if loop:
        parts.append("vioasid.loop=1")
    if extra:
        parts.append(extra)
    return " ".join(parts)


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to start one QEMU VM. ``argv()`` turns it into a command line.

    Paths left as None are filled by the launcher (:func:`qemu_glue.qemu.process.QemuProcess.start`)
    with per-VM temporary files it removes on exit.
    """

    name: str = "vioasid"
    memory_mib: int = 512
    smp: int = 1
    accel: Accel = Accel.TCG
    cpu: str | None = None  # None: "max" (TCG) / "host" (KVM)
    iommu: IommuSpec | None = field(default_factory=IommuSpec)
    devices: tuple[Device, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    ram_path: Path | None = None  # the shared memory-backend file (None: launcher picks /dev/shm)
    qmp_socket: Path | None = None  # None: launcher picks a temp path
    serial_file: Path | None = None  # None: the serial console is QEMU's stdout
    incoming_defer: bool = False  # -incoming defer (migration destination)
    trace_events: tuple[str, ...] = ()
    trace_file: Path | None = None
    no_reboot: bool = True
    qemu_binary: str | None = None  # None: the launcher picks one (qemu_glue.qemu.binary.choose)
    qemu_features: QemuFeatures | None = None  # None: the launcher probes qemu_binary
    extra_args: tuple[str, ...] = ()

    @property
    def default_cpu(self) -> str:
        return self.cpu or ("host" if self.accel is Accel.KVM else "max")

    def machine_arg(self) -> str:
        m = "q35,memory-backend=mem"
        if self.accel is Accel.KVM and self.iommu is not None and self.iommu.intremap:
            m += ",kernel-irqchip=split"  # KVM refuses intremap=on with the in-kernel IOAPIC
        return m

    def argv(self) -> list[str]:
        """The full command line (binary first). Requires ``ram_path`` and ``qmp_socket``."""
        if self.ram_path is None or self.qmp_socket is None:
            raise ValueError("VmSpec.argv needs ram_path and qmp_socket (the launcher fills them)")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("VmSpec: initrd given without a kernel")
        if self.append is not None and self.kernel is None:
            raise ValueError("VmSpec: append given without a kernel")
        mem = f"{self.memory_mib}M"
        features = self.qemu_features or QEMU_10_FEATURES
        argv = [
            self.qemu_binary or QEMU_BINARY,
            "-name",
            self.name,
            "-accel",
            str(self.accel),
            "-machine",
            self.machine_arg(),
            "-cpu",
            self.default_cpu,
            "-smp",
            str(self.smp),
            "-m",
            mem,
            "-object",
            f"memory-backend-file,id=mem,size={mem},mem-path={self.ram_path},share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-nic",
            "none",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-serial",
            f"file:{self.serial_file}" if self.serial_file else "stdio",
        ]
        if self.no_reboot:
            argv.append("-no-reboot")
        if self.iommu is not None:
            argv += ["-device", self.iommu.device_arg(features)]
        for dev in self.devices:
            argv += dev.args()
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        if self.append is not None:
            argv += ["-append", self.append]
        if self.incoming_defer:
            argv += ["-incoming", "defer"]
        for ev in self.trace_events:
            argv += ["-trace", f"enable={ev}"]
        if self.trace_events and self.trace_file is not None:
            # Debian's QEMU uses the "log" trace back-end, which ignores -trace file=:
            # trace output follows the log file set by -D.
            argv += ["-D", str(self.trace_file)]
        argv += list(self.extra_args)
        return argv
