"""migrate_pasid refuses before anything starts, against real QEMU 11.1 (no guest: both QEMUs
wait at -S): vIOMMU settings that differ, functions that differ, a QEMU without vfio-user. The
source is untouched and the destination's engine keeps no VM."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu_support import qemu_or_skip

from qemu_glue.migration.pasid import migrate_pasid
from qemu_glue.migration.pasid_demo import make_host
from qemu_glue.pasid_dma import VM_NAME, DmaDeviceArg, PasidDmaRig
from qemu_glue.pasid_guest import pasid_iommu
from qemu_glue.qemu.process import QemuProcess
from qemu_glue.qemu.vmspec import IommuMode, VmSpec
from vioasid.formats.pasid_dma import FunctionType
from vioasid.model.engine import Host

MDEV, DEDICATED = (FunctionType.MDEV, 0x3C00), (FunctionType.DEDICATED, 0x3A00)


@contextlib.asynccontextmanager
async def _side(host: Host, fns: tuple[tuple[FunctionType, int], ...], mode: IommuMode,
                *, incoming: bool) -> AsyncIterator[tuple[PasidDmaRig, QemuProcess]]:  # fmt: skip
    q = qemu_or_skip(vfio_user=True)
    rig = PasidDmaRig([DmaDeviceArg(t, rid) for t, rid in fns], memory_mib=64, engine=host)
    async with rig:
        spec = VmSpec(name="refuse", memory_mib=64, iommu=pasid_iommu(mode), devices=rig.devices(),
                      ram_path=rig.ram_path, incoming_defer=incoming, extra_args=("-S",),
                      qemu_binary=q.path, qemu_features=q.features)  # fmt: skip
        async with await QemuProcess.start(spec) as vm:
            yield rig, vm


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("dst_fns", "dst_mode", "vfio_user", "why"),
    [
        ((MDEV,), IommuMode.SCALABLE_SS, True, "vIOMMU configurations differ"),
        ((DEDICATED,), IommuMode.SCALABLE_FS, True, "PASID DMA functions differ"),
        ((MDEV,), IommuMode.SCALABLE_FS, False, "need QEMU 11.1"),
    ],
)
async def test_refused_at_start(
    dst_fns: tuple[tuple[FunctionType, int], ...], dst_mode: IommuMode, vfio_user: bool, why: str
) -> None:
    a, b = make_host("host-a"), make_host("host-b")
    with tempfile.TemporaryDirectory(prefix="vioasid-refuse-") as tmp:
        async with (
            _side(a, (MDEV,), IommuMode.SCALABLE_FS, incoming=False) as (src_rig, src),
            _side(b, dst_fns, dst_mode, incoming=True) as (dst_rig, dst),
        ):
            uri = f"unix:{Path(tmp) / 'm.sock'}"
            res = await migrate_pasid(src.require_qmp(), dst.require_qmp(), src_rig, dst_rig,
                                      uri, vfio_user=vfio_user)  # fmt: skip
            assert not res.ok and res.status == "refused" and res.refused_at == "start"
            assert why in (res.error or "")
            assert res.source_status == "prelaunch"  # untouched (-S)
            assert VM_NAME not in b.vms and not list(b.bindings())
            assert VM_NAME in a.vms
            q = await src.require_qmp().execute("query-migrate")
            assert q.get("status") in (None, "none")  # no migration was started
