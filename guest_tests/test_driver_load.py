"""The guest driver in a real guest with no PASID DMA function: /init loads vioasid_dma.ko, the
driver registers and finds nothing, and unloading and reloading it is clean (no oops, no
warning). The PASID checks with real functions run on the vfio-user device's guest tests."""

from __future__ import annotations

import re

import pytest

from guest_tests.specs import image_vm
from images.build import DRIVER_MODULE, GuestImage
from qemu_glue.guest_runner import watch_guest
from qemu_glue.qemu.process import launch
from qemu_glue.qemu.vmspec import IommuMode, kernel_cmdline

pytestmark = pytest.mark.guest
BOOT_TIMEOUT_S = 240.0
KERNEL_TROUBLE = re.compile(r"BUG:|Oops|WARNING:|Call Trace:|general protection|refcount_t")


@pytest.mark.asyncio
async def test_driver_loads_and_reloads_without_a_device(image: GuestImage) -> None:
    mode = IommuMode.SCALABLE_FS
    cmdline = kernel_cmdline(mode, tests=["pasid"], extra="vioasid.pasid=reload loglevel=7")
    spec = image_vm(image, "driver-load", mode, cmdline)
    async with launch(spec) as vm:
        run = await watch_guest(vm, BOOT_TIMEOUT_S)
    console = [line.text for line in vm.console]
    assert not run.timed_out, "\n".join(console[-30:])
    rep = run.report
    assert rep.errors == []
    assert DRIVER_MODULE in image.modules
    assert rep.modules[-1] == DRIVER_MODULE, rep.modules
    assert rep.pasid_devices == {}
    reload = rep.pasid_result("reload")
    assert reload is not None and reload.passed, reload
    assert rep.pasid_done == (1, 0, 0)
    assert [ln for ln in console if KERNEL_TROUBLE.search(ln)] == []
    assert run.returncode == 0
