"""``vioasid migrate``: live-migrate a running QEMU VM and its vPASID state to another host.

The source QEMU runs; the destination QEMU was started with ``-incoming defer`` and the same
devices. Both QMP sockets are given. With ``--vm NAME`` the VM's vPASID state moves too: the
source daemon (``--src-daemon``) exports it, the destination daemon (``--dst-daemon``) imports
it into the destination QEMU's RAM (``--dst-ram``, its memory-backend file) re-allocating every
pPASID. A refused import cancels the migration: the source VM resumes unchanged.

The destination daemon gives the imported VM to this command's connection: after printing the
result the command stays until the destination QEMU exits (``--no-hold``: release it at once).
Exit status 0 when the migration completed, 1 when it was refused or failed, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from qemu_glue.commands.options import add_switch
from qemu_glue.migration.live import (
    MigrationError,
    MigrationResult,
    Reserve,
    VpasidHandover,
    migrate,
)
from qemu_glue.qemu.qmp import Qmp, QmpError
from vioasid.client import Client, ClientError, MemoryRegion
from vioasid.commands.common import UsageError
from vioasid.formats import pasid_dma
from vioasid.model.faults import parse_bdf
from vioasid.model.memory import GuestMemory


def _parse_map(items: list[str]) -> dict[str | int, str | int]:
    out: dict[str | int, str | int] = {}
    for item in items:
        rid, sep, fn = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            out[parse_bdf(rid)] = parse_bdf(fn)
        except ValueError:
            raise UsageError(
                f"--map wants GUEST_RID=HOST_FUNCTION (00:10.0=3a:00.0), not {item!r}"
            ) from None
    return out


def _parse_reserve(text: str) -> tuple[int, int]:
    base, sep, size = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return int(base, 0), int(size, 0)
    except ValueError:
        raise UsageError(f"--reserve wants BASE:SIZE (0x400000:0x800000), not {text!r}") from None


def _map_file(path: str) -> tuple[GuestMemory, int]:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    mem = GuestMemory()
    mem.add_fd(fd, 0, os.fstat(fd).st_size, 0, name=path)
    return mem, fd


async def _hold(dst: Qmp) -> None:
    """Until the destination QEMU goes away (its QMP stops answering)."""
    while True:
        try:
            await dst.query_status()
        except QmpError:
            return
        await asyncio.sleep(1.0)


def _check_args(args: argparse.Namespace) -> None:
    """Usage errors before anything is connected."""
    if args.vm and not (args.src_daemon and args.dst_daemon and args.dst_ram):
        raise UsageError("--vm needs --src-daemon, --dst-daemon and --dst-ram")
    if (args.src_daemon or args.dst_daemon or args.dst_ram) and not args.vm:
        raise UsageError("--src-daemon/--dst-daemon/--dst-ram need --vm NAME")
    if args.reserve:
        _parse_reserve(args.reserve)
        if not args.src_ram:
            raise UsageError("--reserve needs --src-ram (the source's RAM file)")
    _parse_map(args.map)
    if not args.uri.startswith(("unix:", "tcp:", "fd:", "exec:", "file:", "rdma:", "vsock:")):
        raise UsageError(f"--uri {args.uri!r} is not a QEMU migration URI (unix:PATH, tcp:...)")


async def _run_async(args: argparse.Namespace) -> tuple[MigrationResult, bool]:
    try:
        src = await Qmp.connect(args.src_qmp, timeout=5.0)
        dst = await Qmp.connect(args.dst_qmp, timeout=5.0)
    except QmpError as exc:
        raise UsageError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(src.close)
        stack.push_async_callback(dst.close)
        await _refuse_pasid_functions(src)
        handover = None
        if args.vm:
            if not (args.src_daemon and args.dst_daemon and args.dst_ram):
                raise UsageError("--vm needs --src-daemon, --dst-daemon and --dst-ram")
            try:
                sc = await Client.connect(args.src_daemon, timeout=5.0)
                stack.push_async_callback(sc.close)
                dc = await Client.connect(args.dst_daemon, timeout=5.0)
                stack.push_async_callback(dc.close)
                src_vm = await sc.open_vm(args.vm)
            except (ClientError, OSError) as exc:
                raise UsageError(f"daemon: {exc}") from None
            dmem, dfd = _map_file(args.dst_ram)
            stack.callback(os.close, dfd)
            stack.callback(dmem.close)
            reserve = None
            if args.reserve:
                if not args.src_ram:
                    raise UsageError("--reserve needs --src-ram (the source's RAM file)")
                base, size = _parse_reserve(args.reserve)
                smem, sfd = _map_file(args.src_ram)
                stack.callback(os.close, sfd)
                stack.callback(smem.close)
                reserve = Reserve(smem, dmem, base, size)
            handover = VpasidHandover(
                src=sc,
                src_vm=src_vm,
                name=args.vm,
                dst=dc,
                dst_regions=[MemoryRegion(dfd, 0, os.fstat(dfd).st_size)],
                functions=_parse_map(args.map) or None,
                reserve=reserve,
                precopy=not args.no_precopy,
                release_source=False,  # the source VM's owner releases it when its QEMU goes
            )
        try:
            res = await migrate(
                src,
                dst,
                args.uri,
                vpasid=handover,
                timeout=args.timeout,
                check_iommu=not args.no_iommu_check,
            )
        except (MigrationError, QmpError, ClientError) as exc:
            raise UsageError(str(exc)) from None
        _print(res, args.json)
        if res.ok and handover is not None and args.hold:
            await _hold(dst)
        return res, res.ok


async def _refuse_pasid_functions(src: Qmp) -> None:
    """A VM with vioasid PASID DMA functions (vfio-user): their state is in the ``vioasid
    boot`` process serving them, out of this command's reach (and that process's guard would
    cancel the migration): refuse before anything starts."""
    try:
        fns = [d.bdf for d in await src.query_pci() if d.vendor_id == pasid_dma.VENDOR_ID]
    except QmpError:
        return
    if fns:
        raise UsageError(
            f"the source VM has vioasid PASID DMA functions ({', '.join(fns)}); vioasid migrate "
            "cannot reach their state in the process serving them: use vioasid demo --migrate "
            "(qemu_glue.migration.pasid.migrate_pasid) for those VMs"
        )


def _print(res: MigrationResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.to_json()), flush=True)
        return
    rows: list[tuple[str, Any]] = [
        ("status", res.status + (f" ({res.error})" if res.error else "")),
        ("downtime", f"{res.downtime_ms} ms (QEMU), {res.observed_downtime_ms or 0:.1f} ms seen"),
        ("total", f"{res.total_ms} ms"),
    ]
    if res.vpasid_switchover_ms is not None:
        pre = "pre-copied" if res.precopied else "imported at switch-over"
        stopped = f"{res.vpasid_switchover_ms:.2f} ms while stopped ({pre})"
        rows.append(("vPASID hand-over", stopped))
        same = f"{res.vpasids_carried} (identical: {res.vpasids_identical})"
        rows.append(("vPASIDs carried", same))
        rows.append(("pPASIDs re-allocated", str(res.ppasids_changed)))
    rows.append(("source", str(res.source_status)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from qemu_glue.commands.demo import quiet_qmp_logs

    quiet_qmp_logs()
    _check_args(args)
    _res, ok = asyncio.run(_run_async(args))
    return 0 if ok else 1


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid migrate`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("--src-qmp", required=True, metavar="PATH", help="source QEMU's QMP socket")
    p.add_argument(
        "--dst-qmp", required=True, metavar="PATH", help="destination QEMU's QMP (-incoming defer)"
    )
    p.add_argument("--uri", required=True, help="migration URI, e.g. unix:/run/mig.sock")
    p.add_argument("--vm", metavar="NAME", help="the VM's name on the daemons (moves its vPASIDs)")
    p.add_argument("--src-daemon", metavar="SOCK", help="source host's vioasid daemon")
    p.add_argument("--dst-daemon", metavar="SOCK", help="destination host's vioasid daemon")
    p.add_argument("--dst-ram", metavar="FILE", help="destination QEMU's memory-backend file")
    p.add_argument("--src-ram", metavar="FILE", help="source QEMU's memory-backend file")
    p.add_argument(
        "--reserve",
        metavar="BASE:SIZE",
        help="guest RAM range holding the vPASID tables (pre-copy once it arrived intact)",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="RID=FUNCTION",
        help="guest device -> destination host function (default: same function RIDs)",
    )
    p.add_argument("--no-precopy", action="store_true", help="import only at switch-over")
    p.add_argument("--no-iommu-check", action="store_true", help="skip the vIOMMU comparison")
    add_switch(
        p, "--hold", True, "keep the imported VM until the destination QEMU exits (default on)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
