"""The sans-IO codec: framing, every malformed-input rule, fd ownership; decoder fuzzing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vioasid.formats import wire
from vioasid.formats.wire import ErrorCode, Request
from vioasid.protocol.daemon_codec import (
    Codec,
    DmaBatch,
    ProtocolViolation,
    Role,
    encode_error,
    encode_event,
    encode_ok,
    encode_request,
    frame,
)

REGION = {"guest_phys_addr": 0, "memory_size": 4096, "userspace_addr": 0, "mmap_offset": 0}


def register(n: int = 1) -> bytes:
    body = {"flags": 0, "nregions": n, "name": "vm1", "regions": [REGION] * n}
    return encode_request(Request.REGISTER_VM, body)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """A few real fds (pipe ends); whatever the test leaves open is closed after it."""
    made: list[int] = []
    for _ in range(3):
        made += os.pipe()
    yield made
    for fd in made:
        with contextlib.suppress(OSError):
            os.close(fd)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def violation(codec: Codec, data: bytes, fds: list[int] | None = None) -> str:
    with pytest.raises(ProtocolViolation) as info:
        codec.receive(data, fds)
        while codec.next_message() is not None:
            pass
    return str(info.value)


def test_messages_split_anywhere_decode_the_same() -> None:
    stream = (
        encode_request(Request.GET_FEATURES)
        + encode_request(Request.SET_FEATURES, {"features": 3}, need_reply=True)
        + encode_request(Request.DUMP, {"vm": wire.ALL_VMS, "offset": 0})
    )
    for cut in range(len(stream) + 1):
        codec = Codec(Role.DAEMON)
        got = []
        for part in (stream[:cut], stream[cut:]):
            codec.receive(part)
            while (m := codec.next_message()) is not None:
                got.append(m)
        assert [m.request for m in got] == [1, 2, Request.DUMP]
        assert got[1].need_reply and not got[0].need_reply
        assert got[1].body.features == 3
        codec.receive_eof()


def test_dma_is_kept_raw() -> None:
    entries = wire.DMA_ENTRY_S.pack(0x18, 1, 5, 0x1000) * 3
    codec = Codec(Role.DAEMON)
    codec.receive(encode_request(Request.DMA, wire.DMA_HEAD_S.pack(7, 3) + entries))
    msg = codec.next_message()
    assert msg is not None and isinstance(msg.body, DmaBatch)
    assert (msg.body.vm, msg.body.count, msg.body.entries) == (7, 3, entries)


def test_short_header_at_eof() -> None:
    codec = Codec(Role.DAEMON)
    codec.receive(b"\x01\x00\x00")
    assert codec.next_message() is None
    with pytest.raises(ProtocolViolation, match="short header"):
        codec.receive_eof()


def test_truncated_payload_at_eof() -> None:
    codec = Codec(Role.DAEMON)
    codec.receive(encode_request(Request.DUMP, {"vm": 1, "offset": 0})[:-2])
    assert codec.next_message() is None
    with pytest.raises(ProtocolViolation, match="truncated payload of DUMP"):
        codec.receive_eof()


@pytest.mark.parametrize("flags", [0, 2, 3, 1 | 16, 1 | wire.FLAG_REPLY])
def test_bad_flags(flags: int) -> None:
    reason = violation(Codec(Role.DAEMON), frame(Request.GET_FEATURES, flags))
    assert any(w in reason for w in ("wrong version", "reserved", "reply flag"))


def test_size_above_maximum_refused_before_buffering() -> None:
    codec = Codec(Role.DAEMON)
    head = wire.HEADER_S.pack(Request.DUMP, 1, wire.MAX_PAYLOAD + 1)
    assert "above the maximum" in violation(codec, head)


def test_unknown_request() -> None:
    assert "unknown request 999" in violation(Codec(Role.DAEMON), frame(999, 1, b""))
    # an event number is not a request either
    assert "unknown request" in violation(Codec(Role.DAEMON), frame(Request.FAULT_EVENT, 1))


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # VM_REF needs 4 bytes
        b"\x01\x00\x00\x00\x00",  # trailing byte
    ],
)
def test_unparsable_payload(payload: bytes) -> None:
    reason = violation(Codec(Role.DAEMON), frame(Request.DUMP, 1, payload))
    assert reason.startswith("unparsable DUMP")


def test_unparsable_name_utf8() -> None:
    raw = frame(Request.OPEN_VM, 1, b"\x02\x00\xff\xfe")
    assert "unparsable OPEN_VM" in violation(Codec(Role.DAEMON), raw)


def test_dma_count_mismatch() -> None:
    raw = frame(Request.DMA, 1, wire.DMA_HEAD_S.pack(1, 2) + bytes(16))
    assert "unparsable DMA" in violation(Codec(Role.DAEMON), raw)


def test_fds_travel_with_their_message(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    raw = encode_request(Request.GET_FEATURES) + register(2)
    # the kernel may glue earlier bytes onto the chunk that carries the fds
    codec.receive(raw[:20], fds[:2])
    codec.receive(raw[20:])
    first = codec.next_message()
    assert first is not None and first.fds == []
    second = codec.next_message()
    assert second is not None and second.fds == fds[:2]


def test_fds_missing(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    assert "fds missing" in violation(codec, register(2), fds[:1])
    assert not is_open(fds[0])  # the codec closed what it was given


def test_fds_extra(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    assert "fds extra" in violation(codec, register(1), fds[:2])
    assert not is_open(fds[0]) and not is_open(fds[1])


def test_fds_on_a_message_without_fds(fds: list[int]) -> None:
    assert "fds extra" in violation(Codec(Role.DAEMON), encode_request(Request.GET_FEATURES), fds)


def test_fds_on_payload_tail_belong_to_no_message(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    raw = encode_request(Request.DUMP, {"vm": 1, "offset": 0})
    codec.receive(raw[:14])
    assert codec.next_message() is None
    codec.receive(raw[14:], fds[:1])
    with pytest.raises(ProtocolViolation, match="fds extra"):
        while codec.next_message() is not None:
            pass


def test_close_releases_pending_fds(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    codec.receive(register(1)[:10], fds[:1])
    codec.close()
    assert not is_open(fds[0])


def test_client_role_decodes_replies_and_events() -> None:
    codec = Codec(Role.CLIENT)
    codec.receive(encode_ok(Request.GET_FEATURES, 0x1F))
    codec.receive(encode_ok(Request.REGISTER_VM, {"vm": 4}))
    codec.receive(encode_error(Request.DMA, ErrorCode.NOT_FOUND, "no VM 9"))
    fault = {"vm": 1, "rid": 0x18, "reason": 0x71, "flags": 1, "vpasid": 5, "addr": 0x10}
    codec.receive(encode_event(Request.FAULT_EVENT, {**fault, "record": bytes(16)}))
    got = []
    while (m := codec.next_message()) is not None:
        got.append(m)
    assert got[0].body.features == 0x1F
    assert got[1].body.status == 0 and got[1].body.body.vm == 4
    assert got[2].body.status == ErrorCode.NOT_FOUND and got[2].body.body == "no VM 9"
    assert not got[3].is_reply and got[3].body.reason == 0x71


def test_client_role_refuses_need_reply_from_daemon() -> None:
    raw = frame(Request.DUMP, wire.VERSION | wire.FLAG_REPLY | wire.FLAG_NEED_REPLY, bytes(8))
    assert "need_reply" in violation(Codec(Role.CLIENT), raw)


# -- fuzzing -------------------------------------------------------------------------------------

_requests = st.one_of(
    st.sampled_from([int(r) for r in Request]),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
)
_flags = st.one_of(
    st.sampled_from([1, 1 | wire.FLAG_NEED_REPLY, 0, 2, 1 | wire.FLAG_REPLY]),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, int]:
    request = draw(_requests)
    flags = draw(_flags)
    payload = draw(st.binary(max_size=96))
    size = draw(st.one_of(st.just(len(payload)), st.integers(min_value=0, max_value=1 << 26)))
    nfds = draw(st.integers(min_value=0, max_value=3))
    return wire.HEADER_S.pack(request, flags, size) + payload, nfds


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), max_size=5), st.integers(min_value=1, max_value=64))
def test_fuzz_decoder_only_raises_protocol_violation(
    msgs: list[tuple[bytes, int]], chunk: int
) -> None:
    codec = Codec(Role.DAEMON)
    opened: list[int] = []
    try:
        for data, nfds in msgs:
            fds: list[int] = []
            for _ in range(nfds):
                r, w = os.pipe()
                os.close(w)
                fds.append(r)
                opened.append(r)
            for i in range(0, max(len(data), 1), chunk):
                codec.receive(data[i : i + chunk], fds if i == 0 else None)
                while (m := codec.next_message()) is not None:
                    m.close_fds()
        codec.receive_eof()
    except ProtocolViolation:
        pass
    finally:
        codec.close()
    # every fd the codec was handed is closed: by the codec or by the message owner
    assert not any(is_open(fd) for fd in opened)


# -- the one-read DMA fast path ------------------------------------------------------------------


def dma_request(vm: int = 7, count: int = 1, flags: int = wire.VERSION) -> bytes:
    entries = wire.DMA_ENTRY_S.pack(0x18, 1, 5, 0x1000) * count
    return frame(Request.DMA, flags, wire.DMA_HEAD_S.pack(vm, count) + entries)


def test_take_dma_takes_exactly_one_whole_request() -> None:
    codec = Codec(Role.DAEMON)
    raw = dma_request(count=2)
    assert codec.take_dma(raw) == (wire.VERSION, 7, 2)
    need = dma_request(flags=wire.VERSION | wire.FLAG_NEED_REPLY)
    assert codec.take_dma(memoryview(need)) == (wire.VERSION | wire.FLAG_NEED_REPLY, 7, 1)
    assert codec.take_dma(raw[:-1]) is None  # short
    assert codec.take_dma(raw + raw) is None  # two messages: the general path
    assert codec.take_dma(raw + b"\0") is None
    assert codec.take_dma(dma_request(flags=wire.VERSION | wire.FLAG_REPLY)) is None
    assert codec.take_dma(dma_request(flags=0)) is None
    bad_count = bytearray(raw)
    wire.DMA_HEAD_S.pack_into(bad_count, wire.HEADER_SIZE, 7, 3)
    assert codec.take_dma(bytes(bad_count)) is None
    assert Codec(Role.CLIENT).take_dma(raw) is None
    # bytes already buffered: the request belongs after them
    codec.receive(raw[:5])
    assert codec.take_dma(raw) is None
    codec.close()
    assert codec.take_dma(raw) is None


def test_take_dma_refuses_what_the_decoder_refuses() -> None:
    big = wire.MAX_DMA_BATCH + 1
    raw = dma_request(count=big)
    assert Codec(Role.DAEMON).take_dma(raw) is None
    assert "4096" in violation(Codec(Role.DAEMON), raw)
    small = Codec(Role.DAEMON, max_payload=16)
    assert small.take_dma(dma_request(count=1)) is None


def test_take_dma_reply() -> None:
    results = wire.DMA_RESULT_S.pack(0, 0, 1, 5, 0x1000, 0x9000) * 2
    reply = wire.VERSION | wire.FLAG_REPLY
    raw = frame(Request.DMA, reply, wire.DMA_REPLY_HEAD_S.pack(0, 2) + results)
    codec = Codec(Role.CLIENT)
    got = codec.take_dma_reply(memoryview(raw))
    assert got is not None and (got.count, got.results) == (2, results)
    assert type(got.results) is bytes  # copied out of the receive buffer
    assert codec.take_dma_reply(raw[:-1]) is None
    assert codec.take_dma_reply(raw + raw) is None
    assert codec.take_dma_reply(encode_error(Request.DMA, ErrorCode.NOT_FOUND, "x" * 40)) is None
    assert Codec(Role.DAEMON).take_dma_reply(raw) is None
    assert codec.take_dma_reply(frame(Request.DMA, wire.VERSION, raw[12:])) is None  # no reply bit
    codec.receive(raw[:3])
    assert codec.take_dma_reply(raw) is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.sampled_from([0, 1, 2, 5, 9, 0x101]),
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=-3, max_value=3),
)
def test_take_dma_agrees_with_the_decoder(
    vm: int, flags: int, count: int, nbytes: int, size_delta: int
) -> None:
    """Whatever the fast path accepts, the full decoder accepts with the same meaning."""
    payload = wire.DMA_HEAD_S.pack(vm, count) + bytes(range(nbytes))
    raw = wire.HEADER_S.pack(Request.DMA, flags, max(len(payload) + size_delta, 0)) + payload
    took = Codec(Role.DAEMON).take_dma(raw)
    if took is None:
        return
    codec = Codec(Role.DAEMON)
    codec.receive(raw)
    msg = codec.next_message()
    assert msg is not None and codec.next_message() is None
    assert isinstance(msg.body, DmaBatch)
    assert took == (msg.flags, msg.body.vm, msg.body.count)
    assert raw[wire.DMA_FRAME_S.size :] == msg.body.entries


def test_fds_after_fast_path_requests_still_find_their_message(fds: list[int]) -> None:
    codec = Codec(Role.DAEMON)
    for _ in range(3):
        assert codec.take_dma(dma_request()) is not None  # taken without buffering
    codec.receive(register(1), fds[:1])
    msg = codec.next_message()
    assert msg is not None and msg.fds == fds[:1]
    codec.receive(dma_request())  # the general path again
    assert codec.next_message() is not None and codec.next_message() is None
