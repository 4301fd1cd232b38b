"""A SIGBUS guard for guest memory the daemon maps from files a client may truncate.

A memfd is sealed against shrinking (``service.memory_seal``), so touching it never faults. A
plain file (QEMU's ``memory-backend-file`` in ``/dev/shm``, a memfd made without
``MFD_ALLOW_SEALING``) cannot be sealed and its owner may truncate it at any moment: the daemon
checks its size before each request, but a truncation between that check and a read of a page
past the new end raises SIGBUS, which by default kills the daemon and every tenant with it.

:class:`SigbusGuard` closes that window. Each watched mapping (one per plain-file region) is
a range of addresses with an owner (the VM). A SIGBUS whose faulting address lies in a watched
range replaces that whole range with anonymous zero pages (``mmap`` with ``MAP_FIXED``), marks
the owner as having lost its memory and returns: the interrupted read restarts and sees zeros.
The daemon refuses the request during which that happened and every later one naming that VM
(``service``: "its memory file shrank"). A SIGBUS anywhere else is what it always was: the
default action is restored and the fault repeats (the process dies).

The handler is a ``ctypes`` callback installed with ``sigaction(SA_SIGINFO)``: a synchronous
fault runs it on the faulting thread, which holds the GIL while it reads guest memory, so it is
Python code called from C like any other callback (it allocates nothing beyond a few ints and
touches no state but its own). It costs nothing per request; only a fault runs it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_SA_SIGINFO = 4  # <signal.h>, Linux
_MAP_FIXED = 0x10


class _Siginfo(ctypes.Structure):
    """The head of ``siginfo_t`` on 64-bit Linux: signo, errno, code, padding, then (for
    SIGBUS/SIGSEGV) ``si_addr``."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("si_addr", ctypes.c_void_p),
    ]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_Siginfo), ctypes.c_void_p)


class _Sigaction(ctypes.Structure):
    """glibc's ``struct sigaction`` on x86-64 / aarch64: handler, 1024-bit mask, flags,
    restorer."""

    _fields_ = [
        ("sa_sigaction", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


def buffer_address(buf: Any) -> int:
    """The address of a writable buffer's first byte (an ``mmap`` or a view of one)."""
    probe = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe  # releases the export: the buffer may be closed later


class SigbusGuard:
    """Watched address ranges and the SIGBUS handler that rescues them (see the module
    docstring). One per process: :func:`guard`."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mmap.restype = ctypes.c_void_p
        self._libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]  # fmt: skip
        self._libc.signal.restype = ctypes.c_void_p
        self._libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self._ranges: dict[int, tuple[int, int, object]] = {}  # token -> start, end, owner
        self._next = 1
        self._callback = _HANDLER(self._on_sigbus)  # kept alive as long as the guard
        self._installed = False
        self._old = _Sigaction()
        self._lock = threading.Lock()

    def _install(self) -> None:
        act = _Sigaction()
        act.sa_sigaction = ctypes.cast(self._callback, ctypes.c_void_p).value
        act.sa_flags = _SA_SIGINFO
        if self._libc.sigaction(signal.SIGBUS, ctypes.byref(act), ctypes.byref(self._old)):
            raise OSError(ctypes.get_errno(), "sigaction(SIGBUS) failed")
        self._installed = True

    def watch(self, buf: Any, size: int, owner: object) -> int:
        """Rescue ``size`` bytes at ``buf`` (a writable mapping) on SIGBUS, blaming ``owner``;
        returns a token for :meth:`unwatch`."""
        start = buffer_address(buf)
        first = start - start % _PAGE
        end = -(-(start + size) // _PAGE) * _PAGE
        with self._lock:
            if not self._installed:
                self._install()
            token = self._next
            self._next += 1
            self._ranges[token] = (first, end, owner)
        return token

    def unwatch(self, token: int) -> None:
        """Forget a range (before its mapping is unmapped)."""
        with self._lock:
            self._ranges.pop(token, None)

    def _on_sigbus(self, signo: int, info: Any, context: int) -> None:
        try:
            if self._rescue(info.contents.si_addr or 0):
                return
        except BaseException:  # nothing may escape a signal handler
            pass
        # not ours (or the rescue failed): the default action; the fault repeats and kills
        self._libc.signal(signal.SIGBUS, None)  # SIG_DFL

    def _rescue(self, addr: int) -> bool:
        for first, end, owner in list(self._ranges.values()):
            if first <= addr < end:
                got = self._libc.mmap(
                    first, end - first, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0,
                )  # fmt: skip
                if got != first:
                    return False
                RESCUED.append(owner)
                return True
        return False


RESCUED: list[object] = []
"""Owners whose mapping a SIGBUS replaced, not yet handled (the service looks after each
request that may have touched guest memory: an empty list costs one truth test)."""
_guard: SigbusGuard | None = None


def guard() -> SigbusGuard:
    """The process's guard (created, not yet installed, on first use)."""
    global _guard
    if _guard is None:
        _guard = SigbusGuard()
    return _guard
