"""Real guests (TCG) whose disk is the vioasid vhost-user-blk back-end behind intel-iommu.

Every ring and buffer address is an IOVA that vioasid translates by walking the guest's own
VT-d tables; in cross-check mode QEMU is asked for the same IOVA through the IOTLB-miss path and
the answers must agree. One guest at a time; QEMU is always stopped (``launch`` cleans up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from images.build import GuestImage
from images.guest import patterns
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import BlkRunResult, GuestOptions, run_guest_tests
from vioasid.formats.fault import FaultReason

pytestmark = pytest.mark.guest
TIMEOUT_S = 300.0
BAD_IOVA = 0x5EAD_0000_0000  # canonical 48-bit address, never mapped by the guest for this device


async def _run(image: GuestImage, tmp_path: Path, mode: IommuMode, **kw: object) -> BlkRunResult:
    disk = patterns.make_disk(tmp_path / "disk.raw")
    opts = GuestOptions(
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(mode, strict=True),
        disk=disk,
        iommu=IommuSpec(mode=mode),
        **kw,  # type: ignore[arg-type]
    )
    res = await run_guest_tests(opts, timeout=TIMEOUT_S)
    print(f"\n[{mode} {opts.translate}] {res.to_json()}")
    return res


def _assert_all_passed(res: BlkRunResult) -> None:
    assert not res.timed_out, "\n".join(res.console_tail)
    assert res.errors == []
    assert res.failures == []
    assert res.passed == len(patterns.TESTS)
    assert res.disk_ok, res.disk_mismatches


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [IommuMode.SCALABLE_FS, IommuMode.SCALABLE_SS])
async def test_guest_disk_through_own_walk_agrees_with_qemu(
    image: GuestImage, tmp_path: Path, mode: IommuMode
) -> None:
    res = await _run(image, tmp_path, mode, translate="walk", cross_check=True)
    _assert_all_passed(res)
    b = res.backend
    agreement = b["qemu_agreement"]
    assert isinstance(agreement, dict)
    assert agreement["disagree"] == 0
    assert agreement["agree"] > 100
    assert b["faults"] == 0
    assert isinstance(b["invalidations"], int) and b["invalidations"] > 0
    assert isinstance(b["regs_reads"], int) and b["regs_reads"] >= 2  # SeaBIOS, then Linux


@pytest.mark.asyncio
async def test_guest_disk_through_qemu_iotlb_path(image: GuestImage, tmp_path: Path) -> None:
    res = await _run(image, tmp_path, IommuMode.SCALABLE_SS, translate="qemu")
    _assert_all_passed(res)
    assert isinstance(res.backend["qemu_misses"], int) and res.backend["qemu_misses"] > 100
    assert res.backend["qemu_unanswered"] == 0


@pytest.mark.asyncio
async def test_dma_to_unmapped_iova_is_a_fault_and_an_io_error(
    image: GuestImage, tmp_path: Path
) -> None:
    """The first translated read gets its buffer moved to an IOVA the guest never mapped."""
    res = await _run(
        image,
        tmp_path,
        IommuMode.SCALABLE_FS,
        translate="walk",
        cross_check=True,
        inject_bad_iova=BAD_IOVA,
    )
    b = res.backend
    assert b["faults"] == 1
    faults = b["fault_log"]
    assert isinstance(faults, list) and len(faults) == 1
    assert faults[0]["addr"] == hex(BAD_IOVA)
    assert faults[0]["reason"] == FaultReason.FS_PAGING_ENTRY_P  # what QEMU reports too
    assert faults[0]["bdf"] == "00:04.0"
    blk = b["blk"]
    assert isinstance(blk, dict) and blk["ioerr"] == 1
    assert res.guest_io_errors, "the guest kernel saw no I/O error"
    agreement = b["qemu_agreement"]
    assert isinstance(agreement, dict) and agreement["disagree"] == 0
    _assert_all_passed(res)  # the partition-scan read failed; the disk tests are unaffected
