"""Migration orchestration without QEMU: two in-process daemons, a scripted QMP pair.

The fake QMP (:class:`FakeQemuPair`) plays QEMU's side of a pre-copy migration: ``migrate``
copies the source's RAM (a memfd) into the destination's and emits MIGRATION events up to
``pre-switchover``; ``migrate-continue`` completes (destination RESUME), ``migrate_cancel``
cancels and the source runs again. The vPASID tables live in a reserved range of that RAM, as
with a real guest (qemu_glue.migration.vpasid_reserve).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

import pytest

from qemu_glue.migration.live import (
    MigrationError,
    Reserve,
    VpasidHandover,
    iommu_differences,
    migrate,
)
from qemu_glue.migration.vpasid_reserve import (
    DATA_IOVA,
    VirtualDevice,
    VpasidTables,
    memmap_param,
    ppasid_table,
    register,
)
from qemu_glue.qemu.qmp import EventStream, Qmp, QmpError
from vioasid.client import Client, DmaRequest, MemoryRegion
from vioasid.daemon.hostconfig import default_host
from vioasid.daemon.server import Server
from vioasid.daemon.service import Service
from vioasid.model.faults import parse_bdf
from vioasid.model.memory import GuestMemory

RAM = 16 << 20
BASE, SIZE = 4 << 20, 4 << 20
IOMMU = {"intel-iommu": {"x-scalable-mode": True, "x-flts": True, "aw-bits": 48}}


class Ram:
    """A memfd guest RAM, mapped here (what a memory-backend-file is to QEMU)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("vioasid-test-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, RAM)
        self.mem = GuestMemory()
        self.mem.add_fd(self.fd, 0, RAM, 0, name="ram")

    def region(self) -> MemoryRegion:
        return MemoryRegion(self.fd, 0, RAM)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class _Listener:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = set(names)
        self.q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def get(self) -> dict[str, Any]:
        return await self.q.get()

    def clear(self) -> list[dict[str, Any]]:
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out


class FakeQmp:
    """Enough of :class:`qemu_glue.qemu.qmp.Qmp` for :func:`migrate`."""

    def __init__(self, name: str, iommu: dict[str, Any]) -> None:
        self.name = name
        self.iommu = iommu
        self.status = "running" if name == "src" else "inmigrate"
        self.commands: list[tuple[str, Any]] = []
        self.listeners: list[_Listener] = []
        self.peer: FakeQmp | None = None
        self.on_migrate: Any = None
        self.before_switchover: Any = None
        self.converge = asyncio.Event()
        self.converge.set()
        self.task: asyncio.Task[None] | None = None
        self.migration = "none"

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        ev = {"event": event, "data": data or {}, "timestamp": {"seconds": 1, "microseconds": 0}}
        for li in self.listeners:
            if event in li.names:
                li.q.put_nowait(ev)

    def _mig(self, status: str) -> None:
        self.migration = status
        self.emit("MIGRATION", {"status": status})

    async def execute(self, command: str, args: Any = None, timeout: float | None = None) -> Any:
        self.commands.append((command, args))
        if command == "qom-list":
            path = args["path"]
            if path == "/machine/peripheral-anon":
                return [{"name": "device[0]", "type": f"child<{next(iter(self.iommu))}>"}]
            if path.startswith("/machine/peripheral-anon/"):
                props = next(iter(self.iommu.values()))
                return [{"name": k, "type": "bool"} for k in props]
            raise QmpError(command, "no such path")
        if command == "qom-get":
            return next(iter(self.iommu.values()))[args["property"]]
        if command == "migrate":
            assert self.peer is not None
            if self.on_migrate is not None:
                self.on_migrate()
            self.task = asyncio.create_task(self._run())  # QEMU migrates in the background
        elif command == "migrate-set-parameters":
            if "downtime-limit" in args:
                if args["downtime-limit"] == 0:
                    self.converge.clear()
                else:
                    self.converge.set()
                    await asyncio.sleep(0.02)  # QEMU converges at once: events before the reply
        elif command == "migrate-continue":
            assert self.peer is not None
            self._mig("device")
            self.status = "postmigrate"
            self._mig("completed")
            self.peer.status = "running"
            self.peer.emit("RESUME")
        elif command == "migrate_cancel":
            self._mig("cancelling")
            self.status = "running"
            self._mig("cancelled")
            if self.peer is not None:
                self.peer.status = "shutdown"  # its load failed
        elif command == "query-migrate":
            out: dict[str, Any] = {"status": self.migration}
            if self.migration == "completed":
                out.update({"downtime": 12, "total-time": 345, "setup-time": 1})
            return out
        elif command == "query-status":
            return {"status": self.status}
        return {}

    async def _run(self) -> None:
        for s in ("setup", "active"):
            self._mig(s)
        self.emit("MIGRATION_PASS", {"pass": 2})
        await asyncio.sleep(0.01)  # RAM is copied "meanwhile"; the pre-copy runs
        await self.converge.wait()  # like QEMU: no switch-over while the downtime limit is 0
        if self.before_switchover is not None:
            await self.before_switchover()
        self.status = "finish-migrate"
        self.emit("STOP")
        self._mig("pre-switchover")

    async def query_status(self) -> str:
        return self.status

    @contextlib.asynccontextmanager
    async def events(self, *names: str, timeout: float | None = None) -> AsyncIterator[Any]:
        li = _Listener(names)
        self.listeners.append(li)
        try:
            yield EventStream(li, 10.0 if timeout is None else timeout)  # type: ignore[arg-type]
        finally:
            self.listeners.remove(li)


class Rig:
    """Two in-process daemons (host A with a small tenant, host B with a larger one), a VM on A
    whose vPASID tables sit in its RAM's reserved range, and a destination RAM on B."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.servers = [
            Server(Service(default_host()), os.path.join(tmp, f"{n}.sock")) for n in "ab"
        ]
        self.src_ram, self.dst_ram = Ram(), Ram()
        self.tables = VpasidTables(self.src_ram.mem, BASE, SIZE)
        self.devices = [
            VirtualDevice.parse("00:10.0", "3a:00.0", "mdev", range(1, 9)),
            VirtualDevice.parse("00:11.0", "5f:00.0", "vfio-pci", range(1, 9)),
        ]
        for d in self.devices:
            self.tables.add(d)
        self.src_qmp, self.dst_qmp = FakeQmp("src", IOMMU), FakeQmp("dst", IOMMU)
        self.src_qmp.peer = self.dst_qmp
        self.sq, self.dq = cast(Qmp, self.src_qmp), cast(Qmp, self.dst_qmp)
        self.src_qmp.on_migrate = self.copy_ram

    def copy_ram(self) -> None:
        self.dst_ram.mem.write(0, self.src_ram.mem.view(0, RAM))

    async def start(self) -> None:
        for s in self.servers:
            await s.start()
        self.a = await Client.connect(self.servers[0].path)
        self.b = await Client.connect(self.servers[1].path)
        self.tenants = [await self._tenant(self.servers[i].path, n) for i, n in ((0, 2), (1, 5))]
        self.vm = await register(self.a, "vm1", [self.src_ram.region()], self.tables)

    async def _tenant(self, path: str, n: int) -> tuple[Client, Ram]:
        c = await Client.connect(path)
        ram = Ram()
        t = VpasidTables(ram.mem, BASE, SIZE)
        t.add(VirtualDevice.parse("00:05.0", "3a:00.0", "mdev", range(1, n + 1)))
        t.add(VirtualDevice.parse("00:06.0", "5e:00.0", "mdev", range(1, n + 1)))
        await register(c, "tenant", [ram.region()], t)
        return c, ram

    def handover(self, **kw: Any) -> VpasidHandover:
        return VpasidHandover(
            src=self.a,
            src_vm=self.vm,
            name="vm1",
            dst=self.b,
            dst_regions=[self.dst_ram.region()],
            reserve=Reserve(self.src_ram.mem, self.dst_ram.mem, BASE, SIZE),
            **kw,
        )

    async def close(self) -> None:
        for c, ram in self.tenants:
            await c.close()
            ram.close()
        await self.a.close()
        await self.b.close()
        for s in self.servers:
            await s.close()
        self.src_ram.close()
        self.dst_ram.close()


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="vioasid-mig-test-") as tmp:
        r = Rig(tmp)
        await r.start()
        try:
            yield r
        finally:
            await r.close()


async def _daemon_state(c: Client) -> dict[str, Any]:
    d = await c.dump()
    return {"vms": d["vms"], "allocators": d["allocators"], "global": d["global"]}


def test_memmap_param() -> None:
    assert memmap_param(0xC00_0000, 16 << 20) == "memmap=16M$0xc000000"
    with pytest.raises(ValueError):
        memmap_param(0x1000, 16 << 20)


def test_iommu_differences() -> None:
    a = {"intel-iommu": {"x-flts": True, "aw-bits": 48}}
    assert iommu_differences(a, a) == []
    b = {"intel-iommu": {"x-flts": False, "aw-bits": 48}}
    assert iommu_differences(a, b) == ["intel-iommu.x-flts: source True, destination False"]
    assert iommu_differences(a, {}) == ["intel-iommu: only on the source"]


@pytest.mark.asyncio
async def test_migrate_carries_vpasids_and_reallocates_ppasids() -> None:
    async with rig() as r:
        before = ppasid_table(await r.a.dump(r.vm), "vm1")
        res = await migrate(r.sq, r.dq, "unix:/nowhere", vpasid=r.handover())
        assert res.ok and res.status == "completed", res.error
        assert res.precopied  # imported while "running"; the switch-over only compared
        assert res.vpasids_identical and res.vpasids_carried == 16
        assert res.ppasids_before == before
        # host A's tenant holds 2 pPASIDs, host B's 5: every binding moved up by 3
        for rid, table in res.ppasids_after.items():
            for x, pp in table.items():
                assert pp == before[rid][x] + 3
        assert res.reserve_intact is True
        assert res.downtime_ms == 12 and res.source_status == "postmigrate"
        commands = [c for c, _ in r.src_qmp.commands]
        assert commands.index("migrate") < commands.index("migrate-continue")
        caps = dict(r.src_qmp.commands)["migrate-set-capabilities"]["capabilities"]
        assert {"capability": "pause-before-switchover", "state": True} in caps
        # the destination daemon serves the VM: DMA reaches the same guest page, new tags
        assert res.dst_vm is not None
        dev = r.devices[0]
        [d] = await r.b.dma(res.dst_vm, [DmaRequest(dev.rid, 3, DATA_IOVA + 8)])
        assert d.ok and d.gpa == r.tables.data + 8 and d.tag == before["00:10.0"][3] + 3
        # the source released its VM; host A is back to its tenant only
        assert "vm1" not in (await r.a.dump())["vms"]


@pytest.mark.asyncio
async def test_corrupted_stream_is_refused_and_source_keeps_running() -> None:
    def flip(stream: bytes) -> bytes:
        b = bytearray(stream)
        b[-1] ^= 1  # the CRC-32 no longer matches the body
        return bytes(b)

    async with rig() as r:
        src_before, dst_before = await _daemon_state(r.a), await _daemon_state(r.b)
        res = await migrate(r.sq, r.dq, "unix:/x", vpasid=r.handover(tamper=flip))
        assert not res.ok and res.status == "cancelled"
        assert res.error is not None and "checksum" in res.error
        assert res.source_status == "running"
        assert "migrate_cancel" in [c for c, _ in r.src_qmp.commands]
        assert "migrate-continue" not in [c for c, _ in r.src_qmp.commands]
        assert "quit" in [c for c, _ in r.dst_qmp.commands]  # the destination QEMU is stopped
        assert await _daemon_state(r.a) == src_before
        assert await _daemon_state(r.b) == dst_before


@pytest.mark.asyncio
async def test_import_conflict_cancels_and_destination_keeps_nothing() -> None:
    async with rig() as r:
        src_before, dst_before = await _daemon_state(r.a), await _daemon_state(r.b)
        # the enqcmd vfio-pci device sent to a plain function: the destination must refuse
        bad = {parse_bdf("00:10.0"): parse_bdf("3a:00.0"), parse_bdf("00:11.0"): 0x3A00}
        res = await migrate(r.sq, r.dq, "unix:/x", vpasid=r.handover(functions=bad))
        assert res.status == "cancelled" and res.source_status == "running"
        assert res.error is not None and "enqcmd" in res.error
        assert await _daemon_state(r.a) == src_before
        assert await _daemon_state(r.b) == dst_before


@pytest.mark.asyncio
async def test_state_changed_after_precopy_is_imported_again() -> None:
    async with rig() as r:
        h = r.handover()

        async def fault() -> None:
            # a fault queued on the source after the pre-copy changes the stream
            await r.a.dma(r.vm, [DmaRequest("00:10.0", 2, 0xDEAD000)])

        r.src_qmp.before_switchover = fault
        res = await migrate(r.sq, r.dq, "unix:/x", vpasid=h)
        assert res.ok, res.error
        assert not res.precopied  # the final stream differed: imported at switch-over
        vms = (await r.b.dump())["vms"]
        assert list(vms).count("vm1") == 1 and vms["vm1"]["faults"] == 1


@pytest.mark.asyncio
async def test_mismatched_viommu_is_refused_before_anything() -> None:
    async with rig() as r:
        r.dst_qmp.iommu = {"intel-iommu": {**IOMMU["intel-iommu"], "x-flts": False}}
        with pytest.raises(MigrationError, match="x-flts"):
            await migrate(r.sq, r.dq, "unix:/x", vpasid=r.handover())
        assert "migrate" not in [c for c, _ in r.src_qmp.commands]


def _iter_bits(buf: bytes) -> Iterator[int]:
    for i, byte in enumerate(buf):
        for b in range(8):
            if byte & (1 << b):
                yield i * 8 + b


def test_dirty_log_marks_pages_of_writes_only() -> None:
    from vioasid.device.dirty_log import VHOST_F_LOG_ALL, DirtyLogging, open_log
    from vioasid.formats.virtio import VHOST_USER_LOG

    fd = os.memfd_create("log")
    os.ftruncate(fd, 8192)
    view = os.dup(fd)
    state = DirtyLogging()
    state.set_log(open_log(VHOST_USER_LOG.packer.pack(64, 4096), [fd]))  # 64 bytes at +4096

    class Ident:
        generation = 0

        def invalidated_since(self, generation: int, ranges: list[tuple[int, int]]) -> bool:
            return False

        async def translate(self, iova: int, write: bool, pasid: int | None = None) -> int:
            return iova

        def spans(
            self, iova: int, length: int, write: bool, pasid: int | None = None
        ) -> list[tuple[int, int]]:
            return [(iova, length)]

        def spans_many(
            self, bufs: Sequence[tuple[int, int]], write: bool, pasid: int | None = None
        ) -> list[list[tuple[int, int]]]:
            return [[(iova, length)] for iova, length in bufs]

    t = state.wrap(Ident())

    async def go() -> None:
        await t.translate(0x5000, True)  # logging not on yet: nothing marked
        state.set_features(1 << VHOST_F_LOG_ALL)
        await t.translate(0x3000, False)  # a read: nothing
        await t.translate(0x5123, True)
        await t.translate(0x2000 * 4096 + 7, True)  # page 8192: past a 512-page log

    asyncio.run(go())
    assert state.log is not None
    assert state.log.beyond == 1
    raw = os.pread(view, 64, 4096)
    assert list(_iter_bits(raw)) == [5]
    assert not any(os.pread(view, 4096, 0))  # nothing outside the log's offset
    state.close()
    os.close(view)


def test_settle_hands_back_inflight_request() -> None:
    from vioasid.vhost_user.inflight import settle
    from vioasid.vhost_user.virtqueue import SplitQueue

    async def go() -> None:
        q = SplitQueue(0, num=8, last_avail=6, used_idx=5)
        task = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        assert settle(q, task) == 5 and q.last_avail == 5
        await asyncio.sleep(0)
        assert task.cancelled()
        q2 = SplitQueue(1, num=8, last_avail=0xFFFF, used_idx=0xFFFF)
        assert settle(q2, None) == 0xFFFF

    asyncio.run(go())


_VM_ARGS = ["--vm", "g", "--src-daemon", "a", "--dst-daemon", "b", "--dst-ram", "r"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vm", "g"], "--vm needs"),
        (["--src-daemon", "/x"], "need --vm"),
        ([*_VM_ARGS, "--reserve", "12"], "BASE:SIZE"),
        (["--map", "00:10.0"], "GUEST_RID=HOST_FUNCTION"),
    ],
)
def test_migrate_cli_usage_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vioasid.cli import main

    argv = ["migrate", "--src-qmp", "/nonexistent/a", "--dst-qmp", "/nonexistent/b"]
    assert main([*argv, "--uri", "unix:/tmp/m.sock", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_migrate_cli_rejects_bad_uri(capsys: pytest.CaptureFixture[str]) -> None:
    from vioasid.cli import main

    assert main(["migrate", "--src-qmp", "a", "--dst-qmp", "b", "--uri", "/tmp/x"]) == 2
    assert "migration URI" in capsys.readouterr().err


def test_backend_offers_migration_features_and_maps_the_log(tmp_path: Any) -> None:
    """The features QEMU requires before it allows migrating a vhost-user device, and the
    SET_LOG_BASE reply it waits for (exact texts in shared/design/qemu-notes.md)."""
    from vioasid.formats.virtio import (
        VHOST_USER_LOG,
        VHOST_USER_VERSION,
        VhostUserProtocolFeature,
        VhostUserRequest,
        VirtioFeature,
    )
    from vioasid.vhost_user.backend import VhostUserBlkBackend
    from vioasid.vhost_user.codec import Decoder, Message

    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    be = VhostUserBlkBackend(disk, tmp_path / "vu.sock", translate="identity")
    sent: list[bytes] = []
    be._send = lambda data, fds=None: sent.append(data)  # type: ignore[method-assign]

    def call(req: VhostUserRequest, payload: bytes = b"", fds: list[int] | None = None) -> Any:
        sent.clear()
        be._dispatch(Message(req, VHOST_USER_VERSION, payload, fds or []))
        [reply] = Decoder().feed(b"".join(sent))
        return reply

    feats = call(VhostUserRequest.GET_FEATURES).u64()
    assert feats & (1 << VirtioFeature.LOG_ALL)
    proto = call(VhostUserRequest.GET_PROTOCOL_FEATURES).u64()
    assert proto & (1 << VhostUserProtocolFeature.LOG_SHMFD)
    log_fd = os.memfd_create("log")
    os.ftruncate(log_fd, 4096)
    reply = call(VhostUserRequest.SET_LOG_BASE, VHOST_USER_LOG.packer.pack(4096, 0), [log_fd])
    assert reply.request == VhostUserRequest.SET_LOG_BASE and reply.u64() == 0
    assert be.dirty.log is not None and be.dirty.active is None  # mapped, not yet on
    sent.clear()
    be._dispatch(
        Message(
            VhostUserRequest.SET_FEATURES,
            VHOST_USER_VERSION,
            (feats | (1 << VirtioFeature.LOG_ALL)).to_bytes(8, "little"),
            [],
        )
    )
    assert be.dirty.active is be.dirty.log
    be.dirty.close()
    be.blk.close()


@pytest.mark.asyncio
async def test_timeout_cancels_and_cleans_up() -> None:
    async with rig() as r:
        dst_before = await _daemon_state(r.b)

        async def never() -> None:
            await asyncio.sleep(3600)  # QEMU never reaches pre-switchover

        r.src_qmp.before_switchover = never
        with pytest.raises(MigrationError, match="in time"):
            await migrate(r.sq, r.dq, "unix:/x", vpasid=r.handover(), timeout=1.0)
        assert "migrate_cancel" in [c for c, _ in r.src_qmp.commands]
        assert await _daemon_state(r.b) == dst_before  # the pre-copied VM was dropped
        assert r.src_qmp.task is not None
        r.src_qmp.task.cancel()
