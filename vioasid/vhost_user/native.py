"""The front-end socket's reader thread in C (``iotlb_reader.c``), with the Python one as fallback.

Why C (docs/performance.md): in strict mode every guest unmap is a synchronous IOTLB
invalidation round trip, and a Python reader thread must take the GIL to answer it, which the
data path's Python code holds: measured on a guest, its round trips got *slower* than the event
loop's. The C thread answers without the GIL. It is the same contract as
:class:`vioasid.vhost_user.iotlb_reader.FrontendReader` (see there for the correctness
argument) and the same tests run against both.

The library is compiled at first use with the system C compiler into the cache directory
(``$XDG_CACHE_HOME/vioasid/native``, keyed by the source's hash) and loaded with ``ctypes``.
``VIOASID_NATIVE=0``, a missing compiler or a failed build: :func:`load` returns None and the
back-end uses the Python reader thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vioasid.formats.virtio import VHOST_USER_HDR, VHOST_USER_IOTLB
from vioasid.vhost_user import iotlb_reader as py
from vioasid.vhost_user.timing import PhaseTimes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("iotlb_reader.c")
_lib: ctypes.CDLL | None = None
_tried = False


_U32_FIELDS = (
    "msg_bytes",
    "request",
    "version",
    "need_reply",
    "payload",
    "req_off",
    "flags_off",
    "size_off",
    "iova_off",
    "isize_off",
    "type_off",
    "invalidate",
    "ack_len",
)
_LAYOUT_FIELDS: list[tuple[str, Any]] = [(n, ctypes.c_uint32) for n in _U32_FIELDS]
_LAYOUT_FIELDS += [("ack", ctypes.c_ubyte * 64)]


class _Layout(ctypes.Structure):
    """``struct layout`` of iotlb_reader.c: where the C thread finds what it checks."""

    _fields_ = _LAYOUT_FIELDS


def _layout() -> _Layout:
    h, p = VHOST_USER_HDR.offsets, VHOST_USER_IOTLB.offsets
    base = VHOST_USER_HDR.size
    lay = _Layout(
        msg_bytes=py.IOTLB_MSG_BYTES,
        request=py.IOTLB_REQUEST,
        version=py.HDR_VERSION,
        need_reply=py.NEED_REPLY,
        payload=VHOST_USER_IOTLB.size,
        req_off=h["request"],
        flags_off=h["flags"],
        size_off=h["size"],
        iova_off=base + p["iova"],
        isize_off=base + p["size"],
        type_off=base + p["type"],
        invalidate=py.IOTLB_INVALIDATE,
        ack_len=len(py.IOTLB_ACK),
    )
    lay.ack[: len(py.IOTLB_ACK)] = list(py.IOTLB_ACK)
    return lay


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vioasid" / "native"


def _build(src: Path) -> Path | None:
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = _cache_dir() / f"iotlb_reader-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the Python reader thread answers IOTLB invalidations")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(tmp_out), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            log.warning("building %s failed: %s", src.name, res.stderr.strip()[:500])
            return None
        os.replace(tmp_out, out)  # atomic: a concurrent build loses nothing
    return out


def load() -> ctypes.CDLL | None:
    """The compiled reader (built once per source version), or None (use the Python one)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("VIOASID_NATIVE", "1") == "0":
        return None
    try:
        path = _build(SOURCE)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native IOTLB reader unavailable: %s", exc)
        return None
    vp, u64p, dp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_double)
    lib.vr_start.restype = vp
    lib.vr_start.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Layout)]
    lib.vr_set_acks.argtypes = [vp, ctypes.c_int]
    lib.vr_handled.argtypes = [vp, ctypes.c_uint64, ctypes.c_int]
    lib.vr_enter.argtypes = [vp, u64p]
    lib.vr_enter.restype = ctypes.c_int
    lib.vr_exit.argtypes = [vp]
    lib.vr_pending.argtypes = [vp]
    lib.vr_pending.restype = ctypes.c_uint
    lib.vr_stats.argtypes = [vp, u64p, dp, u64p, dp, u64p]
    lib.vr_join.argtypes = [vp]
    lib.vr_free.argtypes = [vp]
    lib.vr_ring_size.restype = ctypes.c_int
    lib.vr_tid.argtypes = [vp]
    lib.vr_tid.restype = ctypes.c_int
    _lib = lib
    return lib


class NativeReader:
    """The C reader thread on ``conn``; forwards everything else to ``deliver`` on ``loop``.

    Also the DMA gate (``with reader:``) of the data path while it runs: before it starts and
    after it stops, :attr:`gate` falls back to the back-end's Python gate.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        conn: socket.socket,
        loop: asyncio.AbstractEventLoop,
        apply: Callable[[int, int], None],
        flush: Callable[[], None],
        deliver: Callable[[bytes | memoryview, list[int]], bool],
        end: Callable[[], None],
        acks: bool,
        times: PhaseTimes,
        applied: Callable[[], object] | None = None,
        apply_many: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> None:
        self.lib = lib
        self.conn = conn
        self.loop = loop
        self._apply = apply
        self._apply_many = apply_many  # all that vr_enter took in one call, when given
        self._flush = flush
        self.deliver = deliver
        self.end = end
        self.applied = applied  # called after posted invalidations were applied (IQ follower)
        self.times = times
        self.invalidations = 0
        self._out = (ctypes.c_uint64 * (2 * lib.vr_ring_size()))()
        self._rx, self._tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._rx.setblocking(False)
        self._layout = _layout()
        self._acks = acks
        self._handle: int | None = None
        self._drain_scheduled = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> bool:
        self.conn.setblocking(True)
        h = self.lib.vr_start(self.conn.fileno(), self._tx.fileno(), ctypes.byref(self._layout))
        if not h:
            self._rx.close()
            self._tx.close()
            return False
        self._handle = h
        self.lib.vr_set_acks(h, int(self._acks))
        self.loop.add_reader(self._rx.fileno(), self._on_readable)
        return True

    def stop(self) -> None:
        """Stop the thread (shutdown of the socket) and account its figures; the caller closes
        ``conn``. Invalidations still posted are applied."""
        h, self._handle = self._handle, None
        if h is None:
            return
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._rx.fileno())
        for sock in (self.conn, self._rx):  # wakes the thread in recvmsg or in a full sendmsg
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.lib.vr_join(h)  # ctypes releases the GIL; the thread never needs it
        self._take(h)
        self._stats(h)
        self.lib.vr_free(h)
        self._rx.close()
        self._tx.close()

    def set_acks(self, acks: bool) -> None:
        self._acks = acks
        if self._handle is not None:
            self.lib.vr_set_acks(self._handle, int(acks))

    def thread_id(self, wait: float = 1.0) -> int | None:
        """The reader thread's id (for CPU placement), waiting up to ``wait`` s for it to run."""
        deadline = time.monotonic() + wait
        while self._handle is not None:
            tid = int(self.lib.vr_tid(self._handle))
            if tid or time.monotonic() >= deadline:
                return tid or None
            time.sleep(0.0005)
        return None

    # -- the gate ----------------------------------------------------------------------------
    def _apply_taken(self, k: int) -> None:
        """Apply the ``k`` invalidations vr_enter took (-1: the ring overflowed: all)."""
        if k < 0:
            self._flush()
        elif k > 1 and self._apply_many is not None:
            flat = iter(self._out[: 2 * k])
            self._apply_many(list(zip(flat, flat, strict=True)))
        else:
            out = self._out
            for i in range(0, 2 * k, 2):
                self._apply(out[i], out[i + 1])
        if self.applied is not None:
            self.applied()

    def _take(self, h: int) -> None:
        """Apply what the thread posted, taking the lock for it."""
        k = self.lib.vr_enter(h, self._out)
        try:
            if k:
                self._apply_taken(k)
        finally:
            self.lib.vr_exit(h)

    def __enter__(self) -> None:
        h = self._handle
        if h is None:
            return
        k = self.lib.vr_enter(h, self._out)
        if not k:
            return
        try:
            self._apply_taken(k)
        except BaseException:
            self.lib.vr_exit(h)
            raise

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self.lib.vr_exit(self._handle)

    @property
    def pending(self) -> int:
        return int(self.lib.vr_pending(self._handle)) if self._handle is not None else 0

    def drain(self) -> None:
        h = self._handle
        if h is not None:
            self._take(h)

    # -- forwarded messages ------------------------------------------------------------------
    def _on_readable(self) -> None:
        h = self._handle
        if h is None:
            return
        got = py.read_ready(self._rx, self.end)
        if got is None:
            return
        data, fds = got
        if not data:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.end()
            return
        partial = False
        try:
            partial = bool(self.deliver(data, fds))
        finally:
            if self._handle is not None:
                self.lib.vr_handled(self._handle, len(data), int(partial))
        if self._handle is not None and self.lib.vr_pending(self._handle) >= py.DRAIN_AT:
            self.drain()

    def _stats(self, h: int) -> None:
        n, mn, bn = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
        ms, bs = ctypes.c_double(), ctypes.c_double()
        self.lib.vr_stats(
            h,
            ctypes.byref(n),
            ctypes.byref(ms),
            ctypes.byref(mn),
            ctypes.byref(bs),
            ctypes.byref(bn),
        )
        self.invalidations = int(n.value)
        self.times.add("message", ms.value, int(mn.value))
        self.times.add("between_messages", bs.value, int(bn.value))
