"""Sans-IO vfio-user codec: bytes + fds in, commands out; replies in, bytes out.

Like h11, the codec never touches a socket. The server feeds it what ``recvmsg`` returned
(:meth:`Codec.receive`, with the fds of that read) and pulls complete commands
(:meth:`Codec.next_message`); the framing is the shared
:class:`vioasid.protocol.framing.FrameBuffer` with the vfio-user header. Framing errors (a
header that is not a command, a size below the header or above :data:`MAX_MESSAGE`, fds with
no message) raise :class:`ProtocolViolation`:
the stream cannot be trusted any more and only that connection is closed. A well-framed
command with a bad payload (too short, unknown command) is returned as a :class:`Message`;
:func:`parse_payload` then raises :class:`BadCommand` with an errno, which the server answers
with an error reply (``VFIO_USER_ERROR`` + errno) and the connection goes on.

File descriptors: the kernel hands SCM_RIGHTS fds over with the ``recvmsg`` that reads the
first byte of the ``sendmsg`` that carried them and stops reading after that send's data (QEMU
sends one message per ``sendmsg``), so fds received with a chunk belong to the *last* message
whose header starts inside that chunk; a chunk with fds in which no header starts is an error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats import vfio_user as vu
from vioasid.formats.vfio_user import Command
from vioasid.protocol.framing import VFIO_USER_HEADER, FrameBuffer, FramingError

MAX_MESSAGE = vu.HEADER_SIZE + vu.REGION_RW.size + vu.DEF_MAX_XFER  # largest accepted command
MAX_VERSION_JSON = 4096

_HDR = vu.HEADER.packer


class ProtocolViolation(FramingError):
    """The byte stream cannot be framed any more: close this connection. ``str()`` says why."""


class BadCommand(Exception):
    """A framed command that cannot be executed: answer with an error reply carrying ``errno``."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(slots=True)
class Message:
    """One framed command from the client (QEMU)."""

    id: int
    cmd: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & vu.FLAG_NO_REPLY)

    def close_fds(self) -> None:
        """Close every fd the message still owns (a handler takes the ones it keeps)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Codec:
    """One connection's decoder on the shared :class:`~vioasid.protocol.framing.FrameBuffer`
    (one framing and fd-attribution rule for every socket protocol). One per connection."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._frames = FrameBuffer(
            VFIO_USER_HEADER,
            max_payload=max_message - vu.HEADER_SIZE,
            check=self._check,
            error=ProtocolViolation,
            describe=lambda h: f"message {h[0]} (command {h[1]})",
        )

    @staticmethod
    def _check(header: tuple[int, ...]) -> None:
        mid, cmd, _size, flags, _err = header
        if flags & vu.FLAGS_TYPE_MASK != vu.TYPE_COMMAND:
            raise ProtocolViolation(
                f"message {mid} (command {cmd}) is not a command (flags {flags:#x})"
            )
        if flags & ~vu.FLAGS_KNOWN:
            raise ProtocolViolation(f"message {mid}: unknown flags {flags:#x}")

    @property
    def closed(self) -> bool:
        return self._frames.closed

    def receive(self, data: bytes | bytearray | memoryview, fds: list[int] | None = None) -> None:
        """Feed what one ``recvmsg`` returned. Raises :class:`ProtocolViolation` (and then
        holds nothing: every fd it had is closed)."""
        try:
            self._frames.receive(data, fds)
        except FramingError as e:
            self.close()
            raise ProtocolViolation(str(e)) from None

    def next_message(self) -> Message | None:
        """The next complete command, or None. Raises :class:`ProtocolViolation`."""
        try:
            got = self._frames.next_frame()
        except FramingError as e:
            self.close()
            raise ProtocolViolation(str(e)) from None
        if got is None:
            return None
        (mid, cmd, _size, flags, _err), payload, fds = got
        return Message(mid, cmd, flags, payload, fds)

    def close(self) -> None:
        """Drop everything buffered, closing fds no message claimed."""
        self._frames.close()


# -- payloads ----------------------------------------------------------------------------------


def _fixed(msg: Message, rec: Any, *, exact: bool = False) -> dict[str, int]:
    if len(msg.payload) < rec.size or (exact and len(msg.payload) != rec.size):
        raise BadCommand(
            errno.EINVAL,
            f"{Command(msg.cmd).name}: payload of {len(msg.payload)} bytes, needs {rec.size}",
        )
    return dict(zip(rec.names, rec.packer.unpack_from(msg.payload, 0), strict=True))


def parse_version(msg: Message) -> tuple[int, int, dict[str, Any]]:
    """(major, minor, capabilities) of a VERSION command."""
    v = _fixed(msg, vu.VERSION)
    raw = msg.payload[vu.VERSION.size :]
    if len(raw) > MAX_VERSION_JSON:
        raise BadCommand(errno.E2BIG, "VERSION: capabilities JSON too long")
    raw = raw.split(b"\0", 1)[0]
    caps: dict[str, Any] = {}
    if raw.strip():
        try:
            doc = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise BadCommand(errno.EINVAL, f"VERSION: capabilities are not JSON ({e})") from e
        if not isinstance(doc, dict):
            raise BadCommand(errno.EINVAL, "VERSION: capabilities JSON is not an object")
        inner = doc.get(vu.CAP_KEY, {})
        if not isinstance(inner, dict):
            raise BadCommand(errno.EINVAL, "VERSION: 'capabilities' is not an object")
        caps = inner
    return v["major"], v["minor"], caps


def parse_payload(msg: Message) -> dict[str, Any]:
    """The fixed part of a command's payload as named fields (+ ``data`` where it has some).

    Raises :class:`BadCommand` (EINVAL for a short or inconsistent payload, ENOSYS for a
    command this server does not implement)."""
    try:
        cmd = Command(msg.cmd)
    except ValueError:
        raise BadCommand(errno.ENOSYS, f"unknown command {msg.cmd}") from None
    if cmd is Command.VERSION:
        major, minor, caps = parse_version(msg)
        return {"major": major, "minor": minor, "caps": caps}
    if cmd is Command.DEVICE_RESET:
        return {}
    rec = {
        Command.DMA_MAP: vu.DMA_MAP,
        Command.DMA_UNMAP: vu.DMA_UNMAP,
        Command.DEVICE_GET_INFO: vu.DEVICE_INFO,
        Command.DEVICE_GET_REGION_INFO: vu.REGION_INFO,
        Command.DEVICE_GET_IRQ_INFO: vu.IRQ_INFO,
        Command.DEVICE_SET_IRQS: vu.IRQ_SET,
        Command.REGION_READ: vu.REGION_RW,
        Command.REGION_WRITE: vu.REGION_RW,
    }.get(cmd)
    if rec is None:
        raise BadCommand(errno.ENOSYS, f"command {cmd.name} is not supported by this server")
    out: dict[str, Any] = _fixed(msg, rec)
    if cmd is Command.REGION_WRITE:
        data = msg.payload[rec.size :]
        if len(data) != out["count"]:
            raise BadCommand(
                errno.EINVAL, f"REGION_WRITE: count {out['count']} but {len(data)} data bytes"
            )
        out["data"] = data
    elif cmd is Command.REGION_READ and out["count"] > vu.DEF_MAX_XFER:
        raise BadCommand(errno.E2BIG, f"REGION_READ of {out['count']} bytes")
    return out


# -- replies -------------------------------------------------------------------------------------


def encode_reply(msg_id: int, cmd: int, payload: bytes = b"") -> bytes:
    """A reply header (type 1) + payload."""
    return _HDR.pack(msg_id, cmd, vu.HEADER_SIZE + len(payload), vu.TYPE_REPLY, 0) + payload


def encode_error(msg_id: int, cmd: int, err: int) -> bytes:
    """An error reply: type 1, VFIO_USER_ERROR, the errno, no payload."""
    return _HDR.pack(msg_id, cmd, vu.HEADER_SIZE, vu.TYPE_REPLY | vu.FLAG_ERROR, err)


def encode_command(msg_id: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A command (client side: tests, or server-initiated DMA_READ/WRITE)."""
    return _HDR.pack(msg_id, cmd, vu.HEADER_SIZE + len(payload), vu.TYPE_COMMAND | flags, 0) + (
        payload
    )


def version_payload(caps: dict[str, Any], major: int = 0, minor: int = 0) -> bytes:
    """VERSION payload: major, minor, NUL-terminated JSON {"capabilities": caps}."""
    doc = json.dumps({vu.CAP_KEY: caps}, separators=(",", ":")).encode() + b"\0"
    return vu.VERSION.packer.pack(major, minor) + doc


def decode_reply(data: bytes) -> tuple[dict[str, int], bytes]:
    """(header fields, payload) of one whole reply (tests and clients)."""
    if len(data) < vu.HEADER_SIZE:
        raise ProtocolViolation("short reply")
    hdr = dict(zip(vu.HEADER.names, _HDR.unpack_from(data, 0), strict=True))
    return hdr, bytes(data[vu.HEADER_SIZE : hdr["size"]])
