"""The front-end socket's reader thread (C and Python) and the DMA gate it shares with the data
path.

What must hold (vioasid/vhost_user/iotlb_reader.py): an invalidation the reader acknowledged is
applied before any later access, an access that used a translation it covers is translated again,
an access in progress delays the ack, and messages keep their order (an invalidation behind a
message the loop has not handled yet goes to the loop too).
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vioasid.device.translator import DeviceTranslator, Resolved
from vioasid.formats.virtio import (
    VHOST_USER_IOTLB,
    VHOST_USER_NEED_REPLY,
    VHOST_USER_U64,
    VHOST_USER_VERSION,
    IotlbType,
    VhostUserRequest,
)
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user import native
from vioasid.vhost_user.codec import Decoder, encode
from vioasid.vhost_user.iotlb_reader import FrontendReader, InvalidationGate
from vioasid.vhost_user.timing import PhaseTimes
from vioasid.vhost_user.virtqueue import Buffer, Dma

R = VhostUserRequest
PAGE = 0x1000
KINDS = ["python", "native"]


class ShiftResolver:
    """IOVA → IOVA + shift, read-write: the guest re-maps a page by changing ``shift``."""

    name = "shift"

    def __init__(self) -> None:
        self.shift = 0
        self.walks = 0

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved:
        self.walks += 1
        return Resolved((iova & ~0xFFF) + self.shift, True, True, "walk", pasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved:
        return self.resolve_now(iova, write, pasid)

    async def refresh(self) -> None:
        return None


def invalidation(iova: int, size: int, need_reply: bool = True) -> bytes:
    payload = VHOST_USER_IOTLB.build(iova=iova, size=size, type=IotlbType.INVALIDATE)
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY if need_reply else 0)
    return encode(R.IOTLB_MSG, payload, flags)


@dataclass
class Rig:
    fe: socket.socket
    gate: InvalidationGate | native.NativeReader
    reader: FrontendReader | native.NativeReader
    tr: DeviceTranslator
    res: ShiftResolver
    dma: Dma
    mem: GuestMemory
    delivered: list[bytes] = field(default_factory=list)
    hold: bool = False  # the loop does not handle forwarded chunks yet

    def ack(self, timeout: float = 5.0) -> int:
        """The next reply's u64 (blocking: the reader thread sends it, not the loop)."""
        self.fe.settimeout(timeout)
        msgs = Decoder().feed(self.fe.recv(4096))
        assert len(msgs) == 1 and msgs[0].request == R.IOTLB_MSG and msgs[0].flags == 0x5
        return int(VHOST_USER_U64.packer.unpack(msgs[0].payload)[0])


@asynccontextmanager
async def rig(kind: str, batches: list[list[tuple[int, int]]] | None = None) -> AsyncIterator[Rig]:
    """A reader of ``kind`` on a socket pair; with ``batches``, the gate applies what was
    posted in one ``invalidate_many`` call (as the back-end wires it) and records each batch."""
    if kind == "native" and native.load() is None:
        pytest.skip("no C compiler: the native reader cannot be built here")
    loop = asyncio.get_running_loop()
    fe, be = socket.socketpair()
    mem = GuestMemory.from_bytes(1 << 22)
    res = ShiftResolver()
    tr = DeviceTranslator(res)
    holder: list[Rig] = []
    apply_many = None
    if batches is not None:

        def apply_many(ranges: list[tuple[int, int]]) -> None:
            batches.append(list(ranges))
            tr.invalidate_many(ranges)

    def on_chunk(data: bytes | memoryview) -> None:
        holder[0].delivered.append(bytes(data))

    reader: FrontendReader | native.NativeReader
    gate: InvalidationGate | native.NativeReader
    if kind == "native":
        lib = native.load()
        assert lib is not None

        def deliver_native(data: bytes | memoryview, fds: list[int]) -> bool:
            on_chunk(data)
            return False

        reader = gate = native.NativeReader(
            lib,
            be,
            loop,
            tr.invalidate,
            tr.flush,
            deliver_native,
            lambda: None,
            acks=True,
            times=PhaseTimes(),
            apply_many=apply_many,
        )
        assert reader.start()
    else:
        gate = InvalidationGate(tr.invalidate, apply_many)

        def deliver_python(data: bytes | None, fds: list[int]) -> None:
            if data is not None:
                on_chunk(data)
            py.handed()

        py = reader = FrontendReader(be, loop, gate, deliver_python, acks=lambda: True)
        reader.start()
    r = Rig(fe, gate, reader, tr, res, Dma(lambda: mem, tr, gate), mem)
    holder.append(r)
    try:
        yield r
    finally:
        reader.stop()
        fe.close()
        be.close()


def _writer(data: bytes) -> Callable[[list[memoryview]], int]:
    def access(views: list[memoryview]) -> int:
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)
        return pos

    return access


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_an_acknowledged_invalidation_is_applied_before_the_next_access(kind: str) -> None:
    async with rig(kind) as r:
        bufs = [Buffer(0x10000, PAGE, True)]
        await r.dma.transfer(bufs, True, _writer(b"A" * PAGE))
        assert r.mem.read(0x10000, 1) == b"A"
        walks = r.res.walks
        # the guest unmaps the page and maps the IOVA elsewhere; QEMU forwards the unmap
        r.res.shift = 0x20_0000
        r.fe.sendall(invalidation(0x10000, PAGE))
        assert r.ack() == 0  # from the reader thread, while the loop does nothing
        await r.dma.transfer(bufs, True, _writer(b"B" * PAGE))
        assert r.mem.read(0x10000 + 0x20_0000, PAGE) == b"B" * PAGE
        assert r.mem.read(0x10000, 1) == b"A"  # the old page was not touched
        assert r.res.walks > walks
        assert r.tr.stats.invalidations == 1
        assert r.reader.invalidations == 1 or kind == "native"  # native counts at stop
        assert r.delivered == []  # nothing went to the loop


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_a_translation_made_before_an_ack_is_made_again(kind: str) -> None:
    async with rig(kind) as r:
        bufs = [Buffer(0x30000, PAGE, True), Buffer(0x50000, PAGE, True)]
        await r.dma.transfer(bufs, True, _writer(b"x" * 2 * PAGE))  # both pages cached
        first = True

        def access(views: list[memoryview]) -> int:
            return _writer(b"N" * 2 * PAGE)(views)

        orig_spans = r.tr.spans_many

        def spans_then_unmap(
            ranges: Sequence[tuple[int, int]], write: bool, pasid: int | None = None
        ) -> list[list[tuple[int, int]]]:
            nonlocal first
            out = orig_spans(ranges, write, pasid)
            if first and (0x50000, PAGE) in ranges[: len(out)]:
                # after both buffers were translated (cache hits) the guest re-maps buffer 0
                # and QEMU forwards the unmap; the reader acks it before the access happens
                first = False
                r.res.shift = 0x10_0000
                r.fe.sendall(invalidation(0x30000, PAGE))
                assert r.ack() == 0
            return out

        assert r.dma.translator is r.tr
        r.tr.spans_many = spans_then_unmap  # type: ignore[method-assign,assignment]
        await r.dma.transfer(bufs, True, access)
        assert r.mem.read(0x30000 + 0x10_0000, PAGE) == b"N" * PAGE
        assert r.mem.read(0x30000, 1) == b"x"  # the stale page was not written
        assert r.mem.read(0x50000, PAGE) == b"N" * PAGE  # not unmapped: its cached page


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_the_ack_waits_for_an_access_in_progress(kind: str) -> None:
    async with rig(kind) as r:
        with r.gate:  # an access in progress (a pwritev of the guest's buffer, say)
            r.fe.sendall(invalidation(0x10000, PAGE))
            ready, _, _ = select.select([r.fe], [], [], 0.3)
            assert not ready  # no ack while the access may still use the translation
        assert r.ack() == 0  # and it comes once the access is done


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_an_invalidation_behind_an_unhandled_message_goes_to_the_loop(kind: str) -> None:
    async with rig(kind) as r:
        other = encode(R.GET_FEATURES, b"", VHOST_USER_VERSION)
        inv = invalidation(0x10000, PAGE)
        r.fe.sendall(other)
        time.sleep(0.2)  # the reader has forwarded GET_FEATURES, the loop has not handled it
        r.fe.sendall(inv)
        time.sleep(0.2)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if b"".join(r.delivered) == other + inv:
                break
        assert b"".join(r.delivered) == other + inv  # both to the loop, in order
        r.gate.drain()
        assert r.tr.stats.invalidations == 0  # none applied behind the loop's back
        ready, _, _ = select.select([r.fe], [], [], 0)
        assert not ready  # and not acknowledged by the reader


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_updates_and_malformed_messages_go_to_the_loop(kind: str) -> None:
    async with rig(kind) as r:
        upd = encode(
            R.IOTLB_MSG,
            VHOST_USER_IOTLB.build(iova=0x1000, size=PAGE, uaddr=0x1000, type=IotlbType.UPDATE),
        )
        bad = bytearray(invalidation(0x1000, PAGE))
        bad[4] = 0x2  # wrong version
        for msg in (upd, bytes(bad)):
            before = len(r.delivered)
            r.fe.sendall(msg)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(r.delivered) > before:
                    break
            assert r.delivered[-1] == msg
        r.gate.drain()
        assert r.tr.stats.invalidations == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_the_backend_acks_from_its_reader_thread(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The back-end picks the C reader when it loads, the Python one when it does not; either
    answers an invalidation (REPLY_ACK negotiated) and counts it."""
    from vioasid.vhost_user.backend import PROTOCOL_FEATURES, VhostUserBlkBackend

    if kind == "python":
        monkeypatch.setattr(native, "load", lambda: None)
    elif native.load() is None:
        pytest.skip("no C compiler: the native reader cannot be built here")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    backend = VhostUserBlkBackend(disk, tmp_path / "vu.sock", translate="identity")
    fe, be = socket.socketpair()
    session = asyncio.create_task(backend._serve_session(be))
    await asyncio.sleep(0)
    want = native.NativeReader if kind == "native" else FrontendReader
    assert isinstance(backend._reader, want)
    loop = asyncio.get_running_loop()
    fe.setblocking(False)
    await loop.sock_sendall(
        fe, encode(R.SET_PROTOCOL_FEATURES, VHOST_USER_U64.build(u64=PROTOCOL_FEATURES))
    )
    # a reply means the loop has handled both messages: the invalidation is the reader's
    await loop.sock_sendall(fe, encode(R.GET_PROTOCOL_FEATURES))
    got = Decoder().feed(await asyncio.wait_for(loop.sock_recv(fe, 4096), 5))
    assert [m.request for m in got] == [R.GET_PROTOCOL_FEATURES]
    await loop.sock_sendall(fe, invalidation(0x10000, PAGE))
    reply = await asyncio.wait_for(loop.sock_recv(fe, 4096), 5)
    msgs = Decoder().feed(reply)
    assert [(m.request, m.flags) for m in msgs] == [(R.IOTLB_MSG, 0x5)]
    assert VHOST_USER_U64.packer.unpack(msgs[0].payload)[0] == 0
    fe.close()
    await asyncio.wait_for(session, 5)
    s = backend.summary()
    assert s["iotlb_acked_by_reader"] == 1 and s["invalidations"] == 1
    await backend.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_posted_invalidations_are_applied_in_one_batch(kind: str) -> None:
    batches: list[list[tuple[int, int]]] = []
    async with rig(kind, batches) as r:
        bufs = [Buffer(0x10000 + i * PAGE, PAGE, True) for i in range(6)]
        await r.dma.transfer(bufs, True, _writer(b"a" * 6 * PAGE))
        gen, walks = r.tr.generation, r.res.walks
        r.res.shift = 0x20_0000  # the guest re-maps five of the six pages
        posted = [(0x10000 + i * PAGE, PAGE) for i in (4, 0, 1, 1, 3)]  # a repeat, any order
        for iova, size in posted:
            r.fe.sendall(invalidation(iova, size))
            assert r.ack() == 0
        await r.dma.transfer(bufs, True, _writer(b"b" * 6 * PAGE))
        assert batches == [posted]  # all of them at the first gate entry, in order
        assert r.tr.generation == gen + 5 and r.tr.stats.invalidations == 5
        assert r.res.walks == walks + 4  # pages 0, 1, 3 and 4 walked again, 2 and 5 cached
        for i in (0, 1, 3, 4):
            assert r.mem.read(0x10000 + i * PAGE + 0x20_0000, PAGE) == b"b" * PAGE
            assert r.mem.read(0x10000 + i * PAGE, 1) == b"a"
        for i in (2, 5):
            assert r.mem.read(0x10000 + i * PAGE, PAGE) == b"b" * PAGE
