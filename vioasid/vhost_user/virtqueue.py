"""Split virtqueues (virtio 1.2 §2.7) read and written through the device's DMA translator.

Every address the ring holds — the rings themselves and each buffer — is an IOVA: :class:`Dma`
translates it page by page (``DeviceTranslator.translate``) and only then touches guest memory,
inside the invalidation gate (``iotlb_reader.InvalidationGate``): invalidations acknowledged by
the socket's reader thread are applied first, and an access whose translation one of them
covered is translated again. A translation failure raises ``DmaFault`` before any byte of the
request is accessed. Guest data
is hostile: chains are bounded by the queue size, indirect tables by their length, and any
out-of-memory pointer ends in a fault, never in an exception escaping or a stray access.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple, Protocol, TypeVar

from vioasid.device.translator import PAGE_MASK, PAGE_SIZE, DmaFault
from vioasid.device.translator import DmaTranslator as Translator
from vioasid.formats.fault import FaultReason
from vioasid.formats.virtio import (
    VRING_AVAIL_HDR,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    VRING_USED_HDR,
)
from vioasid.model.faults import Fault
from vioasid.model.memory import GuestMemory, MemoryAccessError

log = logging.getLogger(__name__)

_DESC = VRING_DESC.packer
_U16 = VRING_AVAIL_HDR.packer  # two u16s; single u16 reads use the idx offset below
_USED_ELEM = VRING_USED_ELEM.packer
AVAIL_IDX_OFF = 2  # offsetof(virtq_avail, idx)
AVAIL_RING_OFF = VRING_AVAIL_HDR.size
USED_IDX_OFF = 2  # offsetof(virtq_used, idx)
USED_RING_OFF = VRING_USED_HDR.size
MAX_QUEUE_SIZE = 32768  # §2.7: queue size is at most 32768
MAX_RETRANSLATIONS = 8  # a request whose buffers keep being invalidated fails after this
YIELD_EVERY = 16  # buffers translated between two turns of the event loop


class Gate(Protocol):
    """Entered around every access to guest memory (``iotlb_reader.InvalidationGate``)."""

    def __enter__(self) -> None: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _NoGate:
    """The gate of a device whose invalidations all arrive on the loop's thread: the checks
    alone keep the accesses right."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


T = TypeVar("T")


class ChainError(Exception):
    """A malformed descriptor chain (loop, bad index, bad indirect table)."""


class Dma:
    """Guest memory accessed by IOVA through a translator.

    Every access happens inside ``gate`` after a check that no invalidation applied since the
    translation began covers it (then it is translated again, at most ``MAX_RETRANSLATIONS``
    times): with the socket read by another thread, an invalidation may be acknowledged at any
    moment, and the gate makes the access either finish before the ack or see it.
    """

    def __init__(
        self,
        memory: Callable[[], GuestMemory | None],
        translator: Translator,
        gate: Gate | None = None,
    ) -> None:
        self._memory = memory
        self.translator = translator
        self.gate: Gate = gate if gate is not None else _NoGate()

    def _mem(self) -> GuestMemory:
        mem = self._memory()
        if mem is None:
            raise MemoryAccessError(0, 0)
        return mem

    def _fresh(self, generation: int, ranges: list[tuple[int, int]]) -> bool:
        """No invalidation applied since ``generation`` covers ``ranges`` (inside the gate)."""
        tr = self.translator
        return tr.generation == generation or not tr.invalidated_since(generation, ranges)

    def _stale(self, iova: int, write: bool) -> DmaFault:
        sid = int(getattr(self.translator, "sid", 0))
        return DmaFault(
            Fault(
                FaultReason.PAGING_ENTRY_INV,
                iova,
                sid,
                None,
                write,
                "buffers invalidated while being translated, again and again",
            )
        )

    async def transfer(
        self, bufs: list[Buffer], write: bool, access: Callable[[list[memoryview]], T]
    ) -> T:
        """``access(views)`` over every buffer of a request, all translated first (a fault
        touches nothing), called inside the gate once no invalidation covers them.

        Every ``YIELD_EVERY`` buffers the event loop gets a turn (QEMU's messages; without the
        reader thread, strict mode's invalidations wait on it with the guest's vCPU). If an
        invalidation covering one of the buffers came in meanwhile (there, while a miss waited
        on QEMU or on the registers, or from the reader thread), the buffers are translated
        again: no access uses a translation made before its invalidation.
        """
        tr = self.translator
        ranges = [(b.addr, b.len) for b in bufs]
        for _ in range(MAX_RETRANSLATIONS):
            gen = tr.generation
            views: list[memoryview] = []
            for start in range(0, len(ranges), YIELD_EVERY):
                if start:
                    await asyncio.sleep(0)
                await self._views_into(views, ranges[start : start + YIELD_EVERY], write)
            with self.gate:
                if self._fresh(gen, ranges):
                    return access(views)
        raise self._stale(bufs[0].addr if bufs else 0, write)

    async def _views_into(
        self, views: list[memoryview], ranges: list[tuple[int, int]], write: bool
    ) -> None:
        """The views of the buffers ``ranges`` appended to ``views``, as :meth:`views` gives
        them buffer after buffer: translated together (``spans_many``: the misses in one walk),
        a buffer whose miss must wait on the awaited path alone, then the rest together again."""
        tr = self.translator
        done = 0
        while done < len(ranges):
            rest = ranges[done:] if done else ranges
            got = tr.spans_many(rest, write)
            if got:
                mem = self._mem()
                for (iova, _), spans in zip(rest, got, strict=False):
                    self._extend(views, mem, iova, spans, write)
                done += len(got)
            if done < len(ranges):
                iova, length = ranges[done]
                spans = await self._spans_awaited(iova, length, write)
                self._extend(views, self._mem(), iova, spans, write)
                done += 1

    async def buffer_views(self, bufs: list[Buffer], write: bool) -> list[memoryview]:
        """Views of every buffer of a request, translated and checked as :meth:`transfer` does;
        for a caller on the loop's thread with no other thread acknowledging invalidations
        (the views are used after the gate is left)."""
        return await self.transfer(bufs, write, _same)

    async def views(self, iova: int, length: int, write: bool) -> list[memoryview]:
        """Zero-copy views covering ``[iova, iova + length)``, translated page by page.

        Contiguous guest-physical pages in one region merge into one view. Every page is
        translated before any view is returned (a fault leaves memory untouched). A buffer
        whose misses the resolver answers at once never awaits (``Translator.spans``). The
        views are not checked against invalidations: access them inside the gate after a
        check (:meth:`transfer`, :meth:`read`, :meth:`write`).
        """
        spans = self.translator.spans(iova, length, write)
        if spans is None:
            spans = await self._spans_awaited(iova, length, write)
        out: list[memoryview] = []
        self._extend(out, self._mem(), iova, spans, write)
        return out

    def _extend(
        self,
        out: list[memoryview],
        mem: GuestMemory,
        iova: int,
        spans: list[tuple[int, int]],
        write: bool,
    ) -> None:
        """The views of one buffer's ``spans`` (at ``iova``) appended to ``out``."""
        append = out.append
        for gpa, n in spans:
            r = mem._last  # the common case: the span lies in the region of the last lookup
            if r is not None and r.gpa <= gpa and gpa + n <= r.gpa + r.size and n > 0:
                off = gpa - r.gpa
                append(r.buf[off : off + n])
                continue
            try:
                out.extend(_region_views(mem, gpa, n))
            except MemoryAccessError as exc:
                sid = int(getattr(self.translator, "sid", 0))
                raise DmaFault(
                    Fault(FaultReason.ADDR_BEYOND_MGAW, iova, sid, None, write, str(exc))
                ) from None

    async def _spans_awaited(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        pos = iova
        end = iova + length
        while pos < end:
            n = min(end - pos, PAGE_SIZE - (pos & PAGE_MASK))
            gpa = await self.translator.translate(pos, write)
            if spans and spans[-1][0] + spans[-1][1] == gpa:
                spans[-1] = (spans[-1][0], spans[-1][1] + n)
            else:
                spans.append((gpa, n))
            pos += n
        return spans

    async def read(self, iova: int, length: int) -> bytes:
        """A copy of ``[iova, iova + length)`` (a copy: guest data may change under a view)."""
        for _ in range(MAX_RETRANSLATIONS):
            gen = self.translator.generation
            views = await self.views(iova, length, False)
            with self.gate:
                if self._fresh(gen, [(iova, length)]):
                    return b"".join(bytes(v) for v in views)
        raise self._stale(iova, False)

    async def write(self, iova: int, data: bytes) -> None:
        for _ in range(MAX_RETRANSLATIONS):
            gen = self.translator.generation
            views = await self.views(iova, len(data), True)
            with self.gate:
                if self._fresh(gen, [(iova, len(data))]):
                    pos = 0
                    for v in views:
                        v[:] = data[pos : pos + len(v)]
                        pos += len(v)
                    return
        raise self._stale(iova, True)

    async def _u16_at(self, iova: int, write: bool) -> tuple[int, memoryview, int]:
        """(generation before the translation, region buffer, offset) of a u16 at ``iova``."""
        if iova & 1:
            raise ChainError("misaligned u16")
        gen = self.translator.generation
        gpa = await self.translator.translate(iova, write)
        r = self._mem().region_of(gpa, 2)
        return gen, r.buf, gpa - r.gpa

    async def read_u16(self, iova: int) -> int:
        for _ in range(MAX_RETRANSLATIONS):
            gen, buf, off = await self._u16_at(iova, False)
            with self.gate:
                if self._fresh(gen, [(iova, 2)]):
                    return int.from_bytes(buf[off : off + 2], "little")
        raise self._stale(iova, False)

    async def write_u16(self, iova: int, value: int) -> None:
        for _ in range(MAX_RETRANSLATIONS):
            gen, buf, off = await self._u16_at(iova, True)
            with self.gate:
                if self._fresh(gen, [(iova, 2)]):
                    buf[off : off + 2] = value.to_bytes(2, "little")
                    return
        raise self._stale(iova, True)


def _same(views: list[memoryview]) -> list[memoryview]:
    return views


async def _table_copy(dma: Dma, table: int, entries: int) -> bytes | None:
    """The descriptor table copied in one access (then each descriptor is unpacked from the
    copy: one translation per table, not per descriptor, and the guest cannot change a
    descriptor under the walk), or None (descriptors are read one by one, as for a table
    beyond 64 KiB or one not wholly mapped)."""
    if entries * VRING_DESC.size > 1 << 16:
        return None
    try:
        return await dma.read(table, entries * VRING_DESC.size)
    except (DmaFault, MemoryAccessError):
        return None  # part of it unreadable: the descriptors actually used decide


def _region_views(mem: GuestMemory, gpa: int, n: int) -> list[memoryview]:
    r = mem._last  # the common case: the span lies in the region of the last lookup
    if r is not None and r.gpa <= gpa and gpa + n <= r.gpa + r.size and n > 0:
        off = gpa - r.gpa
        return [r.buf[off : off + n]]
    out: list[memoryview] = []
    while n > 0:
        r = mem.region_of(gpa, 1)
        take = min(n, r.end - gpa)
        out.append(mem.view(gpa, take))
        gpa += take
        n -= take
    return out


class Buffer(NamedTuple):
    """One descriptor's buffer: IOVA, length, device-writable or not (a tuple: one is made
    per descriptor on the hot path)."""

    addr: int
    len: int
    write: bool


@dataclass
class Chain:
    """A descriptor chain popped from the available ring."""

    head: int
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.write]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.write]


@dataclass
class SplitQueue:
    """Device-side state of one split virtqueue (what the SET_VRING_* messages set)."""

    index: int
    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    last_avail: int = 0  # next avail ring slot to consume (free-running u16)
    used_idx: int = 0  # next used ring slot (free-running u16)
    enabled: bool = False
    started: bool = False  # addresses set and kick fd present
    broken: bool = False  # a ring access faulted: stop until the driver restarts it
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    popped: int = 0

    @property
    def ready(self) -> bool:
        return self.enabled and self.num > 0 and not self.broken and self.desc != 0

    async def avail_idx(self, dma: Dma) -> int:
        return await dma.read_u16(self.avail + AVAIL_IDX_OFF)

    async def pop(self, dma: Dma) -> Chain | None:
        """The next available chain, or None when the ring is empty."""
        idx = await self.avail_idx(dma)
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise ChainError(f"avail idx {idx} is {pending} ahead of {self.last_avail}")
        slot = self.last_avail % self.num
        head = await dma.read_u16(self.avail + AVAIL_RING_OFF + 2 * slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        chain = Chain(head)
        await self._walk(dma, chain, head)
        return chain

    async def _walk(self, dma: Dma, chain: Chain, head: int) -> None:
        if head >= self.num:
            raise ChainError(f"head {head} >= queue size {self.num}")
        table, size, idx = self.desc, self.num, head
        budget = self.num  # §2.7.5.3.1/§2.7.5.2: a chain never exceeds the queue size
        indirect = False
        tview = await _table_copy(dma, table, size)
        while True:
            if budget <= 0:
                raise ChainError("descriptor chain loops or is longer than the queue")
            budget -= 1
            if tview is not None:
                addr, length, flags, nxt = _DESC.unpack_from(tview, 16 * idx)
            else:
                raw = await dma.read(table + 16 * idx, VRING_DESC.size)
                addr, length, flags, nxt = _DESC.unpack(raw)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError("nested indirect descriptor")
                if flags & VRING_DESC_F_NEXT or length % 16 or length == 0:
                    raise ChainError("bad indirect descriptor")
                table, size, idx = addr, length // 16, 0
                budget = min(size, self.num)  # a whole chain never exceeds the queue size
                indirect = True
                tview = await _table_copy(dma, table, size)
                if tview is not None:  # the whole table at hand: no await until the end
                    _walk_indirect(chain.buffers, tview, size, budget)
                    return
                continue
            chain.buffers.append(Buffer(addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return
            if nxt >= size:
                raise ChainError(f"next {nxt} >= table size {size}")
            idx = nxt

    async def push(self, dma: Dma, head: int, written: int) -> None:
        """Return a chain to the driver: used elem, then the used idx (§2.7.8.2)."""
        slot = self.used_idx % self.num
        await dma.write(self.used + USED_RING_OFF + 8 * slot, _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        await dma.write_u16(self.used + USED_IDX_OFF, self.used_idx)


_INDIRECT, _NEXT, _WRITE = VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
_FIELDS = len(VRING_DESC.names)  # addr, len, flags, next: their places in an unpacked tuple
_ADDR, _LEN, _FLAGS, _NXT = (VRING_DESC.names.index(n) for n in ("addr", "len", "flags", "next"))


@functools.cache
def _table_unpacker(n: int) -> Callable[[bytes], tuple[int, ...]]:
    """``unpack`` of ``n`` consecutive descriptors (the VRING_DESC layout repeated): their
    fields in one flat tuple."""
    return struct.Struct(_DESC.format[0] + _DESC.format[1:] * n).unpack


@functools.cache
def _successors(n: int) -> tuple[int, ...]:
    return tuple(range(1, n))


def _walk_indirect(out: list[Buffer], table: bytes, size: int, budget: int) -> None:
    """The chain of an indirect table copied whole (``size`` descriptors), appended to ``out``:
    ``SplitQueue._walk``'s loop over it, every check the same (at most ``budget`` descriptors,
    no nested indirect, next inside the table), the table unpacked at once. A table that is
    one chain in order (what Linux writes: NEXT and next = i + 1 on all but the last, no
    INDIRECT anywhere, no longer than the budget) is taken whole without a step per
    descriptor; any other goes through the loop."""
    flat = _table_unpacker(size)(table)
    flags, nexts = flat[_FLAGS::_FIELDS], flat[_NXT::_FIELDS]
    if (
        size <= budget
        and not flags[-1] & (_NEXT | _INDIRECT)
        and nexts[:-1] == _successors(size)
        and all(f & (_NEXT | _INDIRECT) == _NEXT for f in set(flags[:-1]))
    ):
        writes = map(bool, map(operator.and_, flags, itertools.repeat(_WRITE)))
        out += map(tuple.__new__, itertools.repeat(Buffer),
                   zip(flat[_ADDR::_FIELDS], flat[_LEN::_FIELDS], writes, strict=True))  # fmt: skip
        return
    append = out.append
    new = tuple.__new__
    idx = 0
    while True:
        if budget <= 0:
            raise ChainError("descriptor chain loops or is longer than the queue")
        budget -= 1
        k = idx * _FIELDS
        addr, length, f, nxt = flat[k + _ADDR], flat[k + _LEN], flags[idx], nexts[idx]
        if f & _INDIRECT:
            raise ChainError("nested indirect descriptor")
        append(new(Buffer, (addr, length, bool(f & _WRITE))))
        if not f & _NEXT:
            return
        if nxt >= size:
            raise ChainError(f"next {nxt} >= table size {size}")
        idx = nxt
