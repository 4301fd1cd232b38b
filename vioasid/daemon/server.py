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

Limits (docs/protocol.md, "Limits and ownership"): at most ``max_connections`` clients (one
more is told ``exhausted`` and closed); running out of file descriptors pauses accepting with a
back-off (logged once) and refuses only the request whose fds could not be received; input held
for partial messages is bounded across all connections (:data:`INPUT_BUDGET`: a connection that
would exceed it stops being read until others finish theirs; meanwhile those that have kept a
partial message for :data:`PARTIAL_S` are closed, oldest first, until there is room); a client
that leaves more than :data:`MAX_QUEUED` bytes of replies unread is disconnected, its events
are dropped sooner (``service.EVENT_BACKLOG``); a connection with more work than :data:`TURN_S`
of CPU waits for its next turn (:meth:`Server.later`: round robin, one turn per pass of the
loop, every ready socket served in between). The socket is created 0600 (0660 with a group),
next to a lock file that keeps two daemons off one path; only a socket this daemon created is
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import time
import weakref
from collections import deque

from vioasid.formats import wire
from vioasid.protocol.daemon_codec import FDS_LOST, Codec, ProtocolViolation, Role, encode_error
from vioasid.protocol.transport import Transport

from .service import DmaJob, Service
from .session import Session

log = logging.getLogger(__name__)

MAX_QUEUED = 2 * wire.MAX_PAYLOAD + (1 << 20)
"""A client that lets this much output pile up unread is disconnected."""
MAX_CONNECTIONS = 256
"""Clients served at once (``vioasid serve --max-connections``)."""
INPUT_BUDGET = 64 << 20
"""Bytes of partial messages held across all connections."""
SMALL_INPUT = 1 << 20
"""A connection may always hold this much of a partial message, budget or not."""
PARTIAL_S = 2.0
"""While a connection waits for the input budget, those that have held a partial message above
:data:`SMALL_INPUT` this long are closed, oldest first, until there is room: a message arrives
in milliseconds over a unix socket, one that does not is holding the budget hostage."""
ACCEPT_BACKOFF = (0.05, 1.0)
"""First and longest pause of accepting while the process is out of file descriptors."""
_NO_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_UCRED = struct.Struct("3i")
_DMA_ENTRIES = wire.DMA_FRAME_S.size  # a DMA request's entries start here
_DMA = int(wire.Request.DMA)
TURN_S = 50e-6
"""CPU time one connection's requests get per turn of the event loop (then others' turn)."""
TURN_GAP = 0.5e-3
"""While other clients are being answered (one was within :data:`RECENT_S`), queued work
waits this long between two turns (asyncio's timers are 1 ms coarse: about 1 ms), so that a
flood keeps the daemon busy only a few percent of the time and it is not waiting for a CPU when
their requests arrive; with nobody else around, turns follow each other at once."""
RECENT_S = 0.02
"""How recently a request must have been answered as it arrived for :data:`TURN_GAP` to apply."""
_clock = time.perf_counter


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _peer(sock: socket.socket) -> tuple[str, int]:
    """``("pid P uid U", U)`` from SO_PEERCRED (``("", -1)`` when unavailable)."""
    try:
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return "", -1
    return f"pid {pid} uid {uid}", uid


def refusal(code: wire.ErrorCode, message: str) -> bytes:
    """The notice a refused connection gets before it is closed: a reply to request 0 (which
    no client sends) carrying the error; clients fail their requests with it."""
    return encode_error(0, code, message)


class Connection:
    """One accepted client: transport + codec + session."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.service = server.service
        self.codec = Codec(Role.DAEMON)
        peer, uid = _peer(sock)
        self.session: Session = server.service.open_session(peer, uid)
        self.transport = Transport(sock, self.on_data, self.on_close, server.loop)
        sink = weakref.ref(self.transport)  # a session (kept by log records) must not pin it
        self.session.unsent = lambda: t.pending if (t := sink()) is not None else 0
        self.held = 0  # bytes of a partial message counted in the server's input budget
        self.held_since = 0.0  # loop time it started holding (or was last resumed)
        self.paused = False  # held back by the input budget
        self.busy = False  # work left for the next turn (not read meanwhile)
        self.job: DmaJob | None = None  # a big DMA batch being translated slice by slice

    def on_data(self, data: bytes | memoryview, fds: list[int]) -> None:
        service = self.service
        if not fds:
            dma = self.codec.take_dma(data)
            if dma is not None and dma[2] > 1 and not self.session.closed and not self.job:
                # one batch: translated within this turn's time, else over the next turns
                flags, vm, count = dma
                job = service.start_dma(self.session, flags, vm, count, data[_DMA_ENTRIES:])
                if job is not None and not service.step_dma(job, _clock() + TURN_S):
                    self.job = job
                    self._later()
                else:
                    self.server.answered = _clock(), self.session.id
                self.server.flush()
                return
            if dma is not None and not self.session.closed:
                # the hot path: exactly one one-entry DMA request arrived; reply straight to
                # the socket unless other output is pending (events it raised, an error reply)
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
                self.server.answered = _clock(), self.session.id
                return
        try:
            self.codec.receive(data, fds)
        except ProtocolViolation as exc:
            self.server.flush()
            self.close(f"malformed input: {exc}")
            return
        self._work()
        if not self.busy:
            self.server.answered = _clock(), self.session.id

    def _work(self) -> None:
        """Handle what is buffered for at most :data:`TURN_S` of CPU per turn of the loop: a
        client that sends a lot (or slow requests: faults) waits for its next turn, not read
        meanwhile, while every other client gets its turn in between (a DMA batch too: it
        is a job that may span turns)."""
        service = self.service
        deadline = _clock() + TURN_S
        try:
            while not self.session.closed:
                job = self.job
                if job is not None:
                    if service.step_dma(job, deadline):
                        self.job = None
                elif (msg := self.codec.next_message()) is None:
                    break
                elif msg.body is FDS_LOST:
                    service.refuse_lost_fds(self.session, msg)
                elif msg.request == _DMA and msg.body.count > 1:
                    b = msg.body
                    self.job = service.start_dma(self.session, msg.flags, b.vm, b.count, b.entries)
                else:
                    service.handle(self.session, msg)
                if _clock() >= deadline:
                    break
        except ProtocolViolation as exc:
            self.server.flush()
            self.close(f"malformed input: {exc}")
            return
        if self.job is not None or self.codec.ready:
            self._later()
        if self.held or self.codec.buffered > SMALL_INPUT:
            self.server.account(self)
        self.server.flush()

    def _later(self) -> None:
        """Work is left: stop reading, carry on at this connection's next turn
        (:meth:`Server.later`)."""
        if not self.transport.closed and not self.session.closed and not self.busy:
            self.busy = True
            self.transport.pause_reading()
            self.server.later(self)

    def next_turn(self) -> None:
        """The server's turn for this connection: one more slice of its work."""
        if self.transport.closed:
            return
        self.busy = False
        self._work()
        self.resume()

    def resume(self) -> None:
        """Read again unless a turn is pending or the input budget holds this connection."""
        if not self.busy and not self.paused:
            self.transport.resume_reading()

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
        self.server.account(self, closing=True)
        self.server.connections.pop(self.session.id, None)
        self.server.service.end_session(self.session)
        self.server.flush()


class Server:
    """Serves one :class:`Service` on a unix socket path (see the module docstring's limits)."""

    def __init__(
        self,
        service: Service,
        path: str | os.PathLike[str],
        *,
        group: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.service = service
        self.path = os.fspath(path)
        self.group = group
        self.max_connections = max_connections
        self.connections: dict[int, Connection] = {}
        self.input_held = 0  # bytes of partial messages above SMALL_INPUT, all connections
        self.refused = 0  # connections refused (limit or no fds)
        self._waiting: dict[int, Connection] = {}  # paused for the input budget
        self._evict: asyncio.TimerHandle | None = None  # the next look for hostage-takers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._done: asyncio.Event | None = None
        self._lock_fd: int | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._reserve: int | None = None  # a spare fd, to refuse honestly at the fd limit
        self._backoff = 0.0
        self._resume: asyncio.TimerHandle | None = None
        self._turns: deque[Connection] = deque()  # connections with work left, round robin
        self._turn: asyncio.TimerHandle | None = None  # the next turn, when one is due
        self._turning = False  # in a turn (its connection's later() does not schedule)
        self.answered = (0.0, 0)  # (_clock(), session id): a request last answered as it came

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not started")
        return self._loop

    async def start(self) -> None:
        """Take the lock file beside the path, then bind and listen. A stale socket file at
        the path (nobody holds the lock) is replaced; a daemon holding the lock, or any other
        file at the path, is an error."""
        if not self.path or self.path.startswith("\0"):
            raise ValueError("the socket path must be a file path (not empty, not abstract)")
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._lock_fd = _lock(self.path + ".lock")
        try:
            self._sock = self._bind()
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        with contextlib.suppress(OSError):
            self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.loop.add_reader(self._sock.fileno(), self._accept)
        log.info("listening on %s", self.path)

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, "a file that is not a socket is in the way")
            if _is_live(self.path):
                raise OSError(errno.EADDRINUSE, "another daemon is serving this socket")
            os.unlink(self.path)  # stale: nobody holds the lock, nobody listens
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: nobody else connects
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        try:
            st = os.stat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            if self.group is not None:
                os.chown(self.path, -1, self.group)
                os.chmod(self.path, 0o660)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self._unlink_own()
            raise
        return sock

    def _unlink_own(self) -> None:
        """Remove the socket file only if it is still the one this daemon created."""
        if self._ident is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        self._ident = None

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_FDS:
                    self._out_of_fds(exc)
                else:
                    log.warning("accept: %s", exc)
                return
            if self._backoff:
                log.warning("accepting again")
                self._backoff = 0.0
            if len(self.connections) >= self.max_connections:
                self._refuse(sock, f"the daemon serves {self.max_connections} connections already")
                continue
            conn = Connection(self, sock)
            self.connections[conn.session.id] = conn
            log.info("%s: connected", conn.session)
            conn.transport.start()

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.refused += 1
        log.info("connection refused: %s", why)
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(refusal(wire.ErrorCode.EXHAUSTED, why))
        sock.close()

    def _out_of_fds(self, exc: OSError) -> None:
        """accept() failed for want of fds: refuse the waiting client with the spare fd, and
        stop accepting for a while (the listening socket stays readable: no busy loop)."""
        assert self._sock is not None
        if not self._backoff:
            log.warning("accept: %s; pausing accepting (existing connections are served)", exc)
        while self._reserve is not None:  # refuse every waiting client, one spare fd each
            os.close(self._reserve)
            self._reserve = None
            try:
                sock, _ = self._sock.accept()
            except OSError:
                sock = None
            if sock is not None:
                self._refuse(sock, f"the daemon is out of file descriptors ({exc.strerror})")
            with contextlib.suppress(OSError):
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if sock is None:
                break
        first, longest = ACCEPT_BACKOFF
        self._backoff = min(longest, self._backoff * 2 or first)
        self.loop.remove_reader(self._sock.fileno())
        self._resume = self.loop.call_later(self._backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def later(self, conn: Connection) -> None:
        """``conn`` has work left (a long DMA batch, many buffered requests): it gets a turn
        of at most :data:`TURN_S` after the others that wait, one turn per pass of the loop.
        A turn is a timer, which asyncio runs after the I/O callbacks of the same pass: every
        ready socket is read and answered between two turns, so a client sending one request
        at a time waits for at most one turn, however many connections have work queued.
        While such clients are being answered, turns are :data:`TURN_GAP` apart: queued work
        (a flood of faulting batches) then takes a few percent of the daemon's time, not all
        of it, and the daemon is not queued behind other processes for a CPU when the next
        request arrives; otherwise the next turn follows at once."""
        self._turns.append(conn)
        if self._turn is None and not self._turning:
            self._turn = self.loop.call_later(0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn = None
        turns = self._turns
        self._turning = True
        try:
            while turns:
                conn = turns.popleft()
                if not conn.transport.closed:
                    conn.next_turn()
                    break
        finally:
            self._turning = False
        if turns:
            when, who = self.answered  # another client's, lately: space the turns out
            gap = TURN_GAP if _clock() - when < RECENT_S and who != turns[0].session.id else 0
            self._turn = self.loop.call_later(gap, self._next_turn)

    def account(self, conn: Connection, *, closing: bool = False) -> None:
        """Keep the bytes held for partial messages within :data:`INPUT_BUDGET`: a connection
        over it is paused until the others' messages complete or close; while one waits, the
        connections that have kept a partial message for :data:`PARTIAL_S` are closed, oldest
        first, until there is room (:meth:`_evict_stalled`), so a flood of never-finished
        messages cannot hold a large legitimate one (an ``IMPORT_VM``) back for longer than
        that."""
        held = 0 if closing else max(0, conn.codec.buffered - SMALL_INPUT)
        if held and not conn.held:
            conn.held_since = self.loop.time()
        self.input_held += held - conn.held
        conn.held = held
        if closing:
            self._waiting.pop(conn.session.id, None)
        elif held and self.input_held > INPUT_BUDGET and not conn.paused:
            log.warning(
                "%s: paused: partial messages hold %d bytes (budget %d)",
                conn.session, self.input_held, INPUT_BUDGET,
            )  # fmt: skip
            conn.paused = True
            conn.transport.pause_reading()
            self._waiting[conn.session.id] = conn
            if self._evict is None:
                self._evict = self.loop.call_later(PARTIAL_S / 4, self._evict_stalled)
            return
        if self._waiting and self.input_held <= INPUT_BUDGET:
            waiting, self._waiting = self._waiting, {}
            now = self.loop.time()
            for c in waiting.values():
                c.paused = False
                c.held_since = now  # time spent waiting does not count against it
                c.resume()

    def _evict_stalled(self) -> None:
        """Someone waits for the input budget: close the connections that have held a partial
        message for :data:`PARTIAL_S` (paused or not; a resumed one starts afresh), oldest
        first, until the budget has room again and the waiting are resumed."""
        self._evict = None
        if not self._waiting:
            return
        limit = self.loop.time() - PARTIAL_S
        stale = [c for c in self.connections.values() if c.held and c.held_since <= limit]
        for conn in sorted(stale, key=lambda c: c.held_since):
            if self.input_held <= INPUT_BUDGET:
                break
            conn.close(
                f"a partial message has held {conn.held + SMALL_INPUT} bytes of the input "
                f"budget for over {PARTIAL_S:g} s while others wait"
            )
        if self._waiting and self._evict is None:
            self._evict = self.loop.call_later(PARTIAL_S / 4, self._evict_stalled)

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
        """Stop listening, remove the socket file (if still ours), close every client
        (releasing their VMs), release the lock."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        if self._evict is not None:
            self._evict.cancel()
            self._evict = None
        self._turns.clear()
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._unlink_own()
        for conn in list(self.connections.values()):
            conn.close(None)
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._done is not None:
            self._done.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _lock(path: str) -> int:
    """Hold an exclusive lock on ``path`` (created 0600) for the daemon's life; EADDRINUSE
    when another daemon holds it. The file stays (removing it would race a starting daemon)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EADDRINUSE, "another daemon is serving this socket") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
