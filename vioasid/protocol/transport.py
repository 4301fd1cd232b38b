"""A non-blocking unix stream socket on the asyncio loop, with SCM_RIGHTS fd passing.

asyncio's stream and protocol APIs drop ancillary data, so this layer drives a raw socket with
``loop.add_reader``/``add_writer``. Each readable callback does one ``recvmsg_into`` a buffer
shared by the thread's transports (bytes + fds) and hands the result to ``on_data``, which must
consume it before it returns. ``send`` writes right away when the socket takes it and queues
the rest (fds go with the first byte of their message, so a message with fds is never merged
with queued bytes); :attr:`Transport.pending` is a running count, O(1) per message. Used by the
daemon, :mod:`vioasid.client` and the vhost-user back-end (:func:`recv_with_fds`,
:func:`send_with_fds`).

When the kernel could not hand over every fd that came (``MSG_CTRUNC`` with fewer fds than
the ancillary buffer holds: this process is at its fd limit), the fds that did arrive are passed
as a :class:`LostFds` list, so the message they came with can be refused instead of the
connection being dropped for a framing error.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

from .framing import MAX_FDS, LostFds

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 18
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: enum flag arithmetic is slow per message


_local = threading.local()


def _recv_buffer() -> bytearray:
    """One receive buffer per thread, shared by its transports: ``on_data`` consumes what it
    is given before returning, so no two reads ever need it at once."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(RECV_SIZE)
    return buf


class TooManyFds(Exception):
    """The peer sent more fds than one message may carry (the kernel truncated them)."""


def recv_with_fds(
    sock: socket.socket, buf: bytearray | memoryview | None = None
) -> tuple[bytes | memoryview, list[int]]:
    """One ``recvmsg``: the bytes and every fd that came with them (raises ``TooManyFds``
    after closing them when the ancillary buffer overflowed). With ``buf`` the bytes are read
    into it (no per-call allocation) and a view of it is returned: consume it before the next
    call."""
    if buf is None:
        data, anc, flags, _ = sock.recvmsg(RECV_SIZE, _ANC_SIZE)
        view: bytes | memoryview = data
    else:
        n, anc, flags, _ = sock.recvmsg_into([buf], _ANC_SIZE)
        view = memoryview(buf)[:n]
    if not anc and not flags & _MSG_CTRUNC:
        return view, []
    return view, _fds_of(anc, flags)


def _fds_of(anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """The fds in ``recvmsg``'s ancillary data. When the kernel truncated it: ``TooManyFds``
    (after closing them) if the buffer was full (the peer sent too many), else a
    :class:`LostFds` (this process could take no more)."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & _MSG_CTRUNC:
        if len(fds) < MAX_FDS:
            return LostFds(fds)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise TooManyFds(f"more than {MAX_FDS} fds in one message")
    return fds


def send_with_fds(
    sock: socket.socket, data: bytes | bytearray | memoryview, fds: Sequence[int]
) -> int:
    """One ``send``/``sendmsg``: ``fds`` (if any) ride with the first byte. Returns how many bytes
    the socket took (raises what ``sendmsg`` raises, ``BlockingIOError`` included)."""
    if fds:
        return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return sock.send(data)


class Transport:
    """One connected socket. ``on_data(bytes, fds)`` gets what arrives; ``on_close(reason)``
    is called once, when the peer closes (reason None) or an I/O error happens."""

    def __init__(
        self,
        sock: socket.socket,
        on_data: Callable[[bytes | memoryview, list[int]], None],
        on_close: Callable[[str | None], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self.on_data = on_data
        self.on_close = on_close
        self._fd = sock.fileno()
        self._queue: deque[tuple[memoryview, Sequence[int]]] = deque()
        self._queued = 0  # bytes in _queue
        self._writing = False
        self._drained: asyncio.Event | None = None
        self.closed = False
        self.paused = True  # until start()
        sock.setblocking(False)
        buf = _recv_buffer()  # this thread's, shared with its other transports
        self._bufs = [buf]
        self._view = memoryview(buf)
        self._recvmsg_into = sock.recvmsg_into

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._readable)
        self.paused = False

    def pause_reading(self) -> None:
        """Stop reading (the peer's sends then block once the socket buffer fills)."""
        if not self.closed and not self.paused:
            self.loop.remove_reader(self._fd)
            self.paused = True

    def resume_reading(self) -> None:
        if not self.closed and self.paused:
            self.loop.add_reader(self._fd, self._readable)
            self.paused = False

    # -- reading ------------------------------------------------------------------------
    def _readable(self) -> None:
        # recv_with_fds inlined: this runs once per message on the round-trip path
        try:
            n, anc, flags, _ = self._recvmsg_into(self._bufs, _ANC_SIZE)
            fds = _fds_of(anc, flags) if anc or flags & _MSG_CTRUNC else []
        except (BlockingIOError, InterruptedError):
            return
        except TooManyFds as exc:
            self._fail(str(exc))
            return
        except OSError as exc:
            self._fail(f"recvmsg: {exc}")
            return
        if not n and not fds:
            self.close(None)
            return
        self.on_data(self._view[:n], fds)

    # -- writing ------------------------------------------------------------------------
    def send(self, data: bytes | bytearray, fds: Sequence[int] = ()) -> bool:
        """Send ``data`` (one or more whole messages), ``fds`` with its first byte. False when
        bytes are left queued (:attr:`backlogged`)."""
        if self.closed:
            return True  # dropped, as everything queued was
        if self._queue:
            self._queue.append((memoryview(data), fds))
            self._queued += len(data)
            return False
        try:
            sent = self.sock.send(data) if not fds else send_with_fds(self.sock, data, fds)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(f"send: {exc}")
            return True
        if sent < len(data):
            self._queue.append((memoryview(data)[sent:], () if sent else fds))
            self._queued += len(data) - sent
            self._start_writing()
            return False
        return True

    @property
    def backlogged(self) -> bool:
        """Bytes are queued (the socket did not take everything)."""
        return bool(self._queue)

    @property
    def pending(self) -> int:
        """Bytes queued but not yet taken by the socket (a running count)."""
        return self._queued

    async def drain(self) -> None:
        """Wait until every queued byte is written (or the transport closes)."""
        while self._queue and not self.closed:
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        while self._queue:
            view, fds = self._queue[0]
            try:
                sent = send_with_fds(self.sock, view, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(f"send: {exc}")
                return
            self._queued -= sent
            if sent < len(view):
                self._queue[0] = (view[sent:], ())
                return
            self._queue.popleft()
        self.loop.remove_writer(self._fd)
        self._writing = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    # -- closing ------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self.close(reason)

    def close(self, reason: str | None = None) -> None:
        """Close the socket now (queued bytes are dropped); calls ``on_close`` once."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        if self._writing:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self._fd)
            self._writing = False
        self._queue.clear()
        self._queued = 0
        self._wake_drain()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.on_close(reason)
