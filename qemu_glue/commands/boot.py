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

from vioasid.commands.common import UsageError, add_qemu_option, qemu_choice

from ..vhost_user.guest import GuestOptions, vhost_blk_guest
from ..vmspec import IommuMode, IommuSpec, kernel_cmdline
from .demo import quiet_qmp_logs

DEFAULT_DISK_MIB = 64


def _say(msg: str) -> None:
    print(f"vioasid boot: {msg}", file=sys.stderr, flush=True)


async def _boot(args: argparse.Namespace, disk: Path, trace: IO[str] | None) -> dict[str, Any]:
    from ..accel import choose_accel

    qemu = qemu_choice(args)
    choice = await choose_accel(args.accel, kernel=args.kernel, initrd=args.initrd)
    mode = IommuMode(args.iommu)
    append = args.append if args.append is not None else kernel_cmdline(mode, strict=True)
    opts = GuestOptions(
        kernel=args.kernel,
        initrd=args.initrd,
        append=append,
        disk=disk,
        iommu=IommuSpec(mode=mode, caching_mode=args.caching_mode),
        accel=choice.accel,
        memory_mib=args.memory,
        translate=args.translate,
        cross_check=args.cross_check,
        trace=trace,
        echo=sys.stdout,
        stdin_inherit=sys.stdin.isatty(),
        name="vioasid-boot",
        follow_iq=args.follow_iq,
        qemu=qemu,
    )
    _say(f"accel {choice.accel}; disk {disk}; iommu {mode}; translate {args.translate}")
    async with vhost_blk_guest(opts) as g:
        _say(
            f"vhost-user-blk device at {g.backend.sid >> 8:02x}:{(g.backend.sid >> 3) & 31:02x}."
            f"{g.backend.sid & 7} (guest RID 0x{g.backend.sid:04x})"
        )
        rc = await g.vm.wait(args.timeout)
        summary = g.backend.summary()
    summary["qemu_exit"] = rc
    summary["qemu"] = qemu.to_json()
    return summary


def _run(args: argparse.Namespace) -> int:
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
    _say("summary " + json.dumps({k: v for k, v in summary.items() if k not in ("fault_log",)}))
    return 0 if summary.get("qemu_exit") == 0 else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "boot",
        help="boot your kernel/initramfs with the vioasid-served disk, console on the terminal",
        description=__doc__,
    )
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
    p.add_argument("--accel", default="tcg", choices=["auto", "tcg", "kvm"])
    add_qemu_option(p)
    p.add_argument("--iommu", default="scalable-fs", choices=[m.value for m in IommuMode])
    p.add_argument("--translate", default="walk", choices=["walk", "qemu"])
    p.add_argument(
        "--cross-check",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="also ask QEMU for every translation and count agreement",
    )
    p.add_argument("--caching-mode", action="store_true", help="intel-iommu caching-mode=on")
    p.add_argument(
        "--follow-iq",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="also decode the guest's invalidation queue (QMP reads; default on)",
    )
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: wait for power-off)",
    )
    p.set_defaults(func=_run)
