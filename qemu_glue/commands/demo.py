"""``vioasid demo``: boot the test guest on a disk vioasid serves, translating every DMA itself.

Builds (or reuses) the test image, starts the vhost-user-blk back-end, boots the guest (TCG by
default) behind intel-iommu in scalable mode with ``iommu.strict=1``, runs the guest disk tests,
checks the backing file, and prints a summary (or one JSON object with ``--json``). Exit 0 only
if every guest test passed, the backing file holds what the guest wrote and (cross-check) no
translation disagreed with QEMU's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu_glue.commands import demo_migrate
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import BlkRunResult, GuestOptions, run_guest_tests
from vioasid.commands.common import add_qemu_option, qemu_choice


def progress(msg: str) -> None:
    print(f"vioasid demo: {msg}", file=sys.stderr, flush=True)


def _guest_progress(line: str) -> None:
    """Show the guest's markers as progress (the full console with --console)."""
    if line.startswith("VIOASID-INIT"):
        progress("guest reached /init; running the disk tests")
    elif line.startswith("VIOASID-TEST "):
        fields = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        progress(f"guest test {fields.get('name', '?')}: {fields.get('result', '?')}")
    elif line.startswith("VIOASID-TESTS-DONE"):
        progress("guest tests done; powering off")


async def _demo(args: argparse.Namespace) -> tuple[BlkRunResult, dict[str, Any]]:
    from guest_tests import patterns
    from images.build import ensure_image
    from qemu_glue.qemu.accel import choose_accel

    t0 = time.monotonic()
    qemu = qemu_choice(args)
    progress(f"QEMU {qemu.version} ({qemu.source}: {qemu.path})")
    progress("preparing the test guest image")
    img = await asyncio.to_thread(ensure_image, progress)
    choice = await choose_accel(args.accel, kernel=img.kernel, initrd=img.initrd)
    progress(f"accel {choice.accel} ({choice.reason})")
    mode = IommuMode(args.iommu)
    with tempfile.TemporaryDirectory(prefix="vioasid-demo-") as tmp:
        disk = patterns.make_disk(Path(tmp) / "disk.raw")
        opts = GuestOptions(
            kernel=img.kernel,
            initrd=img.initrd,
            append=kernel_cmdline(mode, strict=True),
            disk=disk,
            iommu=IommuSpec(mode=mode, caching_mode=args.caching_mode),
            accel=choice.accel,
            translate=args.translate,
            cross_check=args.cross_check,
            echo=sys.stderr if args.console else False,
            follow_iq=args.follow_iq,
            qemu=qemu,
        )
        progress(
            f"booting: vhost-user-blk-pci,iommu_platform=on behind intel-iommu ({mode}), "
            f"translate={args.translate}, cross-check={'on' if args.cross_check else 'off'}"
        )
        result = await run_guest_tests(opts, timeout=args.timeout, on_line=_guest_progress)
    extra = {
        "image": img.key,
        "kernel": img.kernel_version,
        "accel_choice": choice.to_json(),
        "qemu": qemu.to_json(),
        "wall_seconds": round(time.monotonic() - t0, 3),
    }
    return result, extra


def _print_human(res: BlkRunResult, extra: dict[str, Any]) -> None:
    b = res.backend
    agree = b.get("qemu_agreement", {})
    assert isinstance(agree, dict)
    rows = [
        ("accel", res.accel),
        ("iommu", f"{res.iommu} (translate={res.translate})"),
        ("boot to /init", f"{res.init_s:.2f} s" if res.init_s else "-"),
        ("boot to tests done", f"{res.tests_done_s:.2f} s" if res.tests_done_s else "-"),
        ("guest tests", f"{res.passed} passed, {res.failed} failed"),
        ("backing file", "matches what the guest wrote" if res.disk_ok else "MISMATCH"),
        ("requests", str(b.get("requests"))),
        ("translations", str(b.get("translations"))),
        ("IOTLB hit rate", f"{100 * float(b.get('iotlb_hit_rate', 0.0)):.1f} %"),  # type: ignore[arg-type]
        (
            "invalidations seen",
            f"{b.get('invalidations')} from QEMU, "
            f"{b.get('iq_descriptors')} guest IQ descriptors decoded",
        ),
        ("faults", str(b.get("faults"))),
    ]
    if res.cross_check:
        rows.append(
            (
                "agreement with QEMU",
                f"{agree.get('agree', 0)} agree, {agree.get('disagree', 0)} disagree",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for f in res.failures:
        print(f"FAILED {f['name']}: {f['detail']}")
    for e in res.errors:
        print(f"guest error: {e}")
    if res.timed_out:
        print("the guest did not finish in time; last console lines:")
        for line in res.console_tail[-15:]:
            print(f"  | {line}")
    print("PASS" if res.ok else "FAIL")


def quiet_qmp_logs() -> None:
    """qemu.qmp logs an ERROR for every connection retry while QEMU starts: not for users."""
    qlog = logging.getLogger("qemu.qmp")
    if qlog.getEffectiveLevel() > logging.DEBUG:
        qlog.setLevel(logging.CRITICAL)


def _run(args: argparse.Namespace) -> int:
    quiet_qmp_logs()
    if args.migrate:  # live migration between two hosts: qemu_glue/commands/demo_migrate.py
        return demo_migrate.run(args)
    res, extra = asyncio.run(_demo(args))
    if args.json:
        out = res.to_json()
        out.update(extra)
        print(json.dumps(out))
    else:
        _print_human(res, extra)
    return 0 if res.ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="boot a guest whose disk vioasid serves, walking the guest's VT-d tables itself",
        description=__doc__,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_qemu_option(p)
    p.add_argument(
        "--accel",
        default="tcg",
        choices=["auto", "tcg", "kvm"],
        help="accelerator (default tcg; auto probes KVM and falls back)",
    )
    p.add_argument(
        "--iommu",
        default="scalable-fs",
        choices=[m.value for m in IommuMode],
        help="intel-iommu mode (default scalable-fs: first stage, x-flts=on)",
    )
    p.add_argument(
        "--cross-check",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="also ask QEMU for every translation and count agreement (default on)",
    )
    p.add_argument(
        "--translate",
        default="walk",
        choices=["walk", "qemu"],
        help="walk: vioasid walks the guest's tables (default); qemu: ask QEMU",
    )
    p.add_argument("--caching-mode", action="store_true", help="intel-iommu caching-mode=on")
    p.add_argument("--console", action="store_true", help="show the guest console on stderr")
    p.add_argument(
        "--follow-iq",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="also decode the guest's invalidation queue (QMP reads; default on)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    demo_migrate.add_arguments(p)
    p.set_defaults(func=_run)
