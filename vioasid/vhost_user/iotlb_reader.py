"""The front-end socket read by a thread of its own, so IOTLB invalidations are answered at once.

In strict mode QEMU forwards each guest unmap as an ``IOTLB_MSG`` invalidation with
``NEED_REPLY`` and its vCPU waits for the ack (docs/performance.md): the ack's latency is the
guest's. Read by the event loop, a message waits for whatever data work the loop is doing; read
by :class:`FrontendReader` (a thread blocked in ``recvmsg``), it is answered while the loop keeps
translating and moving data.

Correctness (after the ack no DMA may use the stale translation) is :class:`InvalidationGate`'s:

* the reader thread only *posts* an invalidation (under the gate's lock), then acks it;
* every access the device makes to guest memory happens inside the gate (``with gate:``): the
  data path takes the lock, applies every posted invalidation to the translator (dropping the
  pages, one translator generation each), checks that no translation it is about to use was
  made before an invalidation covering it (else it translates again), and only then touches
  memory, still holding the lock;
* so an access either finished before the invalidation was posted (before its ack), or starts
  after it and sees it. An access in progress delays the ack, as a device's in-flight DMA delays
  the completion of an ATS invalidation.

Every other message, and an invalidation that arrives while a forwarded message has not been
handled yet (order is kept), goes to the event loop (``loop.call_soon_threadsafe``) exactly as
the socket's bytes would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from vioasid.formats.virtio import (
    VHOST_USER_IOTLB,
    VHOST_USER_NEED_REPLY,
    VHOST_USER_VERSION,
    IotlbType,
    VhostUserRequest,
)
from vioasid.protocol.transport import TooManyFds, recv_with_fds
from vioasid.vhost_user.codec import HDR_SIZE, encode_reply, encode_u64, unpack_header
from vioasid.vhost_user.timing import PhaseTimes

log = logging.getLogger(__name__)

_IOTLB = VHOST_USER_IOTLB.packer
IOTLB_MSG_BYTES = HDR_SIZE + VHOST_USER_IOTLB.size
IOTLB_ACK = encode_reply(VhostUserRequest.IOTLB_MSG, encode_u64(0))
# what a lone invalidation looks like (also the C reader's layout, vioasid/vhost_user/native.py)
IOTLB_REQUEST = int(VhostUserRequest.IOTLB_MSG)
IOTLB_INVALIDATE = int(IotlbType.INVALIDATE)
NEED_REPLY = int(VHOST_USER_NEED_REPLY)
HDR_VERSION = int(VHOST_USER_VERSION)
# While the reader thread waits for the GIL the loop's thread keeps it this long at most: the
# ack's latency when the loop is busy in Python code (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.00002
DRAIN_AT = 64  # posted invalidations that make the loop apply them without waiting for an access


def read_ready(
    sock: socket.socket, end: Callable[[], None]
) -> tuple[bytes | memoryview, list[int]] | None:
    """One ``recvmsg`` on a socket the loop found readable: None when nothing was there after
    all, or when the socket failed (then ``end()`` ran: the session is over)."""
    try:
        return recv_with_fds(sock)
    except (BlockingIOError, InterruptedError):
        return None
    except (OSError, TooManyFds) as exc:
        log.warning("vhost-user socket error: %s", exc)
        end()
        return None


class InvalidationGate:
    """Invalidations posted by any thread, applied by the data path on entering the gate.

    ``apply(iova, size)`` runs in the thread that enters the gate, with the lock held;
    ``apply_many([(iova, size), ...])``, when given, applies everything posted in one call
    instead (``DeviceTranslator.invalidate_many``).
    ``with gate:`` holds the lock for the memory access that follows the check.
    """

    def __init__(
        self,
        apply: Callable[[int, int], None],
        apply_many: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> None:
        self._apply = apply
        self._apply_many = apply_many
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, int]] = deque()
        self.posted = 0

    def post(self, iova: int, size: int) -> None:
        """Queue an invalidation; returns once no access started before it is still running."""
        with self._lock:
            self._pending.append((iova, size))
            self.posted += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self) -> None:
        """Apply what was posted (the loop's thread, when nothing else enters the gate soon)."""
        with self:
            pass

    def __enter__(self) -> None:
        self._lock.acquire()
        pending = self._pending
        try:
            if len(pending) > 1 and self._apply_many is not None:
                batch = list(pending)
                pending.clear()
                self._apply_many(batch)
            while pending:
                self._apply(*pending.popleft())
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


Deliver = Callable[[bytes | None, list[int]], None]
"""Called in the loop's thread with what the socket gave (None: the session ended)."""


class FrontendReader:
    """A thread blocked in ``recvmsg`` on the front-end socket.

    A lone ``IOTLB_MSG`` invalidation (the strict-mode hot message) is posted to ``gate`` and
    acknowledged (when ``acks()``) from this thread; everything else goes to ``deliver`` on
    ``loop``. ``on_invalidated`` runs on the loop after invalidations were applied there; it
    returns False when nobody follows them (then they wait for the next access, or for
    ``DRAIN_AT`` of them).
    """

    def __init__(
        self,
        conn: socket.socket,
        loop: asyncio.AbstractEventLoop,
        gate: InvalidationGate,
        deliver: Deliver,
        acks: Callable[[], bool],
        on_invalidated: Callable[[], bool] | None = None,
        times: PhaseTimes | None = None,
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.gate = gate
        self.deliver = deliver
        self.acks = acks
        self.on_invalidated = on_invalidated
        self.invalidations = 0  # answered here
        self.forwarded = 0  # chunks handed to the loop
        self.consumed = 0  # of those, handled by the loop (written by the loop's thread)
        self.partial = False  # the loop's decoder holds part of a message (loop's thread)
        self._drain_scheduled = False
        self._followed = on_invalidated is not None  # until on_invalidated says otherwise
        # this thread's own phase sums (``message``, ``between_messages``): not shared with the
        # loop's thread, so no two threads add to one counter
        self.times = times if times is not None else PhaseTimes()
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="vhost-user-reader", daemon=True)
        self._stopping = False

    def start(self) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()

    def thread_id(self, wait: float = 1.0) -> int | None:
        """The reader thread's id (for CPU placement); ``wait`` is unused (known at start)."""
        return self._thread.native_id

    def stop(self) -> None:
        """Wake the thread (shutdown of the socket) and wait for it; the caller closes it."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)

    def handed(self) -> None:
        """The loop handled one forwarded chunk (the loop's thread)."""
        self.consumed += 1

    def _forward(self, data: bytes | None, fds: list[int]) -> None:
        self.forwarded += 1
        try:
            self.loop.call_soon_threadsafe(self.deliver, data, fds)
        except RuntimeError:  # the loop is closed: nobody to hand the fds to
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        conn = self.conn
        buf = bytearray(1 << 16)
        while True:
            try:
                view, fds = recv_with_fds(conn, buf)
            except (OSError, TooManyFds) as exc:
                if not self._stopping:
                    log.warning("vhost-user socket error: %s", exc)
                self._forward(None, [])
                return
            n = len(view)
            if not n:
                self._forward(None, fds)
                return
            if (
                n == IOTLB_MSG_BYTES
                and not fds
                and self.forwarded == self.consumed
                and not self.partial
                and self._answer(view)
            ):
                continue
            self._forward(bytes(view), fds)

    def _answer(self, view: bytes | memoryview) -> bool:
        """Handle a lone invalidation here; False if it is anything else (then forwarded)."""
        t0 = time.perf_counter()
        request, flags, size = unpack_header(view)
        if request != IOTLB_REQUEST or size != VHOST_USER_IOTLB.size or flags & 0x3 != HDR_VERSION:
            return False
        iova, isize, _uaddr, _perm, kind = _IOTLB.unpack_from(view, HDR_SIZE)
        if kind != IOTLB_INVALIDATE:
            return False  # updates answer the loop's misses: keep them in order there
        self.gate.post(iova, isize)
        self.invalidations += 1  # counted before the ack: whoever saw the ack sees the count
        if flags & NEED_REPLY and self.acks():
            self.conn.sendall(IOTLB_ACK)
        times = self.times
        gap = t0 - self._last
        if gap < 0.005:
            times.add("between_messages", gap)
        self._last = t1 = time.perf_counter()
        times.add("message", t1 - t0)
        if not self._drain_scheduled and (self._followed or self.gate.pending >= DRAIN_AT):
            # apply them in the loop's thread even if no access comes soon (the IQ follower
            # wants its poke; the queue stays short); else the next access applies them
            self._drain_scheduled = True
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._drained)
        return True

    def _drained(self) -> None:
        self._drain_scheduled = False
        self.gate.drain()
        self._followed = self.on_invalidated is not None and self.on_invalidated()
