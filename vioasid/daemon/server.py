"""The asyncio unix-socket server: accept clients, feed their bytes to the codec, their requests
to the service, and the service's output back to the sockets.

A request's path, top to bottom: :meth:`Connection.on_data` (socket bytes + fds) →
:meth:`Codec.next_message` (framing, validation, payload parse) → :meth:`Service.handle` (engine
call, reply and events into session outboxes) → :meth:`Server.flush` (outboxes → sockets).
The round trip of a device's DMA request takes a shorter path: when one read holds exactly one
well-formed ``DMA`` message and nothing else is buffered, :meth:`Codec.take_dma` frames it,
:meth:`Service.handle_dma` translates it and the reply frame goes straight to the socket
(through the outboxes only when events or an error reply are pending). Anything else takes the
general path, which validates everything.
Malformed input ends only the connection that sent it (logged with its reason); its session's
VMs are released, every other connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct

from vioasid.formats import wire
from vioasid.protocol.transport import Transport

from .codec import Codec, ProtocolViolation, Role
from .service import Service
from .session import Session

log = logging.getLogger(__name__)

MAX_QUEUED = 64 << 20
"""A client that lets this much output pile up unread is disconnected."""

_UCRED = struct.Struct("3i")
_DMA_ENTRIES = wire.DMA_FRAME_S.size  # a DMA request's entries start here


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _peer(sock: socket.socket) -> str:
    try:
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return ""
    return f"pid {pid} uid {uid}"


class Connection:
    """One accepted client: transport + codec + session."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.service = server.service
        self.codec = Codec(Role.DAEMON)
        self.session: Session = server.service.open_session(_peer(sock))
        self.transport = Transport(sock, self.on_data, self.on_close, server.loop)

    def on_data(self, data: bytes | memoryview, fds: list[int]) -> None:
        service = self.service
        if not fds:
            dma = self.codec.take_dma(data)
            if dma is not None and not self.session.closed:
                # the hot path: exactly one DMA request arrived; reply straight to the socket
                # unless other output is pending (events it raised, an error reply)
                flags, vm, count = dma
                reply = service.handle_dma(self.session, flags, vm, count, data[_DMA_ENTRIES:])
                if service.dirty:
                    if reply is not None:
                        service.queue(self.session, reply)
                    self.server.flush()
                elif reply is not None:
                    transport = self.transport
                    if not transport.send(reply) and transport.pending > MAX_QUEUED:
                        self.close(f"client does not read its replies ({transport.pending} bytes)")
                return
        try:
            self.codec.receive(data, fds)
            while not self.session.closed:
                msg = self.codec.next_message()
                if msg is None:
                    break
                service.handle(self.session, msg)
        except ProtocolViolation as exc:
            self.server.flush()
            self.close(f"malformed input: {exc}")
            return
        self.server.flush()

    def close(self, reason: str | None) -> None:
        self.transport.close(reason)

    def on_close(self, reason: str | None) -> None:
        if reason is None:
            try:
                self.codec.receive_eof()
            except ProtocolViolation as exc:
                reason = f"malformed input: {exc}"
        if reason:
            log.warning("%s: connection closed: %s", self.session, reason)
        else:
            log.info("%s: connection closed", self.session)
        self.codec.close()
        self.server.connections.pop(self.session.id, None)
        self.server.service.end_session(self.session)
        self.server.flush()


class Server:
    """Serves one :class:`Service` on a unix socket path."""

    def __init__(self, service: Service, path: str | os.PathLike[str]) -> None:
        self.service = service
        self.path = os.fspath(path)
        self.connections: dict[int, Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._done: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not started")
        return self._loop

    async def start(self) -> None:
        """Bind and listen. A stale socket file at the path (nobody listening) is replaced; a
        live one (another daemon) or any other file is an error."""
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                if _is_live(self.path):
                    raise OSError(errno.EADDRINUSE, "another daemon is serving this socket")
                os.unlink(self.path)  # stale: nobody listens
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        log.info("listening on %s", self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept: %s", exc)
                return
            conn = Connection(self, sock)
            self.connections[conn.session.id] = conn
            log.info("%s: connected", conn.session)
            conn.transport.start()

    def flush(self) -> None:
        """Write every session's pending output to its socket."""
        for session in self.service.take_dirty():
            conn = self.connections.get(session.id)
            if conn is None or conn.transport.closed:
                session.outbox.clear()
                continue
            transport = conn.transport
            transport.send(session.take_output())
            if transport.backlogged and transport.pending > MAX_QUEUED:
                conn.close(f"client does not read its replies ({transport.pending} bytes)")

    async def serve_forever(self) -> None:
        assert self._done is not None
        await self._done.wait()

    async def close(self) -> None:
        """Stop listening, remove the socket file, close every client (releasing their VMs)."""
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for conn in list(self.connections.values()):
            conn.close(None)
        if self._done is not None:
            self._done.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
