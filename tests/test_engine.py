"""The engine's requests: nested DMA through the host table, faults in guest terms, isolation,
cache invalidation on unbind/rebind/unmap, ENQCMD, page requests, guest entry checks, teardown."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_support import Lab

from vioasid.formats.fault import FAULT_RECORD, FaultReason
from vioasid.formats.pasid import PASID_ENTRY, PGTT_NESTED
from vioasid.formats.prq import PAGE_REQ_DESC
from vioasid.model.engine import Host
from vioasid.model.errors import InvalidRequest, NotFound
from vioasid.model.faults import Fault
from vioasid.model.walker import WalkRequest

FUNCS = (("3a:00.0", False, False), ("3b:00.0", True, False), ("3c:00.0", False, False))


def _lab(policy: str = "per-device") -> Lab:
    lab = Lab()
    lab.host("h", policy, FUNCS)
    lab.vm("vm1", "h", (("00:03.0", "3a:00.0", "vfio-pci"), ("00:04.0", "3b:00.0", "mdev")))
    lab.vm("vm2", "h", (("00:03.0", "3c:00.0", "vfio-pci"), ("00:04.0", "3b:00.0", "mdev")))
    return lab


def test_host_entry_is_nested_and_points_at_guest_tables() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    lab.map("vm1", 5, 0x400000, 0x200000)
    b = lab.bind("vm1", "00:03.0", 5)
    words = h.iommu.entry_words(0x3A00, b.ppasid)
    assert words is not None
    e = PASID_ENTRY.flat(b"".join(w.to_bytes(8, "little") for w in words))
    vm = h.vm("vm1")
    assert e["PGTT"] == PGTT_NESTED and e["P"] == 1
    assert e["FLPTPTR"] == lab.guests["vm1"].tables[5].root  # a guest-physical address
    assert e["SSPTPTR"] == vm.second_stage.root
    assert e["DID"] == vm.devices[0x18].did
    # The walker resolves the request from that table (the same call the daemon makes).
    t = h.walker.translate(h.rtaddr, WalkRequest(0x3A00, 0x400123, b.ppasid, True))
    assert not isinstance(t, Fault) and t.address == vm.hpa + 0x200123 and t.pgtt == "nested"


def test_dma_cached_and_uncached_agree_and_large_pages() -> None:
    lab = _lab()
    lab.map("vm1", 5, 0x40000000, 0x200000, size=0x200000)  # 2 MiB page
    lab.bind("vm1", "00:03.0", 5)
    first = lab.dma("vm1", "00:03.0", 5, 0x40123456, write=True)
    again = lab.dma("vm1", "00:03.0", 5, 0x40123456, write=True)
    assert first.to_json() == again.to_json()
    assert first.gpa == 0x323456
    h = lab.hosts["h"]
    t = h.walker.translate(h.rtaddr, WalkRequest(0x3A00, 0x40123456, 5, True))
    assert not isinstance(t, Fault) and t.cached and t.page_size == 0x200000


def test_isolation_same_gpa_two_vms() -> None:
    lab = _lab()
    for vm in ("vm1", "vm2"):
        lab.map(vm, 1, 0x400000, 0x100000)
        lab.bind(vm, "00:04.0", 1)
    h = lab.hosts["h"]
    r1 = lab.dma("vm1", "00:04.0", 1, 0x400000)
    r2 = lab.dma("vm2", "00:04.0", 1, 0x400000)
    assert r1.tag != r2.tag and r1.gpa == r2.gpa == 0x100000
    assert r1.hpa == h.vm("vm1").hpa + 0x100000 and r2.hpa == h.vm("vm2").hpa + 0x100000
    # A guest address outside the VM's RAM never reaches another VM: the second stage faults.
    lab.map("vm1", 1, 0x800000, 0x40000000)  # 1 GiB: beyond vm1's 16 MiB
    r = lab.dma("vm1", "00:04.0", 1, 0x800000)
    assert r.fault is not None and r.fault.reason in (FaultReason.SS_ENTRY_P, FaultReason.SM_READ)


def test_fault_reported_with_guest_rid_and_vpasid() -> None:
    lab = _lab()
    lab.map("vm1", 7, 0x400000, 0x100000, write=False)
    b = lab.bind("vm1", "00:04.0", 7)
    r = lab.dma("vm1", "00:04.0", 7, 0x400010, write=True)
    assert r.fault is not None and r.tag == b.ppasid
    f = r.fault
    assert (f.reason, f.sid, f.pasid, f.addr) == (FaultReason.SM_WRITE, 0x20, 7, 0x400010)
    vm = lab.hosts["h"].vm("vm1")
    assert vm.faults == [f]
    rec = FAULT_RECORD.flat(f.record())
    assert (rec["SID"], rec["PV"], rec["PP"], rec["FR"], rec["T"], rec["FI"]) == (
        0x20, 7, 1, 0x85, 0, 0x400000,
    )  # fmt: skip
    from vioasid.model.engine import guest_fault_json

    j = guest_fault_json(f)
    assert (j["device"], j["vpasid"], j["addr"], j["reason"]) == ("00:04.0", 7, "0x400010", 0x85)


def test_unknown_tags_fault() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.bind("vm1", "00:04.0", 5)  # global 1 in 3b:00.0's table
    # vm2's mdev of the same parent never bound anything: its vPASID 5 has no tag at all.
    r = lab.dma("vm2", "00:04.0", 5, 0x400000)
    assert r.fault is not None and r.tag is None and r.fault.reason == FaultReason.PASID_ENTRY_P
    # Raw tags on the wire: owned -> resolves for its owner; unknown -> fault, no VM touched.
    assert h.dma_tag(0x3B00, 1, 0x400000).hpa == h.vm("vm1").hpa + 0x100000
    owner = h.tag_owner(0x3B00, 1)
    assert owner is not None and (owner[0].name, owner[1].guest_rid, owner[2]) == ("vm1", 0x20, 5)
    assert h.tag_owner(0x3B00, 2) is None
    r = h.dma_tag(0x3B00, 9, 0x400000)
    assert r.fault is not None and r.fault.reason == FaultReason.PASID_ENTRY_P
    assert h.vm("vm1").faults == [] and len(h.vm("vm2").faults) == 1
    # A RID device's unbound vPASID goes out untranslated and finds no entry.
    r = lab.dma("vm1", "00:03.0", 5, 0x400000)
    assert r.tag == 5 and r.fault is not None
    r = h.dma_tag(0x3A00, 6, 0x400000)  # raw unknown tag from vm1's whole function
    assert r.fault is not None and r.fault.sid == 0x18 and r.fault.pasid == 6
    with pytest.raises(NotFound):
        h.dma_tag(0x7700, 1, 0)


def test_unbind_and_rebind_drop_cached_translations() -> None:
    lab = _lab()
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.bind("vm1", "00:03.0", 5)
    assert lab.dma("vm1", "00:03.0", 5, 0x400000).gpa == 0x100000
    lab.unbind("vm1", "00:03.0", 5)
    r = lab.dma("vm1", "00:03.0", 5, 0x400000)
    assert r.fault is not None and r.fault.reason == FaultReason.PASID_ENTRY_P
    # The guest points vPASID 5 at a different first-stage table and binds again.
    g = lab.guests["vm1"]
    del g.tables[5]
    lab.map("vm1", 5, 0x400000, 0x300000)
    lab.bind("vm1", "00:03.0", 5)
    assert lab.dma("vm1", "00:03.0", 5, 0x400000).gpa == 0x300000
    # Re-bind without unbind (guest rewrote the entry + invalidated): same pPASID, new table.
    del g.tables[5]
    lab.map("vm1", 5, 0x400000, 0x500000)
    assert lab.bind("vm1", "00:03.0", 5).ppasid == 5
    assert lab.dma("vm1", "00:03.0", 5, 0x400000).gpa == 0x500000


def test_unmap_then_invalidate() -> None:
    lab = _lab()
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.bind("vm1", "00:04.0", 5)
    assert lab.dma("vm1", "00:04.0", 5, 0x400000).ok
    lab.guests["vm1"].tables[5].unmap(0x400000, 0x1000)
    h = lab.hosts["h"]
    assert lab.dma("vm1", "00:04.0", 5, 0x400000).ok  # stale IOTLB until invalidated (as VT-d)
    assert h.invalidate("vm1", 5) == 1
    r = lab.dma("vm1", "00:04.0", 5, 0x400000)
    assert r.fault is not None and r.fault.reason == FaultReason.FS_PAGING_ENTRY_P
    assert h.invalidate("vm1") == 1 and h.invalidate("vm1", 99) == 0


def test_enqcmd_errors() -> None:
    lab = _lab()
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.bind("vm1", "00:03.0", 5)
    with pytest.raises(InvalidRequest):
        lab.enqcmd("vm1", "00:03.0", 5)  # not an enqcmd function
    with pytest.raises(NotFound):
        lab.enqcmd("vm1", "00:04.0", 5)  # not in the CPU table
    with pytest.raises(InvalidRequest):
        lab.enqcmd("vm1", "00:04.0", 0)


def test_bind_reads_the_guest_entry_and_refuses_bad_ones() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    g = lab.guests["vm1"]
    before = h.snapshot()
    with pytest.raises(NotFound):
        h.bind("vm1", 0x18, 5)  # the guest wrote no entry
    g.driver.set_pasid_entry(0x18, 5, pgtt=2, did=1, ssptptr=0x1000)
    with pytest.raises(InvalidRequest, match="PGTT=2"):
        h.bind("vm1", 0x18, 5)
    with pytest.raises(InvalidRequest):
        h.bind("vm1", 0x18, 0)
    with pytest.raises(NotFound):
        h.bind("vm1", 0x99, 5)
    with pytest.raises(NotFound):
        h.bind("nope", 0x18, 5)
    h.set_rtaddr("vm1", 0)  # legacy / no root table
    with pytest.raises(InvalidRequest):
        h.bind("vm1", 0x18, 5)
    h.set_rtaddr("vm1", (1 << 40) | (1 << 10))  # scalable, root table outside guest RAM
    with pytest.raises(InvalidRequest):
        h.bind("vm1", 0x18, 5)
    h.set_rtaddr("vm1", g.driver.rtaddr)
    assert h.snapshot() == before


def test_hostile_guest_context_pointers() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    g = lab.guests["vm1"]
    ce = g.driver.context_entry_gpa(0x18)
    g.memory.write_u64(ce, g.memory.read_u64(ce) | (0xFFFF << 40))  # directory far outside RAM
    lab.map("vm1", 5, 0x400000, 0x100000)
    with pytest.raises((InvalidRequest, NotFound)):
        lab.bind("vm1", "00:03.0", 5)
    assert h.check_invariants() == []


def test_sync_pasid_binds_and_unbinds() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.guest_entry("vm1", "00:04.0", 5)
    b = h.sync_pasid("vm1", 0x20, 5)
    assert b is not None and b.ppasid == 1
    lab.guests["vm1"].driver.clear_pasid_entry(0x20, 5)
    assert h.sync_pasid("vm1", 0x20, 5) is None
    assert h.vm("vm1").cpu_table == {} and h.check_invariants() == []


def test_page_requests_are_queued_as_vtd_descriptors() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    desc = h.page_request("vm1", 0x20, 5, 0x400123, write=True, prgi=3)
    d = PAGE_REQ_DESC.flat(desc)
    assert (d["RID"], d["PASID"], d["PP"], d["WR"], d["RD"], d["PRGI"], d["ADDR"]) == (
        0x20, 5, 1, 1, 0, 3, 0x400000,
    )  # fmt: skip
    assert h.vm("vm1").page_requests == [desc]
    assert h.drain_page_requests("vm1") == [desc] and h.vm("vm1").page_requests == []
    lab.dma("vm1", "00:03.0", 3, 0)
    assert [f.pasid for f in h.drain_faults("vm1")] == [3] and h.drain_faults("vm1") == []


def test_remove_vm_frees_everything() -> None:
    lab = _lab()
    h = lab.hosts["h"]
    empty = h.snapshot()
    lab.vm("vm3", "h", (("00:05.0", "3b:00.0", "mdev"),))
    for x in (1, 2, 3):
        lab.map("vm3", x, 0x400000, 0x100000)
        lab.bind("vm3", "00:05.0", x)
    assert len(h.global_alloc) == 3
    h.remove_vm("vm3")
    assert len(h.global_alloc) == 0 and h.check_invariants() == []
    after = h.snapshot()
    assert after["global"] == empty["global"] and after["tables"] == empty["tables"]
    assert after["regions"] == empty["regions"] and after["dids"] == empty["dids"]
    with pytest.raises(NotFound):
        h.remove_vm("vm3")


def test_dump_shape() -> None:
    lab = _lab()
    lab.map("vm1", 5, 0x400000, 0x100000)
    lab.bind("vm1", "00:04.0", 5)
    d = lab.hosts["h"].dump("vm1")
    assert d["vms"]["vm1"]["devices"]["00:04.0"]["bindings"] == {"5": 1}
    assert d["vms"]["vm1"]["cpu_table"] == {"5": 1}
    assert d["functions"]["h/3b:00.0"]["table"] == {
        "1": {"vm": "vm1", "device": "00:04.0", "vpasid": 5}
    }
    assert "h/3c:00.0" not in d["functions"]  # vm2's


@pytest.mark.parametrize("policy", ["per-device", "global"])
def test_bind_many_matches_bind(policy: str) -> None:
    labs = [_lab(policy), _lab(policy)]
    xs = [1, 2, 3, 64, 65, 200, 7]
    for lab in labs:
        for x in xs:
            lab.map("vm1", x, 0x400000, 0x100000 + 0x1000 * x)
            for dev in ("00:03.0", "00:04.0"):
                lab.guest_entry("vm1", dev, x)
    one, many = labs[0].hosts["h"], labs[1].hosts["h"]
    for rid in (0x18, 0x20):
        for x in xs:
            one.bind("vm1", rid, x)
        assert many.bind_many("vm1", rid, xs) == len(xs)
    assert one.dump() == many.dump()
    assert one.snapshot()["tables"] == many.snapshot()["tables"]
    assert many.check_invariants() == []
    with pytest.raises(InvalidRequest, match="twice"):
        many.bind_many("vm1", 0x18, [1])
    with pytest.raises(NotFound):
        many.bind_many("vm1", 0x18, [300])  # no guest entry


def test_bind_checks_reserved_bits_as_the_walker_does() -> None:
    """The bind reads the guest's entries through the walker's reader: a reserved bit in the
    guest's PASID entry (bits 11:10 of qw0) or context entry is a refusal naming the VT-d
    reason, by bind and bind_many alike, and nothing changes."""
    lab = _lab()
    h, g = lab.hosts["h"], lab.guests["vm1"]
    lab.guest_entry("vm1", "00:03.0", 5)
    lab.guest_entry("vm1", "00:03.0", 6)
    pe = g.driver.pasid_entry_gpa(0x18, 5)
    g.memory.write_u64(pe, g.memory.read_u64(pe) | (1 << 10))
    before = h.snapshot()
    with pytest.raises(InvalidRequest, match="reserved bits in qw0") as exc:
        h.bind("vm1", 0x18, 5)
    assert exc.value.reason == FaultReason.PASID_ENTRY_RSVD  # type: ignore[attr-defined]
    assert h.snapshot() == before
    with pytest.raises(InvalidRequest, match="reserved bits in qw0"):
        h.bind_many("vm1", 0x18, [6, 5])
    assert set(h.vm("vm1").devices[0x18].ppasids) == {6}  # the binding before the refusal
    ce = g.driver.context_entry_gpa(0x18)
    g.memory.write_u64(ce, g.memory.read_u64(ce) | (1 << 5))  # bits 8:5 reserved
    h.set_rtaddr("vm1", g.driver.rtaddr)  # drops the VM's context cache
    with pytest.raises(InvalidRequest, match="reserved bits in context entry"):
        h.bind("vm1", 0x18, 6)


def _broken_owner(h: Host) -> None:
    fn = h.functions[0x3B00]
    fn.owner.pop(next(iter(fn.owner)))


def _broken_allocator(h: Host) -> None:
    h.functions[0x3A00].allocator.take(9)


def _broken_equal_x(h: Host) -> None:
    dev = h.vm("vm1").devices[0x18]
    dev.ppasids[5] = 6


def _broken_host_entry(h: Host) -> None:
    h.iommu.clear(0x3B00, h.vm("vm1").devices[0x20].ppasids[5])


def _broken_global_owner(h: Host) -> None:
    h.global_owner[77] = ("vm9", 1)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_broken_owner, "table owners != live bindings"),
        (_broken_allocator, "per-RID allocator used set != live per-RID bindings"),
        (_broken_equal_x, "needs pPASID == 5, has 6"),
        (_broken_host_entry, "no host entry for pPASID"),
        (_broken_global_owner, "global owner map != live global pPASIDs"),
    ],
)
def test_check_invariants_reports_a_broken_invariant(
    corrupt: Callable[[Host], None], message: str
) -> None:
    """check_invariants is what the property tests lean on: it must see each kind of damage."""
    lab = _lab("global" if corrupt is _broken_global_owner else "per-device")
    h = lab.hosts["h"]
    lab.bind("vm1", "00:03.0", 5)
    lab.bind("vm1", "00:04.0", 5)
    assert h.check_invariants() == []
    corrupt(h)
    errs = h.check_invariants()
    assert any(message in e for e in errs), errs
