"""Sans-IO vhost-user framing: bytes and file descriptors in, :class:`Message` objects out.

The asyncio edge (``backend.py``) feeds whatever ``recvmsg`` returned (data plus SCM_RIGHTS
fds) into :class:`Decoder` and sends the bytes :func:`encode` builds. Nothing here touches a
socket, so the codec is tested with plain byte strings. Layouts come from
``vioasid.formats.virtio`` (QEMU docs/interop/vhost-user.rst).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from vioasid.formats.virtio import (
    VHOST_USER_HDR,
    VHOST_USER_MAX_PAYLOAD,
    VHOST_USER_NEED_REPLY,
    VHOST_USER_REPLY,
    VHOST_USER_U64,
    VHOST_USER_VERSION,
    VhostUserRequest,
)

_HDR = VHOST_USER_HDR.packer
HDR_SIZE = VHOST_USER_HDR.size


def unpack_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, payload size) of the header at the start of ``data``."""
    request, flags, size = _HDR.unpack_from(data)
    return int(request), int(flags), int(size)


class ProtocolError(Exception):
    """The peer sent something that is not vhost-user (bad size, bad version)."""


@dataclass
class Message:
    """One vhost-user message: request code, flags, payload and the fds that came with it."""

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY)

    @property
    def name(self) -> str:
        try:
            return VhostUserRequest(self.request).name
        except ValueError:
            return f"REQUEST_{self.request}"

    def u64(self) -> int:
        if len(self.payload) < 8:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, want a u64")
        value: int = VHOST_USER_U64.packer.unpack_from(self.payload)[0]
        return value

    def take_fd(self) -> int | None:
        """Hand over the first fd (the caller now owns it)."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def encode(request: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION) -> bytes:
    """Header + payload bytes of one message."""
    return _HDR.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A reply to ``request`` (flags exactly VERSION | REPLY = 0x5, as QEMU checks)."""
    return encode(request, payload, VHOST_USER_VERSION | VHOST_USER_REPLY)


def encode_u64(value: int) -> bytes:
    return VHOST_USER_U64.build(u64=value)


class Decoder:
    """Accumulates received bytes and fds; yields complete messages in order.

    Each batch of fds belongs to the message holding the last byte of the chunk it came with:
    the kernel ends a stream ``recvmsg`` right after the data sent together with fds, so earlier
    fd-less messages may share the chunk but the fd-carrying one ends it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # stream offset of self._buf[0]
        self._fds: list[tuple[int, int]] = []  # (stream offset of the chunk's last byte, fd)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        self._buf += data
        if fds:
            last = self._pos + len(self._buf) - 1
            self._fds.extend((last, fd) for fd in fds)
        out: list[Message] = []
        while len(self._buf) >= HDR_SIZE:
            request, flags, size = _HDR.unpack_from(self._buf)
            if (flags & 0x3) != VHOST_USER_VERSION:
                raise ProtocolError(f"bad vhost-user version in flags 0x{flags:x}")
            if size > VHOST_USER_MAX_PAYLOAD:
                raise ProtocolError(f"payload of {size} bytes is too large")
            total = HDR_SIZE + size
            if len(self._buf) < total:
                break
            payload = bytes(self._buf[HDR_SIZE:total])
            del self._buf[:total]
            end = self._pos + total
            self._pos = end
            mine = [fd for pos, fd in self._fds if pos < end]
            self._fds = [(pos, fd) for pos, fd in self._fds if pos >= end]
            out.append(Message(request, flags, payload, mine))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        for _pos, fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
