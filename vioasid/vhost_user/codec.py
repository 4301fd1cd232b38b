"""Sans-IO vhost-user framing: bytes and file descriptors in, :class:`Message` objects out.

The asyncio edge (``backend.py``) feeds whatever ``recvmsg`` returned (data plus SCM_RIGHTS
fds) into :class:`Decoder` and sends the bytes :func:`encode` builds. Nothing here touches a
socket, so the codec is tested with plain byte strings. Framing, fd attribution and
:class:`Message` are :mod:`vioasid.protocol.framing`'s (shared with the daemon protocol); the
layouts come from ``vioasid.formats.virtio`` (QEMU docs/interop/vhost-user.rst).
"""

from __future__ import annotations

from vioasid.formats.virtio import (
    VHOST_USER_HDR,
    VHOST_USER_MAX_PAYLOAD,
    VHOST_USER_REPLY,
    VHOST_USER_U64,
    VHOST_USER_VERSION,
    VhostUserRequest,
)
from vioasid.protocol.framing import VHOST_USER_HEADER, FrameBuffer, FramingError, Message

__all__ = [
    "Decoder",
    "Message",
    "ProtocolError",
    "encode",
    "encode_reply",
    "encode_u64",
    "unpack_header",
]

_HDR = VHOST_USER_HDR.packer
HDR_SIZE = VHOST_USER_HDR.size
assert VHOST_USER_HEADER.size == HDR_SIZE

ProtocolError = FramingError
"""The peer sent something that is not vhost-user (bad size, bad version, fds astray)."""


def unpack_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(request, flags, payload size) of the header at the start of ``data``."""
    request, flags, size = _HDR.unpack_from(data)
    return int(request), int(flags), int(size)


def request_name(request: int) -> str:
    try:
        return VhostUserRequest(request).name
    except ValueError:
        return f"REQUEST_{request}"


def encode(request: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION) -> bytes:
    """Header + payload bytes of one message."""
    return _HDR.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A reply to ``request`` (flags exactly VERSION | REPLY = 0x5, as QEMU checks)."""
    return encode(request, payload, VHOST_USER_VERSION | VHOST_USER_REPLY)


def encode_u64(value: int) -> bytes:
    return VHOST_USER_U64.build(u64=value)


def _check(header: tuple[int, ...]) -> None:
    if (header[1] & 0x3) != VHOST_USER_VERSION:
        raise ProtocolError(f"bad vhost-user version in flags 0x{header[1]:x}")


class Decoder:
    """Accumulates received bytes and fds; yields complete messages in order (the fds of a
    chunk go to the last message whose header starts in it: see :mod:`vioasid.protocol.framing`).
    """

    def __init__(self) -> None:
        self._frames = FrameBuffer(
            VHOST_USER_HEADER, max_payload=VHOST_USER_MAX_PAYLOAD, check=_check
        )

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        self._frames.receive(data, list(fds))
        out: list[Message] = []
        while (frame := self._frames.next_frame()) is not None:
            (request, flags, _), payload, got = frame
            out.append(Message(request, flags, payload, got))
        return out

    @property
    def pending(self) -> int:
        return self._frames.buffered

    def close(self) -> None:
        self._frames.close()
