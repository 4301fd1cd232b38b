"""Test support for the daemon tests: a guest whose RAM is a memfd, and an in-process daemon.

:class:`MemfdGuest` plays the guest kernel: its RAM is a memfd (handed to the daemon by fd), and
the guest-driver model (:class:`GuestIommuDriver`, :class:`FirstStagePageTable`) writes the
scalable-mode root/context/PASID tables and first-stage page tables into it, as Linux would.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings

from vioasid.client import Client, MemoryRegion, PasidEntryResult
from vioasid.daemon.hostconfig import default_host
from vioasid.daemon.server import Server
from vioasid.daemon.service import Service
from vioasid.formats import invalidation as inv
from vioasid.formats.pasid import PGTT_FIRST_STAGE
from vioasid.model.engine import Host
from vioasid.model.faults import parse_bdf
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory

GUEST_DID = 1

# the default host's functions
PLAIN = "3a:00.0"
TRANSLATING = "3b:00.0"
ENQCMD = "5e:00.0"
ENQCMD_TRANSLATING = "5f:00.0"

# the guest's device 00:03.0 (source id 0x18) and where :func:`bound_guest` maps vPASID 5
DEV = "00:03.0"
SID = 0x18
VA = 0x40_0000
GPA = 0x20_0000
ONE_PLAIN_DEVICE = ((DEV, PLAIN, "vfio-pci"),)


@dataclass
class MemfdGuest:
    """A guest with ``size`` bytes of RAM in a memfd; the top half is its page-table pool."""

    size: int = 8 << 20
    fd: int = -1
    memory: GuestMemory = field(init=False)
    driver: GuestIommuDriver = field(init=False)
    tables: dict[int, FirstStagePageTable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fd = os.memfd_create("vioasid-test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        self.memory = GuestMemory()
        self.memory.add_fd(self.fd, 0, self.size, 0, name="ram")
        pool = self.size // 2
        self.pages = PageAllocator(self.memory, self.size - pool, pool)
        self.driver = GuestIommuDriver.for_pasid_bits(self.memory, self.pages, 20)

    @property
    def rtaddr(self) -> int:
        return self.driver.rtaddr

    def region(self) -> MemoryRegion:
        return MemoryRegion(self.fd, gpa=0, size=self.size)

    def attach(self, sid: int) -> None:
        self.driver.attach_device(sid)

    def table(self, vpasid: int) -> FirstStagePageTable:
        if vpasid not in self.tables:
            self.tables[vpasid] = FirstStagePageTable(self.memory, self.pages)
        return self.tables[vpasid]

    def map(self, vpasid: int, va: int, gpa: int, size: int = 0x1000, write: bool = True) -> None:
        self.table(vpasid).map(va, gpa, size, write=write)

    def write_entry(self, sid: int, vpasid: int) -> None:
        """The guest points (device, vPASID)'s PASID entry at its first-stage table."""
        self.driver.set_pasid_entry(
            sid, vpasid, pgtt=PGTT_FIRST_STAGE, did=GUEST_DID, flptptr=self.table(vpasid).root
        )

    def clear_entry(self, sid: int, vpasid: int) -> None:
        self.driver.clear_pasid_entry(sid, vpasid)

    @staticmethod
    def pasid_cache_inv(vpasid: int, did: int = GUEST_DID) -> bytes:
        """The PASID-selective PASID-cache invalidation Linux queues after editing an entry."""
        return inv.build_desc(inv.PC_DESC, {"G": inv.PC_PASID_SI, "DID": did, "PASID": vpasid})

    @staticmethod
    def piotlb_inv(vpasid: int, did: int = GUEST_DID) -> bytes:
        return inv.build_desc(
            inv.PIOTLB_DESC, {"G": inv.PIOTLB_ALL_IN_PASID, "DID": did, "PASID": vpasid}
        )

    def close(self) -> None:
        self.memory.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def daemon_fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings for a fuzz test that runs a whole daemon per example: few examples,
    no deadline, and no health check for slow examples or large data."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.asynccontextmanager
async def running_daemon(host: Host | None = None) -> AsyncIterator[tuple[Server, str]]:
    """An in-process daemon on a fresh socket path."""
    with tempfile.TemporaryDirectory(prefix="vioasid-test-") as tmp:
        path = os.path.join(tmp, "vioasid.sock")
        server = Server(Service(host or default_host()), path)
        await server.start()
        try:
            yield server, path
        finally:
            await server.close()


@contextlib.asynccontextmanager
async def daemon_clients(count: int = 2) -> AsyncIterator[list[Client]]:
    """An in-process daemon and ``count`` clients connected to it, closed at the end."""
    async with running_daemon() as (_, path):
        clients = [await Client.connect(path) for _ in range(count)]
        try:
            yield clients
        finally:
            for c in clients:
                await c.close()


async def setup_vm(
    client: Client,
    guest: MemfdGuest,
    name: str = "vm1",
    devices: tuple[tuple[str, str, str], ...] = ONE_PLAIN_DEVICE,
) -> int:
    """Register the guest's memory, attach devices (both sides), program RTADDR."""
    vm = await client.register_vm(name, [guest.region()])
    for rid, function, assign in devices:
        guest.attach(parse_bdf(rid))
        await client.attach_device(vm, rid, function, assign)
    await client.set_root_table(vm, guest.rtaddr)
    return vm


def bound_guest() -> MemfdGuest:
    """A guest whose vPASID 5 maps two pages at VA (entry written once a device is attached)."""
    g = MemfdGuest()
    g.map(5, VA, GPA, 0x2000)
    return g


async def bind(
    client: Client, vm: int, guest: MemfdGuest, rid: str = DEV, vpasid: int = 5
) -> PasidEntryResult:
    """The guest writes (``rid``, ``vpasid``)'s PASID entry and the daemon re-reads it: the bind."""
    guest.write_entry(parse_bdf(rid), vpasid)
    return await client.pasid_entry(vm, rid, vpasid)


@contextlib.asynccontextmanager
async def daemon_vm(
    devices: tuple[tuple[str, str, str], ...] = ONE_PLAIN_DEVICE, guest: MemfdGuest | None = None
) -> AsyncIterator[tuple[MemfdGuest, Client, int]]:
    """An in-process daemon, one client on it, and that client's VM "vm1" on ``guest`` (a fresh
    :func:`bound_guest` unless given) with ``devices`` attached; the guest is closed after."""
    g = guest or bound_guest()
    try:
        async with running_daemon() as (_, path), await Client.connect(path) as c:
            yield g, c, await setup_vm(c, g, devices=devices)
    finally:
        g.close()
