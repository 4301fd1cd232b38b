"""The asyncio vhost-user-blk back-end QEMU connects to (``-device vhost-user-blk-pci``).

One listening unix socket; one front-end session at a time. The path of a request, top to bottom:

1. The socket's reader thread (C: ``native.NativeReader``; Python:
   ``iotlb_reader.FrontendReader``) → ``recvmsg`` (data + SCM_RIGHTS fds): a lone IOTLB
   invalidation is posted to the DMA gate and acknowledged right
   there (strict mode: a vCPU waits on each); everything else goes to the loop, ``_on_data`` →
   ``Decoder.feed`` → ``_dispatch``: every front-end message is handled synchronously, in order,
   and answered at once (QEMU blocks on the replies; nothing here may wait on QEMU). With
   ``reader_thread=False`` the loop reads the socket itself (``_on_readable``).
2. A kick eventfd becomes readable → ``_run_queue`` (one task per virtqueue): pop chains, let
   :class:`BlkDevice` serve them through :class:`Dma` (every address an IOVA translated by the
   :class:`DeviceTranslator`), push used entries, signal the call eventfd.
3. In QEMU-IOTLB or cross-check mode a translation miss goes out on the backend channel
   (``BACKEND_IOTLB_MSG`` miss) and its answer comes back on the main socket as an ``IOTLB_MSG``
   update, handled by step 1 while the queue task waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from vioasid.device.dirty_log import DirtyLogging, open_log
from vioasid.device.translator import (
    DeviceTranslator,
    DmaFault,
    IdentityResolver,
    QemuResolver,
    RegsReader,
    Resolver,
    WalkResolver,
)
from vioasid.formats.virtio import (
    VHOST_USER_CONFIG_HDR,
    VHOST_USER_IOTLB,
    VHOST_USER_MEM_HDR,
    VHOST_USER_MEM_REGION,
    VHOST_USER_NEED_REPLY,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_ADDR,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD,
    VHOST_USER_VRING_STATE,
    IotlbPerm,
    IotlbType,
    VhostUserBackendRequest,
    VhostUserProtocolFeature,
    VhostUserRequest,
    VirtioFeature,
)
from vioasid.model.memory import GuestMemory, MemoryAccessError
from vioasid.protocol.framing import close_fds
from vioasid.protocol.transport import send_with_fds
from vioasid.vhost_user import native
from vioasid.vhost_user.blk import BlkDevice
from vioasid.vhost_user.codec import (
    HDR_SIZE,
    Decoder,
    Message,
    ProtocolError,
    encode,
    encode_reply,
    encode_u64,
    request_name,
    unpack_header,
)
from vioasid.vhost_user.inflight import settle
from vioasid.vhost_user.iotlb_reader import (
    IOTLB_ACK,
    IOTLB_MSG_BYTES,
    FrontendReader,
    InvalidationGate,
    read_ready,
)
from vioasid.vhost_user.native import NativeReader
from vioasid.vhost_user.timing import PhaseTimes, merged
from vioasid.vhost_user.virtqueue import (
    MAX_QUEUE_SIZE,
    Buffer,
    Chain,
    ChainError,
    Dma,
    SplitQueue,
)

log = logging.getLogger(__name__)

R = VhostUserRequest
PF = VhostUserProtocolFeature
MAX_QUEUES = 8
MAX_FDS = 16  # SET_MEM_TABLE carries at most 8; leave room
_EVENTFD_ONE = (1).to_bytes(8, "little")

PROTOCOL_FEATURES = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG)
PROTOCOL_FEATURES |= 1 << PF.LOG_SHMFD  # migration: the dirty log comes as a shared fd
VIRTIO_FEATURES = (
    (1 << VirtioFeature.VERSION_1)
    | (1 << VirtioFeature.ACCESS_PLATFORM)
    | (1 << VirtioFeature.PROTOCOL_FEATURES)
    | (1 << VirtioFeature.RING_INDIRECT_DESC)
    | (1 << VirtioFeature.LOG_ALL)  # migration: dirty logging (dirty_log.py)
)

TRANSLATE_MODES = ("walk", "qemu", "identity")

_IOTLB = VHOST_USER_IOTLB.packer
_IOTLB_MSG_BYTES = IOTLB_MSG_BYTES
_IOTLB_ACK = IOTLB_ACK


@dataclass
class BackendStats:
    messages: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    kicks: int = 0
    calls: int = 0
    requests: int = 0
    ring_faults: int = 0
    device_starts: int = 0
    iotlb_updates: int = 0
    iotlb_invalidates: int = 0
    iotlb_acked_by_reader: int = 0


class VhostUserBlkBackend:
    """A vhost-user-blk device on ``disk`` served at ``socket_path``.

    ``translate``: ``walk`` (vioasid walks the guest's VT-d tables; needs ``regs`` and the
    device's RID via :meth:`set_sid`), ``qemu`` (every miss asked of QEMU) or ``identity``.
    ``cross_check`` (walk mode) also asks QEMU for every miss and counts agreement.
    ``inject_bad_iova`` (tests): the first read request served while the guest has DMA
    translation on gets its data buffer moved to this IOVA, as a buggy device would do; the
    real walk of the guest's tables must fault and the guest must see an I/O error.
    ``reader_thread``: read the front-end socket on a thread of its own, which acknowledges
    IOTLB invalidations without waiting for the loop (``iotlb_reader``); False: the loop reads it.
    """

    def __init__(
        self,
        disk: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        translate: str = "walk",
        cross_check: bool = False,
        regs: RegsReader | None = None,
        sid: int = 0,
        trace: IO[str] | None = None,
        serial: str = "",
        inject_bad_iova: int | None = None,
        reader_thread: bool = True,
    ) -> None:
        if translate not in TRANSLATE_MODES:
            raise ValueError(f"translate must be one of {TRANSLATE_MODES}")
        self.blk = BlkDevice(disk, serial=serial)
        self.socket_path = Path(socket_path)
        self.mode = translate
        self.cross_check = cross_check
        self.stats = BackendStats()
        self.memory: GuestMemory | None = None
        self.queues = [SplitQueue(i) for i in range(MAX_QUEUES)]
        self.features = 0
        self.protocol_features = 0
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._backend_sock: socket.socket | None = None
        self._decoder = Decoder()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._kicked: set[int] = set()
        self._kick_at: dict[int, float] = {}
        self._last_message = 0.0  # when the last fast-path message was answered
        self._closed = asyncio.Event()
        self._session_done: asyncio.Event | None = None
        self._restart_pending = True
        self.reader_thread = reader_thread
        self._reader: FrontendReader | NativeReader | None = None
        self.reader_times = PhaseTimes()  # the reader thread's own phase sums
        self.inject_bad_iova = inject_bad_iova
        self.on_invalidate: Callable[[], None] | None = None  # e.g. IqFollower.poke
        # CPUs for the reader thread (qemu_glue.qemu.placement): set on each one it starts
        self.reader_cpus: set[int] | None = None
        self.injected: list[int] = []  # heads of the chains that got the bad IOVA

        mem = self.get_memory
        self.walk = WalkResolver(mem, sid, regs) if translate == "walk" else None
        self.qemu = (
            QemuResolver(mem, sid, self._send_miss)
            if (translate == "qemu" or cross_check)
            else None
        )
        primary: Resolver
        if translate == "walk":
            assert self.walk is not None
            primary = self.walk
        elif translate == "qemu":
            assert self.qemu is not None
            primary = self.qemu
        else:
            primary = IdentityResolver(mem, sid)
        reference = self.qemu if (cross_check and translate == "walk") else None
        self.translator = DeviceTranslator(primary, sid=sid, reference=reference, trace=trace)
        self._identity = DeviceTranslator(IdentityResolver(mem, sid), sid=sid)
        self.dirty = DirtyLogging()  # migration: marks every page the device writes
        # invalidations acknowledged by the reader thread, applied before each DMA access
        self.gate = InvalidationGate(self._apply_invalidation, self._apply_invalidations)
        self.dma = Dma(mem, self.dirty.wrap(self.translator), self.gate)

    # -- public ---------------------------------------------------------------------------
    def set_sid(self, sid: int) -> None:
        """The device's guest requester id (from QMP ``query-pci``)."""
        self.translator.sid = sid
        for r in (self.walk, self.qemu):
            if r is not None:
                r.sid = sid

    @property
    def sid(self) -> int:
        return self.translator.sid

    async def start(self) -> None:
        """Listen on the socket (QEMU connects as a client)."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.socket_path))
        sock.listen(1)
        sock.setblocking(False)
        self._listener = sock
        if self.reader_thread:
            native.load()  # built (once per source version) before QEMU connects, not during

    async def serve_forever(self) -> None:
        """Accept and serve front-end sessions until :meth:`close`."""
        if self._listener is None:
            await self.start()
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while not self._closed.is_set():
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except (OSError, asyncio.CancelledError):
                break
            await self._serve_session(conn)

    async def close(self) -> None:
        self._closed.set()
        self._end_session()
        self.dirty.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self.blk.close()

    def summary(self) -> dict[str, Any]:
        self._drain()  # the invalidations already acknowledged count
        out = self.translator.stats.to_json()
        b = self.blk.stats
        out["blk"] = {
            "reads": b.reads,
            "writes": b.writes,
            "flushes": b.flushes,
            "bytes_read": b.bytes_read,
            "bytes_written": b.bytes_written,
            "ioerr": b.ioerr,
        }
        out["requests"] = self.stats.requests
        out["times"] = merged(self.blk.times, self.reader_times).to_json()
        out["device_starts"] = self.stats.device_starts
        out["ring_faults"] = self.stats.ring_faults
        out["iotlb_invalidates_from_qemu"] = self.stats.iotlb_invalidates
        reader = self._reader
        out["iotlb_acked_by_reader"] = self.stats.iotlb_acked_by_reader + (
            reader.invalidations if reader is not None else 0
        )
        if self.qemu is not None:
            out["qemu_misses"] = self.qemu.misses
            out["qemu_unanswered"] = self.qemu.unanswered
            if self.qemu.misses:
                out["qemu_miss_ms"] = round(1000 * self.qemu.latency_s / self.qemu.misses, 3)
        if self.walk is not None:
            out["regs_reads"] = self.walk.regs_reads
        return out

    # -- session ----------------------------------------------------------------------------
    def get_memory(self) -> GuestMemory | None:
        return self.memory

    async def _serve_session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        self._conn = conn
        self._decoder = Decoder()
        self.stats.sessions += 1
        done = asyncio.Event()
        self._session_done = done
        if self.reader_thread:
            self._start_reader(conn, loop)
        else:
            loop.add_reader(conn.fileno(), self._on_readable)
        log.info("vhost-user front-end connected")
        try:
            await done.wait()
        finally:
            self._end_session()
            log.info("vhost-user front-end disconnected")

    def _start_reader(self, conn: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """The socket's reader thread: the C one when it builds and loads, else Python's."""
        conn.setblocking(True)
        lib = native.load()
        if lib is not None:
            nat = NativeReader(
                lib,
                conn,
                loop,
                self._apply_invalidation,
                self.translator.flush,
                self._on_native_data,
                self._end_session,
                acks=self._acks(),
                times=self.reader_times,
                applied=self._invalidated,
                apply_many=self._apply_invalidations,
            )
            if nat.start():
                self._reader = nat
                self.dma.gate = nat
                self._place_reader()
                return
            log.warning("native IOTLB reader did not start: the Python one answers")
        reader = FrontendReader(
            conn,
            loop,
            self.gate,
            partial(self._on_forwarded, conn),
            acks=self._acks,
            on_invalidated=self._invalidated,
            times=self.reader_times,
        )
        self._reader = reader
        self.dma.gate = self.gate
        reader.start()
        self._place_reader()

    def reader_thread_id(self) -> int | None:
        """The thread id of the socket's reader thread while a session runs, else None."""
        reader = self._reader
        return reader.thread_id() if reader is not None else None

    def _place_reader(self) -> None:
        cpus = self.reader_cpus
        tid = self.reader_thread_id() if cpus else None
        if cpus and tid:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:
                log.warning("IOTLB reader thread %d: CPU placement refused: %s", tid, exc)

    def _end_session(self) -> None:
        loop = asyncio.get_event_loop()
        if self._conn is not None:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.stop()
                self.stats.iotlb_acked_by_reader += reader.invalidations
                self.dma.gate = self.gate
            else:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        self.gate.drain()
        for q in self.queues:
            self._stop_queue(q)
            for name in ("call_fd", "err_fd"):
                fd = getattr(q, name)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(q, name, None)
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()
        if self.qemu is not None:
            self.qemu.cancel_all()
        if self._backend_sock is not None:
            self._backend_sock.close()
            self._backend_sock = None
        self._decoder.close()
        if self.memory is not None:
            self.memory = None  # views may still be alive in cancelled tasks; GC unmaps
        if self._session_done is not None:
            self._session_done.set()

    def _drain(self) -> None:
        """Apply the invalidations the reader thread acknowledged and posted."""
        gate = self.dma.gate
        if isinstance(gate, (InvalidationGate, NativeReader)):
            gate.drain()

    def _acks(self) -> bool:
        return bool(self.protocol_features & (1 << PF.REPLY_ACK))

    def _apply_invalidation(self, iova: int, size: int) -> None:
        """An invalidation the reader thread acknowledged (applied inside the DMA gate)."""
        self.stats.iotlb_invalidates += 1
        self.translator.invalidate(iova, size)

    def _apply_invalidations(self, ranges: list[tuple[int, int]]) -> None:
        """Invalidations the reader thread acknowledged, applied together (inside the gate)."""
        self.stats.iotlb_invalidates += len(ranges)
        self.translator.invalidate_many(ranges)

    def _invalidated(self) -> bool:
        """Poke whoever follows invalidations (the IQ follower); False: nobody does."""
        if self.on_invalidate is None:
            return False
        self.on_invalidate()
        return True

    def _on_native_data(self, data: bytes | memoryview, fds: list[int]) -> bool:
        """What the C reader passed on; True while the decoder holds part of a message."""
        self._on_data(data, fds)
        return bool(self._decoder.pending)

    def _on_forwarded(self, conn: socket.socket, data: bytes | None, fds: list[int]) -> None:
        """What the Python reader thread got from the socket (None: closed or failed)."""
        reader = self._reader
        if conn is not self._conn or not isinstance(reader, FrontendReader):
            close_fds(fds)  # a session that already ended
            return
        try:
            if data is None:
                close_fds(fds)
                self._end_session()
                return
            self._on_data(data, fds)
        finally:
            reader.partial = bool(self._decoder.pending)
            reader.handed()

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        got = read_ready(conn, self._end_session)
        if got is not None:
            self._on_data(*got)

    def _on_data(self, data: bytes | memoryview, fds: list[int]) -> None:
        if not fds and len(data) == _IOTLB_MSG_BYTES and not self._decoder.pending:
            # The hot message (strict mode: one per guest unmap, the vCPU waiting for the ack)
            # skips the decoder and the dispatcher.
            request, flags, size = unpack_header(data)
            if (
                request == R.IOTLB_MSG
                and size == VHOST_USER_IOTLB.size
                and flags & 0x3 == VHOST_USER_VERSION
            ):
                t0 = time.perf_counter()
                times = self.blk.times
                gap = t0 - self._last_message
                if gap < 0.005:
                    times.add("between_messages", gap)
                self.stats.messages["IOTLB_MSG"] += 1
                self._iotlb_msg(data, HDR_SIZE, bool(flags & VHOST_USER_NEED_REPLY))
                self._last_message = t1 = time.perf_counter()
                times.add("message", t1 - t0)
                return
        if not data:
            close_fds(fds)
            self._end_session()
            return
        try:
            messages = self._decoder.feed(bytes(data), fds)
        except ProtocolError as exc:
            log.error("vhost-user protocol error: %s", exc)
            self._end_session()
            return
        for msg in messages:
            t0 = time.perf_counter()
            try:
                self._dispatch(msg)
            except (ProtocolError, ValueError, OSError, MemoryAccessError) as exc:
                log.error("vhost-user %s failed: %s", request_name(msg.request), exc)
                if msg.need_reply:
                    self._send(encode_reply(msg.request, encode_u64(1)))
            finally:
                msg.close_fds()
                self.blk.times.add("message", time.perf_counter() - t0)
            if self._conn is None:
                return

    def _send(self, data: bytes, fds: list[int] | None = None) -> None:
        conn = self._conn
        if conn is None:
            return
        _sendall(conn, data, fds)

    # -- front-end messages ---------------------------------------------------------------------
    def _dispatch(self, msg: Message) -> None:
        name = request_name(msg.request)
        self.stats.messages[name] += 1
        log.debug(
            "vhost-user %s flags=0x%x size=%d fds=%d",
            name,
            msg.flags,
            len(msg.payload),
            len(msg.fds),
        )
        handler: Callable[[Message], bytes | None] | None = getattr(self, f"_on_{name}", None)
        if handler is None:
            log.warning("vhost-user: unsupported request %s", name)
            if msg.need_reply:
                self._send(encode_reply(msg.request, encode_u64(1)))
            return
        reply = handler(msg)
        if reply is not None:
            self._send(encode_reply(msg.request, reply))
        elif msg.need_reply and self.protocol_features & (1 << PF.REPLY_ACK):
            self._send(encode_reply(msg.request, encode_u64(0)))

    def _on_GET_FEATURES(self, msg: Message) -> bytes:
        return encode_u64(VIRTIO_FEATURES | self.blk.features)

    def _on_SET_FEATURES(self, msg: Message) -> None:
        self.features = msg.u64()
        log.info("features 0x%x", self.features)
        self.dirty.set_features(self.features)

    def _on_GET_PROTOCOL_FEATURES(self, msg: Message) -> bytes:
        return encode_u64(PROTOCOL_FEATURES)

    def _on_SET_PROTOCOL_FEATURES(self, msg: Message) -> None:
        self.protocol_features = msg.u64() & PROTOCOL_FEATURES
        if isinstance(self._reader, NativeReader):
            self._reader.set_acks(self._acks())

    def _on_GET_QUEUE_NUM(self, msg: Message) -> bytes:
        return encode_u64(MAX_QUEUES)

    def _on_SET_OWNER(self, msg: Message) -> None:
        return None

    def _on_RESET_OWNER(self, msg: Message) -> None:
        for q in self.queues:
            self._stop_queue(q)

    def _on_RESET_DEVICE(self, msg: Message) -> None:
        self._on_RESET_OWNER(msg)

    def _on_SET_BACKEND_REQ_FD(self, msg: Message) -> None:
        fd = msg.take_fd()
        if fd is None:
            raise ProtocolError("SET_BACKEND_REQ_FD without an fd")
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_sock = socket.socket(fileno=fd)
        self._backend_sock.setblocking(True)

    def _on_GET_CONFIG(self, msg: Message) -> bytes:
        off, size, flags = VHOST_USER_CONFIG_HDR.packer.unpack_from(msg.payload)
        cfg = self.blk.config(num_queues=1)
        body = cfg[off : off + size].ljust(size, b"\0")
        return VHOST_USER_CONFIG_HDR.packer.pack(off, size, flags) + body

    def _on_SET_CONFIG(self, msg: Message) -> None:
        return None  # nothing writable (no CONFIG_WCE)

    def _on_SET_MEM_TABLE(self, msg: Message) -> None:
        nregions, _pad = VHOST_USER_MEM_HDR.packer.unpack_from(msg.payload)
        if nregions > 8 or len(msg.fds) < nregions:
            raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions, {len(msg.fds)} fds")
        mem = GuestMemory()
        for i in range(nregions):
            gpa, size, uaddr, mmap_off = VHOST_USER_MEM_REGION.packer.unpack_from(
                msg.payload, VHOST_USER_MEM_HDR.size + i * VHOST_USER_MEM_REGION.size
            )
            mem.add_fd(msg.fds[i], mmap_off, size, gpa, uaddr=uaddr, name=f"region{i}")
            log.info(
                "memory region %d: gpa 0x%x size 0x%x uaddr 0x%x offset 0x%x",
                i,
                gpa,
                size,
                uaddr,
                mmap_off,
            )
        self.memory = mem
        self.translator.flush()

    def _queue(self, index: int) -> SplitQueue:
        if not 0 <= index < MAX_QUEUES:
            raise ProtocolError(f"vring index {index} out of range")
        return self.queues[index]

    def _on_SET_VRING_NUM(self, msg: Message) -> None:
        index, num = VHOST_USER_VRING_STATE.packer.unpack_from(msg.payload)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"bad queue size {num}")
        self._queue(index).num = num

    def _on_SET_VRING_BASE(self, msg: Message) -> None:
        index, base = VHOST_USER_VRING_STATE.packer.unpack_from(msg.payload)
        q = self._queue(index)
        q.last_avail = base & 0xFFFF
        q.used_idx = base & 0xFFFF
        q.broken = False

    def _on_SET_VRING_ADDR(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = VHOST_USER_VRING_ADDR.packer.unpack_from(
            msg.payload
        )
        q = self._queue(index)
        if not self.features & (1 << VirtioFeature.ACCESS_PLATFORM):
            # Without ACCESS_PLATFORM ring addresses are the front-end's virtual addresses.
            mem = self.memory
            if mem is None:
                raise ProtocolError("SET_VRING_ADDR before SET_MEM_TABLE")
            desc, used, avail = (mem.uaddr_to_gpa(a) for a in (desc, used, avail))
        q.desc, q.used, q.avail = desc, used, avail
        q.broken = False
        self._restart_pending = True  # the guest may have turned translation on meanwhile
        log.info("vring %d: desc 0x%x avail 0x%x used 0x%x", index, desc, avail, used)

    def _vring_fd(self, msg: Message) -> tuple[SplitQueue, int | None]:
        """SET_VRING_KICK/CALL/ERR: the queue and its eventfd (None: VHOST_USER_VRING_NOFD)."""
        val = msg.u64()
        q = self._queue(val & VHOST_USER_VRING_IDX_MASK)
        return q, None if val & VHOST_USER_VRING_NOFD else msg.take_fd()

    def _on_SET_VRING_KICK(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        self._stop_queue(q)
        q.kick_fd = fd
        q.started = True
        if not self.features & (1 << VirtioFeature.PROTOCOL_FEATURES):
            q.enabled = True  # without PROTOCOL_FEATURES rings start enabled
        if fd is not None:
            os.set_blocking(fd, False)
            asyncio.get_event_loop().add_reader(fd, self._on_kick, q.index)
        self.stats.device_starts += int(q.index == 0)
        self._schedule(q.index)

    def _on_SET_VRING_CALL(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        if q.call_fd is not None:
            os.close(q.call_fd)
        q.call_fd = fd

    def _on_SET_VRING_ERR(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        if q.err_fd is not None:
            os.close(q.err_fd)
        q.err_fd = fd

    def _on_SET_VRING_ENABLE(self, msg: Message) -> None:
        index, enable = VHOST_USER_VRING_STATE.packer.unpack_from(msg.payload)
        q = self._queue(index)
        q.enabled = bool(enable)
        if q.enabled:
            self._schedule(index)

    def _on_GET_VRING_BASE(self, msg: Message) -> bytes:
        index, _ = VHOST_USER_VRING_STATE.packer.unpack_from(msg.payload)
        q = self._queue(index)
        self._stop_queue(q)
        q.enabled = False
        base = settle(q, self._tasks.pop(index, None))  # in-flight requests are handed back
        return VHOST_USER_VRING_STATE.packer.pack(index, base)

    def _on_SET_LOG_BASE(self, msg: Message) -> bytes:
        self.dirty.set_log(open_log(msg.payload, msg.fds))
        return encode_u64(0)  # with LOG_SHMFD QEMU waits for this reply

    def _on_IOTLB_MSG(self, msg: Message) -> None:
        self._iotlb_msg(msg.payload, 0, False)  # the dispatcher sends the ack

    def _iotlb_msg(self, buf: bytes | memoryview, off: int, ack: bool) -> None:
        """An IOTLB_MSG at ``buf[off:]``; ``ack``: send the REPLY_ACK here.

        An invalidation is acknowledged first and then dropped, both before this returns: the
        loop runs nothing in between, so no translation can use a page after QEMU heard it is
        gone, and QEMU (with the guest's vCPU) resumes as early as possible.
        """
        iova, size, uaddr, perm, kind = _IOTLB.unpack_from(buf, off)
        if ack and self.protocol_features & (1 << PF.REPLY_ACK):
            self._send(_IOTLB_ACK)
        if kind == IotlbType.INVALIDATE:
            self.stats.iotlb_invalidates += 1
            self.translator.invalidate(iova, size)
            if self.on_invalidate is not None:
                self.on_invalidate()
        elif kind == IotlbType.UPDATE:
            self.stats.iotlb_updates += 1
            if self.qemu is not None:
                self.qemu.on_update(iova, size, uaddr, perm)
        else:
            log.warning("IOTLB_MSG type %d ignored", kind)

    # -- backend channel ------------------------------------------------------------------------
    def _send_miss(self, iova: int, write: bool) -> None:
        sock = self._backend_sock
        if sock is None:
            raise OSError("no backend channel (SET_BACKEND_REQ_FD not received)")
        payload = VHOST_USER_IOTLB.build(
            iova=iova,
            size=0,
            uaddr=0,
            perm=int(IotlbPerm.RW if write else IotlbPerm.RO),
            type=int(IotlbType.MISS),
        )
        _sendall(sock, encode(VhostUserBackendRequest.IOTLB_MSG, payload))

    # -- virtqueues -----------------------------------------------------------------------------
    def _stop_queue(self, q: SplitQueue) -> None:
        if q.kick_fd is not None:
            loop = asyncio.get_event_loop()
            with contextlib.suppress(Exception):
                loop.remove_reader(q.kick_fd)
            with contextlib.suppress(OSError):
                os.close(q.kick_fd)
            q.kick_fd = None
        q.started = False

    def _on_kick(self, index: int) -> None:
        q = self.queues[index]
        if q.kick_fd is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(q.kick_fd, 8)
        self.stats.kicks += 1
        self._schedule(index)

    def _schedule(self, index: int) -> None:
        self._kicked.add(index)
        self._kick_at.setdefault(index, time.perf_counter())
        task = self._tasks.get(index)
        if task is None or task.done():
            self._tasks[index] = asyncio.get_event_loop().create_task(self._run_queue(index))

    async def _run_queue(self, index: int) -> None:
        q = self.queues[index]
        times = self.blk.times
        while index in self._kicked:
            self._kicked.discard(index)
            kicked = self._kick_at.pop(index, None)
            if kicked is not None:
                times.add("kick_to_run", time.perf_counter() - kicked)
            if not (q.started and q.ready) or self.memory is None:
                return
            if self._restart_pending:
                self._restart_pending = False
                await self.translator.restart()
            dma = (
                self.dma
                if self.features & (1 << VirtioFeature.ACCESS_PLATFORM)
                else Dma(self.get_memory, self.dirty.wrap(self._identity), self.dma.gate)
            )
            served = 0
            while q.started and q.ready and self.memory is not None:
                t0 = time.perf_counter()
                try:
                    chain = await q.pop(dma)
                except (DmaFault, MemoryAccessError, ChainError) as exc:
                    self._ring_fault(q, exc)
                    break
                t1 = time.perf_counter()
                times.add("pop", t1 - t0)
                if chain is None:
                    break
                times.request_at(t0)
                if self.inject_bad_iova is not None:
                    self._maybe_inject(chain)
                written = await self.blk.handle(dma, chain)
                self.stats.requests += 1
                t2 = time.perf_counter()
                try:
                    await q.push(dma, chain.head, written)
                except (DmaFault, MemoryAccessError, ChainError) as exc:
                    self._ring_fault(q, exc)
                    break
                t3 = time.perf_counter()
                times.add("push", t3 - t2)
                served += 1
                # Signal each completion at once (the guest can unmap and reuse its buffers
                # while the next request is served), then let the loop answer what QEMU sent
                # meanwhile (strict mode: invalidations a vCPU is waiting on) before the next.
                self._call(q)
                times.add("call", time.perf_counter() - t3)
                await asyncio.sleep(0)

    def _maybe_inject(self, chain: Chain) -> None:
        regs = self.walk.regs if self.walk is not None else None
        if self.injected or regs is None or not regs.translating:
            return
        bufs = chain.buffers
        if len(bufs) >= 3 and not bufs[0].write and bufs[1].write and bufs[-1].write:
            assert self.inject_bad_iova is not None
            b = bufs[1]
            bufs[1] = Buffer(self.inject_bad_iova, b.len, b.write)
            self.injected.append(chain.head)
            log.warning("injected bad IOVA 0x%x into request %d", self.inject_bad_iova, chain.head)

    def _ring_fault(self, q: SplitQueue, exc: Exception) -> None:
        self.stats.ring_faults += 1
        q.broken = True
        log.warning("vring %d stopped: %s", q.index, exc)
        if q.err_fd is not None:
            with contextlib.suppress(OSError):
                os.write(q.err_fd, _EVENTFD_ONE)

    def _call(self, q: SplitQueue) -> None:
        if q.call_fd is not None:
            self.stats.calls += 1
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(q.call_fd, _EVENTFD_ONE)


def _sendall(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """Send a small message completely (briefly blocking: QEMU reads its socket promptly)."""
    fds = fds or []
    try:  # the common case: the whole message fits in the socket buffer at once
        sent = send_with_fds(sock, data, fds)
    except BlockingIOError:
        sent = -1  # nothing (and no fd) went out
    if sent == len(data):
        return
    blocking = sock.getblocking()
    sock.setblocking(True)
    try:
        if sent < 0:
            sent = send_with_fds(sock, data, fds)
        if sent < len(data):
            sock.sendall(data[sent:])  # the fds went with the first part
    finally:
        sock.setblocking(blocking)
