"""Sans-IO codec of the daemon protocol: bytes and fds in, messages out; messages in, bytes out.

Like h11, the codec never touches a socket. The I/O layer feeds it whatever ``recvmsg`` returned
(:meth:`Codec.receive`), pulls complete messages (:meth:`Codec.next_message`) and tells it about
end of file (:meth:`Codec.receive_eof`). Anything malformed raises :class:`ProtocolViolation`
with a one-line reason; the connection that sent it is then closed and nothing else is touched.

One codec class serves both ends: ``Codec(Role.DAEMON)`` decodes requests from clients,
``Codec(Role.CLIENT)`` decodes the daemon's replies and pushed events.

Framing and fd attribution are :class:`vioasid.protocol.framing.FrameBuffer`'s (shared with
vhost-user): a message's fds come on the ``sendmsg`` that carries its header, and a message must
carry exactly the fds its payload announces.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import construct as cs

from vioasid.formats import wire
from vioasid.formats.wire import Request
from vioasid.protocol.framing import VHOST_USER_HEADER, FrameBuffer, FramingError, Message

__all__ = ["Codec", "DmaBatch", "Message", "ProtocolViolation", "Role"]


class Role(Enum):
    DAEMON = "daemon"  # decodes requests
    CLIENT = "client"  # decodes replies and events


class ProtocolViolation(FramingError):
    """Malformed input: the connection that sent it must be closed. ``str()`` is the reason."""


@dataclass(slots=True)
class DmaBatch:
    """A ``DMA`` request's payload kept raw: the hot path unpacks entries with
    ``wire.DMA_ENTRY_S.iter_unpack(entries)``."""

    vm: int
    count: int
    entries: bytes


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return str(request)


class Codec:
    """Framing, validation and payload parsing for one connection (see the module docstring)."""

    def __init__(
        self, role: Role, *, max_payload: int = wire.MAX_PAYLOAD, tolerant: bool = False
    ) -> None:
        """``tolerant`` (the client): a well-framed message whose payload does not parse
        comes out with ``body`` :data:`BAD_PAYLOAD` instead of ending the connection."""
        self.role = role
        self._tolerant = tolerant
        self._daemon = role is Role.DAEMON  # a plain bool for the per-message checks
        self.max_payload = max_payload
        self._frames = FrameBuffer(
            VHOST_USER_HEADER,
            max_payload=max_payload,
            check=self._check_header,
            error=ProtocolViolation,
            describe=lambda h: _name(h[0]),
            skip_oversized=tolerant,
        )

    @property
    def buffered(self) -> int:
        """Input bytes held for a message not yet complete."""
        return self._frames.buffered

    @property
    def ready(self) -> bool:
        """A message may be complete in the buffer (:meth:`next_message` to see)."""
        return self._frames.ready

    # -- input --------------------------------------------------------------------------
    def receive(
        self,
        data: bytes | bytearray | memoryview,
        fds: list[int] | None = None,
        *,
        lost: bool = False,
    ) -> None:
        """Feed what one ``recvmsg`` returned. The codec owns ``fds`` from now on. ``lost``:
        the kernel dropped fds of this chunk (the receiver is at its fd limit); the message
        they belonged to comes out with :attr:`Message.body` None and ``fds_lost``."""
        self._frames.receive(data, fds, lost)

    def receive_eof(self) -> None:
        """The peer closed. Raises :class:`ProtocolViolation` if it left a partial message."""
        self._frames.receive_eof()

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        frame = self._frames.next_frame()
        if frame is None:
            return None
        (request, flags, _), payload, fds = frame
        if self._frames.skipped:
            return Message(request, flags, b"", [], BAD_PAYLOAD)
        if self._frames.lost:
            return Message(request, flags, payload, fds, FDS_LOST)
        try:
            body = self._parse(request, flags, payload)
            want = (
                wire.request_fds(Request(request), body)
                if request in _FD_REQUESTS and self._daemon
                else 0
            )
            if len(fds) != want:
                what = "missing" if len(fds) < want else "extra"
                raise ProtocolViolation(
                    f"fds {what}: {_name(request)} carries {len(fds)} fds, needs {want}"
                )
        except ProtocolViolation:
            Message(request, flags, b"", fds).close_fds()
            if self._tolerant:
                return Message(request, flags, b"", [], BAD_PAYLOAD)
            raise
        return Message(request, flags, b"", fds, body)

    # -- the hot path: one whole DMA message in one read ----------------------------------
    # A round trip of one small DMA request is one recvmsg on each side; these skip buffering,
    # Message objects and the generic parse for exactly that case. They only look at ``data``:
    # None means "not that case", and the caller feeds ``data`` to :meth:`receive` as usual
    # (which then validates it in full). Stream offsets are not advanced: they only order fd
    # batches, and with nothing buffered and no fds pending there is nothing to order.

    def take_dma(self, data: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
        """Daemon role: ``(flags, vm, count)`` when nothing is buffered and ``data`` is exactly
        one valid ``DMA`` request (its entries are ``data[wire.DMA_FRAME_S.size:]``)."""
        if len(data) < _DMA_FRAME_SIZE or not self._frames.idle:
            return None
        request, flags, size, vm, count = _DMA_FRAME_UNPACK(data)
        if (
            request == _DMA
            and size == len(data) - _HEADER_SIZE
            and size == _DMA_HEAD_SIZE + count * _DMA_ENTRY_SIZE
            and count <= _MAX_DMA_BATCH
            and size <= self.max_payload
            and flags in _PLAIN_FLAGS
            and self._daemon
        ):
            return flags, vm, count
        return None

    def take_dma_reply(self, data: bytes | bytearray | memoryview) -> DmaResults | None:
        """Client role: the results when nothing is buffered and ``data`` is exactly one
        successful ``DMA`` reply (copied out of ``data``)."""
        if len(data) < _DMA_REPLY_FRAME_SIZE or not self._frames.idle:
            return None
        request, flags, size, status, count = _DMA_REPLY_FRAME_UNPACK(data)
        if (
            request == _DMA
            and flags == _REPLY
            and status == 0
            and size == len(data) - _HEADER_SIZE
            and size == _DMA_REPLY_HEAD_SIZE + count * _DMA_RESULT_SIZE
            and size <= self.max_payload
            and not self._daemon
        ):
            return _new_tuple(DmaResults, (count, bytes(data[_DMA_REPLY_FRAME_SIZE:])))
        return None

    def close(self) -> None:
        """Drop buffered input and close every fd not yet handed out in a message."""
        self._frames.close()

    # -- validation ---------------------------------------------------------------------
    def _check_header(self, header: tuple[int, ...]) -> None:
        request, flags, size = header
        common = flags in _PLAIN_FLAGS if self._daemon else flags == _REPLY
        if common and size <= self.max_payload and request in _REQUESTS:
            return  # the usual case, checked in one go
        version = flags & wire.FLAG_VERSION_MASK
        if version != wire.VERSION:
            raise ProtocolViolation(f"wrong version {version} (flags 0x{flags:x}), expected 1")
        if flags & wire.FLAG_RESERVED:
            raise ProtocolViolation(f"reserved flag bits set (flags 0x{flags:x})")
        if size > self.max_payload and not self._tolerant:
            raise ProtocolViolation(
                f"size {size} of {_name(request)} above the maximum {self.max_payload}"
            )
        is_reply = bool(flags & wire.FLAG_REPLY)
        if self.role is Role.DAEMON:
            if is_reply:
                raise ProtocolViolation(f"reply flag on a request ({_name(request)})")
            if request not in _REQUESTS:
                raise ProtocolViolation(f"unknown request {request}")
        else:
            known = wire.REPLY_LAYOUTS if is_reply else wire.EVENT_LAYOUTS
            if request not in known and not (is_reply and (request in _REQUESTS or not request)):
                raise ProtocolViolation(
                    f"unknown {'reply' if is_reply else 'event'} {_name(request)}"
                )
            if flags & wire.FLAG_NEED_REPLY:
                raise ProtocolViolation("need_reply on a daemon message")

    def _parse(self, request: int, flags: int, payload: bytes) -> Any:
        if self._daemon:
            if request == _DMA:
                return _parse_dma(payload)
            layout = wire.REQUEST_LAYOUTS[Request(request)]
        elif flags & wire.FLAG_REPLY:
            if request == _DMA and payload[:8] == _OK:
                return _parse_dma_reply(payload)
            layout = wire.REPLY_LAYOUTS.get(request, wire.STATUS_REPLY)  # type: ignore[call-overload]
        else:
            layout = wire.EVENT_LAYOUTS[Request(request)]
        try:
            return layout.parse(payload)
        except (cs.ConstructError, UnicodeDecodeError, ValueError, OverflowError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProtocolViolation(
                f"unparsable {_name(request)} payload ({len(payload)} bytes): {first}"
            ) from None


_DMA = int(Request.DMA)
BAD_PAYLOAD = "bad-payload"
"""``Message.body`` of a message a tolerant codec could frame but not parse."""
FDS_LOST = "fds-lost"
"""``Message.body`` of a message whose fds the kernel dropped (see :meth:`Codec.receive`)."""
_REQUESTS = frozenset(int(r) for r in wire.REQUEST_LAYOUTS)
_FD_REQUESTS = frozenset({int(Request.REGISTER_VM), int(Request.IMPORT_VM)})
_PLAIN_FLAGS = frozenset({wire.VERSION, wire.VERSION | wire.FLAG_NEED_REPLY})
_REPLY = wire.VERSION | wire.FLAG_REPLY
_HEADER_SIZE = wire.HEADER_SIZE
_DMA_FRAME_UNPACK = wire.DMA_FRAME_S.unpack_from
_DMA_FRAME_SIZE = wire.DMA_FRAME_S.size
_DMA_HEAD_SIZE = wire.DMA_HEAD_S.size
_DMA_ENTRY_SIZE = wire.DMA_ENTRY_S.size
_MAX_DMA_BATCH = wire.MAX_DMA_BATCH
_DMA_REPLY_FRAME_UNPACK = wire.DMA_REPLY_FRAME_S.unpack_from
_DMA_REPLY_FRAME_SIZE = wire.DMA_REPLY_FRAME_S.size
_DMA_REPLY_HEAD_SIZE = wire.DMA_REPLY_HEAD_S.size
_DMA_RESULT_SIZE = wire.DMA_RESULT_S.size


def _parse_dma(payload: bytes) -> DmaBatch:
    if len(payload) < wire.DMA_HEAD_S.size:
        raise ProtocolViolation(f"unparsable DMA payload ({len(payload)} bytes): no head")
    vm, count = wire.DMA_HEAD_S.unpack_from(payload)
    if count > wire.MAX_DMA_BATCH:
        raise ProtocolViolation(f"unparsable DMA payload: {count} entries (max 4096)")
    want = wire.DMA_HEAD_S.size + count * wire.DMA_ENTRY_S.size
    if len(payload) != want:
        raise ProtocolViolation(
            f"unparsable DMA payload: {len(payload)} bytes for {count} entries (want {want})"
        )
    return DmaBatch(vm, count, payload[wire.DMA_HEAD_S.size :])


def _parse_dma_reply(payload: bytes) -> OkReply:
    """A successful ``DMA`` reply, results kept raw (``wire.DMA_RESULT_S.iter_unpack``)."""
    head = wire.DMA_REPLY_HEAD_S.size
    if len(payload) < head:
        raise ProtocolViolation(f"unparsable DMA reply ({len(payload)} bytes)")
    _, count = wire.DMA_REPLY_HEAD_S.unpack_from(payload)
    if len(payload) != head + count * wire.DMA_RESULT_S.size:
        raise ProtocolViolation(f"unparsable DMA reply: {len(payload)} bytes for {count} results")
    return OkReply(DmaResults(count, payload[head:]))


@dataclass(slots=True)
class OkReply:
    """A success reply decoded by the hot path (same ``status``/``body`` as the construct
    container the other replies parse to)."""

    body: Any
    status: int = 0


class DmaResults(NamedTuple):
    """A ``DMA`` reply's results kept raw. (A tuple: the hot path builds it with
    ``tuple.__new__``, no Python-level ``__init__``.)"""

    count: int  # type: ignore[assignment]  # shadows tuple.count(), which nobody calls here
    results: bytes


_new_tuple = tuple.__new__


# -- output -------------------------------------------------------------------------------------


def frame(request: int, flags: int, payload: bytes | bytearray = b"") -> bytes:
    """Header + payload."""
    return wire.HEADER_S.pack(request, flags, len(payload)) + payload


def encode_request(request: Request, body: Any = None, *, need_reply: bool = False) -> bytes:
    """A client request; ``body`` is the construct dict of its layout (DMA: the raw payload
    bytes are accepted too)."""
    flags = wire.VERSION | (wire.FLAG_NEED_REPLY if need_reply else 0)
    if isinstance(body, bytes | bytearray):
        return frame(request, flags, body)
    layout = wire.REQUEST_LAYOUTS[request]
    return frame(request, flags, layout.build(body if body is not None else {}))


REPLY_FLAGS = wire.VERSION | wire.FLAG_REPLY
_OK = (0).to_bytes(8, "little")


def encode_ok(request: int, result: Any = None) -> bytes:
    """A success reply (status 0 + the request's result built with its reply layout)."""
    if request == Request.GET_FEATURES:
        return frame(request, REPLY_FLAGS, wire.FEATURES.build({"features": result}))
    layout = wire.REPLY_LAYOUTS.get(Request(request), wire.STATUS_REPLY)
    return frame(request, REPLY_FLAGS, layout.build({"status": 0, "body": result or {}}))


def encode_error(request: int, code: wire.ErrorCode, message: str) -> bytes:
    """A failure reply: status ``code`` and a UTF-8 message (valid for every reply layout)."""
    return frame(request, REPLY_FLAGS, int(code).to_bytes(8, "little") + message.encode())


def encode_event(event: Request, body: Any) -> bytes:
    """A pushed event (no reply bit)."""
    return frame(event, wire.VERSION, wire.EVENT_LAYOUTS[event].build(body))
