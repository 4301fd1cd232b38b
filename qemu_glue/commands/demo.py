"""``vioasid demo``: boot the test guest on a disk vioasid serves, translating every DMA itself.

Builds (or reuses) the test image, starts the vhost-user-blk back-end, boots the guest (TCG by
default) behind intel-iommu in scalable mode with ``iommu.strict=1``, runs the guest disk tests,
checks the backing file, and prints a summary (or one JSON object with ``--json``).

With QEMU 11.1 (vfio-user-pci) the guest also gets one PASID DMA function of each type
(dedicated, mdev, translating, enqcmd; docs/pasid-dma.md): its ``vioasid_dma.ko`` binds its own
vPASIDs, runs copy/fill/compare jobs with random data, provokes the expected faults (a write to a
read-only mapping, an unmapped IOVA, a PASID after unbind), and the summary prints the
vPASID -> pPASID table as vioasid saw it (``--json``: ``pasid``). Exit 0 only if every guest
test passed, the backing file holds what the guest wrote, (cross-check) no translation
disagreed with QEMU's, and every PASID check passed with the host agreeing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu_glue.commands import demo_migrate, demo_seed
from qemu_glue.commands.options import add_guest_options, add_switch, pin_option, qemu_choice
from qemu_glue.pasid_dma import PasidDmaRig, parse_dma_device
from qemu_glue.pasid_guest import (
    ALL_TYPES,
    PasidCollector,
    PasidGuestRun,
    parse_pasid_line,
    pasid_iommu,
)
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import BlkGuest, BlkRunResult, GuestOptions, run_guest_tests
from vioasid.commands.common import UsageError
from vioasid.model.faults import bdf_str


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
    elif line.startswith("VIOASID-PASID-TEST "):
        got = parse_pasid_line(line)
        if got is not None:
            f = got[1]
            extra = f" (fault pasid={f['fault_pasid']})" if "fault_pasid" in f else ""
            progress(f"guest PASID check {f.get('name', '?')}: {f.get('result', '?')}{extra}")


async def _demo(
    args: argparse.Namespace,
) -> tuple[BlkRunResult, dict[str, Any], PasidGuestRun | None]:
    from images.build import ensure_image
    from qemu_glue.qemu.accel import choose_accel

    t0 = time.monotonic()
    qemu = qemu_choice(args)
    pin_option(args)
    progress(f"QEMU {qemu.version} ({qemu.source}: {qemu.path})")
    progress("preparing the test guest image")
    img = await asyncio.to_thread(ensure_image, progress)
    choice = await choose_accel(args.accel, kernel=img.kernel, initrd=img.initrd)
    progress(f"accel {choice.accel} ({choice.reason})")
    mode = IommuMode(args.iommu)
    pasid = args.pasid
    if pasid is None:
        pasid = qemu.features.vfio_user and mode.scalable
        if not pasid:
            progress("no PASID part: it needs QEMU 11.1 (vfio-user-pci) and a scalable IOMMU")
    elif pasid and not qemu.features.vfio_user:
        raise UsageError(f"--pasid needs vfio-user-pci (QEMU 11.1); {qemu.path} is {qemu.version}")
    elif pasid and not mode.scalable:
        raise UsageError("--pasid needs a scalable-mode IOMMU (--iommu scalable-fs|ss)")
    async with contextlib.AsyncExitStack() as stack:
        rig = col = None
        if pasid:
            sock = Path(args.status_socket) if args.status_socket else None
            rig = PasidDmaRig(
                [parse_dma_device(t) for t in ALL_TYPES], memory_mib=512, status_socket=sock
            )
            await stack.enter_async_context(rig)
            col = PasidCollector(str(mode), list(ALL_TYPES))
        result = await _run_demo_guest(args, img, choice, qemu, mode, rig, col)
        pasid_run = await col.finish(rig) if col is not None and rig is not None else None
    extra = {
        "image": img.key,
        "kernel": img.kernel_version,
        "accel_choice": choice.to_json(),
        "qemu": qemu.to_json(),
        "wall_seconds": round(time.monotonic() - t0, 3),
    }
    return result, extra, pasid_run


async def _run_demo_guest(
    args: argparse.Namespace,
    img: Any,
    choice: Any,
    qemu: Any,
    mode: IommuMode,
    rig: PasidDmaRig | None,
    col: PasidCollector | None,
) -> BlkRunResult:
    from images.guest import patterns

    with tempfile.TemporaryDirectory(prefix="vioasid-demo-") as tmp:
        disk = patterns.make_disk(Path(tmp) / "disk.raw")
        opts = GuestOptions(
            kernel=img.kernel,
            initrd=img.initrd,
            append=kernel_cmdline(mode, strict=True, tests=["pasid", "all"] if rig else None),
            disk=disk,
            iommu=pasid_iommu(mode)
            if rig
            else IommuSpec(mode=mode, caching_mode=args.caching_mode),
            extra_devices=rig.devices() if rig else (),
            ram_path=rig.ram_path if rig else None,
            accel=choice.accel,
            translate=args.translate,
            cross_check=args.cross_check,
            echo=sys.stderr if args.console else False,
            follow_iq=args.follow_iq,
            pin=args.pin,
            qemu=qemu,
        )
        progress(
            f"booting: vhost-user-blk-pci,iommu_platform=on behind intel-iommu ({mode}), "
            f"translate={args.translate}, cross-check={'on' if args.cross_check else 'off'}"
        )
        if rig is not None:
            progress(
                "and one PASID DMA function of each type over vfio-user: "
                + ", ".join(f"{p.arg.type.word} at {bdf_str(p.guest_rid)}" for p in rig.placed)
            )

        def on_line(line: str) -> None:
            _guest_progress(line)
            if col is not None:
                col.feed(line)

        def on_start(g: BlkGuest) -> None:
            if rig is not None:
                rig.set_registers(g.regs)

        return await run_guest_tests(opts, timeout=args.timeout, on_line=on_line, on_start=on_start)


def pasid_json(run: PasidGuestRun) -> dict[str, Any]:
    """The ``pasid`` part of ``vioasid demo --json``."""
    j = run.to_json()
    table = {(b["device"], b["type"], b["vpasid"], b["ppasid"], b["tag"]) for b in j["bindings"]}
    return {
        "ok": j["ok"],
        "bindings": [
            {"device": d, "type": t, "vpasid": x, "ppasid": p, "tag": g}
            for d, t, x, p, g in sorted(table)
        ],
        "jobs": j["jobs"],
        "faults_expected": j["faults_expected"],
        "faults_unexpected": j["faults_unexpected"],
        "guest_checks": j["guest_tests"],
        "failures": j["failures"],
        "refusals": len(j["refusals"]),
        "host_errors": j["host_errors"],
        "invariants": j["invariants"],
    }


def _print_pasid(run: PasidGuestRun) -> None:
    j = pasid_json(run)
    print()
    print("PASID DMA functions: the guest's own vPASIDs as vioasid bound them (pPASID, wire tag)")
    rows = [("device", "type", "vPASID", "pPASID", "tag")]
    seen: dict[tuple[str, int], tuple[str, int, int]] = {}
    for b in j["bindings"]:
        seen.setdefault((b["device"], b["vpasid"]), (b["type"], b["ppasid"], b["tag"]))
    shown = 0
    per_dev: dict[str, int] = {}
    for (dev, x), (t, p, g) in sorted(seen.items()):
        if per_dev.get(dev, 0) < 4:  # the first few of each function
            rows.append((dev, t, str(x), str(p), str(g)))
            per_dev[dev] = per_dev.get(dev, 0) + 1
            shown += 1
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if len(seen) > shown:
        print(f"  ... {len(seen) - shown} more (see --json)")
    print(
        f"guest PASID checks  {j['guest_checks']['passed']} passed, "
        f"{j['guest_checks']['failed']} failed"
    )
    print(
        f"jobs                {j['jobs']['ok']} ok, {j['jobs']['failed']} failed (expected faults)"
    )
    print(
        f"faults              {j['faults_expected']} provoked by the guest, all seen by vioasid "
        f"with the guest's vPASID; {j['faults_unexpected']} unexpected"
        if not j["host_errors"]
        else f"faults              guest/host disagree: {j['host_errors'][:3]}"
    )
    for f in j["failures"]:
        print(f"FAILED PASID check {f.get('name')}: {f.get('detail')}")


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


def run(args: argparse.Namespace) -> int:
    quiet_qmp_logs()
    if args.pin != "off" and (args.migrate or args.seed):
        raise UsageError(
            f"--pin {args.pin} places one guest's threads; --migrate and --seed run several "
            "guests at once (leave --pin off)"
        )
    if args.migrate:  # live migration between two hosts: qemu_glue/commands/demo_migrate.py
        return demo_migrate.run(args)
    if args.seed:  # the seed's systems on real guests: qemu_glue/commands/demo_seed.py
        return demo_seed.run(args)
    res, extra, pasid_run = asyncio.run(_demo(args))
    ok = res.ok and (pasid_run is None or pasid_run.ok)
    if args.json:
        out = res.to_json()
        out.update(extra)
        if pasid_run is not None:
            out["pasid"] = pasid_json(pasid_run)
            out["ok"] = ok
        print(json.dumps(out))
    else:
        _print_human(res, extra)
        if pasid_run is not None:
            _print_pasid(pasid_run)
            print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid demo`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_guest_options(p, cross_check=True)
    p.add_argument("--console", action="store_true", help="show the guest console on stderr")
    add_switch(
        p,
        "--pasid",
        None,
        "also one PASID DMA function of each type over vfio-user, driven by the guest's "
        "vioasid_dma.ko (default: on when the QEMU has vfio-user-pci, i.e. 11.1)",
    )
    p.add_argument("--timeout", type=float, default=420.0, help="seconds (default 420)")
    demo_migrate.add_arguments(p)
    demo_seed.add_arguments(p)
