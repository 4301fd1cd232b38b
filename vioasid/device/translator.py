"""A device's DMA translator: (PASID, IOVA) → guest-physical, in 4 KiB pages.

With ``VIRTIO_F_ACCESS_PLATFORM`` every ring and buffer address a device sees is an IOVA; the
PASID DMA function tags its requests with a PASID too. :class:`DeviceTranslator` answers
``translate(iova, write, pasid)`` and, for whole buffers, ``spans(iova, length, write, pasid)``
from its own IOTLB (a dict keyed by (PASID, 4 KiB page)) or, on a miss, from a *resolver*:

* :class:`WalkResolver` — vioasid walks the guest's own VT-d tables (root → context → PASID →
  first/second stage) in guest memory with ``vioasid.model.walker``. While the guest has DMA
  translation off (GSTS.TES = 0: SeaBIOS) an IOVA is the guest-physical address itself.
* :class:`QemuResolver` — asks QEMU: a ``BACKEND_IOTLB_MSG`` miss on the backend channel,
  answered by an ``IOTLB_MSG`` update on the main socket whose ``uaddr`` maps back through the
  ``SET_MEM_TABLE`` regions.
* :class:`EngineResolver` — the engine's nested walk (``vioasid.model.engine.Host.dma``): the
  guest's vPASID through the host's tables to guest-physical, faults queued for the guest.
* :class:`IdentityResolver` — IOVA == GPA (no vIOMMU, or tests).

A resolver that can answer at once (``resolve_now``: the walk, the engine, identity) keeps the
whole buffer on a synchronous path (``spans``: no await per page); one that must wait (QEMU's
miss path, registers not read yet) returns None there and is awaited page by page.

In cross-check mode the translator asks both the own walk and QEMU for every miss and counts
agreements. The IOTLB is dropped on the invalidations QEMU forwards (``IOTLB_MSG`` type 3).
A failed translation raises :class:`DmaFault` carrying the VT-d :class:`Fault`; the caller fails
the request and touches no memory.

Correctness rules the fast path keeps: every entry comes from a walk of the guest's own tables
at the time of the miss (the walker keeps no cache of its own here); an invalidation drops its
pages before the next translation (the caller handles it synchronously, between requests);
permissions are those the walk granted for the access asked (a page resolved for reading is
re-walked before its first write).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import IO, TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from vioasid.formats.fault import FaultReason
from vioasid.formats.registers import GSTS
from vioasid.model.cache import Caches
from vioasid.model.faults import Fault, bdf_str
from vioasid.model.iq import Descriptor, dispatch
from vioasid.model.memory import GuestMemory, MemoryAccessError
from vioasid.model.walker import Walker

if TYPE_CHECKING:
    from vioasid.model.engine import Host

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
GSTS_TES = GSTS.field("TES").mask  # VT-d §10.4.5 GSTS_REG: translation enable status
U64 = (1 << 64) - 1
RTADDR_ADDR_MASK = ~0xFFF & U64
_PASID_SHIFT = 52  # IOTLB key: (PASID + 1) << 52 | page (pages of a 64-bit IOVA fit in 52 bits)
_PAGE_BITS = (1 << _PASID_SHIFT) - 1


def iotlb_key(pasid: int | None, page: int) -> int:
    """The device IOTLB key of a (PASID, 4 KiB page number); PASID None (no PASID) is its own."""
    return ((0 if pasid is None else pasid + 1) << _PASID_SHIFT) | page


class Resolved(NamedTuple):
    """One resolved 4 KiB page: guest-physical page base and permissions (a tuple: one is made
    per page on the hot path)."""

    gpa: int  # page base (4 KiB aligned)
    read: bool
    write: bool
    source: str = ""  # "walk" | "identity" | "qemu"
    pasid: int | None = None  # the PASID the walk used (RID_PASID for requests without one)


class DmaFault(Exception):
    """A DMA to an IOVA the device may not access: the VT-d fault that a real IOMMU raises."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(f"DMA fault {fault.name} at 0x{fault.addr:x} ({bdf_str(fault.sid)})")
        self.fault = fault


class Resolver(Protocol):
    """Resolves a page miss for (PASID, IOVA). ``resolve_now`` answers without waiting or
    returns None when only ``resolve`` can (it may await); ``refresh()`` re-reads whatever
    state the answer depends on."""

    @property
    def name(self) -> str: ...

    async def resolve(
        self, iova: int, write: bool, pasid: int | None = None
    ) -> Resolved | Fault: ...

    def resolve_now(
        self, iova: int, write: bool, pasid: int | None = None
    ) -> Resolved | Fault | None: ...

    async def refresh(self) -> None: ...


@dataclass
class VtdRegs:
    """The two VT-d registers the device's translation depends on."""

    gsts: int = 0
    rtaddr: int = 0

    @property
    def translating(self) -> bool:
        return bool(self.gsts & GSTS_TES)


RegsReader = Callable[[], Awaitable[VtdRegs]]


class IdentityResolver:
    """IOVA == guest-physical address, read-write (no vIOMMU or translation disabled)."""

    name = "identity"

    def __init__(self, memory: Callable[[], GuestMemory | None] | None = None, sid: int = 0):
        self._memory = memory
        self.sid = sid

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        page = iova & ~PAGE_MASK
        mem = self._memory() if self._memory else None
        if mem is not None and not mem.contains(page, PAGE_SIZE):
            return Fault(FaultReason.ADDR_BEYOND_MGAW, iova, self.sid, pasid, write, "not RAM")
        return Resolved(page, True, True, "identity", pasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        return self.resolve_now(iova, write, pasid)

    async def refresh(self) -> None:
        return None


class WalkResolver:
    """vioasid's own walk of the guest's VT-d tables (``vioasid.model.walker.Walker``).

    ``regs`` reads GSTS and RTADDR (QMP ``xp`` on the DMAR registers); it is called lazily on the
    first miss after :meth:`refresh` marked the registers stale (device start, a fault). Until
    then :meth:`resolve_now` returns None and the translator awaits :meth:`resolve`.
    """

    name = "walk"

    def __init__(
        self,
        memory: Callable[[], GuestMemory | None],
        sid: int,
        regs: RegsReader | None,
    ) -> None:
        self._memory = memory
        self.sid = sid
        self._regs_reader = regs
        self.regs: VtdRegs | None = None if regs is not None else VtdRegs()
        self._walker: Walker | None = None
        self._walker_mem: GuestMemory | None = None
        self.regs_reads = 0

    def _get_walker(self, mem: GuestMemory) -> Walker:
        w = self._walker
        if w is None or self._walker_mem is not mem:
            # No walker-side caching: the device IOTLB in front of this resolver is the cache,
            # and it is dropped on exactly the invalidations QEMU forwards.
            w = self._walker = Walker(mem, caches=Caches(enabled=False))
            self._walker_mem = mem
        return w

    async def _ensure_regs(self) -> VtdRegs:
        if self.regs is None:
            assert self._regs_reader is not None
            self.regs = await self._regs_reader()
            self.regs_reads += 1
            log.info(
                "VT-d GSTS=0x%x RTADDR=0x%x (translation %s)",
                self.regs.gsts,
                self.regs.rtaddr,
                "on" if self.regs.translating else "off",
            )
        return self.regs

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        await self._ensure_regs()
        res = self.resolve_now(iova, write, pasid)
        assert res is not None  # the registers are known now
        return res

    def resolve_now(
        self, iova: int, write: bool, pasid: int | None = None
    ) -> Resolved | Fault | None:
        regs = self.regs
        if regs is None:
            return None
        mem = self._memory()
        if mem is None:
            return Fault(FaultReason.ROOT_TABLE_INV, iova, self.sid, pasid, write, "no memory")
        if not regs.gsts & GSTS_TES:
            page = iova & ~PAGE_MASK
            if not mem.contains(page, PAGE_SIZE):
                return Fault(
                    FaultReason.ADDR_BEYOND_MGAW, iova, self.sid, pasid, write, "not guest RAM"
                )
            return Resolved(page, True, True, "identity", pasid)
        w = self._walker if self._walker_mem is mem else None
        if w is None:
            w = self._get_walker(mem)
        try:
            # The walk enforces the access asked: a read-only page faults a write here.
            out = w.translate_fast(regs.rtaddr, self.sid, iova, pasid, write)
        except MemoryAccessError as exc:  # the walker should turn these into faults itself
            return Fault(FaultReason.ROOT_TABLE_INV, iova, self.sid, pasid, write, str(exc))
        return self._resolved(mem, out, iova, write, pasid)

    def resolve_range_now(
        self, iova: int, count: int, write: bool, pasid: int | None = None
    ) -> list[Resolved | Fault] | None:
        """:meth:`resolve_now` for the ``count`` pages from ``iova``'s (``iova + i * 4096``) in
        one range walk (``Walker.translate_range``); the list ends at the first fault."""
        regs = self.regs
        if regs is None:
            return None
        mem = self._memory()
        if mem is None or not regs.gsts & GSTS_TES:
            pages: list[Resolved | Fault] = []
            for a in range(iova, iova + (count << PAGE_SHIFT), PAGE_SIZE):
                res = self.resolve_now(a, write, pasid)
                assert res is not None  # the registers are known
                pages.append(res)
                if type(res) is not Resolved:
                    break
            return pages
        w = self._walker if self._walker_mem is mem else None
        if w is None:
            w = self._get_walker(mem)
        try:
            walked = w.translate_range(regs.rtaddr, self.sid, iova, count, pasid, write)
        except MemoryAccessError as exc:  # the walker should turn these into faults itself
            return [Fault(FaultReason.ROOT_TABLE_INV, iova, self.sid, pasid, write, str(exc))]
        return self._resolved_all(mem, walked, range(iova, iova + (count << PAGE_SHIFT), PAGE_SIZE),
                                  write, pasid)  # fmt: skip

    def resolve_pages_now(
        self, iovas: Sequence[int], write: bool, pasid: int | None = None
    ) -> list[Resolved | Fault] | None:
        """:meth:`resolve_now` for each of ``iovas`` (a request's pages, in any order) in one
        walk that shares the upper levels (``Walker.translate_pages``); the list ends at the
        first fault."""
        regs = self.regs
        if regs is None:
            return None
        mem = self._memory()
        if mem is None or not regs.gsts & GSTS_TES:
            pages: list[Resolved | Fault] = []
            for a in iovas:
                res = self.resolve_now(a, write, pasid)
                assert res is not None  # the registers are known
                pages.append(res)
                if type(res) is not Resolved:
                    break
            return pages
        w = self._walker if self._walker_mem is mem else None
        if w is None:
            w = self._get_walker(mem)
        try:
            walked = w.translate_pages(regs.rtaddr, self.sid, iovas, pasid, write)
        except MemoryAccessError as exc:  # the walker should turn these into faults itself
            a = iovas[0] if iovas else 0
            return [Fault(FaultReason.ROOT_TABLE_INV, a, self.sid, pasid, write, str(exc))]
        return self._resolved_all(mem, walked, iovas, write, pasid)

    def _resolved_all(
        self,
        mem: GuestMemory,
        walked: list[int | Fault],
        iovas: Sequence[int],
        write: bool,
        pasid: int | None,
    ) -> list[Resolved | Fault]:
        """The walk's answers ``walked`` for ``iovas`` as the device IOTLB keeps them, ending at
        the first fault (:meth:`_resolved` each; a page in the region of the one before is
        guest RAM without a lookup)."""
        out: list[Resolved | Fault] = []
        append = out.append
        new, read, lo, hi = tuple.__new__, not write, 0, -1
        for i, o in enumerate(walked):
            page = o & ~PAGE_MASK if type(o) is int else -1
            if lo <= page <= hi:  # in the region of the page before: guest RAM
                append(new(Resolved, (page, read, write, "walk", pasid)))
                continue
            res = self._resolved(mem, o, iovas[i], write, pasid)
            append(res)
            if type(res) is not Resolved:
                break
            r = mem._last
            if r is not None:
                lo, hi = r.gpa, r.gpa + r.size - PAGE_SIZE
        return out

    def _resolved(
        self, mem: GuestMemory, out: int | Fault, iova: int, write: bool, pasid: int | None
    ) -> Resolved | Fault:
        """The walk's answer ``out`` for ``iova`` as the device IOTLB keeps it."""
        if type(out) is not int:
            assert isinstance(out, Fault)
            return out
        page = out & ~PAGE_MASK
        r = mem._last  # the region the last lookup found (nearly always this page's)
        if (r is None or not (r.gpa <= page and page + PAGE_SIZE <= r.gpa + r.size)) and (
            not mem.contains(page, PAGE_SIZE)
        ):
            # Mapped, but not to guest RAM the back-end holds (MMIO, a hole): refuse the DMA.
            return Fault(
                FaultReason.ADDR_BEYOND_MGAW,
                iova,
                self.sid,
                pasid,
                write,
                f"translated to 0x{page:x}, outside the guest RAM regions",
            )
        # Only the access asked is known to be allowed (second stage may grant W without R).
        return Resolved(page, not write, write, "walk", pasid)

    async def refresh(self) -> None:
        if self._regs_reader is not None:
            self.regs = None


@dataclass(eq=False)
class EngineResolver:
    """The engine's translation for one guest device: the guest's vPASID, through the host's
    PASID table and the nested walk (guest first stage, then the VM's second stage), to
    guest-physical. A fault is queued on the VM by the engine (the guest sees it with its
    vPASID) and returned here; a request without PASID uses ``rid_pasid``.

    ``tag_of`` is how the device itself tags a request (its personality, as the issue's seed
    types put it): None, the host converts the vPASID (``Host.dma``: a mediated device, an mdev
    slice whose parent driver converts per RID); a callable vPASID -> tag, the device puts that
    tag on the wire and the request arrives as ``Host.dma_tag(function, tag)`` (a dedicated
    function puts the vPASID itself, a translating one the pPASID of its own table, an ENQCMD
    portal the CPU PASID table's); the callable returning None means the device has no tag for
    that vPASID (a PASID-entry-not-present fault, nothing reaches the IOMMU). ``supervisor``:
    privileged requests (PASID prefix PMR=1)."""

    name: ClassVar[str] = "engine"
    host: Host
    vm: str
    sid: int  # the guest RID
    rid_pasid: int = 0
    _: KW_ONLY
    tag_of: Callable[[int], int | None] | None = None
    supervisor: bool = False
    function: int = field(init=False)  # the host function's RID

    def __post_init__(self) -> None:
        self.function = self.host.vm(self.vm).devices[self.sid].function.rid

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        vpasid = self.rid_pasid if pasid is None else pasid
        if self.tag_of is None:
            r = self.host.dma(self.vm, self.sid, vpasid, iova, write=write,
                              supervisor=self.supervisor)  # fmt: skip
        else:
            tag = self.tag_of(vpasid)
            if tag is None:
                return Fault(FaultReason.PASID_ENTRY_P, iova, self.sid, vpasid, write,
                             f"the device has no tag for vPASID {vpasid}")  # fmt: skip
            r = self.host.dma_tag(self.function, tag, iova, write=write,
                                  supervisor=self.supervisor)  # fmt: skip
        if r.fault is not None:
            f = r.fault
            if f.sid != self.sid or f.pasid != vpasid:  # a raw host-side fault: the guest's terms
                f = Fault(f.reason, iova, self.sid, vpasid, write, f.detail)
            return f
        assert r.gpa is not None
        return Resolved(r.gpa & ~PAGE_MASK, not write, write, "engine", vpasid)

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        return self.resolve_now(iova, write, pasid)

    async def refresh(self) -> None:
        return None


class QemuResolver:
    """Asks QEMU over the backend channel; the answer comes back as an IOTLB update.

    ``send_miss(iova, perm)`` is provided by the back-end (it writes ``BACKEND_IOTLB_MSG``).
    QEMU sends no update when its own translation fails, so a miss that is not answered within
    ``timeout`` counts as a fault.
    """

    name = "qemu"

    def __init__(
        self,
        memory: Callable[[], GuestMemory | None],
        sid: int,
        send_miss: Callable[[int, bool], None],
        timeout: float = 2.0,
    ) -> None:
        self._memory, self.sid = memory, sid
        self._send_miss, self.timeout = send_miss, timeout
        self._pending: dict[int, list[asyncio.Future[tuple[int, int, int]]]] = {}
        self.misses = 0
        self.updates = 0
        self.unanswered = 0
        self.latency_s = 0.0

    def resolve_now(self, iova: int, write: bool, pasid: int | None = None) -> None:
        return None  # always a round trip to QEMU

    async def resolve(self, iova: int, write: bool, pasid: int | None = None) -> Resolved | Fault:
        if pasid is not None:
            return Fault(
                FaultReason.PASID_ENTRY_P, iova, self.sid, pasid, write, "QEMU: no PASID path"
            )
        page = iova & ~PAGE_MASK
        fut: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(page, []).append(fut)
        self.misses += 1
        t0 = time.perf_counter()
        try:
            self._send_miss(page, write)
            async with asyncio.timeout(self.timeout):
                start, uaddr, perm = await fut
        except (TimeoutError, OSError) as exc:
            self.unanswered += 1
            waiters = self._pending.get(page)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending[page]
            return Fault(
                FaultReason.PAGING_ENTRY_INV, iova, self.sid, None, write, f"QEMU: {exc!r}"
            )
        self.latency_s += time.perf_counter() - t0
        mem = self._memory()
        try:
            if mem is None:
                raise MemoryAccessError(uaddr, PAGE_SIZE)
            gpa = mem.uaddr_to_gpa(uaddr + (page - start), PAGE_SIZE)
        except MemoryAccessError:
            return Fault(FaultReason.ADDR_BEYOND_MGAW, iova, self.sid, None, write, "QEMU uaddr")
        return Resolved(gpa, bool(perm & 1), bool(perm & 2), "qemu")

    def on_update(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        """An IOTLB_MSG update from QEMU: wake the misses it answers. True if it answered one."""
        self.updates += 1
        answered = False
        if size <= 0:
            return False
        end = iova + size
        if size <= 64 * PAGE_SIZE or len(self._pending) < size // PAGE_SIZE:
            pages = [p for p in self._pending if iova <= p < end]
        else:
            pages = [p for p in range(iova & ~PAGE_MASK, end, PAGE_SIZE) if p in self._pending]
        for p in pages:
            for fut in self._pending.pop(p):
                if not fut.done():
                    fut.set_result((iova, uaddr, perm))
                    answered = True
        return answered

    async def refresh(self) -> None:
        return None

    def cancel_all(self) -> None:
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._pending.clear()


# ``resolve_range_now(iova, count, write, pasid)`` of a resolver that has one (WalkResolver):
# resolve_now for ``count`` consecutive pages, the list ending at the first fault, or None.
_ResolveRange = Callable[[int, int, bool, int | None], list[Resolved | Fault] | None]
# ``resolve_pages_now(iovas, write, pasid)``: resolve_now for each of ``iovas``, likewise.
_ResolvePages = Callable[[list[int], bool, int | None], list[Resolved | Fault] | None]


class DmaTranslator(Protocol):
    """What a device's data path needs of its translator (:class:`DeviceTranslator`, or a
    wrapper such as :class:`vioasid.device.dirty_log.LoggingTranslator`)."""

    @property
    def generation(self) -> int: ...

    def invalidated_since(self, generation: int, ranges: list[tuple[int, int]]) -> bool: ...

    async def translate(self, iova: int, write: bool, pasid: int | None = None) -> int: ...

    def spans(
        self, iova: int, length: int, write: bool, pasid: int | None = None
    ) -> list[tuple[int, int]] | None: ...

    def spans_many(
        self, bufs: Sequence[tuple[int, int]], write: bool, pasid: int | None = None
    ) -> list[list[tuple[int, int]]]: ...


@dataclass(slots=True)
class TranslatorStats:
    """What the translator counted (``to_json``: the device summary's ``translation``)."""

    translations: int = 0
    hits: int = 0
    misses: int = 0
    faults: int = 0
    fault_log: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_FAULT_LOG
    invalidations: int = 0
    invalidated_pages: int = 0
    iq_descriptors: int = 0
    agree: int = 0  # cross-check mode: the own walk and QEMU gave the same answer
    disagree: int = 0
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.translations if self.translations else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "translations": self.translations,
            "iotlb_hits": self.hits,
            "iotlb_misses": self.misses,
            "iotlb_hit_rate": round(self.hit_rate, 4),
            "invalidations": self.invalidations,
            "iq_descriptors": self.iq_descriptors,
            "faults": self.faults,
            "qemu_agreement": {"agree": self.agree, "disagree": self.disagree},
            "fault_log": self.fault_log[:16],
            "disagreements": self.disagreements[:16],
        }


class _IqHandler:
    """The device IOTLB as a :class:`vioasid.model.iq.Handler`."""

    def __init__(self, tr: DeviceTranslator) -> None:
        self.tr = tr

    def context(self, did: int | None, sid: int | None, fm: int) -> int:
        self.tr.flush()
        return 0

    def pasid_cache(self, did: int | None, pasid: int | None) -> int:
        self.tr.flush()
        return 0

    def iotlb(self, did: int | None, pasid: int | None, addr: int | None, am: int, ih: bool) -> int:
        if addr is None:
            self.tr.flush()
        else:
            self.tr._iq_range(pasid, addr, am)
        return 0

    def other(self, desc: Descriptor) -> int:
        return 0


class DeviceTranslator:
    """The device's IOTLB, keyed by (PASID, page), in front of a primary resolver (and an
    optional reference one).

    ``translate`` returns the guest-physical address for one IOVA (valid to the end of its
    4 KiB page) or raises :class:`DmaFault`; ``spans`` does a whole buffer without awaiting.
    ``trace`` (a text file) receives one JSON line per translation, invalidation and fault.
    """

    MAX_FAULT_LOG = 256
    HISTORY = 1024  # invalidation ranges kept for invalidated_since()
    _PAIRWISE = 64  # up to this many (range, invalidation) pairs are compared one by one
    _RANGE_RUN = 8  # consecutive missing pages from this many on are one range walk

    def __init__(
        self,
        primary: Resolver,
        *,
        sid: int = 0,
        reference: Resolver | None = None,
        trace: IO[str] | None = None,
        cache: bool = True,
    ) -> None:
        self.primary, self.reference = primary, reference
        self.sid, self.trace, self.use_cache = sid, trace, cache
        self._iotlb: dict[int, Resolved] = {}
        self._pasid_keys: set[int] = set()  # key prefixes (PASID + 1, 0 for none) in the IOTLB
        self.stats = TranslatorStats()
        self._iq_handler = _IqHandler(self)
        # One step per invalidation; the recent ones' page ranges, for invalidated_since():
        # (generation, first page, last page), oldest first, at most HISTORY of them; a batch
        # (invalidate_many) is recorded as the union of its pages at its last generation.
        self.generation = 0
        self._recent: collections.deque[tuple[int, int, int]] = collections.deque()
        self._forgotten = 0  # the newest generation with ranges no longer in _recent

    # -- lookup -----------------------------------------------------------------------------
    def spans(
        self, iova: int, length: int, write: bool, pasid: int | None = None
    ) -> list[tuple[int, int]] | None:
        """Guest-physical ``(address, length)`` runs covering ``[iova, iova + length)``, merged
        where pages are contiguous; every page translated before returning. None when a miss
        needs a resolver that must wait (the caller then awaits :meth:`translate` per page).
        Raises :class:`DmaFault` for a page the device may not access."""
        out: list[tuple[int, int]] = []
        if length <= 0:
            return out
        iotlb = self._iotlb
        prefix = (0 if pasid is None else pasid + 1) << _PASID_SHIFT
        if length <= PAGE_SIZE - (iova & PAGE_MASK):  # within one page: a hit is one lookup
            ent = iotlb.get(prefix | (iova >> PAGE_SHIFT))
            if ent is not None and (ent.write if write else ent.read) and self.trace is None:
                st = self.stats
                st.translations += 1
                st.hits += 1
                return [(ent.gpa | (iova & PAGE_MASK), length)]
        trace = self.trace
        pos, end = iova, iova + length
        run_gpa = run_len = -1
        # consecutive misses: one range walk (resolvers that have one), answers kept ahead
        resolve_range: _ResolveRange | None = None
        ahead: Sequence[Resolved | Fault] = ()
        ahead_page = hits = misses = 0
        try:
            while pos < end:
                n = PAGE_SIZE - (pos & PAGE_MASK)
                if n > end - pos:
                    n = end - pos
                page = pos >> PAGE_SHIFT
                key = prefix | page
                ent = iotlb.get(key)
                if ent is not None and (ent.write if write else ent.read):
                    hits += 1
                    hit = True
                else:
                    hit = False
                    if self.reference is not None:
                        return None
                    res: Resolved | Fault | None
                    if 0 <= page - ahead_page < len(ahead):
                        res = ahead[page - ahead_page]
                    elif end - pos > n and (
                        resolve_range is not None
                        or (resolve_range := getattr(self.primary, "resolve_range_now", None))
                    ):
                        # the run of misses from here, resolved in one range walk
                        last, nxt = (end - 1) >> PAGE_SHIFT, page + 1
                        while nxt <= last:
                            e = iotlb.get(prefix | nxt)
                            if e is not None and (e.write if write else e.read):
                                break
                            nxt += 1
                        got = resolve_range(pos, nxt - page, write, pasid)
                        if got:
                            ahead, ahead_page = got, page
                        res = got[0] if got else None
                    else:
                        res = self.primary.resolve_now(pos, write, pasid)
                    if res is None or isinstance(res, Fault):
                        return None  # wait / retry after a refresh on the awaited path
                    misses += 1
                    if ent is None and self.use_cache and (res.write if write else res.read):
                        iotlb[key] = res  # what _store does for a new page
                        ent = res
                    else:
                        ent = self._store(key, ent, res, write, pos, pasid)
                if trace is not None:
                    self._trace_translation(pos, ent, write, hit)
                gpa = ent.gpa | (pos & PAGE_MASK)
                if run_gpa + run_len == gpa:
                    run_len += n
                else:
                    if run_len > 0:
                        out.append((run_gpa, run_len))
                    run_gpa, run_len = gpa, n
                pos += n
        finally:
            # a page that must wait (or faults: the awaited path counts it again) is not counted
            st = self.stats
            st.translations += hits + misses
            if hits:
                st.hits += hits
            if misses:
                st.misses += misses
                if self.use_cache:
                    self._pasid_keys.add(prefix >> _PASID_SHIFT)
        out.append((run_gpa, run_len))
        return out

    def spans_many(
        self, bufs: Sequence[tuple[int, int]], write: bool, pasid: int | None = None
    ) -> list[list[tuple[int, int]]]:
        """:meth:`spans` of each ``(iova, length)`` of ``bufs`` in turn — the same answers,
        device IOTLB, statistics and faults as calling it once per buffer — with the misses
        resolved together: at the first miss, every page from there on without an entry for
        the access is resolved, the scattered ones in one walk (``resolve_pages_now``: the
        upper levels read once per 2 MiB of IOVA, where :meth:`spans` walks each single-page
        buffer from the root), runs of consecutive ones by the range walk as :meth:`spans`.
        The list stops before the first buffer :meth:`spans` answers None for: the caller
        translates that one on the awaited path, then asks again for the rest."""
        out: list[list[tuple[int, int]]] = []
        resolve_pages: _ResolvePages | None = getattr(self.primary, "resolve_pages_now", None)
        if (
            resolve_pages is None
            or self.reference is not None
            or self.trace is not None
            or len(bufs) < 2
        ):
            for iova, length in bufs:  # one buffer after the other
                got = self.spans(iova, length, write, pasid)
                if got is None:
                    break
                out.append(got)
            return out
        iotlb = self._iotlb
        prefix = (0 if pasid is None else pasid + 1) << _PASID_SHIFT
        pre: dict[int, Resolved | Fault] | None = None  # the misses' answers, once resolved
        use_cache, hits, misses = self.use_cache, 0, 0
        try:
            for b, (iova, length) in enumerate(bufs):
                spans: list[tuple[int, int]] = []
                out.append(spans)
                if length <= 0:
                    continue
                pos, end = iova, iova + length
                run_gpa = run_len = -1
                while pos < end:  # _spans' loop
                    n = PAGE_SIZE - (pos & PAGE_MASK)
                    if n > end - pos:
                        n = end - pos
                    page = pos >> PAGE_SHIFT
                    key = prefix | page
                    ent = iotlb.get(key)
                    if ent is not None and (ent.write if write else ent.read):
                        hits += 1
                    else:
                        if pre is None:
                            pre = self._resolve_misses(resolve_pages, bufs, b, pos, write, pasid)
                        res = pre.get(page)
                        if res is None:  # after the first fault, or the registers unknown
                            res = self.primary.resolve_now(pos, write, pasid)
                        if res is None or isinstance(res, Fault):
                            out.pop()  # this buffer waits, or faults on the awaited path
                            return out
                        misses += 1
                        if ent is None and use_cache and (res.write if write else res.read):
                            iotlb[key] = res
                            ent = res
                        else:
                            ent = self._store(key, ent, res, write, pos, pasid)
                    gpa = ent.gpa | (pos & PAGE_MASK)
                    if run_gpa + run_len == gpa:
                        run_len += n
                    else:
                        if run_len > 0:
                            spans.append((run_gpa, run_len))
                        run_gpa, run_len = gpa, n
                    pos += n
                spans.append((run_gpa, run_len))
            return out
        finally:
            st = self.stats
            st.translations += hits + misses
            if hits:
                st.hits += hits
            if misses:
                st.misses += misses
                if use_cache:
                    self._pasid_keys.add(prefix >> _PASID_SHIFT)

    def _resolve_misses(
        self,
        resolve_pages: _ResolvePages,
        bufs: Sequence[tuple[int, int]],
        first: int,
        pos: int,
        write: bool,
        pasid: int | None,
    ) -> dict[int, Resolved | Fault]:
        """The answers for every page from ``pos`` (in buffer ``first``) to the end of
        ``bufs`` that has no IOTLB entry for the access, by page number: in a buffer of at least
        ``_RANGE_RUN`` pages, each run of that many consecutive missing pages one range walk,
        all other pages in one page-list walk (each walk's answers up to its first fault; none
        where the resolver cannot answer at once: the caller resolves a page missing here
        itself)."""
        iotlb = self._iotlb
        prefix = (0 if pasid is None else pasid + 1) << _PASID_SHIFT
        run = self._RANGE_RUN
        singles: dict[int, None] = {}  # pages of short buffers, in order, each once
        runs: list[tuple[int, int]] = []  # (first page, count) of long buffers' missing runs
        for iova, length in bufs[first:]:
            if length > 0:
                lo = max(iova, pos) >> PAGE_SHIFT
                hi = ((iova + length - 1) >> PAGE_SHIFT) + 1
                start = -1  # the run of missing pages being gathered
                for page in range(lo, hi):
                    ent = iotlb.get(prefix | page)
                    if ent is None or not (ent.write if write else ent.read):
                        if hi - lo < run:
                            singles[page] = None
                        elif start < 0:
                            start = page
                    elif start >= 0:
                        runs.append((start, page - start))
                        start = -1
                if start >= 0:
                    runs.append((start, hi - start))
            pos = 0
        out: dict[int, Resolved | Fault] = {}
        resolve_range: _ResolveRange | None = getattr(self.primary, "resolve_range_now", None)
        for start, count in runs:
            if count < run or resolve_range is None:
                singles.update(dict.fromkeys(range(start, start + count)))
                continue
            ran = resolve_range(start << PAGE_SHIFT, count, write, pasid)
            if ran:
                out.update(zip(range(start, start + count), ran, strict=False))  # to a fault
        if singles:  # the rest in one walk, the upper levels shared
            pages = list(singles)
            got = resolve_pages([p << PAGE_SHIFT for p in pages], write, pasid)
            if got:
                out.update(zip(pages, got, strict=False))  # up to its first fault
        return out

    async def translate(self, iova: int, write: bool, pasid: int | None = None) -> int:
        """Guest-physical address of ``iova`` for a read (``write`` False) or a write."""
        st = self.stats
        st.translations += 1
        key = iotlb_key(pasid, iova >> PAGE_SHIFT)
        ent = self._iotlb.get(key)
        if ent is not None and (ent.write if write else ent.read):
            st.hits += 1
            if self.trace is not None:
                self._trace_translation(iova, ent, write, True)
            return ent.gpa | (iova & PAGE_MASK)
        st.misses += 1
        res = await self._resolve(iova, write, pasid)
        if isinstance(res, Fault):
            # The guest may have just enabled translation or moved its tables: re-read, retry.
            await self.primary.refresh()
            res = await self._resolve(iova, write, pasid)
        if isinstance(res, Fault):
            self._fault(res)
            raise DmaFault(res)
        ent = self._store(key, ent, res, write, iova, pasid)
        if self.trace is not None:
            self._trace_translation(iova, ent, write, False)
        return ent.gpa | (iova & PAGE_MASK)

    def _store(
        self,
        key: int,
        old: Resolved | None,
        res: Resolved,
        write: bool,
        iova: int,
        pasid: int | None,
    ) -> Resolved:
        if not (res.write if write else res.read):
            fault = Fault(
                FaultReason.SM_WRITE if write else FaultReason.SM_READ,
                iova,
                self.sid,
                pasid,
                write,
                "permission",
            )
            self._fault(fault)
            raise DmaFault(fault)
        if old is not None and old.gpa == res.gpa and (old.read or old.write):
            # the same page now known for the other access too (both walks granted it)
            res = Resolved(res.gpa, res.read or old.read, res.write or old.write, res.source, pasid)
        if self.use_cache:
            self._iotlb[key] = res
            self._pasid_keys.add(key >> _PASID_SHIFT)
        return res

    async def _resolve(self, iova: int, write: bool, pasid: int | None) -> Resolved | Fault:
        res = await self.primary.resolve(iova, write, pasid)
        if self.reference is not None:
            ref = await self.reference.resolve(iova, write, pasid)
            self._compare(iova, write, res, ref)
        return res

    def _compare(self, iova: int, write: bool, a: Resolved | Fault, b: Resolved | Fault) -> None:
        st = self.stats
        if isinstance(a, Fault) or isinstance(b, Fault):
            same = isinstance(a, Fault) and isinstance(b, Fault)
        else:
            # QEMU's updates always say read-write, so only addresses are compared.
            same = a.gpa == b.gpa
        if same:
            st.agree += 1
            return
        st.disagree += 1
        rec = {
            "iova": hex(iova),
            "write": write,
            "own": _describe(a),
            "qemu": _describe(b),
        }
        log.warning("translation disagreement: %s", rec)
        if len(st.disagreements) < self.MAX_FAULT_LOG:
            st.disagreements.append(rec)
        if self.trace is not None:
            self._write({"event": "disagreement", **rec})

    def _fault(self, fault: Fault) -> None:
        self.stats.faults += 1
        rec = fault.to_json()
        log.warning("DMA fault: %s", rec)
        if len(self.stats.fault_log) < self.MAX_FAULT_LOG:
            self.stats.fault_log.append(rec)
        if self.trace is not None:
            self._write({"event": "fault", **rec})

    # -- invalidation ------------------------------------------------------------------------
    def invalidated_since(self, generation: int, ranges: list[tuple[int, int]]) -> bool:
        """Whether an invalidation since ``generation`` may have covered a page of ``ranges``
        (IOVA, length): translations made before it must not be used for an access after it
        (the caller translates again). True when the history no longer reaches back.

        A few pairs are compared one by one; more (a request's ~85 buffers against the
        invalidations strict mode posts meanwhile) against the sorted union of the newer
        invalidations, one bisection per range."""
        if generation == self.generation:
            return False
        recent = self._recent
        if not recent or generation < self._forgotten:
            return True
        newer: list[tuple[int, int]] = []
        for gen, first, last in reversed(recent):
            if gen <= generation:
                break
            newer.append((first, last))
        pages = [(iova >> PAGE_SHIFT, (iova + max(n, 1) - 1) >> PAGE_SHIFT) for iova, n in ranges]
        if len(newer) * len(pages) <= self._PAIRWISE:
            for first, last in newer:
                for lo, hi in pages:
                    if lo <= last and hi >= first:
                        return True
            return False
        starts, ends = _union(newer)
        right = bisect.bisect_right
        for lo, hi in pages:
            # the last invalidated run starting at or before hi is the only one that can reach lo
            i = right(starts, hi) - 1
            if i >= 0 and ends[i] >= lo:
                return True
        return False

    def _note(self, first: int, last: int) -> None:
        self.generation += 1
        self._remember(self.generation, first, last)

    def _remember(self, gen: int, first: int, last: int) -> None:
        recent = self._recent
        if len(recent) >= self.HISTORY:
            self._forgotten = recent.popleft()[0]
        recent.append((gen, first, last))

    def _drop(self, first: int, last: int, prefixes: list[int]) -> int:
        """Drop pages ``first..last`` of the given key prefixes; the number dropped."""
        iotlb = self._iotlb
        before = len(iotlb)
        if not before:
            return 0
        n = last - first + 1
        if n * len(prefixes) >= before:
            wanted = set(prefixes)
            self._iotlb = {
                k: e
                for k, e in iotlb.items()
                if not (k >> _PASID_SHIFT in wanted and first <= k & _PAGE_BITS <= last)
            }
        else:
            pop = iotlb.pop
            for pre in prefixes:
                base = pre << _PASID_SHIFT
                for p in range(first, last + 1):
                    pop(base | p, None)
        return before - len(self._iotlb)

    def invalidate(self, iova: int, size: int, source: str = "qemu-iotlb") -> None:
        """Drop cached pages in ``[iova, iova + size)`` of every PASID (an IOTLB_MSG invalidate:
        it carries no PASID)."""
        st = self.stats
        st.invalidations += 1
        first, last = _page_range(iova, size)
        self._note(first, last)
        dropped = self._drop(first, last, list(self._pasid_keys)) if self._iotlb else 0
        st.invalidated_pages += dropped
        if self.trace is not None:
            self._write(
                {
                    "event": "invalidation",
                    "source": source,
                    "bdf": bdf_str(self.sid),
                    "iova": hex(iova),
                    "size": size,
                    "dropped": dropped,
                }
            )

    def invalidate_many(
        self, ranges: Sequence[tuple[int, int]], source: str = "qemu-iotlb"
    ) -> None:
        """:meth:`invalidate` of each ``(iova, size)`` of ``ranges`` (invalidations posted by the
        reader thread, applied at once inside the gate): the generation advances by one per
        invalidation; their pages, coalesced (repeated and adjacent ranges merged), are dropped
        and recorded as one step at the last generation — nobody sees the ones in between, the
        gate applies a batch whole. With a trace, one :meth:`invalidate` each (one line each)."""
        if self.trace is not None or len(ranges) < 2:
            for iova, size in ranges:
                self.invalidate(iova, size, source)
            return
        st = self.stats
        st.invalidations += len(ranges)
        self.generation += len(ranges)
        gen = self.generation
        u, top = U64, _PAGE_BITS
        starts, ends = _union(
            [((i & u) >> PAGE_SHIFT, min(((i & u) + (n if n > 0 else 1) - 1) >> PAGE_SHIFT, top))
             for i, n in ranges]
        )  # fmt: skip
        recent = self._recent
        recent.extend(zip(itertools.repeat(gen), starts, ends))
        for _ in range(len(recent) - self.HISTORY):
            self._forgotten = recent.popleft()[0]
        iotlb = self._iotlb
        before = len(iotlb)
        if not before:
            return
        prefixes = list(self._pasid_keys)
        pages = sum(ends) - sum(starts) + len(starts)
        if pages * len(prefixes) >= before:  # fewer entries than pages: look at each entry
            wanted, right = set(prefixes), bisect.bisect_right
            kept = {}
            for k, e in iotlb.items():
                if k >> _PASID_SHIFT in wanted:
                    page = k & top
                    j = right(starts, page) - 1
                    if j >= 0 and page <= ends[j]:
                        continue
                kept[k] = e
            self._iotlb = kept
        else:
            pop = iotlb.pop
            for pre in prefixes:
                base = pre << _PASID_SHIFT
                for first, last in zip(starts, ends, strict=True):
                    for p in range(base | first, (base | last) + 1):
                        pop(p, None)
        st.invalidated_pages += before - len(self._iotlb)

    def on_iq_descriptor(self, desc: Descriptor) -> None:
        """A descriptor from the guest's invalidation queue (read by ``IqFollower``), applied
        through the model's one dispatcher (:func:`vioasid.model.iq.dispatch`).

        Page-selective IOTLB descriptors drop their range in every PASID, page-selective
        PASID-IOTLB ones in their PASID only (PASID 0 is also the requests without PASID, whose
        RID_PASID it is); domain, global, PASID-wide, context-cache and PASID-cache ones drop
        the whole device IOTLB; an invalid one (QEMU raised IQE) drops it too, to be safe.
        Waits are only counted.
        """
        st = self.stats
        st.iq_descriptors += 1
        dropped_before = len(self._iotlb)
        if desc.error:
            self.flush()
        else:
            dispatch(desc, self._iq_handler)
        if self.trace is not None:
            rec = {k: (hex(v) if k == "ADDR" else v) for k, v in desc.to_json().items()}
            self._write(
                {
                    "event": "iq-descriptor",
                    "dropped": dropped_before - len(self._iotlb),
                    **rec,
                }
            )

    def _iq_range(self, pasid: int | None, addr: int, am: int) -> None:
        addr &= ~PAGE_MASK
        size = PAGE_SIZE << min(am, 52)
        first, last = addr >> PAGE_SHIFT, min((addr + size - 1) >> PAGE_SHIFT, _PAGE_BITS)
        self._note(first, last)
        if pasid is not None:
            prefixes = [pasid + 1] + ([0] if pasid == 0 else [])
        else:
            prefixes = list(self._pasid_keys)
        self._drop(first, last, prefixes)

    async def restart(self) -> None:
        """The device (re)started: registers may have changed, drop everything."""
        self.flush()
        await self.primary.refresh()

    def flush(self) -> None:
        self._note(0, _PAGE_BITS)
        self._iotlb.clear()
        self._pasid_keys.clear()

    # -- trace --------------------------------------------------------------------------------
    def _trace_translation(self, iova: int, ent: Resolved, write: bool, hit: bool) -> None:
        self._write(
            {
                "event": "translation",
                "bdf": bdf_str(self.sid),
                "pasid": ent.pasid,
                "iova": hex(iova),
                "address": hex(ent.gpa | (iova & PAGE_MASK)),
                "perm": ("r" if ent.read else "-") + ("w" if ent.write else "-"),
                "access": "write" if write else "read",
                "cache_hit": hit,
                "source": ent.source,
            }
        )

    def _write(self, obj: dict[str, Any]) -> None:
        assert self.trace is not None
        obj["t"] = round(time.time(), 6)
        self.trace.write(json.dumps(obj) + "\n")


def _page_range(iova: int, size: int) -> tuple[int, int]:
    """First and last page an IOTLB_MSG invalidation of ``[iova, iova + size)`` covers."""
    first = (iova & U64) >> PAGE_SHIFT
    return first, min(((iova & U64) + max(size, 1) - 1) >> PAGE_SHIFT, _PAGE_BITS)


def _union(runs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The page runs ``(first, last)`` as sorted, disjoint, non-adjacent runs (their starts and
    their ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted(runs):
        if ends and first <= ends[-1] + 1:
            if last > ends[-1]:
                ends[-1] = last
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


def _describe(r: Resolved | Fault) -> dict[str, Any]:
    if isinstance(r, Fault):
        return {"fault": r.name, "reason": int(r.reason)}
    return {"gpa": hex(r.gpa), "read": r.read, "write": r.write}
