"""vhost-user codec and the back-end driven by a scripted front-end over a socketpair (no QEMU).

The fake front-end plays QEMU 10.0's part: feature negotiation, SET_MEM_TABLE with a memfd,
vring set-up with eventfds, kicks, IOTLB updates/invalidations and the backend channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from vioasid.device.translator import VtdRegs
from vioasid.formats.virtio import (
    BLK_CONFIG,
    BLK_REQ_HDR,
    VHOST_USER_CONFIG_HDR,
    VHOST_USER_IOTLB,
    VHOST_USER_MEM_HDR,
    VHOST_USER_MEM_REGION,
    VHOST_USER_NEED_REPLY,
    VHOST_USER_U64,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_ADDR,
    VHOST_USER_VRING_STATE,
    VRING_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BlkStatus,
    BlkType,
    IotlbType,
    VhostUserBackendRequest,
    VhostUserProtocolFeature,
    VhostUserRequest,
    VirtioFeature,
)
from vioasid.vhost_user.backend import PROTOCOL_FEATURES, VhostUserBlkBackend
from vioasid.vhost_user.codec import Decoder, ProtocolError, encode, encode_reply

R = VhostUserRequest

# -- codec ------------------------------------------------------------------------------------


def test_codec_roundtrip_split_and_coalesced() -> None:
    a = encode(R.GET_FEATURES)
    b = encode(R.SET_FEATURES, VHOST_USER_U64.build(u64=1 << 32), VHOST_USER_VERSION | 8)
    dec = Decoder()
    out = []
    for i in range(len(a + b)):  # one byte at a time
        out += dec.feed((a + b)[i : i + 1])
    assert [m.request for m in out] == [R.GET_FEATURES, R.SET_FEATURES]
    assert out[1].u64() == 1 << 32 and out[1].need_reply
    assert dec.pending == 0
    reply = encode_reply(R.GET_FEATURES, VHOST_USER_U64.build(u64=5))
    (m,) = Decoder().feed(reply)
    assert m.is_reply and m.flags == 0x5 and m.u64() == 5


def test_codec_fds_go_to_the_message_that_ends_the_chunk() -> None:
    r, w = os.pipe()
    try:
        dec = Decoder()
        chunk = encode(R.SET_OWNER) + encode(R.SET_VRING_KICK, VHOST_USER_U64.build(u64=0))
        owner, kick = dec.feed(chunk, [r])
        assert owner.fds == [] and kick.fds == [r]
    finally:
        os.close(r)
        os.close(w)


def test_codec_rejects_bad_version_and_huge_payload() -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(encode(R.SET_OWNER, b"", flags=2))
    with pytest.raises(ProtocolError):
        Decoder().feed(VHOST_USER_U64.build(u64=0)[:4] + b"\x01\0\0\0" + b"\xff\xff\xff\x7f")


# -- a scripted front-end -----------------------------------------------------------------------

RAM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
UADDR = 0x7F00_0000_0000  # the front-end's "virtual address" of guest RAM
IOVA = 0x4000_0000  # the guest driver maps GPA x at IOVA + x (QEMU mode test)


class FrontEnd:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = Decoder()
        self.pending: list[object] = []

    async def send(
        self, req: int, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False
    ) -> None:
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY if need_reply else 0)
        data = encode(req, payload, flags)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    async def recv(self) -> object:
        loop = asyncio.get_running_loop()
        while not self.pending:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 5)
            assert data, "back-end closed the socket"
            self.pending += self.dec.feed(data)
        return self.pending.pop(0)

    async def call(self, req: int, payload: bytes = b"", **kw: object) -> bytes:
        await self.send(req, payload, **kw)  # type: ignore[arg-type]
        msg = await self.recv()
        assert msg.request == req and msg.flags == 0x5  # type: ignore[attr-defined]
        return msg.payload  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return p


async def _setup(fe: FrontEnd, features: int, memfd: int, ring_base: int) -> tuple[int, int]:
    feats = VHOST_USER_U64.packer.unpack(await fe.call(R.GET_FEATURES))[0]
    assert feats & (1 << VirtioFeature.ACCESS_PLATFORM)
    pf = VHOST_USER_U64.packer.unpack(await fe.call(R.GET_PROTOCOL_FEATURES))[0]
    for bit in ("REPLY_ACK", "BACKEND_REQ", "CONFIG"):  # what QEMU demands with iommu_platform
        assert pf & (1 << VhostUserProtocolFeature[bit])
    await fe.send(R.SET_PROTOCOL_FEATURES, VHOST_USER_U64.build(u64=PROTOCOL_FEATURES))
    await fe.send(R.SET_OWNER)
    cfg = await fe.call(R.GET_CONFIG, VHOST_USER_CONFIG_HDR.build(offset=0, size=60) + bytes(60))
    assert len(cfg) == 12 + 60
    assert BLK_CONFIG.parse(cfg[12:].ljust(BLK_CONFIG.size, b"\0"))["capacity"] == 2048
    ack = await fe.call(R.SET_FEATURES, VHOST_USER_U64.build(u64=features), need_reply=True)
    assert VHOST_USER_U64.packer.unpack(ack)[0] == 0
    table = VHOST_USER_MEM_HDR.build(num_regions=1) + VHOST_USER_MEM_REGION.build(
        guest_phys_addr=0, memory_size=RAM, userspace_addr=UADDR, mmap_offset=0
    )
    await fe.call(R.SET_MEM_TABLE, table, fds=[memfd], need_reply=True)
    await fe.send(R.SET_VRING_NUM, VHOST_USER_VRING_STATE.build(index=0, num=8))
    await fe.send(R.SET_VRING_BASE, VHOST_USER_VRING_STATE.build(index=0, num=0))
    await fe.send(
        R.SET_VRING_ADDR,
        VHOST_USER_VRING_ADDR.build(
            index=0, desc=ring_base + DESC, avail=ring_base + AVAIL, used=ring_base + USED
        ),
    )
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    await fe.send(R.SET_VRING_KICK, VHOST_USER_U64.build(u64=0), fds=[kick])
    await fe.send(R.SET_VRING_CALL, VHOST_USER_U64.build(u64=0), fds=[call])
    await fe.send(R.SET_VRING_ENABLE, VHOST_USER_VRING_STATE.build(index=0, num=1))
    return kick, call


# the features the front-end acks (as QEMU's vhost-user-blk with iommu_platform=on)
F = VirtioFeature
FEATURES = (1 << F.VERSION_1) | (1 << F.ACCESS_PLATFORM) | (1 << F.PROTOCOL_FEATURES)


@contextlib.asynccontextmanager
async def _served(backend: VhostUserBlkBackend) -> AsyncIterator[tuple[FrontEnd, int, mmap.mmap]]:
    """A front-end on a socketpair whose other end ``backend`` serves, and guest RAM (a memfd
    and its mapping); at the end the session is waited for and everything is closed."""
    a, b = socket.socketpair()
    a.setblocking(False)
    session = asyncio.create_task(backend._serve_session(b))
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, RAM)
    ram = mmap.mmap(memfd, RAM)
    try:
        yield FrontEnd(a), memfd, ram
    finally:
        a.close()
        await asyncio.wait_for(session, 5)
        await backend.close()
        ram.close()
        os.close(memfd)


def _queue_read(ram: mmap.mmap, base: int, sector: int) -> None:
    """Driver side: one IN request of 4 KiB (header 0x10000, data 0x11000, status 0x12000)."""
    ram[0x10000:0x10010] = BLK_REQ_HDR.build(type=BlkType.IN, sector=sector)
    for i, (a, n, f) in enumerate(
        [
            (0x10000, 16, VRING_DESC_F_NEXT),
            (0x11000, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
            (0x12000, 1, VRING_DESC_F_WRITE),
        ]
    ):
        ram[DESC + 16 * i : DESC + 16 * i + 16] = VRING_DESC.build(
            addr=base + a, len=n, flags=f, next=i + 1
        )
    ram[AVAIL + 4 : AVAIL + 6] = (0).to_bytes(2, "little")
    ram[AVAIL + 2 : AVAIL + 4] = (1).to_bytes(2, "little")


def _setter(fut: asyncio.Future[None]) -> Callable[[], None]:
    def cb() -> None:
        if not fut.done():
            fut.set_result(None)

    return cb


async def _wait_call(call: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(call, _setter(fut))
    try:
        await asyncio.wait_for(fut, 5)
    finally:
        loop.remove_reader(call)
    os.read(call, 8)


@pytest.mark.asyncio
async def test_backend_serves_a_read_in_walk_mode_while_translation_is_off(disk: Path) -> None:
    regs_calls = 0

    async def regs() -> VtdRegs:
        nonlocal regs_calls
        regs_calls += 1
        return VtdRegs(gsts=0, rtaddr=0)  # GSTS.TES = 0: IOVA == GPA (SeaBIOS phase)

    backend = VhostUserBlkBackend(disk, "/nonexistent.sock", translate="walk", regs=regs, sid=0x20)
    async with _served(backend) as (fe, memfd, ram):
        kick, call = await _setup(fe, FEATURES, memfd, 0)
        _queue_read(ram, 0, 2)
        os.eventfd_write(kick, 1)
        await _wait_call(call)
        assert ram[0x12000] == BlkStatus.OK
        assert ram[0x11000:0x12000] == disk.read_bytes()[1024 : 1024 + 4096]
        assert int.from_bytes(ram[USED + 2 : USED + 4], "little") == 1
        assert regs_calls == 1
        st = VHOST_USER_VRING_STATE.packer.unpack(
            await fe.call(R.GET_VRING_BASE, VHOST_USER_VRING_STATE.build(index=0, num=0))
        )
        assert st == (0, 1)
        for fd in (kick, call):
            os.close(fd)


@pytest.mark.asyncio
async def test_backend_qemu_iotlb_path_misses_updates_and_invalidates(disk: Path) -> None:
    """QEMU mode: every miss goes out on the backend channel; updates map back via uaddr."""
    chan_be, chan_fe = socket.socketpair()
    chan_fe.setblocking(False)
    backend = VhostUserBlkBackend(disk, "/nonexistent.sock", translate="qemu", sid=0x20)
    async with _served(backend) as (fe, memfd, ram):
        await fe.send(R.SET_BACKEND_REQ_FD, b"", fds=[chan_be.fileno()])
        chan_be.close()
        kick, call = await _setup(fe, FEATURES, memfd, IOVA)
        _queue_read(ram, IOVA, 0)
        os.eventfd_write(kick, 1)
        channel = FrontEnd(chan_fe)
        misses = 0
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(call, _setter(done))
        while not done.done():
            recv: asyncio.Future[object] = asyncio.ensure_future(channel.recv())
            waiting: set[asyncio.Future[object]] = {recv, done}  # type: ignore[arg-type]
            finished, _ = await asyncio.wait(waiting, timeout=5, return_when="FIRST_COMPLETED")
            if recv not in finished:
                recv.cancel()
                break
            miss = recv.result()
            assert miss.request == VhostUserBackendRequest.IOTLB_MSG  # type: ignore[attr-defined]
            iova, _size, _uaddr, _perm, kind = VHOST_USER_IOTLB.packer.unpack(miss.payload)  # type: ignore[attr-defined]
            assert kind == IotlbType.MISS and iova & 0xFFF == 0
            misses += 1
            gpa = iova - IOVA
            upd = VHOST_USER_IOTLB.build(
                iova=iova, size=4096, uaddr=UADDR + gpa, perm=3, type=IotlbType.UPDATE
            )
            ack = await fe.call(R.IOTLB_MSG, upd, need_reply=True)
            assert VHOST_USER_U64.packer.unpack(ack)[0] == 0
        loop.remove_reader(call)
        assert done.done()
        assert ram[0x12000] == BlkStatus.OK
        assert ram[0x11000:0x12000] == disk.read_bytes()[:4096]
        assert misses >= 5  # desc, avail, used, header, data, status pages
        inv = VHOST_USER_IOTLB.build(iova=IOVA, size=1 << 20, type=IotlbType.INVALIDATE)
        await fe.call(R.IOTLB_MSG, inv, need_reply=True)
        s = backend.summary()
        assert s["invalidations"] == 1 and s["qemu_misses"] == misses and s["faults"] == 0
        chan_fe.close()
        for fd in (kick, call):
            os.close(fd)
