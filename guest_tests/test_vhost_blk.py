"""Real guests (TCG) whose disk is the vioasid vhost-user-blk back-end behind intel-iommu.

Every ring and buffer address is an IOVA that vioasid translates by walking the guest's own
VT-d tables; in cross-check mode QEMU is asked for the same IOVA through the IOTLB-miss path and
the answers must agree. One guest at a time; QEMU is always stopped (``launch`` cleans up).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from images.build import GuestImage
from images.guest import patterns
from qemu_glue.qemu.placement import thread_ids
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import BlkGuest, BlkRunResult, GuestOptions, run_guest_tests
from vioasid.formats.fault import FaultReason

pytestmark = pytest.mark.guest
TIMEOUT_S = 300.0
BAD_IOVA = 0x5EAD_0000_0000  # canonical 48-bit address, never mapped by the guest for this device


async def _run(
    image: GuestImage,
    tmp_path: Path,
    mode: IommuMode,
    on_start: Callable[[BlkGuest], None] | None = None,
    **kw: object,
) -> BlkRunResult:
    disk = patterns.make_disk(tmp_path / "disk.raw")
    opts = GuestOptions(
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(mode, strict=True),
        disk=disk,
        iommu=IommuSpec(mode=mode),
        **kw,  # type: ignore[arg-type]
    )
    res = await run_guest_tests(opts, timeout=TIMEOUT_S, on_start=on_start)
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


@dataclass
class _Seen:
    """CPU sets read from /proc while the pinned guest runs."""

    vcpus: dict[int, set[int]] = field(default_factory=dict)
    qemu_others: list[set[int]] = field(default_factory=list)
    reader: set[int] | None = None
    loop: set[int] = field(default_factory=set)
    vcpu_cpus: set[int] = field(default_factory=set)
    other_cpus: set[int] = field(default_factory=set)


@pytest.mark.asyncio
async def test_pinned_guest_runs_with_vcpu_and_reader_on_one_cpu(
    image: GuestImage, tmp_path: Path
) -> None:
    """``pin="auto"``: QEMU's vCPU thread and the IOTLB reader thread share the first CPU, the
    rest of QEMU and this process's loop thread get the others, the guest's tests all pass, and
    this process's CPU set is given back afterwards."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    me = threading.get_native_id()
    before = os.sched_getaffinity(me)
    seen = _Seen()

    def check(g: BlkGuest) -> None:
        assert g.pinned is not None
        p = g.pinned.placement
        seen.vcpus = {t: os.sched_getaffinity(t) for t in g.pinned.vcpu_threads}
        seen.qemu_others = [
            os.sched_getaffinity(t) for t in thread_ids(g.vm.pid) if t not in g.pinned.vcpu_threads
        ]
        tid = g.backend.reader_thread_id()
        seen.reader = os.sched_getaffinity(tid) if tid else None
        seen.loop = os.sched_getaffinity(me)
        seen.vcpu_cpus, seen.other_cpus = set(p.vcpu_cpus), set(p.other_cpus)

    res = await _run(
        image, tmp_path, IommuMode.SCALABLE_FS, on_start=check, translate="walk", pin="auto"
    )
    _assert_all_passed(res)
    assert seen.vcpu_cpus == {min(allowed)} and seen.other_cpus == allowed - seen.vcpu_cpus
    assert seen.vcpus and all(v == seen.vcpu_cpus for v in seen.vcpus.values())
    assert seen.qemu_others and all(o == seen.other_cpus for o in seen.qemu_others)
    assert seen.reader == seen.vcpu_cpus
    assert seen.loop == seen.other_cpus
    assert res.placement is not None and res.placement["vcpu_cpus"] == str(min(allowed))
    assert isinstance(res.backend["invalidations"], int) and res.backend["invalidations"] > 0
    assert os.sched_getaffinity(me) == before  # given back
