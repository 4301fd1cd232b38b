"""The asyncio edge of a vfio-user function: one unix socket per function, one client at a time.

:class:`FunctionServer` listens on a unix socket (QEMU ``-device vfio-user-pci,socket=...``
connects to it), reads with ``recvmsg`` (bytes + SCM_RIGHTS fds), feeds the sans-IO
:class:`~vioasid.vfio_user.codec.Codec`, and hands each command to its
:class:`~vioasid.vfio_user.function.PciFunction` *strictly in order*: the next command is not
looked at before the previous one's reply is sent (so a register read after a write sees the
write's effect, and a doorbell's job is done before QEMU hears back).

Failure containment: a framing violation, a socket error or a client that disappears mid-request
ends that connection only (the function's :meth:`connection_lost` runs); a device-model
exception becomes an error reply in :meth:`PciFunction.handle`; the loop yields between
commands, so a doorbell flood on one function slows that function, not the loop or other VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import sys
import termios
from pathlib import Path

from vioasid.protocol.framing import LostFds, close_fds
from vioasid.protocol.transport import TooManyFds, recv_with_fds

from .codec import Codec, ProtocolViolation
from .function import PciFunction

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 16
PENDING_TIMEOUT_S = 5.0  # a model's before_write (e.g. a QMP read) may take at most this


def _recv(sock: socket.socket, buf: bytearray) -> tuple[memoryview | bytes, list[int]]:
    """One ``recvmsg`` into ``buf`` (:func:`~vioasid.protocol.transport.recv_with_fds`): a view
    to consume before the next call, and the fds. Fds the kernel truncated, for whatever reason,
    end the connection (:class:`ProtocolViolation`, the fds that came closed)."""
    try:
        data, fds = recv_with_fds(sock, buf)
        if not isinstance(fds, LostFds):
            return data, fds
        close_fds(fds)
    except TooManyFds:  # recv_with_fds closed them
        pass
    raise ProtocolViolation("too many file descriptors in one message (truncated)")


class FunctionServer:
    """Serves one :class:`PciFunction` on a unix socket at ``path``."""

    def __init__(self, function: PciFunction, path: str | os.PathLike[str]) -> None:
        self.function = function
        self.path = Path(path)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conn_task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self.messages = 0
        self.posted = 0  # messages that asked for no reply (QEMU's posted BAR writes)
        self.violations: list[str] = []
        self._waiting: socket.socket | None = None  # the connection, while nothing is queued

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind(str(self.path))
        s.listen(2)
        self._listener = s
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            if self._conn_task is not None and not self._conn_task.done():
                log.warning("%s: a second client while one is connected: refused", self.path)
                conn.close()
                continue
            conn.setblocking(False)
            self.connections += 1
            self._conn_task = loop.create_task(self._serve(conn))

    async def _wait_readable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fn = self.function
        codec = Codec()
        buf = bytearray(RECV_SIZE)
        self.connected.set()
        try:
            while True:
                msg = codec.next_message()
                if msg is None:
                    try:
                        data, fds = _recv(sock, buf)
                    except BlockingIOError:
                        self._waiting = sock
                        try:
                            await self._wait_readable(sock)
                        finally:
                            self._waiting = None
                        continue
                    if not data:
                        close_fds(fds)
                        log.info("%s: client closed the connection", self.path)
                        return
                    codec.receive(data, fds)
                    continue
                self.messages += 1
                if msg.no_reply:
                    self.posted += 1
                aw = fn.pending(msg)
                if aw is not None:
                    try:
                        await asyncio.wait_for(aw, PENDING_TIMEOUT_S)
                    except Exception as e:  # the model sees what it could not learn
                        log.warning("%s: before_write failed: %r", self.path, e)
                reply = fn.handle(msg)
                if reply is not None:
                    await loop.sock_sendall(sock, reply)
                await asyncio.sleep(0)  # one function's flood never starves the loop
        except ProtocolViolation as e:
            self.violations.append(str(e))
            log.warning("%s: protocol violation, connection closed: %s", self.path, e)
        except OSError as e:
            log.warning("%s: connection lost: %s", self.path, e)
        finally:
            codec.close()
            try:
                fn.connection_lost()
            except Exception:
                log.exception("%s: connection_lost failed", self.path)
            sock.close()
            self.connected.clear()

    def drained(self) -> bool:
        """Every message the client has sent so far is handled, its posted writes included
        (a live migration takes the device state only then): no connection, or waiting on
        an empty socket with nothing buffered."""
        if not self.connected.is_set():
            return True
        sock = self._waiting
        if sock is None:
            return False
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(queued, sys.byteorder) == 0

    async def close(self) -> None:
        for t in (self._accept_task, self._conn_task):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
