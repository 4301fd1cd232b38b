"""Walk modes and fault codes of vioasid.model.walker on tables laid out by guest_driver."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vioasid.formats.fault import FaultReason as FR
from vioasid.formats.pasid import (
    PGTT_FIRST_STAGE,
    PGTT_NESTED,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
)
from vioasid.model.cache import Caches
from vioasid.model.faults import Fault, Translation
from vioasid.model.guest_driver import (
    FirstStagePageTable,
    GuestIommuDriver,
    PageAllocator,
    SecondStagePageTable,
)
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest

SID = 0x18  # 00:03.0
MIB = 1 << 20


@dataclass
class Env:
    mem: GuestMemory
    alloc: PageAllocator
    drv: GuestIommuDriver
    walker: Walker

    def tr(self, addr: int, pasid: int | None = None, **kw: bool) -> Translation | Fault:
        return self.walker.translate(self.drv.rtaddr, WalkRequest(SID, addr, pasid, **kw))

    def ok(self, addr: int, pasid: int | None = None, **kw: bool) -> Translation:
        r = self.tr(addr, pasid, **kw)
        assert isinstance(r, Translation), r
        return r

    def fault(self, addr: int, pasid: int | None = None, **kw: bool) -> FR:
        r = self.tr(addr, pasid, **kw)
        assert isinstance(r, Fault), r
        return r.reason


def make_env(*, cached: bool = False, scalable: bool = True, size: int = 64 * MIB) -> Env:
    mem = GuestMemory.from_bytes(size)
    alloc = PageAllocator(mem, 32 * MIB, 16 * MIB)
    drv = GuestIommuDriver(mem, alloc, scalable=scalable)
    return Env(mem, alloc, drv, Walker(mem, caches=Caches(enabled=cached)))


@pytest.fixture
def env() -> Env:
    e = make_env()
    e.drv.attach_device(SID)
    return e


def fs_entry(
    env: Env, pasid: int = 0, levels: int = 4, did: int = 1, **kw: bool
) -> FirstStagePageTable:
    fs = FirstStagePageTable(env.mem, env.alloc, levels=levels)
    env.drv.set_pasid_entry(
        SID, pasid, pgtt=PGTT_FIRST_STAGE, did=did, flptptr=fs.root, flpm=levels - 4, **kw
    )
    return fs


# -- first stage ------------------------------------------------------------------------------
def test_first_stage_4k_2m_1g(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0x5000, 0x1000)
    fs.map(0x200000, 0x400000, 0x200000)
    fs.map(0x40000000, 0x0, 0x40000000)
    t = env.ok(0x1ABC)
    assert (t.address, t.page_size, t.pgtt, t.did, t.write) == (
        0x5ABC,
        4096,
        "first-stage",
        1,
        True,
    )
    t = env.ok(0x212345)
    assert (t.address, t.page_size) == (0x412345, 2 * MIB)
    t = env.ok(0x40123456)
    assert (t.address, t.page_size) == (0x123456, 1 << 30)


def test_first_stage_5_level(env: Env) -> None:
    fs = fs_entry(env, levels=5)
    fs.map(0x00F0_0000_0000_0000, 0x7000, 0x1000)
    assert env.ok(0x00F0_0000_0000_0010).address == 0x7010
    # 57-bit canonical: bit 56 set needs bits 63:57 set
    assert env.fault(1 << 56) == FR.FS_NON_CANONICAL
    assert env.fault(0xFF00_0000_0000_0000) == FR.FS_PAGING_ENTRY_P


def test_first_stage_non_canonical(env: Env) -> None:
    fs_entry(env)
    assert env.fault(1 << 47) == FR.FS_NON_CANONICAL
    assert env.fault(0xFFFF_8000_0000_0000) == FR.FS_PAGING_ENTRY_P  # canonical, unmapped


def test_first_stage_permissions(env: Env) -> None:
    fs = fs_entry(env, sre=True, wpe=False)
    fs.map(0x1000, 0x5000, 0x1000, write=False)
    fs.map(0x2000, 0x6000, 0x1000, user=False)
    fs.map(0x3000, 0x7000, 0x1000, xd=True)
    assert env.ok(0x1000).write is False
    assert env.fault(0x1000, write=True) == FR.SM_WRITE
    assert env.fault(0x2000) == FR.FS_PAGING_ENTRY_US
    assert env.ok(0x2000, supervisor=True).address == 0x6000
    # supervisor write to a read-only page is allowed while WPE is clear
    assert env.ok(0x1000, supervisor=True, write=True).address == 0x5000
    assert env.fault(0x9000) == FR.FS_PAGING_ENTRY_P


def test_wpe_blocks_supervisor_writes(env: Env) -> None:
    fs = fs_entry(env, sre=True, wpe=True)
    fs.map(0x1000, 0x5000, 0x1000, write=False)
    assert env.fault(0x1000, supervisor=True, write=True) == FR.SM_WRITE


def test_sre_and_ere(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0x5000, 0x2000)
    assert env.fault(0x1000, supervisor=True) == FR.SRE_CLEAR
    assert env.fault(0x1000, execute=True) == FR.ERE_CLEAR


def test_execute_and_xd(env: Env) -> None:
    fs = fs_entry(env, ere=True)
    fs.map(0x1000, 0x5000, 0x1000)
    fs.map(0x2000, 0x6000, 0x1000, xd=True)
    assert env.ok(0x1000, execute=True).execute is True
    assert env.fault(0x2000, execute=True) == FR.FS_EXECUTE
    assert env.ok(0x2000).execute is False


def test_first_stage_reserved_bits(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0x5000, 0x1000)
    pml4e = fs.root
    env.mem.write_u64(pml4e, env.mem.read_u64(pml4e) | 0x80)  # PS is reserved in a PML4E
    assert env.fault(0x1000) == FR.FS_PAGING_ENTRY_RSVD


def test_first_stage_address_above_haw(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0x5000, 0x1000)
    env.mem.write_u64(fs.root, env.mem.read_u64(fs.root) | (1 << 50))
    assert env.fault(0x1000) == FR.FS_PAGING_ENTRY_RSVD


def test_fsptptr_beyond_memory(env: Env) -> None:
    env.drv.set_pasid_entry(SID, 0, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=0x7000_0000)
    assert env.fault(0x1000) == FR.PASID_ENTRY_FSPTPTR_INV


def test_lower_table_beyond_memory(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0x5000, 0x1000)
    env.mem.write_u64(fs.root, 0x7000_0000 | 0x7)
    assert env.fault(0x1000) == FR.FS_PAGING_ENTRY_INV


def test_output_in_interrupt_range(env: Env) -> None:
    fs = fs_entry(env)
    fs.map(0x1000, 0xFEE00000, 0x1000)
    assert env.fault(0x1000) == FR.SM_INTERRUPT_ADDR


# -- second stage -------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [3, 4, 5])
def test_second_stage_levels(env: Env, levels: int) -> None:
    ss = SecondStagePageTable(env.mem, env.alloc, levels=levels)
    ss.map(0x1000, 0x9000, 0x1000)
    ss.map(0x200000, 0x600000, 0x200000, write=False)
    env.drv.set_pasid_entry(SID, 3, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=ss.root, aw=ss.aw)
    t = env.ok(0x1010, 3, write=True)
    assert (t.address, t.pgtt, t.did, t.pasid) == (0x9010, "second-stage", 2, 3)
    t = env.ok(0x200010, 3)
    assert (t.address, t.page_size, t.write) == (0x600010, 2 * MIB, False)
    assert env.fault(0x200010, 3, write=True) == FR.WRITE
    assert env.fault(0x5000, 3) == FR.READ
    width = 12 + 9 * levels
    if width < 48:
        assert env.fault(1 << width, 3) == FR.ADDR_BEYOND_MGAW


def test_second_stage_reserved_and_access(env: Env) -> None:
    ss = SecondStagePageTable(env.mem, env.alloc)
    ss.map(0x1000, 0x9000, 0x1000)
    env.drv.set_pasid_entry(SID, 3, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=ss.root, aw=2)
    env.mem.write_u64(ss.root, env.mem.read_u64(ss.root) | 0x80)  # PS in level 4
    assert env.fault(0x1000, 3) == FR.PAGING_ENTRY_RSVD
    env.mem.write_u64(ss.root, 0x7000_0000 | 3)
    assert env.fault(0x1000, 3) == FR.PAGING_ENTRY_INV


def test_bad_aw_and_pgtt(env: Env) -> None:
    env.drv.set_pasid_entry(SID, 3, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=0x1000, aw=0)
    assert env.fault(0x1000, 3) == FR.PASID_TABLE_ENTRY_INV
    env.drv.set_pasid_entry(SID, 4, pgtt=5, did=2)
    assert env.fault(0x1000, 4) == FR.PASID_TABLE_ENTRY_INV
    env.drv.set_pasid_entry(SID, 6, pgtt=PGTT_FIRST_STAGE, did=2, flpm=2)
    assert env.fault(0x1000, 6) == FR.PASID_TABLE_ENTRY_INV


# -- nested and pass-through ----------------------------------------------------------------------
def test_nested(env: Env) -> None:
    ss = SecondStagePageTable(env.mem, env.alloc)
    fs = FirstStagePageTable(env.mem, env.alloc)
    fs.map(0x1000, 0x100000, 0x1000)
    fs.map(0x200000, 0x400000, 0x200000)
    # the second stage maps the first-stage table pool 1:1, and guest data at +8 MiB
    ss.map_identity(32 * MIB, 16 * MIB)
    ss.map(0x100000, 0x900000, 0x1000)
    ss.map(0x400000, 0xC00000, 0x200000, write=False)
    env.drv.set_pasid_entry(SID, 8, pgtt=PGTT_NESTED, did=4, flptptr=fs.root, ssptptr=ss.root, aw=2)
    t = env.ok(0x1234, 8, write=True)
    assert (t.address, t.pgtt, t.page_size) == (0x900234, "nested", 4096)
    t = env.ok(0x212345, 8)
    assert (t.address, t.page_size, t.write) == (0xC12345, 2 * MIB, False)
    assert env.fault(0x212345, 8, write=True) == FR.SM_WRITE
    # a first-stage table the second stage does not map
    ss.unmap(32 * MIB, 16 * MIB)
    assert env.fault(0x1234, 8) == FR.SS_ENTRY_P


def test_nested_with_separate_memory() -> None:
    """Host use: host tables in ``mem``; guest first-stage tables read from nested_memory."""
    host = GuestMemory.from_bytes(16 * MIB)
    halloc = PageAllocator(host, 8 * MIB, 8 * MIB)
    hdrv = GuestIommuDriver(host, halloc)
    hdrv.attach_device(SID)
    guest = GuestMemory.from_bytes(4 * MIB, gpa=64 * MIB)  # the guest's RAM as host sees it
    galloc_mem = GuestMemory.from_bytes(4 * MIB)  # guest view: GPA 0..4M
    galloc = PageAllocator(galloc_mem, 1 * MIB, 1 * MIB)
    gfs = FirstStagePageTable(galloc_mem, galloc)
    gfs.map(0x5000, 0x2000, 0x1000)
    guest.write(64 * MIB, galloc_mem.read(0, 4 * MIB))
    ss = SecondStagePageTable(host, halloc)
    ss.map(0, 64 * MIB, 4 * MIB)  # GPA -> HPA = GPA + 64 MiB
    hdrv.set_pasid_entry(SID, 1, pgtt=PGTT_NESTED, did=9, flptptr=gfs.root, ssptptr=ss.root)
    w = Walker(host, nested_memory=guest)
    t = w.translate(hdrv.rtaddr, WalkRequest(SID, 0x5008, 1))
    assert isinstance(t, Translation), t
    assert t.address == 64 * MIB + 0x2008


def test_pass_through(env: Env) -> None:
    env.drv.set_pasid_entry(SID, 9, pgtt=PGTT_PASS_THROUGH, did=3)
    t = env.ok(0x12345678, 9, write=True)
    assert (t.address, t.pgtt, t.did) == (0x12345678, "pass-through", 3)


# -- root / context / PASID lookup ---------------------------------------------------------
def test_lookup_faults(env: Env) -> None:
    rt = env.drv.rtaddr
    w = env.walker
    r = w.translate(rt, WalkRequest(0x0100, 0x1000))  # bus 1: no root entry
    assert isinstance(r, Fault) and r.reason == FR.ROOT_ENTRY_P
    r = w.translate(rt, WalkRequest(0x20, 0x1000))  # 00:04.0: no context entry
    assert isinstance(r, Fault) and r.reason == FR.CONTEXT_ENTRY_P
    assert env.fault(0x1000) == FR.PASID_DIR_ENTRY_P  # no PASID table allocated yet
    r = w.translate(0x7000_0000 | 0x400, WalkRequest(SID, 0x1000))
    assert isinstance(r, Fault) and r.reason == FR.ROOT_TABLE_INV
    r = w.translate(rt & ~0xC00 | 0xC00, WalkRequest(SID, 0x1000))
    assert isinstance(r, Fault) and r.reason == FR.RTADDR_INV_TTM


def test_pasid_dir_faults(env: Env) -> None:
    assert env.fault(0x1000, 70) == FR.PASID_DIR_ENTRY_P
    assert env.fault(0x1000, 512 * 64) == FR.CONTEXT_PASID_TOO_BIG  # PDTS=2: 512 dir entries
    env.drv.set_pasid_entry(SID, 1, pgtt=PGTT_PASS_THROUGH, did=3)
    assert env.fault(0x1000, 2) == FR.PASID_ENTRY_P
    pdir = env.drv.pasid_dirs[SID]
    env.mem.write_u64(pdir, env.mem.read_u64(pdir) | 0x10)
    assert env.fault(0x1000, 1) == FR.PASID_DIR_ENTRY_RSVD
    env.mem.write_u64(pdir, 0x7000_0000 | 1)
    assert env.fault(0x1000, 1) == FR.PASID_TABLE_ACCESS_ERR


def test_pasid_entry_reserved(env: Env) -> None:
    env.drv.set_pasid_entry(SID, 1, pgtt=PGTT_PASS_THROUGH, did=3)
    gpa = env.drv.pasid_entry_gpa(SID, 1)
    env.mem.write_u64(gpa, env.mem.read_u64(gpa) | 0x400)
    assert env.fault(0x1000, 1) == FR.PASID_ENTRY_RSVD


def test_context_faults() -> None:
    e = make_env()
    e.drv.attach_device(SID, paside=False)
    assert e.fault(0x1000, 1) == FR.CONTEXT_PASIDE_CLEAR
    ce = e.drv.context_entry_gpa(SID)
    e.mem.write_u64(ce, e.mem.read_u64(ce) | 0x20)  # bits 8:5 reserved
    assert e.fault(0x1000) == FR.CONTEXT_ENTRY_RSVD
    e.mem.write_u64(ce, (e.mem.read_u64(ce) & ~0xFFF) | 0x1)
    e.mem.write_u64(ce, 0x1 | 0x7000_0000)  # directory beyond memory
    assert e.fault(0x1000) == FR.PASID_DIR_ACCESS_ERR
    root = e.drv.root
    e.mem.write_u64(root, e.mem.read_u64(root) | 0x2)
    assert e.fault(0x1000) == FR.ROOT_ENTRY_RSVD
    e.mem.write_u64(root, 0x7000_0000 | 1)
    assert e.fault(0x1000) == FR.CONTEXT_TABLE_INV


def test_rid_pasid_and_upper_devfn() -> None:
    e = make_env()
    sid = 0x0185  # 01:10.5 (devfn 0x85: upper half)
    e.drv.attach_device(sid, rid_pasid=7)
    fs = FirstStagePageTable(e.mem, e.alloc)
    fs.map(0x1000, 0x8000, 0x1000)
    e.drv.set_pasid_entry(sid, 7, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=fs.root)
    t = e.walker.translate(e.drv.rtaddr, WalkRequest(sid, 0x1008))
    assert isinstance(t, Translation) and t.address == 0x8008 and t.pasid == 7


def test_clear_pasid_entry(env: Env) -> None:
    env.drv.set_pasid_entry(SID, 1, pgtt=PGTT_PASS_THROUGH, did=3)
    env.ok(0x1000, 1)
    env.drv.clear_pasid_entry(SID, 1)
    assert env.fault(0x1000, 1) == FR.PASID_ENTRY_P


def test_20_bit_pasids() -> None:
    mem = GuestMemory.from_bytes(64 * MIB)
    alloc = PageAllocator(mem, 32 * MIB, 16 * MIB)
    drv = GuestIommuDriver.for_pasid_bits(mem, alloc, 20)
    drv.attach_device(SID)
    drv.set_pasid_entry(SID, 0xFFFFF, pgtt=PGTT_PASS_THROUGH, did=3)
    r = Walker(mem).translate(drv.rtaddr, WalkRequest(SID, 0x5000, 0xFFFFF))
    assert isinstance(r, Translation) and r.pasid == 0xFFFFF


# -- legacy mode --------------------------------------------------------------------------------
def test_legacy_second_stage_and_pass_through() -> None:
    e = make_env(scalable=False)
    ss = SecondStagePageTable(e.mem, e.alloc, levels=3)
    ss.map(0x1000, 0x7000, 0x1000, write=False)
    e.drv.set_legacy_context(SID, did=5, ssptptr=ss.root, aw=1)
    t = e.ok(0x1010)
    assert (t.address, t.pgtt, t.did, t.write) == (0x7010, "second-stage", 5, False)
    assert e.fault(0x1010, write=True) == FR.WRITE
    assert e.fault(0x1010, pasid=1) == FR.RTADDR_INV_TTM
    assert e.fault(1 << 39) == FR.ADDR_BEYOND_MGAW
    e.drv.set_legacy_context(0x20, did=6, tt=2)
    t2 = e.walker.translate(e.drv.rtaddr, WalkRequest(0x20, 0xABC000))
    assert isinstance(t2, Translation) and t2.pgtt == "pass-through" and t2.address == 0xABC000
    e.drv.set_legacy_context(0x28, did=6, tt=3)
    r = e.walker.translate(e.drv.rtaddr, WalkRequest(0x28, 0x1000))
    assert isinstance(r, Fault) and r.reason == FR.CONTEXT_ENTRY_INV


def test_table_pointing_at_itself_terminates(env: Env) -> None:
    fs = fs_entry(env)
    # every level's entry 0 points back at the root table: the walk ends at level 1 as a "leaf"
    env.mem.write_u64(fs.root, fs.root | 0x7)
    r = env.tr(0x0)
    assert isinstance(r, Translation) and r.address == fs.root  # bounded by the level count
    env.mem.write_u64(fs.root, fs.root | 0x87)  # PS in PML4E: reserved
    assert env.fault(0x0) == FR.FS_PAGING_ENTRY_RSVD


def test_translate_fast_matches_translate() -> None:
    e = make_env(cached=True)
    e.drv.attach_device(SID)
    fs = fs_entry(e)
    fs.map(0x1000, 0x5000, 0x4000)
    for _ in range(2):
        assert e.walker.translate_fast(e.drv.rtaddr, SID, 0x2345) == 0x6345
    f = e.walker.translate_fast(e.drv.rtaddr, SID, 0x9000)
    assert isinstance(f, Fault) and f.reason == FR.FS_PAGING_ENTRY_P


def test_fault_processing_disabled(env: Env) -> None:
    rt = env.drv.rtaddr
    assert not env.walker.fault_processing_disabled(rt, SID, 1)
    env.drv.set_pasid_entry(SID, 1, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=0x7000_0000, fpd=True)
    assert env.fault(0x1000, 1) == FR.PASID_ENTRY_FSPTPTR_INV
    assert env.walker.fault_processing_disabled(rt, SID, 1)
    # teardown leaving only FPD=1 (pasid_clear_entry_with_fpd): still suppressed
    env.mem.write_u64(env.drv.pasid_entry_gpa(SID, 1), 0x2)
    assert env.fault(0x1000, 1) == FR.PASID_ENTRY_P
    assert env.walker.fault_processing_disabled(rt, SID, 1)
    assert not env.walker.fault_processing_disabled(rt, SID, 2)
    assert not env.walker.fault_processing_disabled(rt, 0x0100, None)  # no root entry


def test_nested_fault_codes(env: Env) -> None:
    """Faults raised by the second stage of a nested walk use the spec's SM codes."""
    ss = SecondStagePageTable(env.mem, env.alloc, levels=3)  # 39-bit second stage
    fs = FirstStagePageTable(env.mem, env.alloc)
    fs.map(0x1000, 0x100000, 0x1000)
    fs.map(0x2000, 1 << 40, 0x1000)  # output GPA beyond the 39-bit second stage
    ss.map_identity(32 * MIB, 16 * MIB)
    ss.map(0x100000, 0x900000, 0x1000)
    env.drv.set_pasid_entry(SID, 8, pgtt=PGTT_NESTED, did=4, flptptr=fs.root, ssptptr=ss.root, aw=1)
    assert env.ok(0x1000, 8).address == 0x900000
    assert env.fault(0x2000, 8) == FR.SS_BEYOND_MAX
    # the first-stage root pointer beyond the second stage's width
    env.drv.set_pasid_entry(SID, 9, pgtt=PGTT_NESTED, did=4, flptptr=1 << 40, ssptptr=ss.root, aw=1)
    assert env.fault(0x1000, 9) == FR.NESTED_FS_TRANSLATION
    # a reserved bit in the second stage's top entry (bits 51:48 of a paging entry)
    env.mem.write_u64(ss.root, env.mem.read_u64(ss.root) | (1 << 50))
    assert env.fault(0x1000, 8) == FR.SS_ENTRY_RSVD
    env.mem.write_u64(ss.root, 0x7000_0000 | 3)  # next table beyond memory
    assert env.fault(0x1000, 8) == FR.SS_ENTRY_ACCESS


def test_second_stage_interrupt_range(env: Env) -> None:
    ss = SecondStagePageTable(env.mem, env.alloc)
    ss.map(0x1000, 0xFEE00000, 0x1000)
    env.drv.set_pasid_entry(SID, 3, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=ss.root, aw=2)
    assert env.fault(0x1000, 3) == FR.INTERRUPT_ADDR
