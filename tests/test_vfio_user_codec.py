"""The sans-IO vfio-user codec against byte vectors written from QEMU docs/interop/vfio-user.rst."""

from __future__ import annotations

import errno
import os

import pytest

from vioasid.formats import vfio_user as vu
from vioasid.vfio_user.codec import (
    BadCommand,
    Codec,
    ProtocolViolation,
    decode_reply,
    encode_error,
    encode_reply,
    parse_payload,
    version_payload,
)

# VERSION, id 1: header (id=1, cmd=1, size=16+4+len(json), flags=0 command, error=0)
_JSON = b'{"capabilities":{"max_msg_fds":8}}\0'
VERSION_BYTES = (
    bytes.fromhex("0100 0100") + (16 + 4 + len(_JSON)).to_bytes(4, "little")
    + bytes(4) + bytes(4) + bytes.fromhex("0000 0000") + _JSON
)  # fmt: skip
# REGION_READ, id 7: offset 0, region 7 (config), count 4
REGION_READ_BYTES = bytes.fromhex(
    "0700 0900 20000000 00000000 00000000"  # header: id 7, cmd 9, size 32
    "0000000000000000 07000000 04000000"  # offset, region, count
)
# REGION_WRITE, id 8: BAR0 offset 0x18, 4 bytes 01 00 00 00, no-reply flag (posted)
REGION_WRITE_BYTES = bytes.fromhex(
    "0800 0a00 24000000 10000000 000000001800000000000000 00000000 04000000 01000000"
)


def test_header_layout_matches_the_spec() -> None:
    assert vu.HEADER.size == 16
    hdr = vu.HEADER.parse(REGION_READ_BYTES)
    assert hdr == {"id": 7, "cmd": 9, "size": 32, "flags": 0, "error": 0}
    assert vu.HEADER.build(**hdr) == REGION_READ_BYTES[:16]
    assert vu.Command.REGION_READ.value == 9 and vu.Command.DEVICE_RESET.value == 13
    assert vu.REGION_INFO.size == 32 and vu.DMA_MAP.size == 32 and vu.IRQ_SET.size == 20


def test_version_command_decodes() -> None:
    c = Codec()
    c.receive(VERSION_BYTES)
    m = c.next_message()
    assert m is not None and m.id == 1 and m.cmd == vu.Command.VERSION
    p = parse_payload(m)
    assert p == {"major": 0, "minor": 0, "caps": {"max_msg_fds": 8}}
    assert c.next_message() is None


def test_messages_split_and_merged_across_reads() -> None:
    c = Codec()
    stream = REGION_READ_BYTES + REGION_WRITE_BYTES
    for i in range(0, len(stream), 5):
        c.receive(stream[i : i + 5])
    a, b = c.next_message(), c.next_message()
    assert a is not None and b is not None and c.next_message() is None
    assert parse_payload(a) == {"offset": 0, "region": 7, "count": 4}
    pb = parse_payload(b)
    assert b.no_reply and pb["offset"] == 0x18 and pb["data"] == b"\x01\0\0\0"


def test_fds_belong_to_the_message_whose_header_they_came_with() -> None:
    r, w = os.pipe()
    c = Codec()
    dma_map = vu.HEADER.build(id=3, cmd=2, size=48) + vu.DMA_MAP.build(
        argsz=32, flags=3, offset=0, address=0, size=0x1000
    )
    c.receive(REGION_READ_BYTES)
    c.receive(dma_map, [r])
    a, b = c.next_message(), c.next_message()
    assert a is not None and a.fds == []
    assert b is not None and b.fds == [r]
    b.close_fds()
    os.close(w)
    with pytest.raises(OSError):
        os.fstat(r)


@pytest.mark.parametrize(
    "raw, why",
    [
        (vu.HEADER.build(id=1, cmd=9, size=8), "below the header"),
        (vu.HEADER.build(id=1, cmd=9, size=1 << 30), "above the maximum"),
        (vu.HEADER.build(id=1, cmd=9, size=16, flags=1), "not a command"),
        (vu.HEADER.build(id=1, cmd=9, size=16, flags=0x40), "unknown flags"),
    ],
)
def test_framing_violations(raw: bytes, why: str) -> None:
    c = Codec()
    with pytest.raises(ProtocolViolation, match=why):
        c.receive(raw)
        c.next_message()
    assert c.closed
    with pytest.raises(ProtocolViolation):
        c.receive(REGION_READ_BYTES)  # a closed codec takes nothing more


def test_fds_in_the_middle_of_a_message_are_a_violation() -> None:
    r, w = os.pipe()
    c = Codec()
    c.receive(REGION_READ_BYTES[:20])
    with pytest.raises(ProtocolViolation, match="belong to no message"):
        c.receive(REGION_READ_BYTES[20:], [r])
        while c.next_message() is not None:
            pass
    os.close(w)
    with pytest.raises(OSError):
        os.fstat(r)  # the codec closed it


@pytest.mark.parametrize(
    "cmd, payload, err",
    [
        (99, b"", errno.ENOSYS),
        (vu.Command.DEVICE_GET_REGION_IO_FDS, bytes(16), errno.ENOSYS),
        (vu.Command.REGION_READ, bytes(8), errno.EINVAL),
        (vu.Command.DMA_MAP, bytes(31), errno.EINVAL),
        (vu.Command.REGION_WRITE, vu.REGION_RW.build(offset=0, region=0, count=8) + b"1234",
         errno.EINVAL),
        (vu.Command.REGION_READ, vu.REGION_RW.build(offset=0, region=0, count=1 << 24),
         errno.E2BIG),
        (vu.Command.VERSION, vu.VERSION.build() + b"{not json\0", errno.EINVAL),
        (vu.Command.VERSION, vu.VERSION.build() + b"[1]\0", errno.EINVAL),
    ],
)  # fmt: skip
def test_bad_payloads_are_error_replies(cmd: int, payload: bytes, err: int) -> None:
    c = Codec()
    c.receive(vu.HEADER.build(id=5, cmd=cmd, size=16 + len(payload)) + payload)
    m = c.next_message()
    assert m is not None
    with pytest.raises(BadCommand) as e:
        parse_payload(m)
    assert e.value.errno == err


def test_reply_encoding() -> None:
    assert encode_error(9, 10, errno.EINVAL) == bytes.fromhex(
        "0900 0a00 10000000 21000000 16000000"
    )
    r = encode_reply(7, 9, b"\xaa\xbb")
    assert r == bytes.fromhex("0700 0900 12000000 01000000 00000000 aabb")
    hdr, body = decode_reply(r)
    assert hdr["flags"] == vu.TYPE_REPLY and body == b"\xaa\xbb"
    v = version_payload({"max_msg_fds": 8})
    assert v[:4] == bytes(4) and v.endswith(b"\0") and b'"max_msg_fds":8' in v


def test_fds_with_a_chunk_holding_a_tail_and_the_next_header() -> None:
    r, w = os.pipe()
    c = Codec()
    dma_map = vu.HEADER.build(id=3, cmd=2, size=48) + vu.DMA_MAP.build(
        argsz=32, flags=3, offset=0, address=0, size=0x1000
    )
    c.receive(REGION_READ_BYTES[:10])
    c.receive(REGION_READ_BYTES[10:] + dma_map, [r])  # tail of one message + the next one
    a, b = c.next_message(), c.next_message()
    assert a is not None and a.fds == [] and b is not None and b.fds == [r]
    b.close_fds()
    os.close(w)
