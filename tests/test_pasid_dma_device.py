"""The PASID DMA device model on in-memory guest RAM with Linux-like tables (no QEMU).

The guest side is the model's Linux-like table writer (tests/engine_support.Lab); the device is
driven exactly as the guest driver drives it: BAR0 register writes, 64-byte descriptors to the
portal, completion records read back from guest RAM (docs/pasid-dma.md).
"""

from __future__ import annotations

import random
from typing import TypedDict, Unpack

import pytest
from engine_support import MB, Lab

from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.formats import pasid_dma as pd
from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import PGTT_FIRST_STAGE, PGTT_SECOND_STAGE

DATA = 0x100000  # guest-physical data buffer (1 MiB)
DATA2 = 0x200000  # a second one
CTRL_AREA = 0x300000  # completion records / batch arrays (GPA)
WINDOW = 0x10000000
CTRL_OFF = 0x100000  # the control area's IOVA offset within a PASID window


def iova(p: int, off: int) -> int:
    return WINDOW * p + off


class JobFields(TypedDict, total=False):
    """Fields of ``pd.DESCRIPTOR`` a test sets through :meth:`Rig.job` (which sets the PASID
    and the completion address itself)."""

    opcode: int
    flags: int
    rsvd0: int
    src: int
    dst: int
    size: int
    rsvd1: int
    pattern: int
    rsvd2: int
    rsvd3: int


class Descriptor(JobFields, total=False):
    """Fields of ``pd.DESCRIPTOR`` a test sets through :meth:`Rig.submit`."""

    pasid: int
    completion: int


class Rig:
    """One VM with PASID DMA functions of the given types (per-device policy)."""

    def __init__(self, *types: str, pasid_bits: int = 20, allocation: str = "per-device") -> None:
        self.lab = Lab()
        fns = []
        devs = []
        for i, t in enumerate(types):
            fn_rid = f"01:{i:02x}.0"
            enq = t == "enqcmd"
            fns.append((fn_rid, enq, t in ("translating", "enqcmd")))
            devs.append((f"00:{5 + i:02x}.0", fn_rid, "mdev" if t == "mdev" else "vfio-pci"))
        self.host = self.lab.host("h", allocation, tuple(fns), pasid_bits)
        self.guest = self.lab.vm("vm", "h", tuple(devs), memory=16 * MB)
        self.mem = self.guest.memory
        self.fns = [
            PasidDmaFunction(self.host, "vm", 0x28 + 8 * i, pd.FunctionType[t.upper()])
            for i, t in enumerate(types)
        ]
        for f in self.fns:
            self.write(f, pd.Reg.CTRL, pd.CTRL_ENABLE)

    @staticmethod
    def write(f: PasidDmaFunction, reg: int, value: int, size: int = 4) -> None:
        f.bar_write(0, reg, value.to_bytes(size, "little"))

    @staticmethod
    def read(f: PasidDmaFunction, reg: int, size: int = 4) -> int:
        return int.from_bytes(f.bar_read(0, reg, size), "little")

    def entry(self, f: PasidDmaFunction, p: int, *, sre: bool = False) -> None:
        self.guest.driver.set_pasid_entry(
            f.guest_rid, p, pgtt=PGTT_FIRST_STAGE, did=p, flptptr=self.guest.table(p).root, sre=sre
        )

    def bind(self, f: PasidDmaFunction, p: int, *, entry: bool = True) -> int:
        if entry:
            self.entry(f, p)
        self.write(f, pd.Reg.BIND_PASID, p)
        self.write(f, pd.Reg.BIND_CMD, pd.BindCmd.BIND)
        return self.read(f, pd.Reg.BIND_STATUS)

    def unbind(self, f: PasidDmaFunction, p: int) -> int:
        self.write(f, pd.Reg.BIND_PASID, p)
        self.write(f, pd.Reg.BIND_CMD, pd.BindCmd.UNBIND)
        st = self.read(f, pd.Reg.BIND_STATUS)
        self.guest.driver.clear_pasid_entry(f.guest_rid, p)
        return st

    def map(self, p: int, off: int, gpa: int, size: int, write: bool = True, **kw: bool) -> None:
        self.guest.table(p).map(iova(p, off), gpa, size, write=write, **kw)

    def setup(self, f: PasidDmaFunction, p: int, *, ctrl_gpa: int = CTRL_AREA) -> None:
        """Bind P, map the data buffer rw at offset 0 and the control area past it."""
        assert self.bind(f, p) == pd.BindStatus.OK
        self.map(p, 0, DATA, MB)
        self.map(p, CTRL_OFF, ctrl_gpa, 0x10000)

    def submit(self, f: PasidDmaFunction, **desc: Unpack[Descriptor]) -> int:
        desc.setdefault("flags", pd.DESC_FLAG_COMPLETION)
        f.bar_write(0, pd.PORTAL_OFFSET, pd.DESCRIPTOR.build(**desc))
        return self.read(f, pd.Reg.PORTAL_STATUS)

    def record(self, gpa: int = CTRL_AREA) -> dict[str, int]:
        return pd.COMPLETION_RECORD.parse(self.mem.read(gpa, 32))

    def job(
        self,
        f: PasidDmaFunction,
        p: int,
        slot: int = 0,
        priv: bool = False,
        **desc: Unpack[JobFields],
    ) -> dict[str, int]:
        """Submit with a completion record in the control area; return the record."""
        self.mem.write(CTRL_AREA + 32 * slot, bytes(32))
        pasid = p | (pd.DESC_PRIV if priv else 0)
        st = self.submit(f, pasid=pasid, completion=iova(p, CTRL_OFF + 32 * slot), **desc)
        assert st == pd.PortalStatus.ACCEPTED
        return self.record(CTRL_AREA + 32 * slot)


def test_identity_registers_and_read_only_writes() -> None:
    r = Rig("enqcmd")
    f = r.fns[0]
    assert r.read(f, pd.Reg.ID) == 0x414D4456 and r.read(f, pd.Reg.VERSION) == 1
    assert r.read(f, pd.Reg.TYPE) == 4
    assert r.read(f, pd.Reg.CAPS) == 20 | pd.CAPS_SWQ | pd.CAPS_BATCH
    assert r.read(f, pd.Reg.MAX_XFER) == 1 << 20 and r.read(f, pd.Reg.MAX_BATCH) == 1024
    assert r.read(f, pd.Reg.STATUS) == 1
    r.write(f, pd.Reg.ID, 0)
    r.write(f, pd.Reg.MAX_XFER, 5)
    assert r.read(f, pd.Reg.ID) == 0x414D4456 and r.read(f, pd.Reg.MAX_XFER) == 1 << 20


def test_bind_statuses() -> None:
    r = Rig("dedicated", "mdev")
    d, m = r.fns
    assert r.bind(d, 0, entry=False) == pd.BindStatus.INVALID
    assert r.bind(d, 1 << 20, entry=False) == pd.BindStatus.INVALID
    assert r.bind(d, 3, entry=False) == pd.BindStatus.NOT_PRESENT
    assert r.bind(d, 3) == pd.BindStatus.OK and r.read(d, pd.Reg.BOUND_COUNT) == 1
    assert d.bound == {3: 3}
    r.write(d, pd.Reg.BIND_PASID, 3)
    r.write(d, pd.Reg.BIND_CMD, 7)
    assert r.read(d, pd.Reg.BIND_STATUS) == pd.BindStatus.INVALID
    assert r.unbind(d, 4) == pd.BindStatus.NOT_BOUND
    assert r.unbind(d, 3) == pd.BindStatus.OK and r.read(d, pd.Reg.BOUND_COUNT) == 0
    # mdev converts: the first pPASID of the function's own space, whatever the vPASID
    assert r.bind(m, 77) == pd.BindStatus.OK and m.bound == {77: 1}
    assert m.bindings() == [
        {"device": "00:06.0", "type": "mdev", "vpasid": 77, "ppasid": 1, "tag": 1}
    ]
    # a second-stage guest entry is not one vioasid can nest: refused as unusable
    r.guest.driver.set_pasid_entry(d.guest_rid, 9, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=0x1000)
    assert r.bind(d, 9, entry=False) == pd.BindStatus.NOT_PRESENT and 9 not in d.bound


def test_conflict_reports_the_ppasid_in_the_way() -> None:
    # an enqcmd + translating function draws the VM's global pPASID for X; a non-translating
    # enqcmd function then needs pPASID == X (the seed's trouble case).
    lab = Lab()
    h = lab.host("h", "per-device", (("01:00.0", True, True), ("01:01.0", True, False)))
    lab.vm("vm", "h", (("00:05.0", "01:00.0", "mdev"), ("00:06.0", "01:01.0", "vfio-pci")))
    a = PasidDmaFunction(h, "vm", 0x28, pd.FunctionType.ENQCMD)
    b = PasidDmaFunction(h, "vm", 0x30, pd.FunctionType.ENQCMD)
    lab.guest_entry("vm", 0x28, 1)
    lab.guest_entry("vm", 0x28, 5)
    lab.guest_entry("vm", 0x30, 5)
    for f, p in ((a, 1), (a, 5)):
        Rig.write(f, pd.Reg.BIND_PASID, p)
        Rig.write(f, pd.Reg.BIND_CMD, 1)
        assert Rig.read(f, pd.Reg.BIND_STATUS) == 0
    assert a.bound == {1: 1, 5: 2}
    before = h.snapshot()
    Rig.write(b, pd.Reg.BIND_PASID, 5)
    Rig.write(b, pd.Reg.BIND_CMD, 1)
    assert Rig.read(b, pd.Reg.BIND_STATUS) == pd.BindStatus.PASID_CONFLICT
    assert Rig.read(b, pd.Reg.BIND_INFO, 8) == 2
    assert h.snapshot() == before and b.bound == {}


def test_exhausted() -> None:
    # two mdev slices of one function with 2-bit PASIDs: its space holds pPASIDs 1..3
    lab = Lab()
    h = lab.host("h", "per-device", (("01:00.0", False, False),), pasid_bits=2)
    lab.vm("vm", "h", (("00:05.0", "01:00.0", "mdev"), ("00:06.0", "01:00.0", "mdev")))
    a = PasidDmaFunction(h, "vm", 0x28, pd.FunctionType.MDEV)
    b = PasidDmaFunction(h, "vm", 0x30, pd.FunctionType.MDEV)
    for f, p in ((a, 1), (a, 2), (a, 3), (b, 1)):
        lab.guest_entry("vm", f.guest_rid, p)
        Rig.write(f, pd.Reg.BIND_PASID, p)
        Rig.write(f, pd.Reg.BIND_CMD, 1)
    assert Rig.read(a, pd.Reg.BIND_STATUS) == pd.BindStatus.OK and len(a.bound) == 3
    assert Rig.read(b, pd.Reg.BIND_STATUS) == pd.BindStatus.EXHAUSTED and b.bound == {}


@pytest.mark.parametrize("ftype", ["dedicated", "translating", "mdev", "enqcmd"])
def test_copy_fill_compare_random_unaligned_multipage(ftype: str) -> None:
    rng = random.Random(ftype)
    r = Rig(ftype)
    f = r.fns[0]
    p = 7
    r.setup(f, p)
    blob = rng.randbytes(MB)
    r.mem.write(DATA, blob)
    src, dst, n = 0x123, 0x80007, 3 * 4096 + 999
    rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, src), dst=iova(p, dst), size=n)
    assert rec["status"] == pd.CompletionStatus.SUCCESS and rec["bytes_done"] == n
    assert r.mem.read(DATA + dst, n) == blob[src : src + n]
    assert r.mem.read(DATA + dst + n, 64) == blob[dst + n : dst + n + 64]  # nothing past it
    rec = r.job(f, p, opcode=pd.Opcode.COMPARE, src=iova(p, src), dst=iova(p, dst), size=n)
    assert rec["status"] == 1 and rec["result"] == 0 and rec["bytes_done"] == n
    r.mem.write(DATA + dst + 5000, b"\x00" if blob[src + 5000] else b"\x01")
    rec = r.job(f, p, opcode=pd.Opcode.COMPARE, src=iova(p, src), dst=iova(p, dst), size=n)
    assert rec["result"] == 1 and rec["bytes_done"] == 5000
    pattern = 0x0807060504030201
    rec = r.job(f, p, opcode=pd.Opcode.FILL, dst=iova(p, 0x40003), size=10001, pattern=pattern)
    assert rec["status"] == 1
    want = (pattern.to_bytes(8, "little") * 1300)[:10001]
    assert r.mem.read(DATA + 0x40003, 10001) == want
    assert f.jobs_ok == 4 and f.jobs_failed == 0


def test_read_only_mapping_faults_on_write_with_the_vpasid() -> None:
    r = Rig("mdev")
    f = r.fns[0]
    p = 42
    r.setup(f, p)
    r.map(p, 0x200000, DATA2, 0x2000, write=False)  # read-only window
    before = r.mem.read(DATA2, 0x2000)
    rec = r.job(f, p, opcode=pd.Opcode.FILL, dst=iova(p, 0x200000), size=0x100, pattern=0xFF)
    assert rec["status"] == pd.CompletionStatus.FAULT
    assert rec["fault_pasid"] == 42 and rec["fault_flags"] & pd.FAULT_FLAG_WRITE
    assert rec["fault_addr"] == iova(p, 0x200000) and rec["bytes_done"] == 0
    assert rec["fault_reason"] == FaultReason.SM_WRITE
    assert r.mem.read(DATA2, 0x2000) == before
    # reading it is fine
    rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, 0x200000), dst=iova(p, 0), size=0x2000)
    assert rec["status"] == pd.CompletionStatus.SUCCESS
    fs = r.host.drain_faults("vm")
    assert [(x.pasid, x.sid, x.write) for x in fs] == [(42, f.guest_rid, True)]


def test_unmapped_address_faults_and_stops_at_the_fault() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    p = 3
    r.setup(f, p)
    r.mem.write(DATA, b"\x11" * MB)
    # from 0xFF000 (mapped) over the 1 MiB window end (unmapped)
    # from CTRL_OFF + 0xF800 (mapped, the control area's last page) over its end (unmapped)
    r.mem.write(CTRL_AREA + 0xF800, b"\x11" * 0x800)
    rec = r.job(f, p, opcode=pd.Opcode.FILL, dst=iova(p, CTRL_OFF + 0xF800), size=0x1000, pattern=0)
    assert rec["status"] == pd.CompletionStatus.FAULT and rec["bytes_done"] == 0x800
    assert rec["fault_addr"] == iova(p, CTRL_OFF + 0x10000) and rec["fault_pasid"] == 3
    assert rec["fault_reason"] == FaultReason.FS_PAGING_ENTRY_P
    assert r.mem.read(CTRL_AREA + 0xF800, 0x800) == bytes(0x800)


def test_pasid_a_mapping_unreachable_through_b() -> None:
    r = Rig("translating")
    f = r.fns[0]
    r.setup(f, 1)
    assert r.bind(f, 2) == pd.BindStatus.OK
    r.map(2, CTRL_OFF, CTRL_AREA + 0x1000, 0x1000)
    r.mem.write(DATA, b"secret-of-A" * 10)
    # B asks for A's IOVA of the data buffer: not mapped in B's space
    r.mem.write(CTRL_AREA + 0x1000, bytes(32))
    st = r.submit(f, pasid=2, completion=iova(2, CTRL_OFF), opcode=pd.Opcode.COPY,
                  src=iova(1, 0), dst=iova(2, CTRL_OFF + 64), size=16)  # fmt: skip
    assert st == pd.PortalStatus.ACCEPTED
    rec = r.record(CTRL_AREA + 0x1000)
    assert rec["status"] == pd.CompletionStatus.FAULT and rec["fault_pasid"] == 2
    assert r.mem.read(CTRL_AREA + 0x1000 + 64, 16) == bytes(16)


def test_after_unbind_the_record_write_faults_with_the_vpasid() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    r.setup(f, 5)
    assert r.unbind(f, 5) == pd.BindStatus.OK
    r.mem.write(CTRL_AREA, bytes(32))
    st = r.submit(f, pasid=5, completion=iova(5, CTRL_OFF), opcode=pd.Opcode.FILL,
                  dst=iova(5, 0), size=64, pattern=0xAB)  # fmt: skip
    assert st == pd.PortalStatus.ACCEPTED
    assert r.record()["status"] == 0  # nothing reached guest memory
    assert r.read(f, pd.Reg.ERR_STATUS) == pd.ERR_RECORD_WRITE
    assert r.read(f, pd.Reg.ERR_PASID) == 5 and r.read(f, pd.Reg.ERR_ADDR, 8) == iova(5, CTRL_OFF)
    reason = r.read(f, pd.Reg.ERR_REASON)
    assert reason & pd.ERR_REASON_WRITE and reason & 0xFF == FaultReason.PASID_ENTRY_P
    assert r.mem.read(DATA, 64) == bytes(64)
    r.write(f, pd.Reg.ERR_STATUS, 1)  # RW1C
    assert r.read(f, pd.Reg.ERR_STATUS) == 0


@pytest.mark.parametrize("ftype", ["dedicated", "mdev", "enqcmd"])
def test_remap_then_dma_sees_the_new_page_every_time(ftype: str) -> None:
    """No invalidation reaches the device: the doorbell's refresh is what keeps it coherent."""
    r = Rig(ftype)
    f = r.fns[0]
    p = 9
    r.setup(f, p)
    table = r.guest.table(p)
    for i in range(20):
        page = DATA2 + 0x1000 * (i % 7)
        r.mem.write(page, bytes([i]) * 0x1000)
        table.unmap(iova(p, 0x200000), 0x1000)
        table.map(iova(p, 0x200000), page, 0x1000)
        rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, 0x200000), dst=iova(p, 0), size=0x1000)
        assert rec["status"] == 1
        assert r.mem.read(DATA, 0x1000) == bytes([i]) * 0x1000, i
    # and an unmapped IOVA stops being reachable at once
    table.unmap(iova(p, 0x200000), 0x1000)
    rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, 0x200000), dst=iova(p, 0), size=16)
    assert rec["status"] == pd.CompletionStatus.FAULT


def test_two_functions_share_one_pasid() -> None:
    r = Rig("dedicated", "translating")
    a, b = r.fns
    r.setup(a, 4)
    r.entry(b, 4)
    assert r.bind(b, 4, entry=False) == pd.BindStatus.OK
    r.mem.write(DATA, b"A" * 4096)
    rec = r.job(b, 4, opcode=pd.Opcode.COPY, src=iova(4, 0), dst=iova(4, 0x1000), size=4096)
    assert rec["status"] == 1 and r.mem.read(DATA + 0x1000, 4096) == b"A" * 4096
    rec = r.job(a, 4, slot=1, opcode=pd.Opcode.COMPARE, src=iova(4, 0), dst=iova(4, 0x1000),
                size=4096)  # fmt: skip
    assert rec["status"] == 1 and rec["result"] == 0


def test_hundred_pasids_on_one_function() -> None:
    r = Rig("mdev")
    f = r.fns[0]
    for p in range(1, 101):
        assert r.bind(f, p) == pd.BindStatus.OK, p
        r.map(p, CTRL_OFF, CTRL_AREA + 0x1000 * (p % 16), 0x1000)
    assert r.read(f, pd.Reg.BOUND_COUNT) == 100
    assert sorted(f.bound.values()) == list(range(1, 101))
    for p in (1, 50, 100):
        r.mem.write(CTRL_AREA + 0x1000 * (p % 16), bytes(64))
        st = r.submit(f, pasid=p, opcode=pd.Opcode.NOOP, completion=iova(p, CTRL_OFF))
        assert st == 0 and r.record(CTRL_AREA + 0x1000 * (p % 16))["status"] == 1


def test_batch() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    p = 2
    r.setup(f, p)
    r.mem.write(DATA, bytes(range(256)) * 16)
    n = 8
    arr = b"".join(
        pd.DESCRIPTOR.build(pasid=999, opcode=pd.Opcode.COPY, flags=pd.DESC_FLAG_COMPLETION,
                            completion=iova(p, CTRL_OFF + 0x1000 + 32 * i),
                            src=iova(p, 512 * i), dst=iova(p, 0x80000 + 512 * i), size=512)
        for i in range(n)
    )  # fmt: skip
    r.mem.write(CTRL_AREA + 0x2000, arr)
    rec = r.job(f, p, opcode=pd.Opcode.BATCH, src=iova(p, CTRL_OFF + 0x2000), size=n)
    assert rec["status"] == 1 and rec["bytes_done"] == n
    assert r.mem.read(DATA + 0x80000, 4096) == r.mem.read(DATA, 4096)
    for i in range(n):
        assert r.record(CTRL_AREA + 0x1000 + 32 * i)["status"] == 1
    # one descriptor faults, a nested batch is invalid: the batch says so
    bad = pd.DESCRIPTOR.build(pasid=p, opcode=pd.Opcode.COPY, src=iova(p, 0x300000), dst=0, size=8)
    nested = pd.DESCRIPTOR.build(pasid=p, opcode=pd.Opcode.BATCH, src=0, size=1)
    r.mem.write(CTRL_AREA + 0x2000 + 64, bad + nested)
    rec = r.job(f, p, opcode=pd.Opcode.BATCH, src=iova(p, CTRL_OFF + 0x2000), size=4)
    assert rec["status"] == pd.CompletionStatus.BATCH_FAILED and rec["bytes_done"] == 2


@pytest.mark.parametrize(
    "desc, status",
    [
        ({"opcode": pd.Opcode.COPY, "size": pd.MAX_XFER + 1}, pd.CompletionStatus.TOO_BIG),
        ({"opcode": pd.Opcode.BATCH, "size": pd.MAX_BATCH + 1}, pd.CompletionStatus.TOO_BIG),
        ({"opcode": pd.Opcode.BATCH, "size": 0}, pd.CompletionStatus.INVALID),
        ({"opcode": 9}, pd.CompletionStatus.INVALID),
        ({"opcode": pd.Opcode.NOOP, "rsvd2": 1}, pd.CompletionStatus.INVALID),
        ({"opcode": pd.Opcode.NOOP, "flags": 0x81}, pd.CompletionStatus.INVALID),
    ],
)
def test_invalid_descriptors(desc: JobFields, status: int) -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    r.setup(f, 1)
    desc = {"flags": pd.DESC_FLAG_COMPLETION} | desc
    assert r.job(f, 1, **desc)["status"] == status


def test_portal_statuses() -> None:
    r = Rig("dedicated", "enqcmd")
    d, e = r.fns
    r.setup(e, 3)
    assert r.submit(d, pasid=3 | 1 << 25, opcode=0) == pd.PortalStatus.INVALID
    assert r.submit(d, pasid=0, opcode=0) == pd.PortalStatus.INVALID
    assert r.submit(e, pasid=4, opcode=0) == pd.PortalStatus.REFUSED  # not in the CPU table
    assert r.submit(e, pasid=3, opcode=0, flags=0) == pd.PortalStatus.ACCEPTED
    r.write(d, pd.Reg.CTRL, 0)
    assert r.submit(d, pasid=3, opcode=0) == pd.PortalStatus.NOT_ENABLED


def test_supervisor_requests_need_sre_and_supervisor_pages() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    p = 6
    r.setup(f, p)
    r.map(p, 0x200000, DATA2, 0x1000, user=False)  # a supervisor-only page
    rec = r.job(f, p, opcode=pd.Opcode.FILL, dst=iova(p, 0x200000), size=8, pattern=1)
    assert rec["status"] == pd.CompletionStatus.FAULT  # user request to a supervisor page
    r.mem.write(CTRL_AREA, bytes(32))
    r.submit(f, pasid=pd.DESC_PRIV | p, opcode=pd.Opcode.FILL, dst=iova(p, 0x200000), size=8,
             pattern=1, completion=iova(p, CTRL_OFF))  # fmt: skip
    assert r.record()["status"] == 0  # SRE clear: even the record write is refused
    assert r.read(f, pd.Reg.ERR_REASON) & 0xFF == FaultReason.SRE_CLEAR
    r.entry(f, p, sre=True)
    rec = r.job(f, p, priv=True, opcode=pd.Opcode.FILL, dst=iova(p, 0x200000), size=8, pattern=1)
    assert rec["status"] == 1 and r.mem.read(DATA2, 8) == b"\x01" + bytes(7)


def test_interrupt_status_and_reset() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    r.setup(f, 1)
    r.job(f, 1, opcode=pd.Opcode.NOOP, flags=pd.DESC_FLAG_COMPLETION | pd.DESC_FLAG_INTERRUPT)
    assert r.read(f, pd.Reg.INTR_STATUS) == 1
    r.write(f, pd.Reg.INTR_STATUS, 1)
    assert r.read(f, pd.Reg.INTR_STATUS) == 0
    r.write(f, pd.Reg.CTRL, pd.CTRL_RESET)
    assert r.read(f, pd.Reg.CTRL) == 0 and r.read(f, pd.Reg.BOUND_COUNT) == 0
    assert list(r.host.bindings()) == []


def test_guest_second_stage_entries_in_software() -> None:
    """A scalable-ss guest (PGTT=2 entries): with guest_second_stage the engine walks the
    guest's own second-stage table (VT-d cannot nest it), with the same R/W, faults and
    coherence as first-stage bindings."""
    from vioasid.model.guest_driver import SecondStagePageTable

    r = Rig("dedicated", "mdev")
    r.host.guest_second_stage = True
    d, m = r.fns
    p = 3
    tables = {}
    for f in (d, m):
        ss = SecondStagePageTable(r.mem, r.guest.pages)
        ss.map(iova(p, 0), DATA, MB)
        ss.map(iova(p, CTRL_OFF), CTRL_AREA, 0x10000)
        ss.map(iova(p, 0x200000), DATA2, 0x1000, write=False)
        r.guest.driver.set_pasid_entry(f.guest_rid, p, pgtt=PGTT_SECOND_STAGE, did=7,
                                       ssptptr=ss.root, aw=ss.aw)  # fmt: skip
        assert r.bind(f, p, entry=False) == pd.BindStatus.OK
        tables[f.guest_rid] = ss
    assert m.bound == {3: 1} and d.bound == {3: 3}
    r.mem.write(DATA, b"second-stage" * 100)
    for f in (d, m):
        rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, 0), dst=iova(p, 0x40001), size=1200)
        assert rec["status"] == 1 and r.mem.read(DATA + 0x40001, 1200) == r.mem.read(DATA, 1200)
        rec = r.job(f, p, opcode=pd.Opcode.FILL, dst=iova(p, 0x200000), size=8, pattern=1)
        assert rec["status"] == pd.CompletionStatus.FAULT and rec["fault_pasid"] == 3
        assert rec["fault_flags"] & pd.FAULT_FLAG_WRITE
        rec = r.job(f, p, opcode=pd.Opcode.COPY, src=iova(p, 0x300000), dst=iova(p, 0), size=8)
        assert rec["status"] == pd.CompletionStatus.FAULT and rec["fault_addr"] == iova(p, 0x300000)
    # remap at once, no invalidation reaches the device
    ss = tables[d.guest_rid]
    for i in range(5):
        page = DATA2 + 0x1000 * (1 + i)
        r.mem.write(page, bytes([i + 1]) * 4096)
        ss.unmap(iova(p, 0x200000), 0x1000)
        ss.map(iova(p, 0x200000), page, 0x1000)
        rec = r.job(d, p, opcode=pd.Opcode.COPY, src=iova(p, 0x200000), dst=iova(p, 0), size=4096)
        assert rec["status"] == 1 and r.mem.read(DATA, 4096) == bytes([i + 1]) * 4096
    assert r.unbind(d, p) == pd.BindStatus.OK and r.host.check_invariants() == []
    assert r.host._soft_ss == {(m.engine_device.did, 3)}
