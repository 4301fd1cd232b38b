"""The daemon under hostile and careless clients (issue 15, items 1-8): one test (or a few) per
item, each reproducing what a bad client did to the daemon before and checking that it now
hurts nobody else: no crash, no hang, no leak, no other tenant's VM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    DEV,
    GPA,
    SID,
    VA,
    MemfdGuest,
    bind,
    bound_guest,
    running_daemon,
    setup_vm,
)

from vioasid.cli import main as cli_main
from vioasid.client import (
    Client,
    ConnectionLost,
    DmaRequest,
    Exhausted,
    Invalid,
    MemoryRegion,
    NotFound,
    NotOwner,
)
from vioasid.daemon import server as server_mod
from vioasid.daemon.hostconfig import default_host
from vioasid.daemon.server import Connection, Server
from vioasid.daemon.service import EVENT_BACKLOG, Service
from vioasid.formats import wire
from vioasid.formats.wire import EventMask, Request
from vioasid.model.errors import Exhausted as ModelExhausted
from vioasid.model.errors import InvalidRequest
from vioasid.model.memory import GuestMemory
from vioasid.model.vm import FAULT_QUEUE_LIMIT
from vioasid.protocol.daemon_codec import BAD_PAYLOAD, Codec, Role, frame

Served = AsyncIterator[tuple[str, "subprocess.Popen[bytes]"]]


@contextlib.asynccontextmanager
async def serve_process(
    tmp: str, *, nofile: int | None = None
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``vioasid serve`` as a process of its own (a SIGBUS or fd exhaustion there must not take
    the test down), optionally with a low fd limit."""
    path = os.path.join(tmp, "d.sock")
    limit = nofile

    def lower() -> None:  # runs in the child
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "vioasid", "serve", "--socket", path, "--log-level", "warning"],
        stderr=subprocess.PIPE,
        preexec_fn=lower,
        env={**os.environ, "VIOASID_EVENT_LOOP": "asyncio"},
    )
    try:
        async with await Client.connect(path, timeout=30):
            pass
        yield path, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# -- 1. a client that shrinks its memory cannot SIGBUS the daemon ------------------------------


@pytest.mark.asyncio
async def test_memfd_is_sealed_against_shrinking() -> None:
    g = MemfdGuest(size=4 << 20)
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        await c.register_vm("vm1", [g.region()])
        with pytest.raises(PermissionError):  # the daemon sealed it: shrinking is refused
            os.ftruncate(g.fd, 0)
        assert fcntl.fcntl(g.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        # a memfd that cannot be sealed is watched instead: shrinking it costs its VM's
        # requests, not the daemon
        fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 20)
        vm2 = await c.register_vm("vm2", [MemoryRegion(fd, 0, 1 << 20)])
        os.ftruncate(fd, 0)
        with pytest.raises(Invalid, match="shrank"):
            await c.set_root_table(vm2, 0)
        os.close(fd)
        assert set((await c.dump())["vms"]) == {"vm1", "vm2"}
    g.close()


@pytest.mark.asyncio
async def test_truncated_plain_file_is_refused_not_sigbus(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    g = bound_guest()  # tables for vPASID 5 of 00:03.0, in a memfd
    g.attach(SID)
    g.write_entry(SID, 5)
    data = os.pread(g.fd, g.size, 0)
    ram.write_bytes(data)
    with tempfile.TemporaryDirectory() as tmp:
        async with serve_process(tmp) as (path, proc):
            fd = os.open(ram, os.O_RDWR)
            async with await Client.connect(path) as tenant, await Client.connect(path) as other:
                vm = await tenant.register_vm("vm1", [MemoryRegion(fd, 0, g.size)])
                await tenant.attach_device(vm, DEV, "3a:00.0", "vfio-pci")
                await tenant.set_root_table(vm, g.rtaddr)
                await tenant.pasid_entry(vm, DEV, 5)
                os.ftruncate(fd, 0)  # the hostile part: shrink it under the daemon
                with pytest.raises(Invalid, match="shrank"):
                    await tenant.pasid_entry(vm, DEV, 5)  # re-reads guest tables
                with pytest.raises(Invalid, match="shrank"):
                    await tenant.dma(vm, [DmaRequest(DEV, 5, VA + 0x123000)])
                # the daemon lives: another tenant still gets served
                other_g = MemfdGuest(size=4 << 20)
                await other.register_vm("vm2", [other_g.region()])
                assert set((await other.dump())["vms"]) >= {"vm2"}
                other_g.close()
            os.close(fd)
            assert proc.poll() is None
    g.close()


# -- 2. the host address allocator reclaims and refuses what cannot fit --------------------------


def test_host_ranges_are_reclaimed_and_bounded() -> None:
    host = default_host()
    # a VM whose RAM ends 64 GiB up, registered and released 4,096 times (256 TiB in all)
    for i in range(4096):
        mem = GuestMemory()
        mem.add((64 << 30) - 4096, bytearray(4096))
        host.add_vm(f"vm{i % 2}", mem)
        host.remove_vm(f"vm{i % 2}")
    # a VM placed past the 48-bit guest-physical space is refused and changes nothing
    huge = GuestMemory()
    huge.add(1 << 50, bytearray(4096))
    with pytest.raises(InvalidRequest, match="48-bit"):
        host.add_vm("huge", huge)
    assert "huge" not in host.vms
    # ... and the next VM lands in the first range again (nothing was leaked)
    small = GuestMemory.from_bytes(1 << 20)
    vm = host.add_vm("small", small)
    assert vm.hpa == 1 << 32


def test_host_range_exhaustion_is_a_clean_refusal() -> None:
    host = default_host()
    mem = GuestMemory()
    mem.add((1 << 47) - 4096, bytearray(4096))  # 128 TiB: one fits below 2^48, not two
    host.add_vm("a", mem)
    mem2 = GuestMemory()
    mem2.add((1 << 47) - 4096, bytearray(4096))
    with pytest.raises(ModelExhausted):
        host.add_vm("b", mem2)
    assert set(host.vms) == {"a"}
    host.add_vm("c", GuestMemory.from_bytes(4096))  # a small one still fits in what is left


@pytest.mark.asyncio
async def test_out_of_range_region_leaves_later_registers_working() -> None:
    g = bound_guest()
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        with pytest.raises(Invalid, match="48-bit"):
            await c.register_vm("far", [MemoryRegion(g.fd, 1 << 52, 4096)])
        vm = await setup_vm(c, g)
        await bind(c, vm, g)
        [r] = await c.dma(vm, [DmaRequest(DEV, 5, VA + 8)])
        assert r.ok and r.gpa == GPA + 8
    g.close()


# -- 3. a subscriber that never reads costs O(1) per event and bounded memory ------------------


@pytest.mark.asyncio
async def test_subscriber_that_never_reads_has_its_events_dropped_and_counted() -> None:
    g = bound_guest()
    async with running_daemon() as (server, path):
        owner = await Client.connect(path)
        vm = await setup_vm(owner, g)
        await bind(owner, vm, g)
        await owner.subscribe(vm, EventMask.FAULTS)
        # the owner stops reading
        server.loop.remove_reader(owner._transport.sock.fileno())
        device = await Client.connect(path)
        dvm = await device.open_vm("vm1")
        faults = [DmaRequest(DEV, 5, 0x7000_0000 + i * 4096) for i in range(FAULT_QUEUE_LIMIT)]
        for _ in range(40):  # 40k fault events for a subscriber that reads none
            results = await device.dma(dvm, faults)
            assert all(r.fault is not None for r in results)
        owner_conn = next(c for c in server.connections.values() if vm in c.session.owned)
        assert owner_conn.transport.pending <= EVENT_BACKLOG + (1 << 20)
        doc = await device.dump()
        assert doc["events_dropped"][str(owner_conn.session.id)] > 0
        # the device client is still served normally
        [ok] = await device.dma(dvm, [DmaRequest(DEV, 5, VA)])
        assert ok.ok
        await device.close()
        await owner.close()
    g.close()


@pytest.mark.asyncio
async def test_busy_connections_delay_a_one_request_client_by_a_turn_or_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight connections keep the daemon busy with faulting 1,024-entry batches (jobs of many
    turns each); a client sending one request at a time waits for a turn or two, not for a
    turn of every busy connection (nor for a pile of turns: the loop reads every socket
    between two turns)."""
    turns = 0
    next_turn = Connection.next_turn

    def counting(conn: Connection) -> None:
        nonlocal turns
        turns += 1
        next_turn(conn)

    monkeypatch.setattr(Connection, "next_turn", counting)
    g = bound_guest()
    async with running_daemon() as (server, path):
        owner = await Client.connect(path)
        vm = await setup_vm(owner, g)
        await bind(owner, vm, g)
        n = 1024
        bad = b"".join(DmaRequest(DEV, 5, 0x7000_0000 + i * 4096).pack() for i in range(n))
        noisy = [await Client.connect(path) for _ in range(8)]
        vms = [await c.open_vm("vm1") for c in noisy]
        futs = [c.dma_packed_nowait(v, n, bad) for c, v in zip(noisy, vms, strict=True)]
        while sum(c.job is not None for c in server.connections.values()) < len(noisy):
            await asyncio.sleep(0)
        start, worst, gaps = turns, 0, []
        for _ in range(30):
            before = turns
            [r] = await owner.dma(vm, [DmaRequest(DEV, 5, VA + 8)])
            assert r.ok and r.gpa == GPA + 8
            worst = max(worst, turns - before)
            if server._turn is not None:
                gaps.append(server._turn.when() - server.loop.time())
            await asyncio.sleep(0.002)
        assert turns - start >= 10  # the busy connections did work meanwhile
        assert max(gaps) > 0  # spaced out while the owner is being answered
        assert sum(c.job is not None for c in server.connections.values()) >= 4  # and still do
        assert worst <= 4, f"one request waited for {worst} turns of other connections"
        for f in futs:
            [*results] = Client.dma_results(await f)
            assert len(results) == n and results[0].fault is not None
        for c in [owner, *noisy]:
            await c.close()
    g.close()


# -- 4. out of file descriptors: back off, refuse honestly, keep serving ------------------------


@pytest.mark.asyncio
async def test_fd_exhaustion_refuses_new_clients_and_keeps_old_ones() -> None:
    g = MemfdGuest(size=1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        async with serve_process(tmp, nofile=64) as (path, proc):
            async with await Client.connect(path) as tenant:
                await tenant.register_vm("vm1", [g.region()])
                hogs: list[socket.socket] = []
                try:
                    for _ in range(80):  # more than the daemon has fds for
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(path)
                        hogs.append(s)
                    await asyncio.sleep(0.5)
                    # a new client is told why, promptly, instead of hanging
                    async with asyncio.timeout(20):
                        late = await Client.connect(path)
                        with pytest.raises((Exhausted, ConnectionLost)):
                            await late.get_features()
                        await late.close()
                    # the tenant's next fd-carrying request is refused, its VMs are kept
                    g2 = MemfdGuest(size=1 << 20)
                    with pytest.raises(Exhausted, match="file descriptors"):
                        await tenant.register_vm("vm2", [g2.region()])
                    g2.close()
                    assert set((await tenant.dump())["vms"]) == {"vm1"}
                finally:
                    for s in hogs:
                        s.close()
                await asyncio.sleep(1.5)  # the back-off ends; accepting works again
                async with asyncio.timeout(20), await Client.connect(path) as fresh:
                    assert await fresh.get_features() == wire.ALL_FEATURES
            proc.terminate()
            assert proc.stderr is not None
            _, err = proc.communicate(timeout=20)
            # logged once per episode, not once per wakeup
            assert err.count(b"pausing accepting") <= 5, err[-2000:]
    g.close()


@pytest.mark.asyncio
async def test_connection_cap_refuses_with_a_reason(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    async with Server(Service(default_host()), path, max_connections=2):
        a = await Client.connect(path)
        b = await Client.connect(path)
        assert await a.get_features() == await b.get_features()
        c = await Client.connect(path)
        with pytest.raises(Exhausted, match="connections"):
            await c.get_features()
        for x in (a, b, c):
            await x.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.asyncio
async def test_partial_messages_are_bounded_across_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    async with Server(Service(default_host()), path):
        socks = []
        # 20 connections each sending 12 MiB of a message that announces 16 MiB
        half = wire.HEADER_S.pack(Request.DUMP, wire.VERSION, wire.MAX_PAYLOAD) + bytes(12 << 20)
        loop = asyncio.get_running_loop()
        before = _rss()
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, path)
            socks.append(s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # a paused connection stops taking bytes
                    await loop.sock_sendall(s, half)
        grown = _rss() - before
        assert grown < 150 << 20, f"{grown >> 20} MiB held for partial messages"
        async with await Client.connect(path) as fresh:  # small requests still served
            assert await fresh.get_features() == wire.ALL_FEATURES
        for s in socks:
            s.close()


@pytest.mark.asyncio
async def test_spacing_of_turns_is_for_other_clients_sake_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client's own pipelined requests (answered a moment ago, alone on the daemon) get
    their turns at once; the same work is spaced out while another client is being
    answered."""
    async with running_daemon() as (server, path):
        loop = server.loop
        gaps: list[float] = []
        call_later = loop.call_later

        def spy(delay: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
            if getattr(callback, "__name__", "") == "_next_turn":
                gaps.append(delay)
            return call_later(delay, callback, *args, **kw)

        monkeypatch.setattr(loop, "call_later", spy)
        a, b = await Client.connect(path), await Client.connect(path)
        assert await a.get_features() == wire.ALL_FEATURES  # answered as it arrived
        a_id = min(server.connections)
        assert server.answered[1] == a_id
        server.answered = (time.perf_counter() + 3600, a_id)  # "just now", for the whole batch
        await asyncio.gather(*(a.get_features() for _ in range(3000)))  # many turns
        assert gaps and max(gaps) == 0
        gaps.clear()

        async def ping() -> None:
            for _ in range(200):
                await b.get_features()

        server.answered = (0.0, 0)
        pings = asyncio.ensure_future(ping())
        await asyncio.sleep(0.005)
        await asyncio.gather(*(a.get_features() for _ in range(3000)))
        await pings
        assert max(gaps) > 0
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_large_import_completes_while_a_flood_holds_the_input_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that send part of a huge message and stop hold the whole input budget; a
    large ``IMPORT_VM`` sent then is paused for the budget, and completes once the daemon
    closes the hostage-takers (a partial message held for ``PARTIAL_S`` while it waits).
    The sizes are scaled down (budget 512 KiB, 32 KiB always allowed) so the import's 60 KiB
    is large."""
    monkeypatch.setattr(server_mod, "INPUT_BUDGET", 512 << 10)
    monkeypatch.setattr(server_mod, "SMALL_INPUT", 32 << 10)
    monkeypatch.setattr(server_mod, "PARTIAL_S", 0.5)
    path = str(tmp_path / "d.sock")
    g, g2 = MemfdGuest(size=1 << 20), MemfdGuest(size=1 << 20)
    name = "dst-" + "y" * 60000  # the import's 60 KiB
    async with Server(Service(default_host()), path) as server:
        source, target = await Client.connect(path), await Client.connect(path)
        stream = await source.export_vm(await source.register_vm("src", [g.region()]))
        loop = asyncio.get_running_loop()
        half = wire.HEADER_S.pack(Request.DUMP, wire.VERSION, wire.MAX_PAYLOAD) + bytes(200 << 10)
        socks = []
        for _ in range(12):  # each holds 200 KiB of a 16 MiB message, then goes quiet
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, path)
            socks.append(s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await loop.sock_sendall(s, half)
        await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)
        assert server.input_held > server_mod.INPUT_BUDGET  # the budget is full
        async with asyncio.timeout(30):
            res = await target.import_vm(name, stream, [g2.region()])
        assert set((await target.dump())["vms"]) == {"src", name}
        assert res.vm and not res.bindings
        # what held the budget hostage was closed; what is held now fits in it
        assert len(server.connections) < 2 + len(socks)
        assert server.input_held <= server_mod.INPUT_BUDGET
        for s in socks:
            s.close()
        await source.close()
        await target.close()
    g.close()
    g2.close()


# -- 5. replies of any size; a bad reply costs one request, not the VMs ------------------------


@pytest.mark.asyncio
async def test_dump_larger_than_one_message_arrives_whole() -> None:
    g = MemfdGuest(size=1 << 20)
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        for i in range(300):  # 300 VMs with 64 KiB names: the document is over 16 MiB
            await c.register_vm(f"{i:05d}" + "x" * 65000, [g.region()])
        doc = await c.dump()
        assert len(doc["vms"]) == 300
        assert not c.closed and len((await c.dump())["vms"]) == 300
    g.close()


def test_undecodable_reply_fails_one_request_not_the_connection() -> None:
    codec = Codec(Role.CLIENT, tolerant=True)
    codec.receive(frame(Request.DUMP, wire.VERSION | wire.FLAG_REPLY, b"\0" * 3))
    codec.receive(frame(Request.GET_FEATURES, wire.VERSION | wire.FLAG_REPLY, bytes(8)))
    bad = codec.next_message()
    good = codec.next_message()
    assert bad is not None and bad.body is BAD_PAYLOAD
    assert good is not None and good.body.features == 0
    # a reply bigger than any message may be is skipped as it arrives, never buffered whole
    small = Codec(Role.CLIENT, tolerant=True, max_payload=1024)
    small.receive(wire.HEADER_S.pack(Request.DUMP, wire.VERSION | wire.FLAG_REPLY, 5000) + b"x")
    huge = small.next_message()
    assert huge is not None and huge.body is BAD_PAYLOAD and small.buffered == 0
    for _ in range(4):
        small.receive(b"y" * 1000)
        assert small.next_message() is None and small.buffered == 0
    small.receive(
        b"z" * 999 + frame(Request.GET_FEATURES, wire.VERSION | wire.FLAG_REPLY, bytes(8))
    )
    after = small.next_message()
    assert after is not None and after.request == Request.GET_FEATURES


@pytest.mark.asyncio
async def test_client_refuses_locally_what_the_daemon_would_refuse() -> None:
    g = MemfdGuest(size=1 << 20)
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        regions = [MemoryRegion(g.fd, i << 20, 4096) for i in range(17)]
        with pytest.raises(Invalid, match="17 memory regions"):
            await c.register_vm("many", regions)
        with pytest.raises(Invalid, match="not sent"):
            await c.open_vm("\udcff-not-utf8")
        assert await c.get_features() == wire.ALL_FEATURES  # the connection is fine
    g.close()


# -- 6. the socket path: a lock beside it, remove only what we created -------------------------


@pytest.mark.asyncio
async def test_second_daemon_on_a_path_is_refused_even_without_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    async with Server(Service(default_host()), path):
        os.unlink(path)  # the window a racing daemon used to hit: the file is gone
        with pytest.raises(OSError, match="another daemon"):
            await Server(Service(default_host()), path).start()


@pytest.mark.asyncio
async def test_shutdown_removes_only_its_own_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    server = Server(Service(default_host()), path)
    await server.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's socket now lives at the path
    await server.close()
    assert os.path.exists(path)
    other.close()


# -- 7. access control ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_socket_is_private_and_only_the_owner_changes_its_vm() -> None:
    g = bound_guest()
    async with running_daemon() as (_, path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        owner = await Client.connect(path)
        other = await Client.connect(path)
        vm = await setup_vm(owner, g)
        await bind(owner, vm, g)
        seen = await other.open_vm("vm1")  # same uid: may read
        assert "vm1" in (await other.dump())["vms"]
        for attempt in (
            other.unregister_vm(seen),
            other.attach_device(seen, "00:04.0", "3b:00.0", "vfio-pci"),
            other.detach_device(seen, DEV),
            other.set_root_table(seen, 0),
            other.pasid_entry(seen, DEV, 5),
            other.subscribe(seen),
        ):
            with pytest.raises(NotOwner):
                await attempt
        [r] = await owner.dma(vm, [DmaRequest(DEV, 5, VA)])
        assert r.ok  # the VM is untouched
        await other.close()
        await owner.close()
    g.close()


def test_other_users_see_nothing_of_a_vm() -> None:
    service = Service(default_host())
    alice = service.open_session("alice", uid=1000)
    bob = service.open_session("bob", uid=1001)
    g = MemfdGuest(size=1 << 20)
    codec = Codec(Role.DAEMON)

    def ask(session: object, request: Request, body: dict[str, object], fds: list[int]) -> None:
        codec.receive(frame(request, wire.VERSION, wire.REQUEST_LAYOUTS[request].build(body)), fds)
        msg = codec.next_message()
        assert msg is not None
        service.handle(session, msg)  # type: ignore[arg-type]

    regions = [
        {"guest_phys_addr": 0, "memory_size": 1 << 20, "userspace_addr": 0, "mmap_offset": 0}
    ]
    ask(
        alice,
        Request.REGISTER_VM,
        {"flags": 0, "nregions": 1, "name": "a", "regions": regions},
        [os.dup(g.fd)],
    )
    assert service.vms
    ask(bob, Request.OPEN_VM, {"name": "a"}, [])
    assert b"VM a belongs to another user" in b"".join(bob.outbox)
    assert "a" not in service.dump(viewer=bob)["vms"]
    assert "a" in service.dump(viewer=alice)["vms"]
    service.end_session(alice)
    g.close()


# -- 8. the command line: one line, exit 2, never a traceback or a hang -------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_vm_scenario(memory: str) -> str:
    """Scenario TOML: host "h" with function 3a:00.0 and VM "v" of ``memory`` on it."""
    return (
        '[[host]]\nname = "h"\n[[host.function]]\nrid = "3a:00.0"\n'
        f'[[vm]]\nname = "v"\nhost = "h"\nmemory = "{memory}"\n'
    )


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not utf-8 = 1\n", b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n"],
    ids=["non-utf8", "5000-deep"],
)
def test_bad_toml_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(content)
    for argv in (
        ["scenario", str(f)],
        ["serve", "--socket", str(tmp_path / "s"), "--host", str(f)],
    ):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_scenario_with_a_date_in_expect_ends_with_an_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "date.toml"
    f.write_text(
        _one_vm_scenario("4M")
        + '[[vm.device]]\nrid = "00:03.0"\nfunction = "3a:00.0"\nassign = "vfio-pci"\n'
        '[[step]]\nop = "dump"\nvm = "v"\nexpect = { when = 1979-05-27 }\n'
    )
    rc, err = _cli(capsys, "scenario", str(f))
    assert rc in (1, 2) and "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1


def test_scenario_exhausting_the_guest_page_pool_ends_with_an_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "pool.toml"
    steps = "".join(  # each 512 GiB apart: three new table pages a step, the 1 MiB pool runs out
        f'[[step]]\nop = "map"\nvm = "v"\nvpasid = 1\nva = {i << 39}\ngpa = 4096\nsize = 4096\n'
        for i in range(256)
    )
    f.write_text(_one_vm_scenario("2M") + steps)
    rc, err = _cli(capsys, "scenario", str(f))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "page-table pool is exhausted" in err


def test_scenario_with_memory_the_host_cannot_map_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "huge.toml"
    f.write_text(_one_vm_scenario("64G"))  # more memory than this machine maps
    rc, err = _cli(capsys, "scenario", str(f))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_serve_refuses_an_empty_socket_path(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, "serve", "--socket", "")
    assert rc == 2 and "file path" in err


def test_status_times_out_on_a_daemon_that_never_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(8)  # connections complete in the backlog; nobody ever answers
    try:
        rc, err = _cli(capsys, "status", "--socket", path, "--timeout", "0.5")
    finally:
        mute.close()
    assert rc == 1 and "did not answer" in err and err.count("\n") == 1


def test_status_vm_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli(capsys, "status", "--socket", str(tmp_path / "s"), "--vm", "x" * 70000)
    assert rc == 2 and err.count("\n") == 1
    rc, err = _cli(capsys, "status", "--socket", str(tmp_path / "s"), "--vm", "\udcff")
    assert rc == 2 and err.count("\n") == 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vioasid", "serve", "--socket", path], stderr=subprocess.DEVNULL
        )
        try:
            for _ in range(300):
                if os.path.exists(path):
                    break
                proc.wait(0.1) if proc.poll() is not None else None
                import time

                time.sleep(0.05)
            rc, err = _cli(capsys, "status", "--socket", path, "--vm", "nope")
            assert rc == 2 and "nope" in err and err.count("\n") == 1
        finally:
            proc.terminate()
            proc.wait(10)


def test_asyncio_wait_for_is_gone_where_it_could_swallow_a_cancellation() -> None:
    root = Path(__file__).resolve().parent.parent
    files = [
        "qemu_glue/migration/live.py", "qemu_glue/migration/rig.py", "vioasid/device/translator.py",
        "qemu_glue/vhost_user/guest.py", "vioasid/client.py", "qemu_glue/guest_runner.py",
    ]  # fmt: skip
    for name in files:
        assert "asyncio.wait_for(" not in (root / name).read_text(), name


@pytest.mark.asyncio
async def test_console_lines_longer_than_64k_do_not_stop_the_reader() -> None:
    from qemu_glue.qemu.process import read_line

    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 200_000 + b"\nnext line\n")
    reader.feed_eof()
    long = await read_line(reader)
    assert long == b"x" * 200_000 + b"\n"
    assert await read_line(reader) == b"next line\n"
    assert await read_line(reader) == b""
    # NotFound is re-exported for callers that match it
    assert issubclass(NotFound, Exception)
