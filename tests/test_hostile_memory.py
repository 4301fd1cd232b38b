"""A client that truncates a plain (unsealable) memory file while the daemon reads it (issue 15,
item 1's race): the size check before a request cannot see a truncation that lands after it, so
the daemon's mappings of such files are guarded (``vioasid.daemon.sigbus``): the request during
which it happened is refused, the VM's memory is gone for good, and the daemon lives on."""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import tempfile
from pathlib import Path

import pytest
from daemon_support import DEV, SID, VA, MemfdGuest, bound_guest, running_daemon
from test_hostile_clients import serve_process

from vioasid.client import Client, DmaRequest, Invalid, MemoryRegion
from vioasid.daemon import service
from vioasid.daemon.sigbus import RESCUED, guard


def test_sigbus_guard_rescues_a_watched_mapping_only(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, struct.pack("<Q", 0x1234), 0x3000)
    mm = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mm)
    owner = object()
    token = guard().watch(view, 1 << 20, owner)
    try:
        assert struct.unpack_from("<Q", view, 0x3000) == (0x1234,)
        os.ftruncate(fd, 0)  # every page is past the end now: a read is SIGBUS
        assert struct.unpack_from("<Q", view, 0x3000) == (0,)  # rescued: zeros
        assert len(RESCUED) == 1 and RESCUED[0] is owner
        assert bytes(view[0x8000:0x8010]) == bytes(16)  # the whole range was replaced
    finally:
        RESCUED.clear()
        guard().unwatch(token)
        view.release()
        mm.close()
        os.close(fd)


def _plain_copy(g: MemfdGuest, path: Path) -> int:
    """The guest's RAM (tables written) copied into a plain file; its fd."""
    path.write_bytes(os.pread(g.fd, g.size, 0))
    return os.open(path, os.O_RDWR)


@pytest.mark.asyncio
async def test_truncation_after_the_size_check_is_refused_not_sigbus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment, made certain: the file is truncated right after the daemon's size
    check, before the walk reads the guest's tables."""
    g = bound_guest()
    g.attach(SID)
    g.write_entry(SID, 5)
    fd = _plain_copy(g, tmp_path / "ram")
    armed = False
    check = service._check_files

    def check_then_truncate(entry: service.VmEntry) -> None:
        check(entry)
        if armed:
            os.ftruncate(fd, 0)

    monkeypatch.setattr(service, "_check_files", check_then_truncate)
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        vm = await c.register_vm("vm1", [MemoryRegion(fd, 0, g.size)])
        await c.attach_device(vm, DEV, "3a:00.0", "vfio-pci")
        await c.set_root_table(vm, g.rtaddr)
        await c.pasid_entry(vm, DEV, 5)
        armed = True
        with pytest.raises(Invalid, match="during this request"):
            await c.dma(vm, [DmaRequest(DEV, 5, VA + 0x10)])  # walks the first-stage table
        armed = False
        os.ftruncate(fd, g.size)  # growing it back does not bring the VM back
        with pytest.raises(Invalid, match="shrank during a request"):
            await c.dma(vm, [DmaRequest(DEV, 5, VA + 0x10)])
        await c.unregister_vm(vm)
        other = MemfdGuest(size=1 << 20)  # the daemon serves on
        vm2 = await c.register_vm("vm2", [other.region()])
        assert set((await c.dump())["vms"]) == {"vm2"}
        await c.unregister_vm(vm2)
        other.close()
    assert not RESCUED
    os.close(fd)
    g.close()


@pytest.mark.asyncio
async def test_truncation_racing_requests_in_a_loop_never_kills_the_daemon(
    tmp_path: Path,
) -> None:
    """A separate daemon process; 60 rounds of: register a VM from a plain file, pipeline 64
    uncached DMA requests (each a walk of the guest's tables) and truncate the file while they
    are served. Every request is answered (translated, or refused with ``invalid``), the daemon
    stays up and another tenant is served after every round."""
    g = bound_guest()
    g.map(5, VA + 0x10_0000, 0x30_0000, 64 * 4096)  # 64 pages: 64 distinct walks a round
    g.attach(SID)
    g.write_entry(SID, 5)
    image = os.pread(g.fd, g.size, 0)
    ram = tmp_path / "ram"
    refused = translated = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with serve_process(tmp) as (path, proc):
            async with await Client.connect(path) as tenant, await Client.connect(path) as other:
                other_g = MemfdGuest(size=1 << 20)
                await other.register_vm("other", [other_g.region()])
                for i in range(60):
                    ram.write_bytes(image)
                    fd = os.open(ram, os.O_RDWR)
                    vm = await tenant.register_vm(f"vm{i}", [MemoryRegion(fd, 0, g.size)])
                    await tenant.attach_device(vm, DEV, "3a:00.0", "vfio-pci")
                    await tenant.set_root_table(vm, g.rtaddr)
                    await tenant.pasid_entry(vm, DEV, 5)
                    futs = [
                        tenant.dma_nowait(vm, [DmaRequest(DEV, 5, VA + 0x10_0000 + p * 4096)])
                        for p in range(64)
                    ]
                    await asyncio.sleep(0)
                    os.ftruncate(fd, 0)  # while the daemon walks
                    for r in await asyncio.gather(*futs, return_exceptions=True):
                        if isinstance(r, Invalid):
                            refused += 1
                        else:
                            assert not isinstance(r, BaseException), r
                            translated += 1
                    await tenant.unregister_vm(vm)
                    os.close(fd)
                    assert proc.poll() is None
                    assert "other" in (await other.dump())["vms"]
                other_g.close()
            assert proc.poll() is None
    assert refused and translated + refused == 60 * 64
    g.close()
