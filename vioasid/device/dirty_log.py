"""Dirty-page logging of the vhost-user back-end during live migration (vhost-user.rst "Migration").

QEMU turns logging on with ``SET_LOG_BASE`` (the log's shared memory fd, ``log_description``
``mmap_size``/``mmap_offset``, protocol feature ``LOG_SHMFD``) and ``SET_FEATURES`` with
``VHOST_F_LOG_ALL`` (bit 26). From then on every guest page the device writes — used ring
entries and indices, data of block reads, status bytes — must have its bit set in the log: one
bit per 4 KiB page of guest-physical address (``VHOST_LOG_PAGE``), bit ``page % 8`` of byte
``page // 8``, as libvhost-user's ``vu_log_page`` does. QEMU syncs (and clears) the bitmap
after every RAM pass and once more after it stopped the device, so a page marked before its
write lands is carried.

:class:`DirtyLog` is the mapped bitmap; :class:`LoggingTranslator` wraps the device's DMA
translator so that every translation for a write marks the guest-physical page it returns (the
device writes guest memory only through translations made for writing). The bitmap is shared
with QEMU, which clears 64-bit chunks atomically; a byte-wide read-modify-write here can only
re-set bits QEMU already collected (one page sent twice), never lose one.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

from vioasid.device.translator import DmaTranslator as Translator
from vioasid.formats.virtio import VHOST_USER_LOG, VirtioFeature

log = logging.getLogger(__name__)

VHOST_F_LOG_ALL = VirtioFeature.LOG_ALL
VHOST_LOG_PAGE = 0x1000
"""Bytes of guest-physical address space per log bit (QEMU ``VHOST_LOG_PAGE``)."""
_PAGE_SHIFT = 12


class DirtyLog:
    """The shared dirty bitmap QEMU handed over with ``SET_LOG_BASE``."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"dirty log of {size} bytes")
        page = mmap.ALLOCATIONGRANULARITY
        base = offset - offset % page
        self._mm = mmap.mmap(fd, size + (offset - base), mmap.MAP_SHARED, offset=base)
        self._view = memoryview(self._mm)[offset - base :]
        self.size = size
        self.pages = size * 8
        self.marked = 0  # marks made (pages may repeat)
        self.beyond = 0  # writes past the end of the log (a log too small for guest memory)

    @classmethod
    def from_message(cls, payload: bytes, fd: int) -> DirtyLog:
        """Map the log of a ``SET_LOG_BASE`` payload (``log_description``) and its fd."""
        size, offset = VHOST_USER_LOG.packer.unpack_from(payload)
        return cls(fd, size, offset)

    def mark(self, gpa: int, length: int = 1) -> None:
        """Set the bits of every 4 KiB page of ``[gpa, gpa + length)``."""
        if length <= 0:
            return
        view = self._view
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        for page in range(first, last + 1):
            byte = page >> 3
            if byte >= self.size:
                self.beyond += 1
                continue
            view[byte] |= 1 << (page & 7)
            self.marked += 1

    def is_marked(self, gpa: int) -> bool:
        page = gpa >> _PAGE_SHIFT
        byte = page >> 3
        return byte < self.size and bool(self._view[byte] & (1 << (page & 7)))

    def close(self) -> None:
        self._view.release()
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the GC unmaps it later
            log.debug("dirty log still referenced at close")


class DirtyLogging:
    """The back-end's logging state: the mapped log (``SET_LOG_BASE``) and whether the
    front-end asked for logging (``VHOST_F_LOG_ALL`` in ``SET_FEATURES``)."""

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.enabled = False
        self.marked_before = 0  # marks made in earlier logs
        self.logs_mapped = 0  # SET_LOG_BASE messages (QEMU sends one per migration start)
        self.enables = 0  # times the front-end turned logging on (VHOST_F_LOG_ALL)

    @property
    def marked(self) -> int:
        """Pages marked dirty so far, over every log this back-end was given."""
        return self.marked_before + (self.log.marked if self.log is not None else 0)

    @property
    def active(self) -> DirtyLog | None:
        """The log to mark now, or None."""
        return self.log if self.enabled else None

    def set_log(self, dlog: DirtyLog) -> None:
        """A new log replaces the old one (QEMU resizes the log when guest memory changes)."""
        if self.log is not None:
            self.marked_before += self.log.marked
            self.log.close()
        self.log = dlog
        self.logs_mapped += 1
        log.info("dirty log mapped: %d bytes (%d pages)", dlog.size, dlog.pages)

    def set_features(self, features: int) -> None:
        enabled = bool(features & (1 << VHOST_F_LOG_ALL))
        if enabled != self.enabled:
            log.info("dirty logging %s", "on" if enabled else "off")
            self.enables += int(enabled)
        self.enabled = enabled

    def wrap(self, inner: Translator) -> LoggingTranslator:
        return LoggingTranslator(inner, self)

    def close(self) -> None:
        if self.log is not None:
            self.marked_before += self.log.marked
            self.log.close()
            self.log = None
        self.enabled = False


class LoggingTranslator:
    """A DMA translator that marks each page translated for writing in the dirty log while
    logging is on; the translation itself is the wrapped translator's."""

    def __init__(self, inner: Translator, state: DirtyLogging) -> None:
        self.inner = inner
        self.state = state

    @property
    def generation(self) -> int:
        return self.inner.generation

    def invalidated_since(self, generation: int, ranges: list[tuple[int, int]]) -> bool:
        return self.inner.invalidated_since(generation, ranges)

    async def translate(self, iova: int, write: bool, pasid: int | None = None) -> int:
        gpa = await self.inner.translate(iova, write, pasid)
        if write:
            dlog = self.state.active
            if dlog is not None:
                dlog.mark(gpa)
        return gpa

    def spans(
        self, iova: int, length: int, write: bool, pasid: int | None = None
    ) -> list[tuple[int, int]] | None:
        out = self.inner.spans(iova, length, write, pasid)
        if write and out:
            dlog = self.state.active
            if dlog is not None:
                for gpa, n in out:
                    dlog.mark(gpa, n)
        return out

    def spans_many(
        self, bufs: Sequence[tuple[int, int]], write: bool, pasid: int | None = None
    ) -> list[list[tuple[int, int]]]:
        out = self.inner.spans_many(bufs, write, pasid)
        if write and out:
            dlog = self.state.active
            if dlog is not None:
                for spans in out:
                    for gpa, n in spans:
                        dlog.mark(gpa, n)
        return out


def open_log(payload: bytes, fds: list[int]) -> DirtyLog:
    """The log of a ``SET_LOG_BASE`` message (takes and closes the fd after mapping)."""
    if not fds:
        raise ValueError("SET_LOG_BASE without a log fd (LOG_SHMFD)")
    fd = fds.pop(0)
    try:
        return DirtyLog.from_message(payload, fd)
    finally:
        os.close(fd)


__all__ = [
    "VHOST_F_LOG_ALL",
    "VHOST_LOG_PAGE",
    "DirtyLog",
    "DirtyLogging",
    "LoggingTranslator",
    "open_log",
]
