"""``vioasid demo --migrate [--count N]``: the migration demo behind the ``demo`` command.

With QEMU 11.1 (or ``--pasid``): the guest's own vPASIDs on four PASID DMA functions move
A → B → A ... while its driver runs random-data jobs on them (:mod:`qemu_glue.migration.
pasid_demo`); each ``migrations`` entry has ``bindings`` ([{device, type, vpasid,
ppasid_before, ppasid_after}]) and the object ``pasid`` ({jobs: {ok, failed}}, ...). On QEMU
10.0 (or ``--no-pasid``): the guest runs its disk tests continuously while it is live-migrated
``N`` times between two hosts (two vioasid daemons); see :mod:`qemu_glue.migration.demo`.
The summary shows, per migration, the downtime, the vPASID hand-over's share of it,
vPASIDs carried and pPASIDs before and after, then the guest tests passed and the
backing-file check. ``--json``: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from qemu_glue.commands.options import qemu_choice
from qemu_glue.migration.attempts import DemoResultBase
from qemu_glue.migration.demo import FAILURE_MODES, DemoOptions, DemoResult, run_migration_demo
from qemu_glue.migration.pasid_demo import FAILURE_MODES as PASID_FAILURE_MODES
from qemu_glue.migration.pasid_demo import PasidDemoOptions, PasidDemoResult, run_pasid_migration
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.qemu.vmspec import Accel, IommuMode


class _Result(Protocol):
    @property
    def ok(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


T = TypeVar("T", bound=_Result)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's migration options (called by ``demo.configure``)."""
    g = p.add_argument_group("live migration (--migrate)")
    g.add_argument(
        "--migrate",
        action="store_true",
        help="migrate the guest between two hosts while its disk tests run",
    )
    g.add_argument("--count", type=int, default=1, metavar="N", help="migrations (default 1)")
    g.add_argument(
        "--vpasids",
        type=int,
        default=16,
        metavar="N",
        help="vPASIDs bound on each of the 3 virtual devices (default 16)",
    )
    g.add_argument(
        "--refuse-first",
        action="append",
        default=[],
        choices=tuple(dict.fromkeys(FAILURE_MODES + PASID_FAILURE_MODES)),
        help="first show a refused migration (daemon demo: corrupt state stream / conflict; "
        "PASID functions: exhausted / conflict / dst-dies / dst-dies-late / import-aborted on "
        "the destination)",
    )


def _table(t: dict[str, dict[str, int]], limit: int = 4) -> str:
    parts = []
    for rid, m in t.items():
        items = list(m.items())
        shown = ", ".join(f"{x}→{pp}" for x, pp in items[:limit])
        more = f", … (+{len(items) - limit})" if len(items) > limit else ""
        parts.append(f"{rid}: {shown}{more}")
    return "; ".join(parts)


def _migrations(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Print the refused attempts, then each migration's first line, yielding the ones that went
    through (the caller prints their details right under it)."""
    for a in doc["refused_attempts"]:
        print(f"refused {a['source']} -> {a['destination']} ({a['forced']}): {a['error']}")
        print(f"  source afterwards: {a['source_status']}; problems: {a['checks'] or 'none'}")
    for i, m in enumerate(doc["migrations"], 1):
        print(f"migration {i}: {m['source']} -> {m['destination']}: {m['status']}")
        if m["ok"]:
            yield m
        else:
            print(f"  error: {m['error']}")


def _print_human(res: DemoResult) -> None:
    doc = res.to_json()
    for m in _migrations(doc):
        pre = "pre-copied while running" if m["precopied"] else "imported at switch-over"
        print(
            f"  downtime {m['downtime_ms']} ms (QEMU; {m['observed_downtime_ms']} ms STOP→RESUME),"
            f" total {m['total_ms']} ms"
        )
        print(
            f"  vPASID state: {m['vpasid_switchover_ms']} ms of the downtime ({pre}; "
            f"pre-copy took {m['vpasid_precopy_ms']} ms), {m['stream_bytes']} bytes"
        )
        print(
            f"  vPASIDs carried {m['vpasids_carried']} (identical: {m['vpasids_identical']}), "
            f"pPASIDs re-allocated {m['ppasids_changed']}, DMA checks ok {m['dma_ok']}"
        )
        print(f"  pPASIDs before: {_table(m['ppasids_before'])}")
        print(f"  pPASIDs after:  {_table(m['ppasids_after'])}")
        for c in m["checks"]:
            print(f"  PROBLEM: {c}")
    g = doc["guest_tests"]
    print(
        f"guest tests: {g['passed']} passed, {g['failed']} failed over {g['generations']} "
        f"passes ({g['after_migration']} passed after the last migration)"
    )
    print(f"backing file: {'matches' if res.disk_ok else 'MISMATCH'} {res.disk_mismatches or ''}")
    _print_end(res, res.ok, res.report.errors)


def _print_pasid(res: PasidDemoResult) -> None:
    doc = res.to_json()
    for m in _migrations(doc):
        print(
            f"  downtime {m['downtime_ms']} ms (QEMU), vioasid {m['vioasid_downtime_ms']} ms "
            f"(switch-over {m['vioasid_switchover_ms']} ms, resume {m['vioasid_resume_ms']} ms;"
            f" pre-copied: {m['precopied']}), {m['dma_pages']} DMA-written pages carried"
        )
        for b in m["bindings"]:
            print(
                f"  {b['device']} {b['type']:<11} vPASID {b['vpasid']}: pPASID "
                f"{b['ppasid_before']} -> {b['ppasid_after']}"
            )
        for c in m["checks"]:
            print(f"  PROBLEM: {c}")
    j = doc["pasid"]["jobs"]
    print(f"guest PASID jobs: {j['ok']} verified, {j['failed']} failed "
          f"({doc['pasid']['rounds']} rounds)")  # fmt: skip
    _print_end(res, res.ok)


def _print_end(res: DemoResultBase[Any], ok: bool, guest_errors: Sequence[str] = ()) -> None:
    """The run's problems, the console's last lines if it failed, PASS or FAIL."""
    for p in res.problems:
        print(f"problem: {p}")
    for e in guest_errors:
        print(f"guest error: {e}")
    if not ok and res.console_tail:
        print("last console lines:")
        for line in res.console_tail[-15:]:
            print(f"  | {line}")
    print("PASS" if ok else "FAIL")


def _progress(msg: str) -> None:
    print(f"vioasid demo: {msg}", file=sys.stderr, flush=True)


def _failures(args: argparse.Namespace, modes: tuple[str, ...], which: str) -> tuple[str, ...]:
    """``--refuse-first`` values, each one of ``modes`` (UsageError naming them otherwise)."""
    from vioasid.commands.common import UsageError

    bad = [f for f in args.refuse_first if f not in modes]
    if bad:
        raise UsageError(f"--refuse-first {bad[0]}: {which} use one of " + ", ".join(modes))
    return tuple(args.refuse_first)


def _report(
    args: argparse.Namespace, res: T, qemu: QemuChoice | None, human: Callable[[T], None]
) -> int:
    """The result as one JSON object (``--json``, with the QEMU used) or as text; 0 if it held."""
    if args.json:
        out: dict[str, Any] = res.to_json()
        if qemu is not None:
            out["qemu"] = qemu.to_json()
        print(json.dumps(out))
    else:
        human(res)
    return 0 if res.ok else 1


def _run_pasid(args: argparse.Namespace) -> int:
    """``vioasid demo --migrate`` with PASID DMA functions (QEMU 11.1)."""
    opts = PasidDemoOptions(
        count=args.count,
        iommu=IommuMode(args.iommu),
        accel=Accel.KVM if args.accel == "kvm" else Accel.TCG,
        failures=_failures(args, PASID_FAILURE_MODES, "with PASID functions"),
        timeout=args.timeout,
        qemu=qemu_choice(args),
    )
    res = asyncio.run(run_pasid_migration(opts, _progress))
    return _report(args, res, opts.qemu, _print_pasid)


def _wants_pasid(args: argparse.Namespace) -> bool:
    """--pasid (default: when the QEMU has vfio-user-pci); refused clearly on QEMU 10.0."""
    from vioasid.commands.common import UsageError

    q = qemu_choice(args)
    want = getattr(args, "pasid", None)
    if want and not q.features.vfio_user:
        raise UsageError(
            f"--migrate --pasid needs QEMU 11.1 (vfio-user-pci); {q.path} is {q.features.version}"
        )
    return bool(q.features.vfio_user) if want is None else bool(want)


def run(args: argparse.Namespace) -> int:
    """``vioasid demo --migrate``: exit 0 only if everything held."""
    if args.count < 1:
        from vioasid.commands.common import UsageError

        raise UsageError("--count must be at least 1")
    if _wants_pasid(args):
        return _run_pasid(args)
    opts = DemoOptions(
        count=args.count,
        iommu=IommuMode(args.iommu),
        accel=Accel.KVM if args.accel == "kvm" else Accel.TCG,
        vpasids=args.vpasids,
        failures=_failures(args, FAILURE_MODES, "without PASID functions"),
        timeout=args.timeout,
        qemu=qemu_choice(args),
    )
    res = asyncio.run(run_migration_demo(opts, _progress))
    return _report(args, res, opts.qemu, _print_human)
