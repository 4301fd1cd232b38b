"""Every daemon request against a real daemon on a real unix socket (in-process server task).

Guest memory is a memfd passed by SCM_RIGHTS; the guest's root/context/PASID tables and
first-stage page tables are written into it by the guest-driver model, and the daemon reads them
from its own mapping of that fd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from daemon_support import (
    DEV,
    ENQCMD,
    ENQCMD_TRANSLATING,
    GPA,
    PLAIN,
    SID,
    TRANSLATING,
    VA,
    MemfdGuest,
    bind,
    bound_guest,
    daemon_clients,
    daemon_vm,
    running_daemon,
    setup_vm,
)

from vioasid.client import (
    Client,
    DmaRequest,
    Exhausted,
    FaultEvent,
    Invalid,
    MemoryRegion,
    MigrationFailed,
    NotFound,
    NotOwner,
    PageRequestEvent,
    PageResponseEvent,
    PasidConflict,
)
from vioasid.daemon.hostconfig import host_from_doc
from vioasid.formats import wire
from vioasid.formats.fault import FaultReason
from vioasid.formats.wire import DmaStatus, ErrorCode, EventMask, Feature, Request
from vioasid.protocol.daemon_codec import encode_request, frame


@pytest.mark.asyncio
async def test_features() -> None:
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        feats = await c.get_features()
        assert feats == wire.ALL_FEATURES and Feature.DMA_BATCH in feats
        await c.set_features(Feature.DMA_BATCH | Feature.EVENTS)
        with pytest.raises(Invalid, match="not offered"):
            await c.set_features(1 << 40)


@pytest.mark.asyncio
async def test_register_open_unregister() -> None:
    g = MemfdGuest()
    async with daemon_clients() as (owner, other):
        vm = await owner.register_vm("vm1", [g.region()])
        assert await other.open_vm("vm1") == vm
        with pytest.raises(NotFound):
            await other.open_vm("nope")
        with pytest.raises(Invalid, match="already has VM"):
            await owner.register_vm("vm1", [g.region()])
        with pytest.raises(NotOwner, match="belongs to"):
            await other.unregister_vm(vm)
        d = await other.dump(vm)
        assert d["vms"]["vm1"]["memory"] == [{"gpa": "0x0", "size": hex(g.size)}]
        assert d["vms"]["vm1"]["owner"] != d["sessions"][-1]
        await owner.unregister_vm(vm)
        with pytest.raises(NotFound):
            await other.dump(vm)
        assert (await other.dump())["vms"] == {}
    g.close()


@pytest.mark.asyncio
async def test_register_refuses_bad_memory() -> None:
    g = MemfdGuest(size=1 << 20)
    r, w = os.pipe()
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        with pytest.raises(Invalid, match="not inside its file"):
            await c.register_vm("big", [MemoryRegion(g.fd, 0, 2 << 20)])
        with pytest.raises(Invalid, match="not a file"):
            await c.register_vm("pipe", [MemoryRegion(r, 0, 4096)])
        with pytest.raises(Invalid, match="no memory regions"):
            await c.register_vm("none", [])
        with pytest.raises(Invalid, match="overlaps"):
            await c.register_vm(
                "overlap", [MemoryRegion(g.fd, 0, 8192), MemoryRegion(g.fd, 4096, 8192, 4096)]
            )
        assert (await c.dump())["vms"] == {}
    os.close(r)
    os.close(w)
    g.close()


@pytest.mark.asyncio
async def test_memfd_tables_bind_and_dma() -> None:
    """The guest-driver model writes tables into a memfd; the daemon walks its own mapping."""
    async with daemon_vm() as (g, c, vm):
        b = await bind(c, vm, g)
        assert (b.bound, b.ppasid, b.space) == (True, 5, "per-rid")
        [ok] = await c.dma(vm, [DmaRequest(DEV, 5, VA + 0x10, write=True)])
        assert ok.ok and ok.tag == 5 and ok.gpa == GPA + 0x10
        assert ok.hpa != ok.gpa and ok.perm == 3
        # the guest writes data where the device will look: the daemon sees the same bytes
        g.memory.write(GPA + 0x10, b"hello")
        d = await c.dump(vm)
        assert d["vms"]["vm1"]["devices"][DEV]["bindings"] == {"5": 5}
        assert d["allocators"]["functions"][PLAIN] == {"per_rid": [5], "host_entries": [5]}


@pytest.mark.asyncio
async def test_pasid_entry_missing_and_unbind() -> None:
    async with daemon_vm() as (g, c, vm):
        nb = await c.pasid_entry(vm, DEV, 5)  # nothing written yet
        assert (nb.bound, nb.space) == (False, "none")
        g.write_entry(SID, 5)
        assert (await c.pasid_entry(vm, DEV, 5)).bound
        g.clear_entry(SID, 5)
        assert not (await c.pasid_entry(vm, DEV, 5)).bound
        d = await c.dump()
        assert d["allocators"]["functions"][PLAIN] == {"per_rid": [], "host_entries": []}
        with pytest.raises(Invalid):
            await c.pasid_entry(vm, DEV, 0)
        with pytest.raises(NotFound):
            await c.pasid_entry(vm, "00:09.0", 5)
        with pytest.raises(NotFound):
            await c.pasid_entry(vm + 7, DEV, 5)


@pytest.mark.asyncio
async def test_invalidation_descriptors_bind_unbind_and_flush() -> None:
    async with daemon_vm() as (g, c, vm):
        g.write_entry(SID, 5)
        assert await c.invalidate(vm, g.pasid_cache_inv(5)) == 1  # the Linux sequence: bind
        [r] = await c.dma(vm, [DmaRequest(DEV, 5, VA)])
        assert r.gpa == GPA
        # remap the page elsewhere; until the guest invalidates, the cached translation stays
        g.table(5).unmap(VA, 0x1000)
        g.map(5, VA, GPA + 0x10000)
        assert await c.invalidate(vm, g.piotlb_inv(5)) == 1
        [r] = await c.dma(vm, [DmaRequest(DEV, 5, VA)])
        assert r.gpa == GPA + 0x10000
        # an entry cleared + PASID-cache invalidation: unbound
        g.clear_entry(SID, 5)
        assert await c.invalidate(vm, g.pasid_cache_inv(5)) == 1
        assert (await c.dump(vm))["vms"]["vm1"]["devices"][DEV]["bindings"] == {}
        # wait descriptors change nothing; bad descriptors are refused
        from vioasid.formats import invalidation as inv

        assert await c.invalidate(vm, inv.build_desc(inv.WAIT_DESC, {"SW": 0})) == 0
        with pytest.raises(Invalid, match="not defined"):
            await c.invalidate(vm, bytes(32))
        with pytest.raises(Invalid, match="reserved"):
            await c.invalidate(vm, g.pasid_cache_inv(5)[:16] + b"\x01" + bytes(15))


@pytest.mark.asyncio
async def test_domain_global_context_and_iotlb_invalidations() -> None:
    from vioasid.formats import invalidation as inv

    devices = (("00:03.0", PLAIN, "vfio-pci"), ("00:04.0", TRANSLATING, "mdev"))
    async with daemon_vm(devices) as (g, c, vm):
        for sid in (0x18, 0x20):
            g.write_entry(sid, 5)
            await c.pasid_entry(vm, sid, 5)
        # the guest clears 00:04.0's entry; a domain-selective PASID-cache flush unbinds it
        g.clear_entry(0x20, 5)
        dsi = inv.build_desc(inv.PC_DESC, {"G": inv.PC_DSI, "DID": 1})
        assert await c.invalidate(vm, dsi) == 2  # both bound entries re-read
        d = (await c.dump(vm))["vms"]["vm1"]["devices"]
        assert d["00:03.0"]["bindings"] == {"5": 5} and d["00:04.0"]["bindings"] == {}
        # another domain's flush touches nothing bound under DID 1
        other = inv.build_desc(inv.PC_DESC, {"G": inv.PC_DSI, "DID": 9})
        assert await c.invalidate(vm, other) == 0
        glob = inv.build_desc(inv.PC_DESC, {"G": inv.PC_GLOBAL})
        assert await c.invalidate(vm, glob) == 1
        cc = inv.build_desc(inv.CC_DESC, {"G": inv.CC_DEVICE, "SID": 0x18})
        assert await c.invalidate(vm, cc) == 1
        cc_none = inv.build_desc(inv.CC_DESC, {"G": inv.CC_DEVICE, "SID": 0x99})
        assert await c.invalidate(vm, cc_none) == 0
        iotlb = inv.build_desc(inv.IOTLB_DESC, {"G": inv.IOTLB_GLOBAL})
        assert await c.invalidate(vm, iotlb) == 1
        # a 128-bit descriptor is accepted as the low half of a 256-bit one
        assert await c.invalidate(vm, inv.build_desc(inv.WAIT_DESC, {}, wide=False)) == 0
        with pytest.raises(Invalid, match="granularity"):
            await c.invalidate(vm, inv.build_desc(inv.PC_DESC, {"G": 2}))


@pytest.mark.asyncio
async def test_batched_dma_in_order_faults_and_events() -> None:
    g = bound_guest()
    async with daemon_clients() as (c, watcher):
        vm = await setup_vm(c, g)
        await bind(c, vm, g)
        with pytest.raises(NotOwner):  # only the owner may subscribe to its VM's faults
            await watcher.subscribe(await watcher.open_vm("vm1"), EventMask.FAULTS)
        await c.subscribe(vm, EventMask.FAULTS)
        reqs = [DmaRequest(DEV, 5, VA + i * 8) for i in range(40)]
        reqs[7] = DmaRequest(DEV, 5, 0x7000_0000)  # not mapped: fault
        reqs[9] = DmaRequest("00:09.0", 5, VA)  # no such device: error
        results = await c.dma(vm, reqs)
        assert [r.gpa for i, r in enumerate(results) if i not in (7, 9)] == [
            GPA + i * 8 for i in range(40) if i not in (7, 9)
        ]
        assert results[7].status == DmaStatus.FAULT
        assert results[7].fault == FaultReason.FS_PAGING_ENTRY_P and results[7].tag == 5
        assert results[9].status == DmaStatus.ERROR and results[9].error == "not-found"
        ev = await c.next_event(timeout=5)
        assert isinstance(ev, FaultEvent)
        assert (ev.rid, ev.vpasid, ev.addr, ev.reason) == (DEV, 5, 0x7000_0000, 0x71)
        assert len(ev.record) == 16
        # the watcher was refused: nothing pushed to it
        assert watcher.pending_events() == []
        # a read-only page written: a fault with the write bit
        g.map(5, VA + 0x100000, GPA + 0x100000, write=False)
        [w] = await c.dma(vm, [DmaRequest(DEV, 5, VA + 0x100000, write=True)])
        assert w.status == DmaStatus.FAULT
        ev = await c.next_event(timeout=5)
        assert isinstance(ev, FaultEvent) and ev.write
        # by tag: the host function + the PASID on the wire
        [t] = await c.dma(vm, [DmaRequest(PLAIN, 5, VA, by_tag=True)])
        assert t.ok and t.gpa == GPA
    g.close()


@pytest.mark.asyncio
async def test_single_dma_fast_path_matches_the_batch_path() -> None:
    """One-entry DMA messages (the daemon's one-read fast path) answer exactly as the same
    entries inside a batch; refusals and events still reach the client."""
    g = bound_guest()
    g.map(5, VA + 0x100000, GPA + 0x100000, write=False)
    async with daemon_vm(guest=g) as (g, c, vm):
        await bind(c, vm, g)
        await c.subscribe(vm, EventMask.FAULTS)  # the same connection: events and replies
        reqs = [
            DmaRequest(DEV, 5, VA + 0x18),
            DmaRequest(DEV, 5, VA + 0x20, write=True),
            DmaRequest(DEV, 5, VA + 0x100000, write=True),  # read-only page: fault
            DmaRequest(DEV, 5, 0x7000_0000),  # not mapped: fault
            DmaRequest("00:09.0", 5, VA),  # no such device: error
            DmaRequest(PLAIN, 5, VA + 8, by_tag=True),
            DmaRequest(DEV, 6, VA),  # vPASID 6 not bound: a fault
        ]
        one = [(await c.dma(vm, [r]))[0] for r in reqs]
        single_faults = [await c.next_event(timeout=5) for _ in range(3)]
        batch = await c.dma(vm, reqs)
        batch_faults = [await c.next_event(timeout=5) for _ in range(3)]
        assert one == batch
        assert [r.status for r in one[:2]] == [DmaStatus.OK, DmaStatus.OK]
        assert (one[0].perm, one[1].perm, one[1].gpa) == (1, 3, GPA + 0x20)
        assert one[2].status == one[3].status == DmaStatus.FAULT
        assert one[4].error == "not-found" and one[5].ok and one[6].status == DmaStatus.FAULT
        assert single_faults == batch_faults
        assert [(e.addr, e.write) for e in single_faults if isinstance(e, FaultEvent)] == [
            (VA + 0x100000, True),
            (0x7000_0000, False),
            (VA, False),
        ]
        assert c.pending_events() == []
        with pytest.raises(NotFound):
            await c.dma(vm + 100, reqs[:1])
        raw = DmaRequest(DEV, 5, VA).pack()
        f1 = c.dma_packed_nowait(vm + 100, 1, raw)
        f2 = c.dma_packed_nowait(vm, 1, raw)
        with pytest.raises(NotFound):
            await f1
        assert Client.dma_results(await f2)[0].gpa == GPA
    g.close()


@pytest.mark.asyncio
async def test_faults_queued_before_subscribe_are_delivered_then() -> None:
    async with daemon_vm() as (g, c, vm):
        await bind(c, vm, g)
        await c.dma(vm, [DmaRequest(DEV, 5, 0x9000_0000)])
        assert (await c.dump(vm))["vms"]["vm1"]["faults"] == 1
        await c.subscribe(vm)
        ev = await c.next_event(timeout=5)
        assert isinstance(ev, FaultEvent) and ev.addr == 0x9000_0000
        assert (await c.dump(vm))["vms"]["vm1"]["faults"] == 0


@pytest.mark.asyncio
async def test_page_request_pushed() -> None:
    async with daemon_vm() as (g, c, vm):
        await bind(c, vm, g)
        await c.subscribe(vm, EventMask.PAGE_REQUESTS | EventMask.FAULTS)
        [r] = await c.dma(vm, [DmaRequest(DEV, 5, 0x7000_0000, write=True, page_request=True)])
        assert r.status == DmaStatus.PAGE_REQUEST
        ev = await c.next_event(timeout=5)
        assert isinstance(ev, PageRequestEvent)
        assert (ev.rid, ev.vpasid, ev.addr, ev.write) == (DEV, 5, 0x7000_0000, True)
        assert c.pending_events() == []  # no fault record for it
        # the guest answers with a page-group response: the device side gets it
        from vioasid.formats import invalidation as inv

        resp = inv.build_desc(
            inv.PGRESP_DESC,
            {"PP": 1, "RC": inv.RESP_SUCCESS, "RID": SID, "PASID": 5, "LPIG": 1, "PRGI": ev.prgi},
        )
        assert await c.invalidate(vm, resp) == 1
        pr = await c.next_event(timeout=5)
        assert isinstance(pr, PageResponseEvent)
        assert (pr.rid, pr.vpasid, pr.code, pr.last) == (DEV, 5, 0, True)


@pytest.mark.asyncio
async def test_enqcmd_and_global_space() -> None:
    devices = (("00:03.0", PLAIN, "vfio-pci"), ("00:04.0", ENQCMD_TRANSLATING, "mdev"))
    async with daemon_vm(devices) as (g, c, vm):
        b = await bind(c, vm, g, "00:04.0")
        assert b.space == "global"
        assert await c.enqcmd(vm, "00:04.0", 5) == b.ppasid
        with pytest.raises(Invalid, match="not enqcmd"):
            await c.enqcmd(vm, "00:03.0", 5)
        with pytest.raises(NotFound, match="CPU PASID translation table"):
            await c.enqcmd(vm, "00:04.0", 6)
        d = await c.dump()
        assert d["allocators"]["global"] == [b.ppasid]
        assert d["vms"]["vm1"]["cpu_table"] == {"5": b.ppasid}


@pytest.mark.asyncio
async def test_pasid_conflict_is_reported_with_its_kind() -> None:
    """The seed's trouble case: vPASID 5 already maps elsewhere in the CPU table, then a
    non-translating enqcmd function needs pPASID == 5."""
    g = MemfdGuest()
    g2 = MemfdGuest()
    devices = (("00:04.0", ENQCMD_TRANSLATING, "mdev"), ("00:05.0", ENQCMD, "vfio-pci"))
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        # another VM takes global pPASID 5 first, so vm1's vPASID 5 gets another value
        other = await setup_vm(c, g2, "vm0", devices=(("00:04.0", ENQCMD_TRANSLATING, "mdev"),))
        g2.map(5, VA, GPA)
        assert (await bind(c, other, g2, "00:04.0")).ppasid == 1
        g2.map(6, VA, GPA)
        await bind(c, other, g2, "00:04.0", 6)
        vm = await setup_vm(c, g, devices=devices)
        for x in (5,):
            g.map(x, VA, GPA)
            g.write_entry(0x20, x)
            g.write_entry(0x28, x)
        assert (await c.pasid_entry(vm, "00:04.0", 5)).ppasid != 5
        before = await c.dump()
        with pytest.raises(PasidConflict) as info:
            await c.pasid_entry(vm, "00:05.0", 5)
        assert info.value.kind == "pasid-conflict" and "vPASID 5" in info.value.message
        assert await c.dump() == before  # nothing changed
    g.close()
    g2.close()


@pytest.mark.asyncio
async def test_exhausted() -> None:
    host = host_from_doc(
        {
            "host": [
                {"name": "tiny", "pasid_bits": 1, "function": [{"rid": "3a:00.0"}]},
            ]
        }
    )
    g = MemfdGuest()
    async with running_daemon(host) as (_, path), await Client.connect(path) as c:
        vm = await setup_vm(c, g, devices=(("00:03.0", PLAIN, "mdev"),))
        for x in (5, 6):
            g.map(x, VA, GPA)
            g.write_entry(SID, x)
        assert (await c.pasid_entry(vm, DEV, 5)).ppasid == 1
        with pytest.raises(Exhausted) as info:
            await c.pasid_entry(vm, DEV, 6)
        assert info.value.code == ErrorCode.EXHAUSTED
    g.close()


@pytest.mark.asyncio
async def test_attach_detach() -> None:
    async with daemon_vm((("00:03.0", TRANSLATING, "vfio-pci"),)) as (g, c, vm):
        with pytest.raises(NotFound, match="no function"):
            await c.attach_device(vm, "00:06.0", "99:00.0")
        with pytest.raises(Invalid, match="assigned whole"):
            await c.attach_device(vm, "00:06.0", TRANSLATING, "mdev")
        with pytest.raises(ValueError):
            await c.attach_device(vm, "zz", PLAIN)
        await bind(c, vm, g)
        await c.detach_device(vm, DEV)
        d = await c.dump()
        assert d["vms"]["vm1"]["devices"] == {}
        assert d["allocators"]["functions"][TRANSLATING]["host_entries"] == []
        with pytest.raises(NotFound):
            await c.detach_device(vm, DEV)


@pytest.mark.asyncio
async def test_export_import_between_daemons() -> None:
    """Live-migration hand-over through two daemons: export on the source, import with the
    destination's functions; pPASIDs re-allocated under the destination's occupancy."""
    g = bound_guest()
    dst_host = host_from_doc(
        {"host": [{"name": "h2", "function": [{"rid": "5e:00.0"}, {"rid": "6a:00.0"}]}]}
    )
    async with running_daemon() as (_, src_path), running_daemon(dst_host) as (_, dst_path):
        src = await Client.connect(src_path)
        dst = await Client.connect(dst_path)
        vm = await setup_vm(src, g, devices=(("00:03.0", PLAIN, "mdev"),))
        assert (await bind(src, vm, g)).ppasid == 1
        stream = await src.export_vm(vm)
        # a destination without the right function: refused, nothing kept
        with pytest.raises(MigrationFailed, match="no function"):
            await dst.import_vm("vm1", stream, [g.region()], {DEV: "7f:00.0"})
        with pytest.raises(MigrationFailed):
            await dst.import_vm("vm1", stream[:-3], [g.region()], {DEV: "6a:00.0"})
        assert (await dst.dump())["vms"] == {}
        res = await dst.import_vm("vm1", stream, [g.region()], {DEV: "6a:00.0"})
        assert res.ppasids() == {DEV: {5: 1}}
        [r] = await dst.dma(res.vm, [DmaRequest(DEV, 5, VA + 8)])
        assert r.ok and r.gpa == GPA + 8
        # the source keeps running unchanged until its owner lets go
        [r] = await src.dma(vm, [DmaRequest(DEV, 5, VA + 8)])
        assert r.ok
        await src.unregister_vm(vm)
        await src.close()
        await dst.close()
    g.close()


@pytest.mark.asyncio
async def test_import_default_function_map() -> None:
    g = bound_guest()
    async with running_daemon() as (_, a), running_daemon() as (_, b):
        src = await Client.connect(a)
        dst = await Client.connect(b)
        vm = await setup_vm(src, g)
        await bind(src, vm, g)
        res = await dst.import_vm("", await src.export_vm(vm), [g.region()])
        assert res.ppasids() == {DEV: {5: 5}}
        assert (await dst.dump(res.vm))["vms"]["vm1"]["devices"][DEV]["function"] == PLAIN
        await src.close()
        await dst.close()
    g.close()


@pytest.mark.asyncio
async def test_import_reply_lists_every_binding_in_order() -> None:
    """IMPORT_VM's packed binding array: every (device, vPASID) with the pPASID and space the
    destination gave it, guest rid then vPASID ascending, matching the destination's dump."""
    g = bound_guest()
    devices = (("00:04.0", TRANSLATING, "vfio-pci"), ("00:03.0", PLAIN, "mdev"))
    async with running_daemon() as (_, a), running_daemon() as (_, b):
        src = await Client.connect(a)
        dst = await Client.connect(b)
        vm = await setup_vm(src, g, devices=devices)
        spaces = {}
        for rid, vpasids in (("00:04.0", (9, 2)), ("00:03.0", (7, 5, 300))):
            sid = int(rid[3:5], 16) << 3
            for x in vpasids:
                g.write_entry(sid, x)
                spaces[rid, x] = (await src.pasid_entry(vm, rid, x)).space
        # a tenant already on the destination: the imported pPASIDs cannot all stay the same
        tenant = bound_guest()
        t = await setup_vm(dst, tenant, name="tenant", devices=(("00:03.0", PLAIN, "mdev"),))
        held = (await bind(dst, t, tenant)).ppasid
        res = await dst.import_vm("vm1", await src.export_vm(vm), [g.region()])
        assert isinstance(res.vm, int)
        got = [(x.rid, x.vpasid) for x in res.bindings]
        want_order = [("00:03.0", 5), ("00:03.0", 7), ("00:03.0", 300)]
        want_order += [("00:04.0", 2), ("00:04.0", 9)]
        assert got == want_order
        assert {(x.rid, x.vpasid): x.space for x in res.bindings} == spaces
        dump = (await dst.dump(res.vm))["vms"]["vm1"]["devices"]
        want = {rid: {int(k): v for k, v in dev["bindings"].items()} for rid, dev in dump.items()}
        assert res.ppasids() == want
        assert held not in want["00:03.0"].values()  # the tenant's pPASID on that function
        await src.close()
        await dst.close()
    g.close()
    tenant.close()


# -- raw protocol behaviour -----------------------------------------------------------------------


async def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def recv_exact(s: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    while len(buf) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, n - len(buf)), 5)
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


@pytest.mark.asyncio
async def test_get_features_reply_bytes() -> None:
    async with running_daemon() as (_, path):
        s = await raw_connect(path)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s, frame(Request.GET_FEATURES, 1))
        reply = await recv_exact(s, 20)
        assert wire.HEADER_S.unpack_from(reply) == (1, 1 | wire.FLAG_REPLY, 8)
        assert int.from_bytes(reply[12:], "little") == wire.ALL_FEATURES
        s.close()


@pytest.mark.asyncio
async def test_need_reply_status_replies() -> None:
    async with running_daemon() as (_, path):
        s = await raw_connect(path)
        loop = asyncio.get_running_loop()
        # without need_reply: no reply at all (the next reply is GET_FEATURES')
        await loop.sock_sendall(s, encode_request(Request.SET_FEATURES, {"features": 1}))
        await loop.sock_sendall(
            s, encode_request(Request.SET_FEATURES, {"features": 1}, need_reply=True)
        )
        ok = await recv_exact(s, 20)
        assert wire.HEADER_S.unpack_from(ok) == (2, 5, 8) and ok[12:] == bytes(8)
        await loop.sock_sendall(
            s, encode_request(Request.SET_FEATURES, {"features": 1 << 60}, need_reply=True)
        )
        head = await recv_exact(s, 12)
        request, flags, size = wire.HEADER_S.unpack(head)
        body = await recv_exact(s, size)
        assert (request, flags) == (2, 5)
        assert int.from_bytes(body[:8], "little") == ErrorCode.INVALID
        assert "not offered" in body[8:].decode()
        s.close()


@pytest.mark.asyncio
async def test_malformed_connection_ends_alone() -> None:
    """Garbage on one connection closes it; the other session, its VM and new connections
    are unaffected."""
    g = bound_guest()
    async with running_daemon() as (server, path), await Client.connect(path) as c:
        vm = await setup_vm(c, g)
        await bind(c, vm, g)
        before = await c.dump()
        loop = asyncio.get_running_loop()
        for bad in (
            frame(Request.GET_FEATURES, 2),  # wrong version
            frame(4242, 1),  # unknown request
            wire.HEADER_S.pack(Request.DUMP, 1, wire.MAX_PAYLOAD + 1),  # too big
            frame(Request.DUMP, 1, b"\x01"),  # unparsable
            b"\x01\x00",  # short header, then EOF
            encode_request(Request.DUMP, {"vm": 1, "offset": 0})[:-1],  # truncated, then EOF
        ):
            s = await raw_connect(path)
            await loop.sock_sendall(s, bad)
            s.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(loop.sock_recv(s, 100), 5) == b""  # closed by daemon
            s.close()
        # fds on a message that carries none
        s = await raw_connect(path)
        s.setblocking(True)
        socket.send_fds(s, [frame(Request.GET_FEATURES, 1)], [g.fd])
        s.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(s, 100), 5) == b""
        s.close()
        # more fds than any message may carry (the kernel truncates them: MSG_CTRUNC)
        s = await raw_connect(path)
        s.setblocking(True)
        socket.send_fds(s, [frame(Request.GET_FEATURES, 1)], [g.fd] * (wire.MAX_FDS + 4))
        s.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(s, 100), 5) == b""
        s.close()
        after = await c.dump()
        assert after["vms"] == before["vms"] and after["allocators"] == before["allocators"]
        [r] = await c.dma(vm, [DmaRequest(DEV, 5, VA)])
        assert r.ok
        async with await Client.connect(path) as fresh:
            assert await fresh.open_vm("vm1") == vm
        for _ in range(500):  # the daemon notices the fresh client's EOF
            if len(server.connections) == 1:
                break
            await asyncio.sleep(0.01)
        assert list(server.connections) == [(await c.dump())["vms"]["vm1"]["owner"]]
    g.close()


@pytest.mark.asyncio
async def test_second_daemon_does_not_steal_a_live_socket(tmp_path: Path) -> None:
    from vioasid.daemon.hostconfig import default_host
    from vioasid.daemon.server import Server
    from vioasid.daemon.service import Service

    async with running_daemon() as (_, path):
        with pytest.raises(OSError, match="another daemon"):
            await Server(Service(default_host()), path).start()
        async with await Client.connect(path) as c:  # the first one still serves
            assert await c.get_features()
    # a stale socket file (nobody listening) is replaced
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    server = Server(Service(default_host()), path)
    await server.start()
    await server.close()
    assert not os.path.exists(path)
