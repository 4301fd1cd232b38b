"""The plain-``migrate`` guard against real QEMU: a migration vioasid did not start is
cancelled (the source keeps its state) with one log line naming ``vioasid migrate``; one that
vioasid marks as its own is left alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu_support import qemu_or_skip

from qemu_glue.migration.guard import REASON, MigrationGuard
from qemu_glue.qemu.process import QemuProcess
from qemu_glue.qemu.qmp import MIGRATION, Qmp
from qemu_glue.qemu.vmspec import VmSpec


def _spec(tag: str, *, incoming: bool) -> VmSpec:
    q = qemu_or_skip()
    return VmSpec(name=f"guard-{tag}", memory_mib=64, iommu=None, incoming_defer=incoming,
                  extra_args=("-S",), qemu_binary=q.path, qemu_features=q.features)  # fmt: skip


async def _status(qmp: Qmp, want: set[str], timeout: float = 60.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            st = str((await qmp.execute("query-migrate")).get("status", ""))
            if st in want:
                return st
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _guarded() -> AsyncIterator[tuple[str, QemuProcess, QemuProcess, MigrationGuard]]:
    """The migration URI, a source QEMU (at -S) watched by a ready guard for "vm0", and an
    incoming destination; the guard is closed at the end."""
    with tempfile.TemporaryDirectory(prefix="vioasid-guard-") as tmp:
        uri = f"unix:{Path(tmp) / 'mig.sock'}"
        async with (
            await QemuProcess.start(_spec("src", incoming=False)) as src,
            await QemuProcess.start(_spec("dst", incoming=True)) as dst,
        ):
            guard = MigrationGuard(src.require_qmp(), "vm0")
            guard.start()
            try:
                await asyncio.wait_for(guard.ready.wait(), 10.0)
                yield uri, src, dst, guard
            finally:
                await guard.close()


@pytest.mark.asyncio
async def test_plain_migrate_is_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="qemu_glue.migration.guard")
    async with _guarded() as (uri, src, dst, guard):
        sq, dq = src.require_qmp(), dst.require_qmp()
        # slow enough that the migration cannot finish before anyone could react
        await sq.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        await dq.execute("migrate-incoming", {"uri": uri})
        async with sq.events(MIGRATION) as ev:
            await sq.execute("migrate", {"uri": uri})  # someone else's plain migrate
            await ev.wait_for(MIGRATION, lambda e: e["data"]["status"] == "cancelled", 30)
        assert await _status(sq, {"cancelled", "completed", "failed"}) == "cancelled"
        assert guard.cancelled == 1
        assert await sq.query_status() == "prelaunch"  # the source is as it was (-S)
        lines = [r.getMessage() for r in caplog.records if REASON in r.getMessage()]
        assert len(lines) == 1 and "vioasid migrate" in lines[0] and "vm0" in lines[0]


@pytest.mark.asyncio
async def test_own_migration_is_left_alone() -> None:
    async with _guarded() as (uri, src, dst, guard):
        guard.ours = True
        sq = src.require_qmp()
        await dst.require_qmp().execute("migrate-incoming", {"uri": uri})
        await sq.execute("migrate", {"uri": uri})
        assert await _status(sq, {"cancelled", "completed", "failed"}) == "completed"
        assert guard.cancelled == 0


@pytest.mark.asyncio
async def test_vioasid_migrate_refuses_a_vm_with_pasid_functions() -> None:
    from qemu_glue.commands.migrate import _refuse_pasid_functions
    from qemu_glue.pasid_dma import PasidDmaRig, parse_dma_device
    from qemu_glue.pasid_guest import pasid_iommu
    from qemu_glue.qemu.vmspec import IommuMode
    from vioasid.commands.common import UsageError

    q = qemu_or_skip(vfio_user=True)
    async with PasidDmaRig([parse_dma_device("mdev")], memory_mib=64) as rig:
        spec = VmSpec(name="guard-pasid", memory_mib=64, iommu=pasid_iommu(IommuMode.SCALABLE_FS),
                      devices=rig.devices(), ram_path=rig.ram_path, extra_args=("-S",),
                      qemu_binary=q.path, qemu_features=q.features)  # fmt: skip
        async with await QemuProcess.start(spec) as vm:
            with pytest.raises(UsageError, match=r"PASID DMA functions \(00:05\.0\)"):
                await _refuse_pasid_functions(vm.require_qmp())
