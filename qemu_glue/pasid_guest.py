"""A real guest runs its PASID DMA checks on vioasid's functions; the host checks its own view.

:func:`run_pasid_guest` boots the test image (its ``/init`` loads ``vioasid_dma.ko`` and, with
``vioasid.tests=pasid``, runs ``guest_tests/pasid_tests.sh``) with one PASID DMA function per
requested type (:class:`~qemu_glue.pasid_dma.PasidDmaRig`) next to the vioasid disk, follows
the console's ``VIOASID-PASID-*`` lines, and cross-checks them against what vioasid saw:

* every ``VIOASID-PASID-BIND dev=dmaN pasid=P`` has a successful host bind of vPASID P on
  function N (functions are numbered in PCI order, the rig's slot order);
* every fault the guest reports (``fault_pasid``, ``fault_addr``, ``fault_write``,
  ``fault_reason``) is one vioasid recorded on that function, with the guest's vPASID;
* the engine's invariants hold at the end and no binding outlives the guest.

Used by ``guest_tests/test_pasid_dma.py`` and the PASID part of ``vioasid demo``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from images.guest.markers import parse_prefixed

from .pasid_dma import PasidDmaRig, parse_dma_device
from .qemu.binary import QemuChoice
from .qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from .vhost_user.guest import GuestOptions, vhost_blk_guest

log = logging.getLogger(__name__)

PREFIX = "VIOASID-PASID-"
ALL_TYPES = ("dedicated", "mdev", "translating", "enqcmd")


def parse_pasid_line(text: str) -> tuple[str, dict[str, str]] | None:
    """``VIOASID-PASID-KIND k=v ... detail=free text`` -> (KIND, fields), else None."""
    return parse_prefixed(text, PREFIX)


@dataclass
class PasidGuestRun:
    """What the guest printed and what vioasid saw."""

    mode: str
    types: list[str]
    tests: list[dict[str, str]] = field(default_factory=list)
    binds: list[tuple[int, int]] = field(default_factory=list)  # (function index, vPASID)
    done: dict[str, str] | None = None
    devices: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    host_errors: list[str] = field(default_factory=list)  # guest/host disagreements
    invariants: list[str] = field(default_factory=list)
    bound_at_exit: int = 0
    qemu_exit: int | None = None
    timed_out: bool = False
    console_tail: list[str] = field(default_factory=list)
    bench: list[dict[str, str]] = field(default_factory=list)  # VIOASID-PASID-BENCH lines
    bench_done: dict[str, str] | None = None

    @property
    def passed(self) -> int:
        return sum(t.get("result") == "pass" for t in self.tests)

    @property
    def failed(self) -> list[dict[str, str]]:
        return [t for t in self.tests if t.get("result") not in ("pass", "skip")]

    @property
    def ok(self) -> bool:
        return (
            self.done is not None
            and not self.failed
            and self.passed > 0
            and not self.host_errors
            and not self.invariants
            and self.bound_at_exit == 0
            and not self.timed_out
        )

    def guest_faults(self) -> list[dict[str, str]]:
        return [t for t in self.tests if "fault_pasid" in t]

    def to_json(self) -> dict[str, Any]:
        h = self.host
        return {
            "ok": self.ok,
            "mode": self.mode,
            "types": self.types,
            "guest_tests": {"passed": self.passed, "failed": len(self.failed)},
            "failures": self.failed,
            "bindings": [e for e in h.get("bind_log", []) if e.get("status") == "ok"
                         and e.get("cmd") == "bind"],
            "refusals": [e for e in h.get("bind_log", []) if e.get("status") != "ok"],
            "jobs": h.get("jobs", {"ok": 0, "failed": 0}),
            "faults_expected": len(self.guest_faults()),
            "faults_host": len(h.get("faults", [])),
            "faults_unexpected": len(self.host_errors),
            "host_errors": self.host_errors,
            "invariants": self.invariants,
            "functions": h.get("functions", []),
            "qemu_exit": self.qemu_exit,
        }  # fmt: skip


class PasidCollector:
    """Follows the console's ``VIOASID-PASID-*`` lines into a :class:`PasidGuestRun`."""

    def __init__(self, mode: str, types: list[str]) -> None:
        self.run = PasidGuestRun(mode, types)

    def feed(self, text: str) -> None:
        got = parse_pasid_line(text)
        if got is None:
            return
        kind, fields = got
        run = self.run
        if kind == "TEST":
            run.tests.append(fields)
        elif kind == "BIND":
            dev = fields.get("dev", "")
            if dev.startswith("dma") and dev[3:].isdigit() and fields.get("pasid", "").isdigit():
                run.binds.append((int(dev[3:]), int(fields["pasid"])))
        elif kind == "DONE":
            run.done = fields
        elif kind == "DEVICES":
            run.devices = fields.get("types", "")
        elif kind == "BENCH":
            run.bench.append(fields)
        elif kind == "BENCH-DONE":
            run.bench_done = fields

    async def finish(self, rig: PasidDmaRig) -> PasidGuestRun:
        """After QEMU exited: wait for the servers to see it, then compare with the host."""
        import asyncio

        for s in rig.servers:
            for _ in range(200):
                if not s.connected.is_set():
                    break
                await asyncio.sleep(0.01)
        run = self.run
        run.host = rig.summary()
        run.invariants = rig.host.check_invariants()
        run.bound_at_exit = sum(1 for _ in rig.host.bindings())
        run.host_errors = cross_check(run, rig)
        return run


def pasid_iommu(mode: IommuMode) -> IommuSpec:
    """intel-iommu for PASID DMA functions: caching-mode=on (vfio-user-pci), pasid-bits=20."""
    return IommuSpec(mode=mode, caching_mode=True, pasid_bits=20)


async def run_pasid_guest(
    kernel: Path,
    initrd: Path,
    *,
    mode: IommuMode = IommuMode.SCALABLE_FS,
    types: tuple[str, ...] = ALL_TYPES,
    checks: str = "all",
    qemu: QemuChoice | None = None,
    timeout: float = 420.0,
    echo: bool | TextIO = False,
    tests: tuple[str, ...] = ("pasid",),
) -> PasidGuestRun:
    """Boot, run the guest's PASID checks on one function per type, cross-check the host.
    ``tests=("pasid-bench",)`` runs the guest-measured figures (images/guest/pasid_bench.sh)
    on the first function instead."""
    from qemu_glue.guest_runner import watch_guest

    col = PasidCollector(str(mode), list(types))
    rig = PasidDmaRig([parse_dma_device(t) for t in types], memory_mib=512)
    extra = f"vioasid.pasid={checks}" if checks != "all" else ""
    append = kernel_cmdline(mode, strict=True, tests=list(tests), extra=extra)
    with tempfile.TemporaryDirectory(prefix="vioasid-pasid-") as tmp:
        disk = Path(tmp) / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        async with rig:
            opts = GuestOptions(
                kernel=kernel,
                initrd=initrd,
                append=append,
                disk=disk,
                iommu=pasid_iommu(mode),
                echo=echo,
                name=f"pasid-{mode}",
                qemu=qemu,
                extra_devices=rig.devices(),
                ram_path=rig.ram_path,
                follow_iq=False,
            )
            async with vhost_blk_guest(opts) as g:
                rig.set_registers(g.regs)
                g.vm.on_console(col.feed)
                result = await watch_guest(g.vm, timeout)
                col.run.timed_out = result.timed_out
                col.run.qemu_exit = result.returncode
                col.run.console_tail = [line.text for line in g.vm.console[-30:]]
            return await col.finish(rig)


def cross_check(run: PasidGuestRun, rig: PasidDmaRig) -> list[str]:
    """Where the guest's report and vioasid's own record disagree (empty: they agree)."""
    errs: list[str] = []
    fns = rig.functions
    ok_binds: list[set[int]] = [set() for _ in fns]
    for f_i, f in enumerate(fns):
        for e in f.bind_log:
            if e["cmd"] == "bind" and e["status"] == "ok":
                ok_binds[f_i].add(int(e["vpasid"]))
    for f_i, p in run.binds:
        if f_i >= len(fns):
            errs.append(f"guest bound PASID {p} on dma{f_i}, which vioasid does not serve")
        elif p not in ok_binds[f_i]:
            errs.append(f"guest bound PASID {p} on dma{f_i}; vioasid has no such bind")
    for t in run.guest_faults():
        dev = t.get("dev", "")
        f_i = int(dev[3:]) if dev.startswith("dma") and dev[3:].isdigit() else -1
        if not 0 <= f_i < len(fns):
            errs.append(f"fault on unknown device {dev}")
            continue
        want = (int(t["fault_pasid"]), int(t["fault_addr"], 16), t["fault_write"] == "1",
                int(t["fault_reason"], 16))  # fmt: skip
        seen = {(x.pasid, x.addr, x.write, int(x.reason)) for x in fns[f_i].faults}
        if want not in seen:
            errs.append(f"guest fault {t} on {dev}: vioasid recorded no such fault")
    return errs
