"""Hypothesis over the daemon codec and the shared framing, with a live daemon that must keep
serving a well-behaved client *while* a hostile connection sends it random frames."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest
from daemon_support import MemfdGuest, bind, daemon_fuzz_settings, running_daemon, setup_vm
from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.client import Client, DmaRequest
from vioasid.daemon.service import Service
from vioasid.formats import wire
from vioasid.formats.fault import FaultReason
from vioasid.formats.wire import Request
from vioasid.model.faults import Fault
from vioasid.protocol.daemon_codec import (
    Codec,
    ProtocolViolation,
    Role,
    encode_event,
    encode_request,
)
from vioasid.protocol.framing import (
    VFIO_USER_HEADER,
    VHOST_USER_HEADER,
    FrameBuffer,
    FramingError,
)

_VALID = [
    encode_request(Request.GET_FEATURES),
    encode_request(Request.DUMP, {"vm": wire.ALL_VMS, "offset": 0}),
    encode_request(Request.DUMP, {"vm": 1, "offset": 12345}),
    encode_request(Request.OPEN_VM, {"name": "vm1"}),
    encode_request(Request.UNREGISTER_VM, {"vm": 1}, need_reply=True),
    encode_request(Request.SUBSCRIBE, {"vm": 1, "events": 3}, need_reply=True),
    encode_request(Request.SET_ROOT_TABLE, {"vm": 1, "rtaddr": 0}, need_reply=True),
    encode_request(Request.DMA, wire.DMA_HEAD_S.pack(1, 1) + bytes(16)),
]


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, int]:
    """One sendmsg: a valid request (some aimed at the victim's VM), a mutated one, or noise."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        data = draw(st.sampled_from(_VALID))
    elif kind == 1:
        mutated = bytearray(draw(st.sampled_from(_VALID)))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(mutated) - 1))
            mutated[i] = draw(st.integers(0, 255))
        data = bytes(mutated)
    else:
        request = draw(st.sampled_from([int(r) for r in Request] + [0, 3, 2000]))
        payload = draw(st.binary(max_size=64))
        size = draw(st.one_of(st.just(len(payload)), st.integers(0, 1 << 25)))
        data = wire.HEADER_S.pack(request, draw(st.sampled_from([1, 9, 5, 0])), size) + payload
    return data, draw(st.integers(0, 2))


async def _hostile(path: str, plan: list[tuple[bytes, int]], fd: int) -> None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, path)
        for data, nfds in plan:
            try:
                if nfds:
                    socket.send_fds(s, [data], [fd] * nfds)
                else:
                    await loop.sock_sendall(s, data)
            except OSError:
                return  # the daemon hung up on us: fine
            await asyncio.sleep(0)
    finally:
        s.close()


async def _round(plan: list[tuple[bytes, int]]) -> None:
    g = MemfdGuest(size=4 << 20)
    g.map(5, 0x400000, 0x200000)
    try:
        async with running_daemon() as (_, path), await Client.connect(path) as victim:
            vm = await setup_vm(victim, g)
            await bind(victim, vm, g)
            before = await victim.dump()
            attack = asyncio.ensure_future(_hostile(path, plan * 3, g.fd))
            served = 0
            while not attack.done() or served < 20:  # served all along, not only afterwards
                [r] = await victim.dma(vm, [DmaRequest("00:03.0", 5, 0x400008)])
                assert r.ok and r.gpa == 0x200008
                served += 1
            await attack
            after = await victim.dump()
            assert after["vms"]["vm1"] == before["vms"]["vm1"]
            async with await Client.connect(path) as fresh:
                assert await fresh.get_features() == wire.ALL_FEATURES
    finally:
        g.close()


@daemon_fuzz_settings(20)
@given(st.lists(frames(), min_size=1, max_size=6))
def test_hostile_frames_while_a_good_client_is_served(plan: list[tuple[bytes, int]]) -> None:
    asyncio.run(_round(plan))


# -- the shared framing: fd attribution under any chunking ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=40), st.integers(0, 3)), min_size=1, max_size=8),
    st.data(),
)
def test_framing_gives_each_message_its_fds_under_any_split(
    messages: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    """What the kernel may do with one sendmsg per message: merge fd-less sends into one read,
    split any send, but end a read within the send that carried fds (and hand the fds over
    with that send's first byte). The framing must then give every message exactly its fds."""
    r, w = os.pipe()
    opened: list[int] = []
    try:
        stream = []
        for payload, nfds in messages:
            fds = [os.dup(r) for _ in range(nfds)]
            opened += fds
            stream.append((VHOST_USER_HEADER.struct.pack(7, 1, len(payload)) + payload, fds))
        fb = FrameBuffer(max_payload=1 << 10)
        got: list[tuple[bytes, list[int]]] = []
        pending = b""
        for raw, fds in stream:
            if fds:  # a read ends within this send; what came before may share the read
                if pending and data.draw(st.booleans()):
                    fb.receive(pending)
                    pending = b""
                cut = data.draw(st.integers(1, len(raw)))
                fb.receive(pending + raw[:cut], list(fds))
                pending = b""
                rest = raw[cut:]
                while rest:
                    k = data.draw(st.integers(1, len(rest)))
                    fb.receive(rest[:k])
                    rest = rest[k:]
            else:
                pending += raw
                if data.draw(st.booleans()):
                    fb.receive(pending)
                    pending = b""
            while (frame := fb.next_frame()) is not None:
                got.append((frame[1], frame[2]))
        if pending:
            fb.receive(pending)
        while (frame := fb.next_frame()) is not None:
            got.append((frame[1], frame[2]))
        assert [p for p, _ in got] == [p for p, _ in messages]
        assert [f for _, f in got] == [fds for _, fds in stream]
    finally:
        for fd in [r, w, *opened]:
            with contextlib.suppress(OSError):
                os.close(fd)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 64))
def test_daemon_codec_never_raises_anything_but_protocol_violation(blob: bytes, step: int) -> None:
    for role in (Role.DAEMON, Role.CLIENT):
        codec = Codec(role)
        try:
            for i in range(0, len(blob), step):
                codec.receive(blob[i : i + step])
                while codec.next_message() is not None:
                    pass
            codec.receive_eof()
        except ProtocolViolation:
            pass
        tolerant = Codec(Role.CLIENT, tolerant=True)
        try:
            tolerant.receive(blob)
            while tolerant.next_message() is not None:
                pass
        except FramingError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFF),
    st.sampled_from(list(FaultReason)),
    st.one_of(st.none(), st.integers(1, (1 << 20) - 1)),
    st.integers(0, (1 << 64) - 1),
    st.booleans(),
)
def test_fault_event_fast_pack_is_the_layout(
    vm: int, sid: int, reason: FaultReason, pasid: int | None, addr: int, write: bool
) -> None:
    f = Fault(reason, addr, sid, pasid, write, "")
    flags = (wire.FAULT_PASID_PRESENT if pasid is not None else 0) | (
        wire.FAULT_WRITE if write else 0
    )
    body = {
        "vm": vm, "rid": sid, "reason": int(reason), "flags": flags, "vpasid": pasid or 0,
        "addr": addr, "record": f.record(),
    }  # fmt: skip
    assert Service._fault_event(vm, f) == encode_event(Request.FAULT_EVENT, body)


def test_framing_serves_the_16_byte_vfio_user_header_too() -> None:
    """One FrameBuffer for both header kinds: vfio-user's size counts its 16-byte header."""
    hdr = VFIO_USER_HEADER.struct
    fb = FrameBuffer(VFIO_USER_HEADER, max_payload=64)
    fb.receive(hdr.pack(1, 2, 16 + 3, 0, 0) + b"abc" + hdr.pack(2, 3, 16, 0, 0)[:5])
    first = fb.next_frame()
    assert first is not None and first[0][:3] == (1, 2, 19) and first[1] == b"abc"
    assert fb.next_frame() is None
    fb.receive(hdr.pack(2, 3, 16, 0, 0)[5:])
    second = fb.next_frame()
    assert second is not None and second[1] == b""
    bad = FrameBuffer(VFIO_USER_HEADER, max_payload=64)
    bad.receive(hdr.pack(1, 2, 8, 0, 0))  # a size below the header's own
    with pytest.raises(FramingError, match="below the header"):
        bad.next_frame()
