"""Sans-IO framing of the header-prefixed socket protocols, with SCM_RIGHTS fd attribution.

Every socket protocol vioasid speaks frames messages the same way: a fixed little-endian header
holding the payload's size, then the payload, with file descriptors as SCM_RIGHTS ancillary data
sent on the ``sendmsg`` that carries the message. The daemon protocol and vhost-user share one
12-byte header (QEMU ``docs/interop/vhost-user.rst``, "Message Specification":
``u32 request, u32 flags, u32 size``; :data:`VHOST_USER_HEADER`); vfio-user has a 16-byte one
whose size counts the header too (``docs/interop/vfio-user.rst``, "Header"): a
:class:`HeaderFormat` says which. :class:`FrameBuffer` turns what ``recvmsg`` returned into
whole frames; :class:`Message` is one decoded frame of the 12-byte protocols.

File descriptors: the kernel hands a message's fds over with the ``recvmsg`` call that reads
the first byte of the ``sendmsg`` that carried them, and ends that read within that send's first
buffer. So the fds received with a chunk of bytes ``[start, end)`` belong to the *last* frame
whose header starts inside that chunk (earlier fd-less frames may share the chunk). A sender
puts a message's fds on the ``sendmsg`` that carries its header (one ``sendmsg`` per message, as
QEMU does). fds that arrive with bytes in which no header starts belong to no frame: an error.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats import vfio_user as vu

FLAG_VERSION_MASK = 0x3  # VHOST_USER_VERSION_MASK
FLAG_REPLY = 1 << 2  # VHOST_USER_REPLY_MASK
FLAG_NEED_REPLY = 1 << 3  # VHOST_USER_NEED_REPLY_MASK
MAX_FDS = 16
"""Most file descriptors one message may carry (vhost-user sends at most 8 regions)."""


class FramingError(Exception):
    """Malformed framing: the connection that sent it must be closed. ``str()`` is the reason."""


@dataclass(frozen=True, slots=True)
class HeaderFormat:
    """A protocol's fixed header: its ``struct``, which unpacked field is the size, and whether
    that size counts the header itself (vfio-user) or only the payload (vhost-user)."""

    name: str
    struct: struct.Struct
    size_index: int
    size_includes_header: bool = False

    @property
    def size(self) -> int:
        return self.struct.size

    def payload_size(self, header: tuple[int, ...]) -> int:
        """The payload length a header announces (FramingError when it is impossible)."""
        n: int = header[self.size_index]
        if self.size_includes_header:
            if n < self.struct.size:
                raise FramingError(f"{self.name}: message size {n} below the header's")
            n -= self.struct.size
        return n


_U64 = struct.Struct("<Q")
VHOST_USER_HEADER = HeaderFormat("vhost-user", struct.Struct("<III"), 2)
"""``VhostUserHeader``: request, flags, size (of the payload). The daemon protocol's too."""
VFIO_USER_HEADER = HeaderFormat("vfio-user", vu.HEADER.packer, 2, size_includes_header=True)
"""vfio-user's header (id, command, size counting the header, flags, error): the vfio-user
codec frames with ``FrameBuffer(VFIO_USER_HEADER, ...)`` and the same fd rule."""


@dataclass(slots=True)
class Message:
    """One message of the 12-byte-header protocols (daemon, vhost-user): request, flags, raw
    payload, the fds that came with it (owned by whoever holds the message) and, once a codec
    parsed it, ``body``."""

    request: int
    flags: int = 1
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    body: Any = None

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def u64(self) -> int:
        """The payload as the protocols' one-u64 body (vhost-user ``VhostUserMsg.u64``)."""
        if len(self.payload) < 8:
            raise FramingError(
                f"request {self.request}: payload of {len(self.payload)} bytes, want a u64"
            )
        value: int = _U64.unpack_from(self.payload)[0]
        return value

    def take_fd(self) -> int | None:
        """Hand over the first fd (the caller now owns it)."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class LostFds(list[int]):
    """The fds that arrived when the kernel dropped others of the same chunk (the receiver is
    at its fd limit, ``EMFILE``): their message is to be refused, the connection kept.
    :meth:`FrameBuffer.receive` treats such a batch as ``lost=True``."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


Check = Callable[[tuple[int, ...]], None]


class FrameBuffer:
    """Bytes and fds in, ``(header, payload, fds)`` frames out (see the module docstring).

    ``check(header)`` validates a header as soon as it is complete (raise ``error``);
    ``max_payload`` bounds what one frame may announce, so at most one frame's bytes are ever
    buffered. Every error raised is ``error`` (a :class:`FramingError` subclass). ``lost_fds``
    batches (:meth:`receive` with ``lost=True``: the kernel dropped fds, e.g. at the receiver's
    fd limit) mark their frame instead of being checked (:attr:`lost` after :meth:`next_frame`).
    """

    def __init__(
        self,
        header: HeaderFormat = VHOST_USER_HEADER,
        *,
        max_payload: int,
        check: Check | None = None,
        error: type[FramingError] = FramingError,
        describe: Callable[[tuple[int, ...]], str] | None = None,
        skip_oversized: bool = False,
    ) -> None:
        self.header = header
        self.max_payload = max_payload
        self._check = check
        self._error = error
        self._describe = describe
        self._hsize = header.size
        self._unpack = header.struct.unpack_from
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._received = 0  # stream offset of the end of everything received
        self._fd_batches: deque[tuple[int, int, list[int], bool]] = deque()  # start, end, fds, lost
        self._pending: tuple[tuple[int, ...], int] | None = None  # header, payload size
        self.lost = False  # the last frame's fds were dropped by the kernel
        self.skipped = False  # the last frame was over max_payload: its payload was discarded
        self._skip_oversized = skip_oversized
        self._skip_left = 0  # payload bytes of a skipped frame still to discard
        self.closed = False

    @property
    def idle(self) -> bool:
        """Nothing buffered and no fds waiting: the next chunk starts a frame."""
        return not self._buf and not self._fd_batches and not self.closed and not self._skip_left

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buf)

    @property
    def ready(self) -> bool:
        """:meth:`next_frame` may have something to return (a whole frame, or a header not
        looked at yet)."""
        if self._pending is None:
            return len(self._buf) >= self._hsize
        return len(self._buf) >= self._hsize + self._pending[1]

    @property
    def wanted(self) -> int:
        """Bytes the frame being received still needs (0 when no header is complete)."""
        if self._pending is None:
            return 0
        return max(0, self._hsize + self._pending[1] - len(self._buf))

    def receive(
        self, data: bytes | bytearray | memoryview, fds: list[int] | None = None, lost: bool = False
    ) -> None:
        """Feed what one ``recvmsg`` returned; the buffer owns ``fds`` from now on."""
        if self.closed:
            close_fds(fds or [])
            raise self._error("data after the connection was closed")
        if self._skip_left:  # the rest of an oversized frame: dropped as it arrives
            n = min(len(data), self._skip_left)
            self._skip_left -= n
            self._received += n
            self._base += n
            data = data[n:]
        start = self._received
        self._buf += data
        self._received += len(data)
        lost = lost or type(fds) is LostFds
        if fds or lost:
            fds = list(fds or ())
            if len(fds) > MAX_FDS:
                self._fd_batches.append((start, self._received, fds, lost))
                raise self._error(f"{len(fds)} fds in one message (max {MAX_FDS})")
            if not data:
                self._fd_batches.append((start, start + 1, fds, lost))
                raise self._error("fds without data")
            self._fd_batches.append((start, self._received, fds, lost))

    def receive_eof(self) -> None:
        """The peer closed: an error if it left a partial frame."""
        pending = len(self._buf)
        if pending == 0:
            return
        if pending < self._hsize:
            raise self._error(f"short header: {pending} of {self._hsize} bytes at EOF")
        header = self._pending[0] if self._pending else self._unpack(self._buf)
        size = self.header.payload_size(header)
        what = f" of {self._describe(header)}" if self._describe else ""
        raise self._error(
            f"truncated payload{what}: {pending - self._hsize} of {size} bytes at EOF"
        )

    def next_frame(self) -> tuple[tuple[int, ...], bytes, list[int]] | None:
        """The next whole frame, or None until more bytes arrive."""
        buf = self._buf
        pending = self._pending
        hsize = self._hsize
        if pending is None:
            if len(buf) < hsize:
                if self._fd_batches:
                    self._check_orphan_fds(self._base)
                return None
            header = self._unpack(buf)
            if self._check is not None:
                self._check(header)
            size = self.header.payload_size(header)
            if size > self.max_payload and self._skip_oversized:
                # drop it without buffering it: the frame comes out marked ``skipped``
                drop = min(len(buf) - hsize, size)
                del buf[: hsize + drop]
                self._base += hsize + drop
                self._skip_left = size - drop
                self.skipped = True
                self.lost = False
                return header, b"", []
            if size > self.max_payload:
                raise self._error(
                    f"{self.header.name}: payload of {size} bytes above the maximum "
                    f"{self.max_payload}"
                )
            pending = self._pending = (header, size)
        header, size = pending
        total = hsize + size
        have = len(buf)
        if have < total:
            return None
        start = self._base
        if have == total:
            payload = bytes(buf[hsize:])
            buf.clear()
        else:
            payload = bytes(buf[hsize:total])
            del buf[:total]
        self._base = start + total
        self._pending = None
        self.lost = False
        self.skipped = False
        fds = self._claim_fds(start, start + total) if self._fd_batches else []
        return header, payload, fds

    def close(self) -> None:
        """Drop buffered input and close every fd not yet handed out in a frame."""
        self.closed = True
        self._buf.clear()
        while self._fd_batches:
            close_fds(self._fd_batches.popleft()[2])

    def _claim_fds(self, start: int, end: int) -> list[int]:
        """The fds of the frame occupying ``[start, end)`` of the stream."""
        self._check_orphan_fds(start)
        fds: list[int] = []
        batches = self._fd_batches
        # a batch is ours when our header starts in its chunk and no later header does
        while batches and batches[0][0] <= start < batches[0][1] and end >= batches[0][1]:
            _, _, got, lost = batches.popleft()
            fds += got
            self.lost = self.lost or lost
        return fds

    def _check_orphan_fds(self, offset: int) -> None:
        """fds whose chunk ended before ``offset`` with no frame claiming them."""
        if self._fd_batches and self._fd_batches[0][1] <= offset:
            n = len(self._fd_batches[0][2])
            raise self._error(f"fds extra: {n} fds belong to no message")
