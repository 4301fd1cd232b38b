"""virtio-blk requests (virtio 1.2 §5.2.6) served from a raw backing file.

:class:`BlkDevice` takes a popped :class:`Chain`, translates every buffer first (a DMA fault
fails the request with ``VIRTIO_BLK_S_IOERR`` before any byte is read or written), then does the
file I/O straight into/out of guest memory views (inside the DMA gate: ``Dma.transfer``). The
status byte is the last device-writable byte; the header the first 16 device-readable bytes (no
framing assumed, §2.6.4).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from vioasid.device.translator import DmaFault
from vioasid.formats.virtio import (
    BLK_CONFIG,
    BLK_ID_BYTES,
    BLK_REQ_HDR,
    BLK_SECTOR_SIZE,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from vioasid.model.memory import MemoryAccessError
from vioasid.vhost_user.timing import PhaseTimes
from vioasid.vhost_user.virtqueue import Buffer, Chain, Dma

log = logging.getLogger(__name__)

SEG_MAX = 126  # queue size 128 minus header and status descriptors

BLK_FEATURES = (1 << BlkFeature.SEG_MAX) | (1 << BlkFeature.BLK_SIZE) | (1 << BlkFeature.FLUSH)

_IoOp = Callable[[int, Sequence[memoryview], int], int]
_READ: tuple[_IoOp, str] = (os.preadv, "short read from backing file")
_WRITE: tuple[_IoOp, str] = (os.pwritev, "short write to backing file")


@dataclass
class BlkStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    ioerr: int = 0
    unsupported: int = 0


class BlkDevice:
    """A raw disk image exposed as a virtio-blk device."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, serial: str = ""):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.capacity = self.size // BLK_SECTOR_SIZE
        self.serial = (serial or "vioasid-" + os.path.basename(self.path))[:BLK_ID_BYTES]
        self.stats = BlkStats()
        self.times = PhaseTimes()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def features(self) -> int:
        return BLK_FEATURES | ((1 << BlkFeature.RO) if self.readonly else 0)

    def config(self, num_queues: int = 1) -> bytes:
        """``struct virtio_blk_config`` for GET_CONFIG."""
        return BLK_CONFIG.build(
            capacity=self.capacity,
            seg_max=SEG_MAX,
            blk_size=BLK_SECTOR_SIZE,
            num_queues=num_queues,
        )

    async def handle(self, dma: Dma, chain: Chain) -> int:
        """Serve one request; returns the number of bytes written into device-writable buffers.

        A fault on the header or the status byte leaves nothing to report to: the request is
        returned with 0 bytes written (the guest driver sees an I/O error for it).
        """
        readable, writable = chain.readable, chain.writable
        if not writable or writable[-1].len < 1:
            self.stats.ioerr += 1
            log.warning("virtio-blk request %d without a status byte", chain.head)
            return 0
        status_buf = writable[-1]
        status_iova = status_buf.addr + status_buf.len - 1
        data_in = _trim_tail(writable, 1)
        try:
            hdr = await dma.read(*_first_bytes(readable, BLK_REQ_HDR.size))
        except (DmaFault, MemoryAccessError, ValueError):
            self.stats.ioerr += 1
            return await self._status(dma, status_iova, BlkStatus.IOERR, 0)
        rtype, _reserved, sector = BLK_REQ_HDR.packer.unpack(hdr)
        data_out = _skip_head(readable, BLK_REQ_HDR.size)
        try:
            if rtype == BlkType.IN:
                status, n = await self._move(dma, sector, data_in, True)
            elif rtype == BlkType.OUT:
                status, _ = await self._move(dma, sector, data_out, False)
                n = 0
            elif rtype == BlkType.FLUSH:
                self.stats.flushes += 1
                os.fdatasync(self.fd)
                status, n = BlkStatus.OK, 0
            elif rtype == BlkType.GET_ID:
                self.stats.get_ids += 1
                status, n = await self._get_id(dma, data_in)
            else:
                self.stats.unsupported += 1
                status, n = BlkStatus.UNSUPP, 0
        except (DmaFault, MemoryAccessError):
            self.stats.ioerr += 1
            status, n = BlkStatus.IOERR, 0
        except OSError as exc:
            log.warning("virtio-blk I/O error: %s", exc)
            self.stats.ioerr += 1
            status, n = BlkStatus.IOERR, 0
        return await self._status(dma, status_iova, status, n)

    async def _status(self, dma: Dma, iova: int, status: int, n: int) -> int:
        try:
            await dma.write(iova, bytes([status]))
        except (DmaFault, MemoryAccessError):
            return n
        return n + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        if length % BLK_SECTOR_SIZE:
            return False
        return sector * BLK_SECTOR_SIZE + length <= self.size

    async def _move(
        self, dma: Dma, sector: int, bufs: list[Buffer], to_guest: bool
    ) -> tuple[BlkStatus, int]:
        """An IN request (``to_guest``: the disk's bytes into the guest's buffers) or an OUT
        one; the status and the bytes moved."""
        total = sum(b.len for b in bufs)
        if (self.readonly and not to_guest) or not self._range_ok(sector, total):
            self.stats.ioerr += 1
            return BlkStatus.IOERR, 0
        op, short = _READ if to_guest else _WRITE
        t0 = time.perf_counter()
        # everything translated first (a fault touches nothing), the I/O inside the gate
        t1 = await dma.transfer(bufs, to_guest, partial(self._io, op, sector, short))
        self._timed(t0, t1, time.perf_counter())
        if to_guest:
            self.stats.reads += 1
            self.stats.bytes_read += total
        else:
            self.stats.writes += 1
            self.stats.bytes_written += total
        return BlkStatus.OK, total

    def _io(self, op: _IoOp, sector: int, short: str, views: list[memoryview]) -> float:
        """The file I/O of one request (inside the DMA gate); returns when it started."""
        t1 = time.perf_counter()
        self._transfer(op, views, sector * BLK_SECTOR_SIZE, short)
        return t1

    def _timed(self, t0: float, t1: float, t2: float) -> None:
        self.times.add("translate", t1 - t0)
        self.times.add("io", t2 - t1)

    def _transfer(self, op: _IoOp, views: list[memoryview], off: int, short: str) -> None:
        """Run ``os.preadv``/``os.pwritev`` over ``views`` at ``off`` until all bytes moved."""
        done = 0
        while views:
            n = op(self.fd, views[:1024], off + done)
            if n <= 0:
                raise OSError(short)
            done += n
            views = _advance(views, n)

    async def _get_id(self, dma: Dma, bufs: list[Buffer]) -> tuple[BlkStatus, int]:
        data = self.serial.encode()[:BLK_ID_BYTES].ljust(BLK_ID_BYTES, b"\0")
        pos = 0
        for b in bufs:
            if pos >= len(data):
                break
            chunk = data[pos : pos + b.len]
            await dma.write(b.addr, chunk)
            pos += len(chunk)
        return BlkStatus.OK, pos


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = list(views)
    while n > 0 and out:
        if len(out[0]) <= n:
            n -= len(out[0])
            out.pop(0)
        else:
            out[0] = out[0][n:]
            n = 0
    return out


def _first_bytes(bufs: list[Buffer], n: int) -> tuple[int, int]:
    """(iova, n) of the first ``n`` readable bytes; they must sit in one buffer."""
    if not bufs or bufs[0].len < n:
        # A header split across descriptors is legal but no Linux driver does it.
        raise ValueError("request header split across descriptors")
    return bufs[0].addr, n


def _skip_head(bufs: list[Buffer], n: int) -> list[Buffer]:
    out: list[Buffer] = []
    for i, b in enumerate(bufs):
        if n >= b.len:
            n -= b.len
            continue
        out.append(Buffer(b.addr + n, b.len - n, b.write))
        out += bufs[i + 1 :]  # the rest whole
        break
    return out


def _trim_tail(bufs: list[Buffer], n: int) -> list[Buffer]:
    out = list(bufs)
    while n > 0 and out:
        last = out.pop()
        if last.len > n:
            out.append(Buffer(last.addr, last.len - n, last.write))
            n = 0
        else:
            n -= last.len
    return out
