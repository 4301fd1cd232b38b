"""The PASID DMA function's device TLB (vioasid/device/pasid_tlb.py): hits across doorbells, and
never a stale translation after the guest changes its tables, though nobody tells the device.

The guest side changes its tables exactly as a guest would (the model's table writer, the PASID
entry writer, raw entry writes for the hostile cases) and, as over vfio-user, the device hears
nothing of it: every job must still see the tables as they are at its doorbell. The random test
checks every job against an oracle that knows the guest's mapping, not the engine.
"""

from __future__ import annotations

import random

import pytest
from engine_support import MB, Lab
from test_pasid_dma_device import CTRL_AREA, DATA, DATA2, JobFields, Rig, iova

from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.device.pasid_tlb import PasidTlb
from vioasid.device.translator import EngineResolver, Resolved
from vioasid.formats import pasid_dma as pd
from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import PGTT_FIRST_STAGE, PGTT_SECOND_STAGE
from vioasid.formats.pasid_dma import CompletionStatus, FunctionType, Opcode, Reg
from vioasid.model.engine import Binding
from vioasid.model.faults import Fault
from vioasid.model.guest_driver import FirstStagePageTable, SecondStagePageTable

PAGE = 4096
WIN = 0x200000  # window offset of the pages the tests remap (a region of its own)
DST = 0x40000  # window offset of the destination (inside the stable 1 MiB data mapping)


def _rig(ftype: str = "dedicated", p: int = 5) -> tuple[Rig, int]:
    r = Rig(ftype)
    r.setup(r.fns[0], p)
    return r, p


def _copy(r: Rig, p: int, src: int, dst: int, n: int) -> dict[str, int]:
    return r.job(r.fns[0], p, opcode=Opcode.COPY, src=iova(p, src), dst=iova(p, dst), size=n)


def _page_data(i: int) -> bytes:
    return bytes([i & 0xFF]) * 16 + i.to_bytes(4, "little") * ((PAGE - 16) // 4)


def test_repeated_jobs_hit_the_device_tlb_and_need_no_walk() -> None:
    r, p = _rig()
    f = r.fns[0]
    r.mem.write(DATA, random.Random(1).randbytes(MB // 2))
    assert _copy(r, p, 0, MB // 2, MB // 2)["status"] == CompletionStatus.SUCCESS
    walked = f.tlb.stats.filled
    assert walked >= 256  # every page of both halves, once
    for _ in range(3):
        assert _copy(r, p, 0, MB // 2, MB // 2)["status"] == CompletionStatus.SUCCESS
    assert f.tlb.stats.filled == walked  # no new walk
    assert f.tlb.stats.hits >= 3 * 256
    assert r.mem.read(DATA + MB // 2, MB // 2) == r.mem.read(DATA, MB // 2)


def test_an_unmap_nobody_announced_faults_the_next_job() -> None:
    r, p = _rig()
    r.mem.write(DATA, b"\x5a" * MB)
    assert _copy(r, p, 0, DST, 4 * PAGE)["status"] == CompletionStatus.SUCCESS
    r.guest.table(p).unmap(iova(p, 2 * PAGE), PAGE)  # no notification of any kind
    rec = _copy(r, p, 0, DST, 4 * PAGE)
    assert rec["status"] == CompletionStatus.FAULT
    assert rec["fault_addr"] == iova(p, 2 * PAGE) and rec["bytes_done"] == 2 * PAGE
    assert rec["fault_reason"] == FaultReason.FS_PAGING_ENTRY_P and rec["fault_pasid"] == p


def test_remap_to_another_page_is_seen_by_the_very_next_job_every_time() -> None:
    r, p = _rig()
    pages = [DATA2 + i * PAGE for i in range(2)]
    for i, gpa in enumerate(pages):
        r.mem.write(gpa, _page_data(i + 1))
    t = r.guest.table(p)
    for k in range(50):
        which = k % 2 if k % 7 else 0  # mostly alternating, sometimes the same page again
        t.map(iova(p, WIN), pages[which], PAGE)
        assert _copy(r, p, WIN, DST, PAGE)["status"] == CompletionStatus.SUCCESS
        assert r.mem.read(DATA + DST, PAGE) == _page_data(which + 1), k
        t.unmap(iova(p, WIN), PAGE)
        rec = _copy(r, p, WIN, DST, PAGE)
        assert rec["status"] == CompletionStatus.FAULT and rec["fault_addr"] == iova(p, WIN)
    assert r.fns[0].tlb.stats.hits > 0


def test_read_only_now_means_a_write_fault_though_write_was_cached() -> None:
    r, p = _rig()
    t = r.guest.table(p)
    t.map(iova(p, WIN), DATA2, PAGE, write=True)
    fill: JobFields = {
        "opcode": Opcode.FILL,
        "dst": iova(p, WIN),
        "size": PAGE,
        "pattern": 0x1111111111111111,
    }
    assert r.job(r.fns[0], p, **fill)["status"] == CompletionStatus.SUCCESS
    assert r.job(r.fns[0], p, **fill)["status"] == CompletionStatus.SUCCESS  # from the TLB
    t.unmap(iova(p, WIN), PAGE)
    t.map(iova(p, WIN), DATA2, PAGE, write=False)  # same page, now read-only
    r.mem.write(DATA2, b"\x00" * PAGE)
    rec = r.job(r.fns[0], p, **fill)
    assert rec["status"] == CompletionStatus.FAULT and rec["fault_reason"] == FaultReason.SM_WRITE
    assert r.mem.read(DATA2, PAGE) == b"\x00" * PAGE
    # and the reverse: read-only cached, then writable
    t.unmap(iova(p, WIN), PAGE)
    t.map(iova(p, WIN), DATA2, PAGE, write=True)
    assert r.job(r.fns[0], p, **fill)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA2, 8) == b"\x11" * 8


def test_a_leaf_table_replaced_above_the_leaf_is_seen() -> None:
    # The guest points the PDE of the region at a new leaf table (same IOVAs, other pages) and
    # reuses the old leaf table's page for data: no leaf entry the TLB filed under changed.
    r, p = _rig()
    t = r.guest.table(p)
    t.map(iova(p, WIN), DATA2, 4 * PAGE)
    r.mem.write(DATA2, b"\x01" * 4 * PAGE)
    assert _copy(r, p, WIN, DST, 4 * PAGE)["status"] == CompletionStatus.SUCCESS
    pde_gpa = t._entry_gpa(iova(p, WIN), 2, create=False)
    assert pde_gpa is not None
    pde = r.mem.read_u64(pde_gpa)
    old_leaf = pde & ~0xFFF & ((1 << 52) - 1)
    new_leaf = r.guest.pages.alloc()
    fresh = DATA2 + 0x10000
    r.mem.write(fresh, b"\x02" * 4 * PAGE)
    for i in range(4):
        r.mem.write_u64(
            new_leaf + i * 8, (r.mem.read_u64(old_leaf + i * 8) & 0xFFF) | fresh + i * PAGE
        )
    r.mem.write_u64(pde_gpa, (pde & 0xFFF) | new_leaf)
    assert _copy(r, p, WIN, DST, 4 * PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA + DST, 4 * PAGE) == b"\x02" * 4 * PAGE
    # the old leaf table, now garbage that looks like entries to other pages, is never used
    r.mem.write(old_leaf, (DATA | 0x7).to_bytes(8, "little") * 512)
    assert _copy(r, p, WIN, DST, 4 * PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA + DST, 4 * PAGE) == b"\x02" * 4 * PAGE


def test_a_pasid_entry_repointed_at_other_tables_is_seen() -> None:
    r, p = _rig()
    f = r.fns[0]
    r.mem.write(DATA, b"\x0a" * PAGE)
    assert _copy(r, p, 0, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    other = FirstStagePageTable(r.mem, r.guest.pages)
    other.map(iova(p, 0), DATA2, PAGE)
    other.map(iova(p, DST), DATA2 + PAGE, PAGE)
    other.map(iova(p, 0x100000), CTRL_AREA, 0x10000)  # the control area stays where it was
    r.mem.write(DATA2, b"\x0b" * PAGE)
    r.guest.driver.set_pasid_entry(f.guest_rid, p, pgtt=PGTT_FIRST_STAGE, did=p,
                                   flptptr=other.root)  # fmt: skip
    assert _copy(r, p, 0, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA2 + PAGE, PAGE) == b"\x0b" * PAGE
    assert r.mem.read(DATA + DST, PAGE) == b"\x0a" * PAGE  # the old destination untouched
    # cleared entry: the function drops the binding and the job is refused, nothing moves
    r.guest.driver.clear_pasid_entry(f.guest_rid, p)
    rec_gpa = CTRL_AREA
    r.mem.write(rec_gpa, bytes(32))
    before = r.mem.read(DATA2 + PAGE, PAGE)
    r.submit(f, pasid=p, opcode=Opcode.COPY, src=iova(p, 0), dst=iova(p, DST), size=PAGE,
             completion=iova(p, 0x100000))  # fmt: skip
    assert p not in f.bound and r.mem.read(DATA2 + PAGE, PAGE) == before


def test_an_entry_changed_and_changed_back_is_still_right() -> None:
    r, p = _rig()
    t = r.guest.table(p)
    r.mem.write(DATA2, _page_data(7))
    r.mem.write(DATA2 + PAGE, _page_data(8))
    t.map(iova(p, WIN), DATA2, PAGE)
    assert _copy(r, p, WIN, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    t.unmap(iova(p, WIN), PAGE)
    t.map(iova(p, WIN), DATA2 + PAGE, PAGE)
    t.unmap(iova(p, WIN), PAGE)
    t.map(iova(p, WIN), DATA2, PAGE)  # back to the first page between two jobs
    assert _copy(r, p, WIN, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA + DST, PAGE) == _page_data(7)


@pytest.mark.parametrize("ftype", ["dedicated", "translating", "mdev", "enqcmd"])
@pytest.mark.parametrize("seed", range(4))
def test_random_remaps_never_see_a_stale_translation(ftype: str, seed: int) -> None:
    """Random map/unmap/remap/permission changes of 8 window pages over 12 data pages, each
    followed by a copy of the whole window and a fill into it: every result is what the guest's
    mapping says at that moment (first unmapped page faults, read-only pages fault the fill)."""
    rng = random.Random(f"{ftype}-{seed}")
    r, p = _rig(ftype)
    f = r.fns[0]
    t = r.guest.table(p)
    n_win, n_data = 8, 12
    data = [DATA2 + i * PAGE for i in range(n_data)]
    mapping: dict[int, tuple[int, bool]] = {}  # window page -> (data page, writable)
    for i in range(n_data):
        r.mem.write(data[i], _page_data(100 + i))
    for step in range(60):
        w = rng.randrange(n_win)
        if w in mapping:
            t.unmap(iova(p, WIN + w * PAGE), PAGE)
            del mapping[w]
        if rng.random() < 0.75:
            d, wr = rng.randrange(n_data), rng.random() < 0.6
            t.map(iova(p, WIN + w * PAGE), data[d], PAGE, write=wr)
            mapping[w] = (d, wr)
        # the copy: the window into the stable destination
        rec = _copy(r, p, WIN, DST, n_win * PAGE)
        first_hole = next((i for i in range(n_win) if i not in mapping), n_win)
        for i in range(first_hole):
            got = r.mem.read(DATA + DST + i * PAGE, PAGE)
            assert got == r.mem.read(data[mapping[i][0]], PAGE), (step, i)
        if first_hole == n_win:
            assert rec["status"] == CompletionStatus.SUCCESS, (step, rec)
        else:
            assert rec["status"] == CompletionStatus.FAULT, (step, rec)
            assert rec["fault_addr"] == iova(p, WIN + first_hole * PAGE)
            assert rec["bytes_done"] == first_hole * PAGE
        # the fill: one random window page
        w = rng.randrange(n_win)
        pat = rng.randrange(1 << 64)
        rec = r.job(f, p, opcode=Opcode.FILL, dst=iova(p, WIN + w * PAGE), size=PAGE, pattern=pat)
        if w in mapping and mapping[w][1]:
            assert rec["status"] == CompletionStatus.SUCCESS, (step, rec)
            assert r.mem.read(data[mapping[w][0]], PAGE) == pat.to_bytes(8, "little") * 512
        else:
            assert rec["status"] == CompletionStatus.FAULT, (step, rec)
            want = FaultReason.SM_WRITE if w in mapping else FaultReason.FS_PAGING_ENTRY_P
            assert rec["fault_reason"] == want and rec["fault_flags"] == 1
        _counts_ok(f.tlb)
    st = f.tlb.stats
    assert st.hits > 0 and st.dropped > 0  # the cache was used, and had to drop


def _counts_ok(tlb: PasidTlb) -> None:
    assert tlb.pages == sum(len(r.pages) for sp in tlb.spaces.values() for r in sp.regions.values())
    assert tlb.regions == sum(len(sp.regions) for sp in tlb.spaces.values())
    assert tlb.pages <= tlb.limit and tlb.regions <= tlb.region_limit
    assert len(tlb.spaces) <= tlb.space_limit


def test_a_guest_scattering_pages_over_regions_and_pasids_stays_bounded() -> None:
    """One page per 2 MiB region (each region keeps a 4 KiB leaf-table copy) and many PASIDs:
    the TLB empties itself at its limits and every job stays right."""
    r, p = _rig()
    f = r.fns[0]
    f.tlb.region_limit = 4
    f.tlb.space_limit = 3
    t = r.guest.table(p)
    for i in range(10):
        t.map(iova(p, 0x400000 + i * 0x200000), DATA2 + i * PAGE, PAGE)
        r.mem.write(DATA2 + i * PAGE, _page_data(i))
    for _ in range(2):
        for i in range(10):
            assert _copy(r, p, 0x400000 + i * 0x200000, DST, PAGE)["status"] == 1
            assert r.mem.read(DATA + DST, PAGE) == _page_data(i)
            _counts_ok(f.tlb)
    for q in range(20, 26):
        r.setup(f, q)
        assert _copy(r, q, 0, DST, PAGE)["status"] == CompletionStatus.SUCCESS
        _counts_ok(f.tlb)
    assert f.tlb.stats.wipes >= 2


def test_second_stage_guest_entries_are_cached_and_checked_too() -> None:
    r = Rig("dedicated")
    r.host.guest_second_stage = True
    f = r.fns[0]
    p = 9
    ss = SecondStagePageTable(r.mem, r.guest.pages, levels=4)
    ss.map(iova(p, 0), DATA, MB)
    ss.map(iova(p, 0x100000), CTRL_AREA, 0x10000)
    r.guest.driver.set_pasid_entry(f.guest_rid, p, pgtt=PGTT_SECOND_STAGE, did=p, ssptptr=ss.root,
                                   aw=2)  # fmt: skip
    assert r.bind(f, p, entry=False) == 0
    r.mem.write(DATA, _page_data(1) + _page_data(2))
    assert _copy(r, p, 0, DST, 2 * PAGE)["status"] == CompletionStatus.SUCCESS
    assert _copy(r, p, 0, DST, 2 * PAGE)["status"] == CompletionStatus.SUCCESS
    assert f.tlb.stats.hits >= 4
    ss.unmap(iova(p, PAGE), PAGE)
    ss.map(iova(p, PAGE), DATA2, PAGE, write=False)
    r.mem.write(DATA2, _page_data(3))
    assert _copy(r, p, 0, DST, 2 * PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA + DST + PAGE, PAGE) == _page_data(3)
    rec = r.job(f, p, opcode=Opcode.FILL, dst=iova(p, PAGE), size=8, pattern=0)
    assert rec["status"] == CompletionStatus.FAULT and rec["fault_flags"] == 1


def test_entries_rewritten_during_the_walk_are_not_filed() -> None:
    """Another vCPU rewrites the leaf entry while the engine walks: the answer is used for
    this access only, and the next job walks again and sees the new entry."""
    r, p = _rig()
    f = r.fns[0]
    t = r.guest.table(p)
    t.map(iova(p, WIN), DATA2, PAGE)
    r.mem.write(DATA2, _page_data(1))
    r.mem.write(DATA2 + PAGE, _page_data(2))
    real = f.resolvers[False]
    flipped: list[int] = []

    class Racing:
        def resolve_now(self, iova_: int, write: bool, pasid: int | None = None) -> object:
            res = real.resolve_now(iova_, write, pasid)
            if iova_ >> 12 == iova(p, WIN) >> 12 and not flipped:
                t.unmap(iova(p, WIN), PAGE)
                t.map(iova(p, WIN), DATA2 + PAGE, PAGE)
                flipped.append(1)
            return res

    f.resolvers[False] = Racing()  # type: ignore[assignment]  # a stand-in (duck-typed)
    assert _copy(r, p, WIN, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    assert flipped and f.tlb.stats.unfiled >= 1
    f.resolvers[False] = real
    assert _copy(r, p, WIN, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    assert r.mem.read(DATA + DST, PAGE) == _page_data(2)


def test_a_bounded_tlb_empties_itself_and_stays_right() -> None:
    r, p = _rig()
    f = r.fns[0]
    f.tlb.limit = 8
    r.mem.write(DATA, random.Random(3).randbytes(MB // 4))
    for _ in range(3):
        assert _copy(r, p, 0, MB // 2, MB // 4)["status"] == CompletionStatus.SUCCESS
        assert f.tlb.pages <= 8
    assert f.tlb.stats.wipes > 0
    assert r.mem.read(DATA + MB // 2, MB // 4) == r.mem.read(DATA, MB // 4)


def test_unbind_and_reset_forget_the_pasid() -> None:
    r, p = _rig()
    f = r.fns[0]
    assert _copy(r, p, 0, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    assert f.tlb.pages > 0
    r.unbind(f, p)
    assert f.tlb.pages == 0 and not f.tlb.spaces
    r.setup(f, p)
    assert _copy(r, p, 0, DST, PAGE)["status"] == CompletionStatus.SUCCESS
    f.reset_device()
    assert f.tlb.pages == 0 and not f.tlb.spaces


def test_tlb_files_nothing_without_a_space_and_never_a_fault() -> None:
    r, p = _rig()
    tlb = PasidTlb(r.mem)
    tlb.begin(None)
    calls = []

    def resolve(i: int, w: bool) -> Resolved | Fault:
        calls.append(i)
        return Resolved(DATA, True, False)

    assert tlb.lookup(5, False) is None
    tlb.fill(5 << 12, False, False, resolve)
    assert tlb.pages == 0 and calls == [5 << 12]
    fault = Fault(FaultReason.FS_PAGING_ENTRY_P, 0, 0x28, p, False, "x")
    tlb.begin((p, p, False), ("sig",), PGTT_FIRST_STAGE, r.guest.table(p).root, 4)
    assert tlb.fill(iova(p, 0), False, False, lambda i, w: fault) is fault
    assert tlb.pages == 0


@pytest.mark.parametrize(
    ("ftype", "tag"),
    [("dedicated", "vpasid"), ("translating", "table"), ("mdev", None), ("enqcmd", "cpu")],
)
def test_each_personality_tags_its_requests_its_own_way(ftype: str, tag: str | None) -> None:
    r, p = _rig(ftype, p=6)
    f = r.fns[0]
    res = f.resolvers[False]
    assert isinstance(res, EngineResolver)
    if tag is None:
        assert res.tag_of is None  # the parent's host driver converts (Host.dma)
    else:
        assert res.tag_of is not None
        if ftype == FunctionType.ENQCMD.word:
            f._enq_tag = r.host.enqcmd("vm", f.guest_rid, p)
        want = {"vpasid": p, "table": f.bound[p]}
        if tag == "cpu":
            want["cpu"] = r.host.enqcmd("vm", f.guest_rid, p)
        assert res.tag_of(p) == want[tag]
    got = res.resolve_now(iova(p, 0x10), False, p)
    assert isinstance(got, Resolved) and got.gpa == DATA
    if ftype == "translating":
        f.bound.pop(p)  # the device's own table has no entry: nothing reaches the IOMMU
        miss = res.resolve_now(iova(p, 0x10), False, p)
        assert isinstance(miss, Fault) and miss.reason == FaultReason.PASID_ENTRY_P
        assert miss.pasid == p and miss.addr == iova(p, 0x10)


def test_a_pasid_entry_rewritten_during_the_refresh_is_caught_by_the_next_job() -> None:
    """Another vCPU clears SRE in the PASID entry right after the doorbell's refresh gave the
    engine its host entry: this job still ran with SRE (its walk did), the next supervisor job
    must fault (the space's signature was read before the refresh, so it no longer matches)."""
    r = Rig("dedicated")
    f = r.fns[0]
    p = 4
    r.entry(f, p, sre=True)
    assert r.bind(f, p, entry=False) == 0
    r.map(p, 0, DATA, MB)
    r.map(p, 0x100000, CTRL_AREA, 0x10000)
    real = r.host.sync_pasid
    once: list[int] = []

    def racing(vm: str, guest_rid: int, vpasid: int) -> Binding | None:
        b = real(vm, guest_rid, vpasid)
        if not once:
            once.append(1)
            r.entry(f, p, sre=False)
        return b

    r.host.sync_pasid = racing  # type: ignore[method-assign]  # this Host's, for one test
    rec = r.job(f, p, priv=True, opcode=Opcode.COPY, src=iova(p, 0), dst=iova(p, DST), size=PAGE)
    assert once and rec["status"] == CompletionStatus.SUCCESS
    rec = r.job(f, p, priv=True, opcode=Opcode.COPY, src=iova(p, 0), dst=iova(p, DST), size=PAGE)
    assert rec["status"] != CompletionStatus.SUCCESS, rec


def test_an_enqcmd_tag_bound_by_another_slice_is_refreshed_too() -> None:
    """Two ENQCMD slices of one parent; only B binds vPASID 5, A's portal takes the CPU table's
    pPASID for it (a binding of B's). B's guest entry then loses a page: A's next job faults
    (nothing of B's binding stays cached because A rang the doorbell)."""
    lab = Lab()
    h = lab.host("h", "per-device", (("01:00.0", True, True),))
    g = lab.vm("vm", "h", (("00:05.0", "01:00.0", "mdev"), ("00:06.0", "01:00.0", "mdev")))
    a = PasidDmaFunction(h, "vm", 0x28, FunctionType.ENQCMD)
    b = PasidDmaFunction(h, "vm", 0x30, FunctionType.ENQCMD)
    for f in (a, b):
        Rig.write(f, Reg.CTRL, pd.CTRL_ENABLE)
    x = 5
    g.table(x).map(iova(x, 0), DATA, MB)
    g.table(x).map(iova(x, 0x100000), CTRL_AREA, 0x10000)
    lab.guest_entry("vm", 0x30, x)
    Rig.write(b, Reg.BIND_PASID, x)
    Rig.write(b, Reg.BIND_CMD, pd.BindCmd.BIND)
    assert Rig.read(b, Reg.BIND_STATUS) == 0 and x not in a.bound

    def job() -> dict[str, int]:
        g.memory.write(CTRL_AREA, bytes(32))
        a.bar_write(0, pd.PORTAL_OFFSET, pd.DESCRIPTOR.build(
            pasid=x, opcode=Opcode.COPY, flags=pd.DESC_FLAG_COMPLETION,
            completion=iova(x, 0x100000), src=iova(x, 0), dst=iova(x, DST), size=PAGE))  # fmt: skip
        return pd.COMPLETION_RECORD.parse(g.memory.read(CTRL_AREA, 32))

    assert job()["status"] == CompletionStatus.SUCCESS
    assert job()["status"] == CompletionStatus.SUCCESS
    g.table(x).unmap(iova(x, 0), PAGE)
    rec = job()
    assert rec["status"] == CompletionStatus.FAULT and rec["fault_addr"] == iova(x, 0)
