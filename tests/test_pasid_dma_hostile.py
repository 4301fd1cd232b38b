"""Hostile guests against the PASID DMA function: random descriptors and register writes never
raise out of the model, never touch a byte outside what the PASID maps writable, and a flood of
doorbells on one function's connection leaves the loop and another function responsive."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest
from engine_support import MB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pasid_dma_device import CTRL_AREA, CTRL_OFF, DATA, Rig, iova
from test_vfio_user_function import dma_function

from vioasid.formats import pasid_dma as pd
from vioasid.formats import vfio_user as vu
from vioasid.formats.pasid_dma import Opcode
from vioasid.vfio_user.codec import decode_reply, encode_command, version_payload
from vioasid.vfio_user.server import FunctionServer

_RIG = Rig("dedicated", "enqcmd")
for _f in _RIG.fns:
    _RIG.setup(_f, 5)
RO_GPA = 0x500000
_RIG.map(5, 0x300000, RO_GPA, 0x2000, write=False)  # a read-only window
# everything but the writable mappings (the 1 MiB data buffer, the 64 KiB control area)
PROTECTED = [(0, DATA), (DATA + MB, CTRL_AREA - DATA - MB), (CTRL_AREA + 0x10000, 0x400000)]


def _digest() -> str:
    h = hashlib.sha256()
    for gpa, n in PROTECTED:
        h.update(_RIG.mem.read(gpa, n))
    return h.hexdigest()


_addr = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 0x120000).map(lambda o: iova(5, o)),
    st.sampled_from([iova(5, 0x300000), iova(5, 0xFFFF8), iova(5, CTRL_OFF + 0xFFE0)]),
)
_desc = st.fixed_dictionaries(
    {
        "pasid": st.one_of(st.just(5), st.integers(0, (1 << 32) - 1), st.just(5 | 1 << 31)),
        "opcode": st.integers(0, 7),
        "flags": st.integers(0, 3),
        "completion": st.one_of(_addr, st.just(iova(5, CTRL_OFF + 0x100))),
        "src": _addr,
        "dst": _addr,
        "size": st.one_of(st.integers(0, 0x3000), st.integers(0, (1 << 32) - 1)),
        "pattern": st.integers(0, (1 << 64) - 1),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(_desc, min_size=1, max_size=6), fn=st.integers(0, 1))
def test_random_descriptors_never_escape(descs: list[dict[str, int]], fn: int) -> None:
    before = _digest()
    f = _RIG.fns[fn]
    for d in descs:
        st_ = f._submit(pd.DESCRIPTOR.build(**d))  # the model itself: no catch-all here
        assert st_ in set(pd.PortalStatus)
    assert _digest() == before  # nothing outside the writable mappings changed
    assert _RIG.host.check_invariants() == []


@settings(max_examples=100, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 0x10FF), st.binary(min_size=1, max_size=16)),
                       max_size=12))  # fmt: skip
def test_random_register_writes_never_raise(writes: list[tuple[int, bytes]]) -> None:
    r = Rig("mdev")
    f = r.fns[0]
    for off, data in writes:
        f.bar_write(0, off, data[: pd.BAR0_SIZE - off])
        assert len(f.bar_read(0, off, 4)) == 4
    assert r.read(f, Reg_ID()) == pd.ID_VALUE
    assert r.host.check_invariants() == []


def Reg_ID() -> int:
    return int(pd.Reg.ID)


def test_batch_of_huge_and_nested_descriptors_is_bounded() -> None:
    r = Rig("dedicated")
    f = r.fns[0]
    r.setup(f, 2)
    nested = pd.DESCRIPTOR.build(pasid=2, opcode=Opcode.BATCH, src=iova(2, CTRL_OFF + 0x2000),
                                 size=pd.MAX_BATCH)  # fmt: skip
    r.mem.write(CTRL_AREA + 0x2000, nested * 4)  # a batch whose entries point at itself
    rec = r.job(f, 2, opcode=Opcode.BATCH, src=iova(2, CTRL_OFF + 0x2000), size=4)
    assert rec["status"] == pd.CompletionStatus.BATCH_FAILED and rec["bytes_done"] == 0
    huge = pd.DESCRIPTOR.build(pasid=2, opcode=Opcode.COPY, size=0xFFFFFFFF)
    r.mem.write(CTRL_AREA + 0x2000, huge)
    rec = r.job(f, 2, opcode=Opcode.BATCH, src=iova(2, CTRL_OFF + 0x2000), size=1)
    assert rec["status"] == pd.CompletionStatus.BATCH_FAILED
    assert f.jobs[-2].status == pd.CompletionStatus.TOO_BIG


@pytest.mark.asyncio
async def test_doorbell_flood_leaves_other_functions_responsive(tmp_path: Path) -> None:
    busy, other = dma_function(), dma_function()
    sa, sb = FunctionServer(busy, tmp_path / "a"), FunctionServer(other, tmp_path / "b")
    await sa.start()
    await sb.start()
    loop = asyncio.get_running_loop()
    try:
        ca, cb = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        ca.connect(str(tmp_path / "a"))
        cb.connect(str(tmp_path / "b"))
        ver = encode_command(1, vu.Command.VERSION, version_payload({}))
        ca.sendall(ver)
        cb.sendall(ver)
        await loop.run_in_executor(None, ca.recv, 4096)
        await loop.run_in_executor(None, cb.recv, 4096)
        # 3000 posted portal writes (doorbells with a noop descriptor) on one connection
        ring = vu.REGION_RW.build(offset=pd.PORTAL_SUBMIT_QWORD, region=0, count=8) + bytes(8)
        flood = b"".join(
            encode_command(i & 0xFFFF, vu.Command.REGION_WRITE, ring, vu.FLAG_NO_REPLY)
            for i in range(3000)
        )
        ca.setblocking(False)
        await loop.sock_sendall(ca, flood)
        # meanwhile the other function answers a read
        cb.sendall(encode_command(2, vu.Command.REGION_READ, vu.REGION_RW.build(count=4)))
        data = await loop.run_in_executor(None, cb.recv, 4096)
        assert decode_reply(data)[1][16:] == b"VDMA"
        for _ in range(500):
            if busy.doorbells >= 3000:
                break
            await asyncio.sleep(0.01)
        assert busy.doorbells == 3000
        ca.close()
        cb.close()
    finally:
        await sa.close()
        await sb.close()
