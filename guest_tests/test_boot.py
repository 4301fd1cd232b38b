"""Boot the real test guest under TCG with QEMU's built-in virtio-blk behind intel-iommu.

Asserts every guest disk test passed, that the backing file holds exactly the pattern the guest
wrote, and (through QMP ``xp``) that the vIOMMU runs in the requested translation mode.
Boot figures are printed (``-s`` shows them); no timed assertions.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from guest_tests.specs import image_vm
from images.build import GuestImage
from images.guest import patterns
from qemu_glue.guest_runner import watch_guest
from qemu_glue.qemu.process import launch
from qemu_glue.qemu.vmspec import IommuMode, VirtioBlk, VmSpec, kernel_cmdline
from qemu_glue.qemu.vtd_regs import VtdRegisterReader, VtdRegisters

pytestmark = pytest.mark.guest
BOOT_TIMEOUT_S = 240.0


def _spec(image: GuestImage, disk: Path, mode: IommuMode, *, loop: bool = False) -> VmSpec:
    cmdline = kernel_cmdline(mode, strict=True, loop=loop)
    return image_vm(image, f"boot-{mode}", mode, cmdline, VirtioBlk(disk))


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(IommuMode))
async def test_guest_disk_tests_pass(image: GuestImage, tmp_path: Path, mode: IommuMode) -> None:
    disk = patterns.make_disk(tmp_path / "disk.raw")
    regs: list[VtdRegisters] = []
    async with launch(_spec(image, disk, mode)) as vm:
        init_seen = asyncio.ensure_future(vm.wait_console("VIOASID-INIT", BOOT_TIMEOUT_S))
        run_task = asyncio.ensure_future(watch_guest(vm, BOOT_TIMEOUT_S))
        await init_seen  # the kernel has set up DMA remapping before it runs /init
        regs.append(await VtdRegisterReader(vm.require_qmp()).snapshot())
        run = await run_task
    print(
        f"\n[{mode}] boot-to-/init {run.init_s:.2f}s, boot-to-tests-done "
        f"{run.tests_done_s:.2f}s, exit {run.exit_s:.2f}s; guest uptime at /init "
        f"{run.report.init_uptime_s}s"
    )
    assert not run.timed_out, "\n".join(line.text for line in vm.console[-30:])
    assert run.report.errors == []
    failures = [(r.name, r.detail) for r in run.report.results if not r.passed]
    assert failures == []
    assert run.report.passed == len(patterns.TESTS)
    assert run.report.done == [(0, len(patterns.TESTS), 0)]
    assert run.returncode == 0
    assert patterns.check_disk(disk) == []
    (r,) = regs
    assert r.translation_enabled and r.root_table_set and r.root_table != 0
    assert r.scalable == mode.scalable


@pytest.mark.asyncio
async def test_guest_loop_mode_stops_on_request(image: GuestImage, tmp_path: Path) -> None:
    disk = patterns.make_disk(tmp_path / "disk.raw")
    spec = _spec(image, disk, IommuMode.SCALABLE_SS, loop=True)
    async with launch(spec) as vm:
        await vm.wait_console(r"VIOASID-TESTS-DONE gen=1 ", BOOT_TIMEOUT_S)
        patterns.request_stop(disk)
        run = await watch_guest(vm, BOOT_TIMEOUT_S)
    assert not run.timed_out and run.report.stopped
    assert run.report.failed == 0 and len(run.report.done) >= 2
    last = run.report.done[-1][0]
    assert [g for g, _, _ in run.report.done] == list(range(last + 1))
    assert patterns.check_disk(disk, gen=last) == []
