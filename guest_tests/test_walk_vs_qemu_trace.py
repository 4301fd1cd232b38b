"""vioasid's walker against QEMU's own translations, in a real guest (issue 2, "Tests and proof").

Boots the test guest (TCG, intel-iommu scalable mode) with x-flts on (first stage, strict
invalidation) and off (second stage, lazy invalidation), QEMU tracing ``vtd_dmar_translate`` and
``vtd_inv_desc`` into a file. While the guest loops over its disk tests, the host repeatedly
pauses it (QMP ``stop``), reads RTADDR through QMP and walks every IOVA QEMU logged since the
previous pause in the guest's own tables, read from its memory-backend file
(:mod:`qemu_glue.trace_check`). A still-mapped IOVA must give QEMU's page; IOVAs torn down since
QEMU logged them count as stale, never as agreement.

The drive is throttled (4 MiB/s) so the guest spends its time waiting on DMA with the buffers
mapped: a pause then usually finds a request's pages still live (strict mode unmaps a buffer
about 1 ms after use otherwise, and the pauses would only ever see the virtqueue rings).
Counts are printed (``-s`` shows them); no timed assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from guest_tests.specs import image_vm
from images.build import GuestImage
from images.guest import patterns
from images.guest.markers import DONE
from qemu_glue.guest_runner import watch_guest
from qemu_glue.qemu.process import launch
from qemu_glue.qemu.vmspec import IommuMode, RawArgs, VirtioBlk, VmSpec, kernel_cmdline
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from qemu_glue.trace_check import CheckCounts, TraceChecker, check_paused, trace_args
from vioasid.model.cache import Caches
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker

pytestmark = pytest.mark.guest

BOOT_TIMEOUT_S = 240.0
EXIT_TIMEOUT_S = 120.0
CHECK_BUDGET_S = 90.0  # give up pausing after this long (the asserts then say why)
PAUSE_EVERY_S = 0.3
MIN_CHECKS = 12
MIN_UNIQUE_AGREE = 10  # distinct (device, IOVA, page) triples that must agree
THROTTLE_BPS = 4 << 20
GUEST_TESTS = ("multipage", "large", "parallel")
DISK_ID = "disk0"

EXPECTED_PGTT = {IommuMode.SCALABLE_FS: "first-stage", IommuMode.SCALABLE_SS: "second-stage"}


def throttled_disk(path: Path) -> RawArgs:
    """QEMU's virtio-blk (as :class:`VirtioBlk` builds it) on a bandwidth-throttled drive."""
    args = VirtioBlk(path, id=DISK_ID).args()
    i = args.index("-drive") + 1
    args[i] += f",throttling.bps-total={THROTTLE_BPS}"
    return RawArgs(tuple(args))


def _spec(image: GuestImage, disk: Path, trace: Path, mode: IommuMode, strict: bool) -> VmSpec:
    cmdline = kernel_cmdline(mode, strict=strict, tests=GUEST_TESTS, loop=True)
    disk_arg = throttled_disk(disk)
    return image_vm(image, f"trace-{mode}", mode, cmdline, disk_arg, extra_args=trace_args(trace))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "strict"),
    [(IommuMode.SCALABLE_FS, True), (IommuMode.SCALABLE_SS, False)],
    ids=["x-flts-on-strict", "x-flts-off-lazy"],
)
async def test_walk_agrees_with_qemu_trace(
    image: GuestImage, tmp_path: Path, mode: IommuMode, strict: bool
) -> None:
    disk = patterns.make_disk(tmp_path / "disk.raw")
    trace = tmp_path / "qemu-trace.log"
    total = CheckCounts()
    async with launch(_spec(image, disk, trace, mode, strict)) as vm:
        qmp = vm.require_qmp()
        await vm.wait_console("VIOASID-INIT", BOOT_TIMEOUT_S)
        regs = await VtdRegisterReader(qmp).snapshot()
        assert regs.translation_enabled and regs.scalable, regs
        rid = (await qmp.find_pci(DISK_ID)).rid
        assert vm.spec.ram_path is not None
        mem = GuestMemory.from_file(vm.spec.ram_path)
        try:
            checker = TraceChecker(trace, Walker(mem, haw=48, caches=Caches(enabled=False)))
            deadline = time.monotonic() + CHECK_BUDGET_S
            while time.monotonic() < deadline and vm.running:
                await asyncio.sleep(PAUSE_EVERY_S)
                rtaddr = await VtdRegisterReader(qmp).rtaddr()
                assert rtaddr == regs.rtaddr  # the guest keeps one root table
                total.merge(await check_paused(qmp, checker, rtaddr))
                generation_done = any(DONE in line.text for line in vm.console)
                if (
                    total.checks >= MIN_CHECKS
                    and generation_done
                    and total.unique_agree >= MIN_UNIQUE_AGREE
                ):
                    break
        finally:
            mem.close()
        patterns.request_stop(disk)
        run = await watch_guest(vm, EXIT_TIMEOUT_S)
    sids = {sid for sid, _, _ in total.agreeing}
    report = {"mode": str(mode), "strict": strict, **total.to_json()}
    print("\n" + json.dumps(report))
    with contextlib.suppress(OSError):
        (tmp_path / "counts.json").write_text(json.dumps(report))
    assert total.disagree == 0, json.dumps(total.to_json()["disagreements"], indent=1)
    assert total.unique_agree >= MIN_UNIQUE_AGREE, report
    assert total.agree >= MIN_UNIQUE_AGREE, report
    assert set(total.pgtt) == {EXPECTED_PGTT[mode]}, report
    assert sids == {rid}, f"translations from {sids}, the disk is {rid:#x}"
    assert not run.timed_out and run.report.stopped
    assert run.report.failed == 0 and run.report.errors == []
    assert run.report.done, "the guest never finished a pass of its disk tests"
