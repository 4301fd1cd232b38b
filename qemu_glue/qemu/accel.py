"""Choose the accelerator: ``auto`` probes KVM with a short boot and falls back to TCG.

On these machines /dev/kvm exists but is a nested software hypervisor on which guests die with
"KVM internal error" (shared/design/qemu-notes.md), so existence of /dev/kvm proves nothing: the
probe boots the test guest (``vioasid.tests=none``) under KVM and needs its /init marker within a
few seconds. ``tcg`` and ``kvm`` force the choice without probing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu_glue.qemu.process import QemuError, launch
from qemu_glue.qemu.vmspec import Accel, IommuSpec, VmSpec, kernel_cmdline

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 6.0
INIT_MARKER = r"VIOASID-INIT"
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    requested: str  # auto | tcg | kvm
    reason: str
    probe_s: float | None = None  # how long the KVM probe took (auto only)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "accel": str(self.accel)}


_cache: dict[tuple[str, str], tuple[bool, str, float]] = {}


async def probe_kvm(
    kernel: Path | None, initrd: Path | None, timeout: float = PROBE_TIMEOUT_S
) -> tuple[bool, str]:
    """(works, why): boot ``kernel``/``initrd`` under KVM and wait for /init (cached per run).

    Without a kernel only QEMU's KVM start-up is checked (a weaker probe).
    """
    if not KVM_DEVICE.exists():
        return False, "/dev/kvm does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible (group kvm?)"
    key = (str(kernel), str(initrd))
    if key in _cache:
        ok, why, _ = _cache[key]
        return ok, why
    t0 = time.monotonic()
    spec = VmSpec(
        name="kvm-probe",
        accel=Accel.KVM,
        memory_mib=256,
        iommu=IommuSpec(),
        kernel=kernel,
        initrd=initrd,
        append=kernel_cmdline(None, tests=[]) if kernel else None,
    )
    ok, why = False, ""
    try:
        async with launch(spec, qmp_timeout=timeout) as vm:
            if kernel is None:
                status = await vm.require_qmp().query_status()
                ok, why = status == "running", f"QEMU under KVM is {status}"
            else:
                await vm.wait_console(INIT_MARKER, timeout)
                ok, why = True, f"guest reached /init under KVM in {vm.elapsed():.1f}s"
            if "KVM internal error" in vm.stderr:
                ok, why = False, "KVM internal error"
    except QemuError as exc:
        first = str(exc).strip().splitlines()
        ok, why = False, first[-1] if first else "KVM probe failed"
    _cache[key] = (ok, why, time.monotonic() - t0)
    log.info("KVM probe: %s (%s)", ok, why)
    return ok, why


async def choose_accel(
    requested: str = "auto",
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> AccelChoice:
    """Resolve ``auto`` | ``tcg`` | ``kvm`` to an :class:`~qemu_glue.qemu.vmspec.Accel`."""
    if requested == "tcg":
        return AccelChoice(Accel.TCG, requested, "forced")
    if requested == "kvm":
        return AccelChoice(Accel.KVM, requested, "forced")
    if requested != "auto":
        raise ValueError(f"accel must be auto, tcg or kvm, not {requested!r}")
    t0 = time.monotonic()
    ok, why = await probe_kvm(kernel, initrd, timeout)
    spent = time.monotonic() - t0
    if ok:
        return AccelChoice(Accel.KVM, requested, why, spent)
    return AccelChoice(Accel.TCG, requested, f"KVM unusable ({why}); using TCG", spent)
