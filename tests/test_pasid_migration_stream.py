"""The PASID DMA functions' migration stream (vioasid.formats.pasid_migration) end to end in
memory: a source function's registers, config space and bindings re-created on another host's
engine (pPASIDs re-allocated there), DMA-dirtied pages carried, corrupt streams refused."""

from __future__ import annotations

import mmap

import pytest
from test_pasid_dma_device import DATA, Rig, iova

from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.device.pasid_dma_state import (
    apply_pages,
    decode_functions,
    encode_functions,
    encode_pages,
)
from vioasid.formats import pasid_dma as pd
from vioasid.formats.pasid_dma import CompletionStatus, FunctionType, Opcode, Reg
from vioasid.model.engine import Host
from vioasid.model.errors import MigrationFailed
from vioasid.model.memory import GuestMemory
from vioasid.model.migration import export_vm, import_vm


def _copy_memory(src: GuestMemory) -> GuestMemory:
    r = src.regions[0]
    m = mmap.mmap(-1, r.end)
    m[:] = src.read(0, r.end)
    out = GuestMemory()
    out.add(0, m, name="dst-ram")
    return out


def _destination(src: Rig, *, tenant: int = 5) -> Host:
    h = Host("dst", hpa_base=7 << 40)
    for f in src.fns:
        fn = src.host.functions[f.function_rid]
        h.add_function(fn.rid, enqcmd=fn.enqcmd, translating=fn.translating)
    if tenant:  # another VM already holding pPASIDs 1..tenant of the global space
        for _ in range(tenant):
            h.global_alloc.alloc()
    return h


def test_functions_move_to_another_engine() -> None:
    src = Rig("dedicated", "mdev", "enqcmd")
    for i, f in enumerate(src.fns):
        src.setup(f, 3 + i)
    _d, m, e = src.fns
    for f in src.fns:
        f.dirty = set()
    src.mem.write(DATA, b"migrate me " * 10)
    rec = src.job(m, 4, opcode=Opcode.COPY, src=iova(4, 0), dst=iova(4, 0x2000), size=110)
    assert rec["status"] == CompletionStatus.SUCCESS
    m.intr_status = pd.INTR_COMPLETION
    m.portal[:8] = b"partial!"  # a descriptor half-written when the VM stopped
    assert (DATA + 0x2000) >> 12 in (m.dirty or set())

    stream = encode_functions(src.fns)
    engine = export_vm(src.host, "vm")
    dirty = encode_pages(src.mem, set().union(*(f.dirty or set() for f in src.fns)))

    dst_mem = _copy_memory(src.mem)
    dst_mem.write(DATA + 0x2000, bytes(110))  # QEMU never saw that DMA write
    assert apply_pages(dst_mem, dirty) >= 1
    assert dst_mem.read(DATA + 0x2000, 110) == b"migrate me " * 10

    h = _destination(src)
    import_vm(h, engine, dst_mem, {f.guest_rid: f.function_rid for f in src.fns})
    records = decode_functions(stream)
    new = [PasidDmaFunction(h, "vm", f.guest_rid, f.ftype) for f in src.fns]
    for f in new:
        f.load_migration_state(records[f.guest_rid])
    nd, nm, ne = new
    assert nd.bound == {3: 3}  # dedicated: pPASID == vPASID on either host
    assert ne.bound[5] != e.bound[5]  # enqcmd: the destination's global space is occupied
    assert nm.intr_status == pd.INTR_COMPLETION and bytes(nm.portal[:8]) == b"partial!"
    assert bytes(nm.config.data) == bytes(m.config.data)
    assert Rig.read(nm, Reg.BOUND_COUNT) == 1 and Rig.read(nm, Reg.STATUS) == 1
    # the destination's function works on the destination's RAM
    dst_mem.write(DATA + 0x100, b"after")
    nm.bar_write(0, pd.PORTAL_OFFSET, pd.DESCRIPTOR.build(
        pasid=4, opcode=Opcode.COPY, flags=0, completion=0, src=iova(4, 0x100),
        dst=iova(4, 0x3000), size=5))  # fmt: skip
    assert Rig.read(nm, Reg.PORTAL_STATUS) == 0
    assert dst_mem.read(DATA + 0x3000, 5) == b"after"
    assert src.mem.read(DATA + 0x3000, 5) != b"after"


def test_corrupt_and_mismatched_streams_are_refused() -> None:
    src = Rig("dedicated", "mdev")
    src.setup(src.fns[0], 3)
    stream = encode_functions(src.fns)
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(MigrationFailed, match="checksum"):
        decode_functions(bytes(bad))
    with pytest.raises(MigrationFailed, match=r"truncated|malformed"):
        decode_functions(stream[:40])
    with pytest.raises(MigrationFailed, match="not a PASID function stream"):
        decode_functions(b"X" * 64)
    future = bytearray(stream)
    future[8] = 9
    with pytest.raises(MigrationFailed, match="version 9"):
        decode_functions(bytes(future))
    with pytest.raises(MigrationFailed):
        apply_pages(GuestMemory(), b"\x01\x00")
    recs = decode_functions(stream)
    # a record of a dedicated function does not load into an mdev one
    with pytest.raises(ValueError, match="type"):
        src.fns[1].load_migration_state(recs[src.fns[0].guest_rid])
    assert FunctionType(recs[src.fns[1].guest_rid].type) is FunctionType.MDEV


def test_dirty_tracking_is_off_unless_asked() -> None:
    src = Rig("mdev")
    f = src.fns[0]
    src.setup(f, 2)
    src.job(f, 2, opcode=Opcode.FILL, dst=iova(2, 0), size=64, pattern=0x55)
    assert f.dirty is None
    f.dirty = set()
    src.job(f, 2, opcode=Opcode.FILL, dst=iova(2, 0x5000), size=64, pattern=0x55)
    assert (DATA + 0x5000) >> 12 in f.dirty


def test_page_stream_fast_path_is_the_construct_layout() -> None:
    from vioasid.formats.pasid_migration import PAGES

    src = Rig("mdev")
    src.mem.write(0x3000, b"a" * 4096)
    src.mem.write(0x7000, b"b" * 10)
    raw = encode_pages(src.mem, {7, 3})
    parsed = PAGES.parse(raw)
    assert [p.gpa for p in parsed] == [0x3000, 0x7000]
    assert parsed[0].data == b"a" * 4096 and parsed[1].data[:10] == b"b" * 10
    assert PAGES.build(parsed) == raw
    with pytest.raises(MigrationFailed):
        apply_pages(src.mem, raw[:-1])
