"""The vhost-user device's DMA translator: IOVA → guest-physical, one 4 KiB page at a time.

With ``VIRTIO_F_ACCESS_PLATFORM`` every ring and buffer address the device sees is an IOVA.
:class:`DeviceTranslator` answers ``translate(iova, write)`` from its own IOTLB (a dict of 4 KiB
pages) or, on a miss, from a *resolver*:

* :class:`WalkResolver` — vioasid walks the guest's own VT-d tables (root → context → PASID →
  first/second stage) in guest memory with ``vioasid.model.walker``. While the guest has DMA
  translation off (GSTS.TES = 0: SeaBIOS) an IOVA is the guest-physical address itself.
* :class:`QemuResolver` — asks QEMU: a ``BACKEND_IOTLB_MSG`` miss on the backend channel,
  answered by an ``IOTLB_MSG`` update on the main socket whose ``uaddr`` maps back through the
  ``SET_MEM_TABLE`` regions.
* :class:`IdentityResolver` — IOVA == GPA (no vIOMMU, or tests).

In cross-check mode the translator asks both the own walk and QEMU for every miss and counts
agreements. The IOTLB is dropped on the invalidations QEMU forwards (``IOTLB_MSG`` type 3).
A failed translation raises :class:`DmaFault` carrying the VT-d :class:`Fault`; the caller fails
the request and touches no memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from vioasid.formats.fault import FaultReason
from vioasid.formats.registers import GSTS
from vioasid.model.faults import Fault, bdf_str
from vioasid.model.memory import GuestMemory, MemoryAccessError

log = logging.getLogger(__name__)

# Invalidation descriptor types (VT-d §6.5.2; vioasid.formats.invalidation TYPE_*).
_IQ_CC, _IQ_IOTLB, _IQ_PIOTLB, _IQ_PC = 1, 2, 6, 7

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
GSTS_TES = GSTS.field("TES").mask  # VT-d §10.4.5 GSTS_REG: translation enable status
RTADDR_ADDR_MASK = ~0xFFF & ((1 << 64) - 1)


@dataclass(frozen=True, slots=True)
class Resolved:
    """One resolved 4 KiB page: guest-physical page base and permissions."""

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
    """Resolves a page miss. ``refresh()`` re-reads whatever state the answer depends on."""

    name: str

    async def resolve(self, iova: int, write: bool) -> Resolved | Fault: ...

    async def refresh(self) -> None: ...

    def invalidate(self, iova: int, size: int) -> None: ...


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

    async def resolve(self, iova: int, write: bool) -> Resolved | Fault:
        page = iova & ~PAGE_MASK
        mem = self._memory() if self._memory else None
        if mem is not None and not mem.contains(page, PAGE_SIZE):
            return Fault(FaultReason.ADDR_BEYOND_MGAW, iova, self.sid, None, write, "not RAM")
        return Resolved(page, True, True, "identity")

    async def refresh(self) -> None:
        return None

    def invalidate(self, iova: int, size: int) -> None:
        return None


class WalkResolver:
    """vioasid's own walk of the guest's VT-d tables (``vioasid.model.walker.Walker``).

    ``regs`` reads GSTS and RTADDR (QMP ``xp`` on the DMAR registers); it is called lazily on the
    first miss after :meth:`refresh` marked the registers stale (device start, a fault).
    """

    name = "walk"

    def __init__(
        self,
        memory: Callable[[], GuestMemory | None],
        sid: int,
        regs: RegsReader | None,
        pasid: int | None = None,
    ) -> None:
        self._memory = memory
        self.sid = sid
        self.pasid = pasid
        self._regs_reader = regs
        self.regs: VtdRegs | None = None if regs is not None else VtdRegs()
        self._walker: Any = None
        self._walker_mem: GuestMemory | None = None
        self.regs_reads = 0

    def _get_walker(self, mem: GuestMemory) -> Any:
        if self._walker is None or self._walker_mem is not mem:
            from vioasid.model.cache import Caches
            from vioasid.model.walker import Walker

            # No walker-side caching: the device IOTLB in front of this resolver is the cache,
            # and it is dropped on exactly the invalidations QEMU forwards.
            self._walker = Walker(mem, caches=Caches(enabled=False))
            self._walker_mem = mem
        return self._walker

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

    async def resolve(self, iova: int, write: bool) -> Resolved | Fault:
        regs = await self._ensure_regs()
        mem = self._memory()
        if mem is None:
            return Fault(FaultReason.ROOT_TABLE_INV, iova, self.sid, self.pasid, write, "no memory")
        if not regs.translating:
            page = iova & ~PAGE_MASK
            if not mem.contains(page, PAGE_SIZE):
                return Fault(
                    FaultReason.ADDR_BEYOND_MGAW, iova, self.sid, None, write, "not guest RAM"
                )
            return Resolved(page, True, True, "identity")
        from vioasid.model.walker import Request

        walker = self._get_walker(mem)
        try:
            out = walker.translate(
                regs.rtaddr, Request(self.sid, iova, pasid=self.pasid, write=write)
            )
        except MemoryAccessError as exc:  # the walker should turn these into faults itself
            return Fault(FaultReason.ROOT_TABLE_INV, iova, self.sid, self.pasid, write, str(exc))
        if isinstance(out, Fault):
            return out
        gpa = out.address + ((iova & ~PAGE_MASK) - (out.iova & ~PAGE_MASK))
        page = gpa & ~PAGE_MASK
        if not mem.contains(page, PAGE_SIZE):
            # Mapped, but not to guest RAM the back-end holds (MMIO, a hole): refuse the DMA.
            return Fault(
                FaultReason.ADDR_BEYOND_MGAW,
                iova,
                self.sid,
                out.pasid,
                write,
                f"translated to 0x{page:x}, outside the guest RAM regions",
            )
        return Resolved(page, bool(out.read), bool(out.write), "walk", out.pasid)

    async def refresh(self) -> None:
        if self._regs_reader is not None:
            self.regs = None
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        w = self._walker
        if w is None:
            return
        for meth in ("invalidate_all", "flush", "clear_caches"):
            fn = getattr(w, meth, None)
            if callable(fn):
                fn()
                return
        self._walker = None  # no flush API: start from a fresh walker

    def invalidate(self, iova: int, size: int) -> None:
        # QEMU forwards IOTLB invalidations only; paging-structure and PASID caches inside the
        # walker may hold entries the guest changed. Domain-wide flushes drop everything.
        if size >= (1 << 30):
            self.invalidate_caches()


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
        self._memory = memory
        self.sid = sid
        self._send_miss = send_miss
        self.timeout = timeout
        self._pending: dict[int, list[asyncio.Future[tuple[int, int, int]]]] = {}
        self.misses = 0
        self.updates = 0
        self.unanswered = 0
        self.latency_s = 0.0

    async def resolve(self, iova: int, write: bool) -> Resolved | Fault:
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

    def invalidate(self, iova: int, size: int) -> None:
        return None

    def cancel_all(self) -> None:
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._pending.clear()


@dataclass
class TranslatorStats:
    translations: int = 0
    hits: int = 0
    misses: int = 0
    faults: int = 0
    invalidations: int = 0
    invalidated_pages: int = 0
    iq_descriptors: int = 0
    agree: int = 0
    disagree: int = 0
    fault_log: list[dict[str, Any]] = field(default_factory=list)
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


class DeviceTranslator:
    """The device's IOTLB in front of a primary resolver (and an optional reference one).

    ``translate`` returns the guest-physical address for one IOVA (valid to the end of its
    4 KiB page) or raises :class:`DmaFault`. ``trace`` (a text file) receives one JSON line per
    translation, invalidation and fault.
    """

    MAX_FAULT_LOG = 256

    def __init__(
        self,
        primary: Resolver,
        *,
        sid: int = 0,
        reference: Resolver | None = None,
        trace: IO[str] | None = None,
        cache: bool = True,
    ) -> None:
        self.primary = primary
        self.reference = reference
        self.sid = sid
        self.trace = trace
        self.use_cache = cache
        self._iotlb: dict[int, Resolved] = {}
        self.stats = TranslatorStats()

    # -- lookup -----------------------------------------------------------------------------
    async def translate(self, iova: int, write: bool) -> int:
        """Guest-physical address of ``iova`` for a read (``write`` False) or a write."""
        st = self.stats
        st.translations += 1
        page = iova >> PAGE_SHIFT
        ent = self._iotlb.get(page)
        if ent is not None and (ent.write if write else ent.read):
            st.hits += 1
            if self.trace is not None:
                self._trace_translation(iova, ent, write, True)
            return ent.gpa | (iova & PAGE_MASK)
        st.misses += 1
        res = await self._resolve(iova, write)
        if isinstance(res, Fault):
            # The guest may have just enabled translation or moved its tables: re-read, retry.
            await self.primary.refresh()
            res = await self._resolve(iova, write)
        if isinstance(res, Fault):
            self._fault(res)
            raise DmaFault(res)
        if not (res.write if write else res.read):
            fault = Fault(
                FaultReason.SM_WRITE if write else FaultReason.SM_READ,
                iova,
                self.sid,
                getattr(self.primary, "pasid", None),
                write,
                "permission",
            )
            self._fault(fault)
            raise DmaFault(fault)
        if self.use_cache:
            self._iotlb[page] = res
        if self.trace is not None:
            self._trace_translation(iova, res, write, False)
        return res.gpa | (iova & PAGE_MASK)

    async def _resolve(self, iova: int, write: bool) -> Resolved | Fault:
        res = await self.primary.resolve(iova, write)
        if self.reference is not None:
            ref = await self.reference.resolve(iova, write)
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
    def invalidate(self, iova: int, size: int, source: str = "qemu-iotlb") -> None:
        """Drop cached pages in ``[iova, iova + size)`` (an IOTLB_MSG invalidate)."""
        st = self.stats
        st.invalidations += 1
        first = iova >> PAGE_SHIFT
        last = (iova + max(size, 1) - 1) >> PAGE_SHIFT
        n = last - first + 1
        dropped = 0
        if n >= len(self._iotlb):
            keep = {p: e for p, e in self._iotlb.items() if not first <= p <= last}
            dropped = len(self._iotlb) - len(keep)
            self._iotlb = keep
        else:
            for p in range(first, last + 1):
                if self._iotlb.pop(p, None) is not None:
                    dropped += 1
        st.invalidated_pages += dropped
        self.primary.invalidate(iova, size)
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

    def on_iq_descriptor(self, desc: dict[str, Any]) -> None:
        """A descriptor from the guest's invalidation queue (decoded by ``IqFollower``).

        IOTLB / PASID-IOTLB page-selective descriptors drop their range; domain, global,
        context-cache and PASID-cache ones drop the whole device IOTLB. Waits are only counted.
        """
        st = self.stats
        st.iq_descriptors += 1
        t = desc.get("type_code")
        dropped_before = len(self._iotlb)
        if t in (_IQ_IOTLB, _IQ_PIOTLB) and desc.get("G") == 3:
            addr = int(desc.get("ADDR", 0)) & ~PAGE_MASK
            size = PAGE_SIZE << int(desc.get("AM", 0))
            first, last = addr >> PAGE_SHIFT, (addr + size - 1) >> PAGE_SHIFT
            if last - first + 1 >= len(self._iotlb):
                self._iotlb = {p: e for p, e in self._iotlb.items() if not first <= p <= last}
            else:
                for p in range(first, last + 1):
                    self._iotlb.pop(p, None)
        elif t in (_IQ_IOTLB, _IQ_PIOTLB, _IQ_CC, _IQ_PC):
            self._iotlb.clear()
        if self.trace is not None:
            rec = {k: (hex(v) if k == "ADDR" else v) for k, v in desc.items()}
            self._write(
                {
                    "event": "iq-descriptor",
                    "dropped": dropped_before - len(self._iotlb),
                    **rec,
                }
            )

    async def restart(self) -> None:
        """The device (re)started: registers may have changed, drop everything."""
        self._iotlb.clear()
        await self.primary.refresh()

    def flush(self) -> None:
        self._iotlb.clear()

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


def _describe(r: Resolved | Fault) -> dict[str, Any]:
    if isinstance(r, Fault):
        return {"fault": r.name, "reason": int(r.reason)}
    return {"gpa": hex(r.gpa), "read": r.read, "write": r.write}
