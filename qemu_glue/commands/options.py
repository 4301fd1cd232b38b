"""The options every command that starts a guest shares (``boot``, ``demo``), and the QEMU choice.

One place for ``--qemu``, ``--accel``, ``--iommu``, ``--translate``, ``--cross-check``,
``--caching-mode``, ``--follow-iq`` and ``--pin``, so the commands cannot drift apart
(defaults that differ, ``--cross-check`` on for the demo and off for ``boot``, are parameters).
"""

from __future__ import annotations

import argparse
import os

from vioasid.commands.common import UsageError

from ..qemu.binary import QemuChoice, QemuNotFound, choose
from ..qemu.placement import PIN_CHOICES_HELP, PinError, check_pin, plan
from ..qemu.vmspec import IommuMode


def add_qemu_option(p: argparse.ArgumentParser) -> None:
    """``--qemu PATH``: every command that starts QEMU takes it (then $VIOASID_QEMU, ...)."""
    p.add_argument(
        "--qemu",
        metavar="PATH",
        default=None,
        help="the qemu-system-x86_64 to start (default: $VIOASID_QEMU, then the QEMU 11.1 of "
        "'vioasid qemu install', then qemu-system-x86_64 >= 10.0 on PATH; "
        "see 'vioasid qemu path')",
    )


def qemu_choice(args: argparse.Namespace) -> QemuChoice:
    """The QEMU a command will start (``--qemu``, then ``choose()``'s order); UsageError else."""
    try:
        return choose(getattr(args, "qemu", None))
    except QemuNotFound as exc:
        raise UsageError(str(exc)) from None


def add_switch(p: argparse.ArgumentParser, flag: str, default: bool | None, help: str) -> None:
    """An on/off option: ``--flag`` and ``--no-flag``."""
    p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help)


def add_guest_options(p: argparse.ArgumentParser, *, cross_check: bool) -> None:
    """QEMU, accelerator, vIOMMU and translation options of a command that boots a guest."""
    add_qemu_option(p)
    p.add_argument(
        "--accel",
        default="tcg",
        choices=["auto", "tcg", "kvm"],
        help="accelerator (default tcg; auto probes KVM with a short boot and falls back)",
    )
    p.add_argument(
        "--iommu",
        default="scalable-fs",
        choices=[m.value for m in IommuMode],
        help="intel-iommu mode (default scalable-fs: scalable mode with first-stage "
        "translation, QEMU's fsts / x-flts)",
    )
    p.add_argument(
        "--translate",
        default="walk",
        choices=["walk", "qemu"],
        help="walk: vioasid walks the guest's tables (default); qemu: ask QEMU",
    )
    add_switch(
        p,
        "--cross-check",
        cross_check,
        "also ask QEMU for every translation and count agreement "
        f"(default {'on' if cross_check else 'off'})",
    )
    p.add_argument("--caching-mode", action="store_true", help="intel-iommu caching-mode=on")
    add_switch(
        p, "--follow-iq", True, "also decode the guest's invalidation queue (QMP reads; default on)"
    )
    p.add_argument(
        "--pin",
        default="off",
        type=_pin_arg,
        metavar="CPUS",
        help=f"host CPU placement ({PIN_CHOICES_HELP}; default off): QEMU's vCPU threads and "
        "vioasid's IOTLB reader thread on these CPUs, QEMU's other threads and vioasid's data "
        "path on the rest; auto takes the first allowed CPU. Strict-mode guests (one vhost-user "
        "IOTLB round trip per unmap) run up to 1.5x faster (docs/performance.md)",
    )


def _pin_arg(text: str) -> str:
    try:
        return check_pin(text)
    except PinError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pin_option(args: argparse.Namespace) -> str:
    """``--pin``, checked against the CPUs this process may use (UsageError, one line)."""
    pin = str(getattr(args, "pin", "off"))
    try:
        plan(pin, os.sched_getaffinity(0))
    except PinError as exc:
        raise UsageError(str(exc)) from None
    return pin
