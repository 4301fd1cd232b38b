"""``vioasid boot``: your own kernel and initramfs on the vioasid-served disk, console here.

For guest driver development: the same ``vhost-user-blk-pci,iommu_platform=on`` device as
``vioasid demo`` (every DMA address translated by vioasid's own walk of the guest's VT-d
tables), the serial console on this terminal. ``--trace FILE`` writes one JSON line per
translation (bdf, pasid, iova, address, perm, cache hit), per invalidation (QEMU-forwarded and
decoded guest invalidation-queue descriptors) and per fault. A summary goes to stderr at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from qemu_glue.commands.demo import quiet_qmp_logs
from qemu_glue.commands.options import add_guest_options, pin_option, qemu_choice
from qemu_glue.pasid_dma import DmaDeviceError, PasidDmaRig, parse_dma_device
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import GuestOptions, vhost_blk_guest
from vioasid.commands.common import UsageError
from vioasid.model.faults import bdf_str

DEFAULT_DISK_MIB = 64


def _say(msg: str) -> None:
    print(f"vioasid boot: {msg}", file=sys.stderr, flush=True)


def dma_rig(args: argparse.Namespace) -> PasidDmaRig | None:
    """The PASID DMA functions of ``--dma-device`` (None without any); UsageError on misuse."""
    if not args.dma_device:
        if args.host is not None:
            raise UsageError("--host describes the host functions of --dma-device; give one")
        if args.status_socket is not None:
            raise UsageError("--status-socket serves the functions of --dma-device; give one")
        return None
    try:
        specs = [parse_dma_device(t) for t in args.dma_device]
        sock = Path(args.status_socket) if args.status_socket else None
        return PasidDmaRig(specs, host_file=args.host, memory_mib=args.memory, status_socket=sock)
    except DmaDeviceError as e:
        raise UsageError(str(e)) from None


def dma_iommu(mode: IommuMode, caching_mode: bool, rig: PasidDmaRig | None) -> IommuSpec:
    """intel-iommu for the guest: vfio-user-pci needs caching-mode=on, PASIDs pasid-bits."""
    if rig is None:
        return IommuSpec(mode=mode, caching_mode=caching_mode)
    if not mode.scalable:
        raise UsageError("--dma-device needs a scalable-mode IOMMU (--iommu scalable-fs|ss)")
    return IommuSpec(mode=mode, caching_mode=True, pasid_bits=20)


async def _boot(args: argparse.Namespace, disk: Path, trace: IO[str] | None) -> dict[str, Any]:
    from qemu_glue.qemu.accel import choose_accel

    qemu = qemu_choice(args)
    pin_option(args)
    rig = dma_rig(args)
    mode = IommuMode(args.iommu)
    iommu = dma_iommu(mode, args.caching_mode, rig)
    if rig is not None and not qemu.features.vfio_user:
        raise UsageError(
            f"--dma-device needs vfio-user-pci (QEMU 11.1); {qemu.path} is {qemu.version}: "
            "see 'vioasid qemu install'"
        )
    choice = await choose_accel(args.accel, kernel=args.kernel, initrd=args.initrd)
    append = args.append if args.append is not None else kernel_cmdline(mode, strict=True)
    if rig is None:
        return await _boot_with(args, disk, trace, qemu, choice.accel, mode, iommu, append, None)
    async with rig:
        return await _boot_with(args, disk, trace, qemu, choice.accel, mode, iommu, append, rig)


async def _boot_with(
    args: argparse.Namespace,
    disk: Path,
    trace: IO[str] | None,
    qemu: Any,
    accel: Any,
    mode: IommuMode,
    iommu: IommuSpec,
    append: str,
    rig: PasidDmaRig | None,
) -> dict[str, Any]:
    opts = GuestOptions(
        kernel=args.kernel,
        initrd=args.initrd,
        append=append,
        disk=disk,
        iommu=iommu,
        accel=accel,
        memory_mib=args.memory,
        translate=args.translate,
        cross_check=args.cross_check,
        trace=trace,
        echo=sys.stdout,
        stdin_inherit=sys.stdin.isatty(),
        name="vioasid-boot",
        follow_iq=args.follow_iq,
        pin=args.pin,
        qemu=qemu,
        extra_devices=rig.devices() if rig is not None else (),
        ram_path=rig.ram_path if rig is not None else None,
    )
    _say(f"accel {accel}; disk {disk}; iommu {mode}; translate {args.translate}")
    async with vhost_blk_guest(opts) as g:
        if rig is not None:
            rig.set_registers(g.regs)
            for f in rig.placed:
                _say(
                    f"PASID DMA function {f.arg.type.word} at {bdf_str(f.guest_rid)} "
                    f"(host function {bdf_str(f.function)}, {f.assign})"
                )
        _say(
            f"vhost-user-blk device at {g.backend.sid >> 8:02x}:{(g.backend.sid >> 3) & 31:02x}."
            f"{g.backend.sid & 7} (guest RID 0x{g.backend.sid:04x})"
        )
        rc = await g.vm.wait(args.timeout)
        summary = g.backend.summary()
    summary["qemu_exit"] = rc
    summary["qemu"] = qemu.to_json()
    if rig is not None:
        summary["pasid"] = rig.summary()
    return summary


def run(args: argparse.Namespace) -> int:
    quiet_qmp_logs()
    for p, what in ((args.kernel, "--kernel"), (args.initrd, "--initrd")):
        if p is not None and not p.is_file():
            raise UsageError(f"{what} {p}: no such file")
    if args.disk is not None and not args.disk.is_file():
        raise UsageError(f"--disk {args.disk}: no such file (create it: truncate -s 64M FILE)")
    with contextlib.ExitStack() as stack:
        if args.disk is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vioasid-boot-"))
            disk = Path(tmp) / "disk.raw"
            with open(disk, "wb") as f:
                f.truncate(DEFAULT_DISK_MIB << 20)
        else:
            disk = args.disk
        trace = None
        if args.trace is not None:
            trace = stack.enter_context(open(args.trace, "w", buffering=1 << 16))
        try:
            summary = asyncio.run(_boot(args, disk, trace))
        except TimeoutError:
            _say(f"the guest did not power off within {args.timeout:.0f}s")
            return 1
    short = {k: v for k, v in summary.items() if k not in ("fault_log",)}
    if args.json:
        pasid = summary.get("pasid") or {}
        line = {
            "ok": summary.get("qemu_exit") == 0,
            "qemu_exit": summary.get("qemu_exit"),
            "bindings": pasid.get("bind_log", []),
            "bound_at_exit": pasid.get("bindings", []),
            "jobs": pasid.get("jobs", {"ok": 0, "failed": 0}),
            "faults": pasid.get("faults", []),
            "invalidations": summary.get("invalidations", 0),
            "functions": pasid.get("functions", []),
            "disk": short,
        }
        print(json.dumps(line), flush=True)
    else:
        _say("summary " + json.dumps(short))
    return 0 if summary.get("qemu_exit") == 0 else 1


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid boot`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("--kernel", type=Path, required=True, help="kernel (vmlinux or bzImage)")
    p.add_argument("--initrd", type=Path, default=None, help="initramfs")
    p.add_argument(
        "--append",
        default=None,
        help="kernel command line (default: console=ttyS0 intel_iommu=on,sm_on iommu.strict=1 ...)",
    )
    p.add_argument(
        "--disk",
        type=Path,
        default=None,
        help=f"raw disk image served as /dev/vda (default: a fresh "
        f"{DEFAULT_DISK_MIB} MiB scratch disk)",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="JSON lines: every translation, invalidation and fault",
    )
    add_guest_options(p, cross_check=False)
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    p.add_argument(
        "--dma-device",
        action="append",
        default=[],
        metavar="TYPE[,function=RID]",
        help="add a PASID DMA function over vfio-user (QEMU 11.1; repeatable); TYPE is "
        "dedicated, translating, mdev or enqcmd (docs/pasid-dma.md); function= picks the "
        "host function (default: one per type)",
    )
    p.add_argument(
        "--host",
        default=None,
        metavar="FILE.toml",
        help="the host functions of --dma-device: a [[host]] table as in scenario files",
    )
    p.add_argument(
        "--status-socket",
        default=None,
        metavar="PATH",
        help="serve the --dma-device functions' engine on PATH with the daemon's server while "
        "the guest runs: 'vioasid status --socket PATH' shows their bindings live",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary line at the end (bindings, jobs, faults, invalidations)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: wait for power-off)",
    )
