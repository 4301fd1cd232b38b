"""The VT-d translation walk over tables in guest memory (legacy and scalable mode).

RTADDR (TTM) -> root entry -> context entry -> [scalable: PASID directory -> PASID-table entry
-> by PGTT] first-stage (x86-64 4/5-level), second-stage (AW + 2 levels), nested (every
first-stage table access and the output through the entry's second stage) or pass-through.

Every read is bounds-checked by :class:`GuestMemory`; a failed read, a clear present bit, a set
reserved bit or a permission miss ends the walk with the VT-d fault for that level. Work is
bounded by the level count, so a table pointing at itself still ends (with a fault or a
translation). The walk never raises for hostile tables: :meth:`Walker.translate` returns a
:class:`Translation` or a :class:`Fault`.

Fault codes: QEMU's ``VTD_FR_*`` where QEMU models the condition (root/context/PASID lookup,
first-stage, second-stage in legacy and scalable mode); the VT-d spec's scalable-mode codes
(Linux ``dma_remap_sm_fault_reasons[]``) otherwise: PASIDE clear 0x45, PASID beyond PDTS 0x46,
reserved bits in PASID-dir/PASID entries 0x52/0x5a, ERE/SRE clear 0x5c/0x5d, execute on an XD
page 0x82, and every fault raised by the second stage of a nested walk (0x74, 0x78-0x7a,
0x83, 0x85/0x86).

The hot path uses ``struct.unpack_from`` and module-level masks derived from the
``vioasid.formats`` layouts (no second description of any layout).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vioasid.formats.context import (
    LEGACY_CONTEXT_ENTRY,
    LEGACY_CONTEXT_ENTRY_SIZE,
    SM_CONTEXT_ENTRY,
    SM_CONTEXT_ENTRY_SIZE,
    TT_DEV_IOTLB,
    TT_MULTI_LEVEL,
    TT_PASS_THROUGH,
)
from vioasid.formats.fault import FaultReason as FR
from vioasid.formats.paging import FIRST_STAGE_PTE, SECOND_STAGE_PTE
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    PGTT_FIRST_STAGE,
    PGTT_NAMES,
    PGTT_NESTED,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
)
from vioasid.formats.registers import RTADDR, TTM_LEGACY, TTM_SCALABLE
from vioasid.formats.root import LEGACY_ROOT_ENTRY, SM_ROOT_ENTRY

from .cache import (
    PERM_R,
    PERM_S,
    PERM_SW,
    PERM_U,
    PERM_W,
    PERM_X,
    Caches,
    ContextInfo,
    IotlbEntry,
    IotlbTag,
    PasidInfo,
)
from .faults import Fault, FaultError, Translation
from .memory import GuestMemory

U64 = (1 << 64) - 1
_Q2 = struct.Struct("<2Q")
_Q4 = struct.Struct("<4Q")

# -- masks derived from the layouts ---------------------------------------------------------
_TTM = RTADDR.field("TTM")
_RTA = RTADDR.field("RTA").mask

_LRE_P = LEGACY_ROOT_ENTRY.field("P").mask
_LRE_CTP = LEGACY_ROOT_ENTRY.field("CTP").mask
_LRE_RSVD = (LEGACY_ROOT_ENTRY.words[0].reserved, LEGACY_ROOT_ENTRY.words[1].reserved)
_SRE_LP = SM_ROOT_ENTRY.field("LP").mask
_SRE_LCTP = SM_ROOT_ENTRY.field("LCTP").mask
_SRE_RSVD = SM_ROOT_ENTRY.words[0].reserved  # same in both halves (bits 11:1)

_LCE = LEGACY_CONTEXT_ENTRY
_LCE_P, _LCE_FPD, _LCE_TT = _LCE.field("P"), _LCE.field("FPD"), _LCE.field("TT")
_LCE_SSPTPTR, _LCE_AW, _LCE_DID = _LCE.field("SSPTPTR"), _LCE.field("AW"), _LCE.field("DID")
_LCE_RSVD = (_LCE.words[0].reserved, _LCE.words[1].reserved)

_SCE = SM_CONTEXT_ENTRY
_SCE_P, _SCE_FPD, _SCE_PASIDE = _SCE.field("P"), _SCE.field("FPD"), _SCE.field("PASIDE")
_SCE_PRE, _SCE_PDTS, _SCE_DIR = _SCE.field("PRE"), _SCE.field("PDTS"), _SCE.field("PASIDDIRPTR")
_SCE_RID_PASID = _SCE.field("RID_PASID")
_SCE_RSVD = tuple(w.reserved for w in _SCE.words)

_PDE_P = PASID_DIR_ENTRY.field("P").mask
_PDE_PTP = PASID_DIR_ENTRY.field("PTP").mask
_PDE_FPD = PASID_DIR_ENTRY.field("FPD").mask
_PDE_RSVD = PASID_DIR_ENTRY.words[0].reserved

_PE = PASID_ENTRY
_PE_P, _PE_FPD, _PE_AW, _PE_PGTT = (
    _PE.field("P"),
    _PE.field("FPD"),
    _PE.field("AW"),
    _PE.field("PGTT"),
)
_PE_SSPTPTR, _PE_DID = _PE.field("SSPTPTR"), _PE.field("DID")
_PE_SRE, _PE_ERE, _PE_FLPM = _PE.field("SRE"), _PE.field("ERE"), _PE.field("FLPM")
_PE_WPE, _PE_FLPTPTR = _PE.field("WPE"), _PE.field("FLPTPTR")
_PE_RSVD = tuple(w.reserved for w in _PE.words)

_FS = FIRST_STAGE_PTE
_FS_P, _FS_RW, _FS_US = _FS.field("P").mask, _FS.field("RW").mask, _FS.field("US").mask
_FS_PS, _FS_XD, _FS_ADDR = _FS.field("PS").mask, _FS.field("XD").mask, _FS.field("ADDR").mask

_SS = SECOND_STAGE_PTE
_SS_R, _SS_W, _SS_PS = _SS.field("R").mask, _SS.field("W").mask, _SS.field("PS").mask
_SS_ADDR = _SS.field("ADDR").mask

# (shift, value mask) of every field the walk decodes
_LCE_AW_S, _LCE_AW_M = _LCE_AW.lo, _LCE_AW.vmask
_LCE_DID_S, _LCE_DID_M = _LCE_DID.lo, _LCE_DID.vmask
_LCE_FPD_S, _LCE_FPD_M = _LCE_FPD.lo, _LCE_FPD.vmask
_LCE_P_S, _LCE_P_M = _LCE_P.lo, _LCE_P.vmask
_LCE_TT_S, _LCE_TT_M = _LCE_TT.lo, _LCE_TT.vmask
_PE_AW_S, _PE_AW_M = _PE_AW.lo, _PE_AW.vmask
_PE_DID_S, _PE_DID_M = _PE_DID.lo, _PE_DID.vmask
_PE_ERE_S, _PE_ERE_M = _PE_ERE.lo, _PE_ERE.vmask
_PE_FLPM_S, _PE_FLPM_M = _PE_FLPM.lo, _PE_FLPM.vmask
_PE_FPD_S, _PE_FPD_M = _PE_FPD.lo, _PE_FPD.vmask
_PE_PGTT_S, _PE_PGTT_M = _PE_PGTT.lo, _PE_PGTT.vmask
_PE_SRE_S, _PE_SRE_M = _PE_SRE.lo, _PE_SRE.vmask
_PE_WPE_S, _PE_WPE_M = _PE_WPE.lo, _PE_WPE.vmask
_SCE_FPD_S, _SCE_FPD_M = _SCE_FPD.lo, _SCE_FPD.vmask
_SCE_P_S, _SCE_P_M = _SCE_P.lo, _SCE_P.vmask
_SCE_PASIDE_S, _SCE_PASIDE_M = _SCE_PASIDE.lo, _SCE_PASIDE.vmask
_SCE_PDTS_S, _SCE_PDTS_M = _SCE_PDTS.lo, _SCE_PDTS.vmask
_SCE_PRE_S, _SCE_PRE_M = _SCE_PRE.lo, _SCE_PRE.vmask
_SCE_RID_PASID_S, _SCE_RID_PASID_M = _SCE_RID_PASID.lo, _SCE_RID_PASID.vmask
_TTM_S, _TTM_M = _TTM.lo, _TTM.vmask
_LCE_SSPTPTR_M = _LCE_SSPTPTR.mask
_TTM_MASK, _TTM_SM = _TTM.mask, TTM_SCALABLE << _TTM.lo
_SCE_RSVD1, _SCE_RSVD2, _SCE_RSVD3 = _SCE_RSVD[1], _SCE_RSVD[2], _SCE_RSVD[3]
_PE_RSVD1 = _PE_RSVD[1]
_PE_WPE_MASK, _PE_SRE_MASK, _PE_ERE_MASK = _PE_WPE.mask, _PE_SRE.mask, _PE_ERE.mask
_SCE_DIR_M = _SCE_DIR.mask
_PE_SSPTPTR_M = _PE_SSPTPTR.mask
_PE_FLPTPTR_M = _PE_FLPTPTR.mask

_INTR_LO, _INTR_HI = 0xFEE00000, 0xFEEFFFFF  # VT-d §3.15 interrupt address range

# Second-stage fault codes: (cannot access, write denied, read denied, reserved, beyond AW).
_SS_CODES_QEMU = (FR.PAGING_ENTRY_INV, FR.WRITE, FR.READ, FR.PAGING_ENTRY_RSVD, FR.ADDR_BEYOND_MGAW)
_SS_CODES_NESTED_OUT = (FR.SS_ENTRY_ACCESS, FR.SM_WRITE, FR.SM_READ, FR.SS_ENTRY_RSVD,
                        FR.SS_BEYOND_MAX)  # fmt: skip
_SS_CODES_NESTED_TABLE = (FR.SS_ENTRY_ACCESS, FR.SS_ENTRY_P, FR.SS_ENTRY_P, FR.SS_ENTRY_RSVD,
                          FR.NESTED_FS_TRANSLATION)  # fmt: skip

_NAME_FS = PGTT_NAMES[PGTT_FIRST_STAGE]
_NAME_SS = PGTT_NAMES[PGTT_SECOND_STAGE]
_NAME_NESTED = PGTT_NAMES[PGTT_NESTED]
_NAME_PT = PGTT_NAMES[PGTT_PASS_THROUGH]
_ALL_PERMS = PERM_R | PERM_W | PERM_X | PERM_U | PERM_S | PERM_SW


def need_mask(write: bool, supervisor: bool = False, execute: bool = False) -> int:
    """The IOTLB permission bits a request needs."""
    need = PERM_R | (PERM_S if supervisor else PERM_U)
    if write:
        need |= PERM_SW if supervisor else PERM_W
    if execute:
        need |= PERM_X
    return need


_NEED_READ = need_mask(False)
_NEED_WRITE = need_mask(True)
_NEED = {(w, s, x): need_mask(w, s, x) for w in (False, True) for s in (False, True)
         for x in (False, True)}  # fmt: skip
_PE_WORDS = 1 + max(i for i, w in enumerate(_PE.words) if w.fields)  # words the walk decodes
_Q = struct.Struct("<Q")
_QPE = struct.Struct(f"<{_PE_WORDS}Q")
_UNPACK_Q, _UNPACK_Q4, _UNPACK_QPE = _Q.unpack_from, _Q4.unpack_from, _QPE.unpack_from


@dataclass(slots=True)
class Request:
    """One DMA request: source id, input address, PASID (None = request without PASID)."""

    sid: int
    addr: int
    pasid: int | None = None
    write: bool = False
    supervisor: bool = False
    execute: bool = False


Span = tuple[int, int, memoryview]  # (GPA base, GPA end, buffer)
_NO_SPAN: Span = (0, 0, memoryview(b""))


class Walker:
    """Walks VT-d tables in ``mem``.

    ``haw``: host address width (bits above it in table pointers are reserved).
    ``caches``: the context/PASID/IOTLB caches (``Caches(enabled=False)`` for none); default a
    fresh enabled :class:`Caches`.
    ``nested_memory``: where the first-stage tables of a *nested* (PGTT=3) entry are read, at the
    address their second stage yields (default ``mem``). Root/context/PASID tables and every
    second-stage table are always read from ``mem``. The final output of a nested walk is the
    second stage's output address.
    """

    def __init__(
        self,
        mem: GuestMemory,
        *,
        haw: int = 48,
        caches: Caches | None = None,
        nested_memory: GuestMemory | None = None,
    ) -> None:
        if not 32 <= haw <= 52:
            raise ValueError("host address width must be 32..52 bits")
        self.mem = mem
        self.nested_memory = nested_memory if nested_memory is not None else mem
        self.haw = haw
        self.caches = caches if caches is not None else Caches()
        above = U64 & ~((1 << haw) - 1)
        self._above_haw = above
        r = above & _FS_ADDR  # bits 51:haw of a paging entry
        # First-stage reserved bits per level (index = level), QEMU VTD_FPTE_PAGE_L*_RSVD_MASK
        # (PS reserved in PML4E/PML5E) and VTD_FPTE_LPAGE_L2/L3_RSVD_MASK for large pages.
        self._fs_rsvd = (0, r, r, r, r | _FS_PS, r | _FS_PS)
        self._fs_lrsvd = (0, r, r | 0x1FE000, r | 0x3FFFE000)
        # Second stage: QEMU VTD_SPTE_PAGE_L*_RSVD_MASK / VTD_SPTE_LPAGE_L*_RSVD_MASK.
        self._ss_rsvd = (0, r, r, r, r | _SS_PS, r | _SS_PS)
        self._ss_lrsvd = (0, r, r | 0x1FF000, r | 0x3FFFF000)
        self._pe_rsvd = tuple(
            (i, w.reserved | (above if any(f.addr for f in w.fields) else 0))
            for i, w in enumerate(_PE.words[:_PE_WORDS])
        )
        self._spans: dict[int, tuple[object, int, list[Span]]] = {}
        self.direct = True  # uncached user requests try the one-run first-stage path first
        self._span_cache: tuple[object, int, Span] = (None, -1, _NO_SPAN)
        # Folded checks for the direct (uncached) path: "present and no reserved bit" tests.
        self._chk_root = _SRE_LP | _SRE_RSVD | above
        self._chk_ctx0 = _SCE_P.mask | _SCE_RSVD[0] | above
        self._chk_pde = _PDE_P | _PDE_RSVD | above
        self._chk_pe0 = _PE_P.mask | _PE_PGTT.mask | _PE_RSVD[0] | above
        self._want_pe0 = _PE_P.mask | (PGTT_FIRST_STAGE << _PE_PGTT.lo)
        self._chk_pe2 = _PE_RSVD[2] | above
        self._chk_fs = tuple(_FS_P | m for m in self._fs_rsvd)
        self._ss_chk_r = tuple(_SS_R | m for m in self._ss_rsvd)
        self._ss_chk_w = tuple(_SS_W | m for m in self._ss_rsvd)

    # -- public API -----------------------------------------------------------------------
    def translate(self, rtaddr: int, req: Request) -> Translation | Fault:
        """Translate one request; a :class:`Fault` for every failure, never an exception."""
        c = self.caches
        if c.enabled and c.rtaddr == rtaddr:
            tag = c.fast.get((req.sid, req.pasid))
            if tag is not None:
                sub = c.iotlb.get(tag)
                if sub is not None:
                    hit = sub.get(req.addr >> 12)
                    if hit is not None:
                        need = need_mask(req.write, req.supervisor, req.execute)
                        if hit[2] & need == need:
                            return self._translation(req, hit, tag[1], True)
        try:
            e, pasid, cached = self._walk(
                rtaddr, req.sid, req.addr, req.pasid, req.write, req.supervisor, req.execute
            )
        except FaultError as exc:
            return Fault(exc.reason, req.addr, req.sid, req.pasid, req.write, exc.detail)
        return self._translation(req, e, pasid, cached)

    @staticmethod
    def _translation(req: Request, e: IotlbEntry, pasid: int | None, cached: bool) -> Translation:
        perm = e[2]
        return Translation(
            iova=req.addr,
            address=e[0] | (req.addr & (e[1] - 1)),
            page_size=e[1],
            pgtt=e[3],
            did=e[4],
            read=bool(perm & PERM_R),
            write=bool(perm & (PERM_SW if req.supervisor else PERM_W)),
            execute=bool(perm & PERM_X),
            sid=req.sid,
            pasid=pasid,
            cached=cached,
        )

    def translate_fast(
        self, rtaddr: int, sid: int, addr: int, pasid: int | None = None, write: bool = False
    ) -> int | Fault:
        """Hot path for user-privilege requests: the output address (int) or a Fault."""
        c = self.caches
        if not c.enabled:
            if self.direct:
                sc = self._span_cache
                regions = self.mem.regions
                if sc[0] is not regions or sc[1] != len(regions):
                    sc = self._refresh_span_cache()
                d = self._direct_first_stage(rtaddr, sid, addr, pasid, write, sc[2])
                if d is not None:
                    return d[0] | (addr & (d[1] - 1))
        elif c.rtaddr == rtaddr:
            tag = c.fast.get((sid, pasid))
            if tag is not None:
                sub = c.iotlb.get(tag)
                if sub is not None:
                    hit = sub.get(addr >> 12)
                    if hit is not None:
                        need = _NEED_WRITE if write else _NEED_READ
                        if hit[2] & need == need:
                            return hit[0] | (addr & (hit[1] - 1))
        try:
            e, _, _ = self._walk(rtaddr, sid, addr, pasid, write, False, False)
        except FaultError as exc:
            return Fault(exc.reason, addr, sid, pasid, write, exc.detail)
        return e[0] | (addr & (e[1] - 1))

    def fault_processing_disabled(self, rtaddr: int, sid: int, pasid: int | None) -> bool:
        """Whether FPD is set on the request's path (context entry, PASID-directory entry, or
        PASID entry, present or not: Linux's ``pasid_clear_entry_with_fpd`` leaves FPD=1 with
        P=0). The caller skips recording such faults (QEMU ``vtd_report_fault``)."""
        spans = self._spans_of(self.mem)
        try:
            ctx = self._load_context(rtaddr, sid, spans)
        except FaultError:
            return False
        if ctx.fpd:
            return True
        if not ctx.scalable:
            return False
        p = ctx.rid_pasid if pasid is None else pasid
        if not 0 <= p < 1 << 20:
            return False
        try:
            (pde,) = self._read(
                spans, ctx.pasid_dir + (p >> 6) * 8, _Q, FR.PASID_DIR_ACCESS_ERR, ""
            )
            if pde & _PDE_FPD:
                return True
            if not pde & _PDE_P:
                return False
            (w0,) = self._read(
                spans, (pde & _PDE_PTP) + (p & 0x3F) * PASID_ENTRY_SIZE, _Q,
                FR.PASID_TABLE_ACCESS_ERR, "",
            )  # fmt: skip
        except FaultError:
            return False
        return bool(w0 & _PE_FPD.mask)

    def context_info(self, rtaddr: int, sid: int) -> ContextInfo:
        """The decoded context entry for ``sid`` (raises FaultError)."""
        return self._load_context(rtaddr, sid, self._spans_of(self.mem))

    def pasid_info(self, ctx: ContextInfo, pasid: int) -> PasidInfo:
        """The decoded PASID-table entry (raises FaultError)."""
        return self._load_pasid(ctx, pasid, self._spans_of(self.mem))

    # -- memory ---------------------------------------------------------------------------
    def _spans_of(self, mem: GuestMemory) -> list[Span]:
        """(base, end, buffer) of every region, rebuilt when the region list changes."""
        regions = mem.regions
        key = id(mem)
        got = self._spans.get(key)
        if got is None or got[0] is not regions or got[1] != len(regions):
            spans = sorted(((r.gpa, r.end, r.buf) for r in regions), key=lambda s: -(s[1] - s[0]))
            self._spans[key] = (regions, len(regions), spans)
            return spans
        return got[2]

    def _refresh_span_cache(self) -> tuple[object, int, Span]:
        regions = self.mem.regions
        self._span_cache = (regions, len(regions), self._span0())
        return self._span_cache

    def _span0(self) -> Span:
        """The largest region (the direct path's only region)."""
        got = self._spans.get(id(self.mem))
        regions = self.mem.regions
        if got is None or got[0] is not regions or got[1] != len(regions):
            spans = self._spans_of(self.mem)
            return spans[0] if spans else _NO_SPAN
        return got[2][0] if got[2] else _NO_SPAN

    @staticmethod
    def _read(
        spans: list[Span], gpa: int, st: struct.Struct, reason: FR, what: str
    ) -> tuple[int, ...]:
        end = gpa + st.size
        for base, top, buf in spans:
            if base <= gpa and end <= top:
                return st.unpack_from(buf, gpa - base)
        raise FaultError(reason, f"{what} at 0x{gpa:x} is outside guest memory")

    # -- the walk -------------------------------------------------------------------------
    def _walk(
        self,
        rtaddr: int,
        sid: int,
        addr: int,
        rpasid: int | None,
        write: bool,
        supervisor: bool,
        execute: bool,
    ) -> tuple[IotlbEntry, int | None, bool]:
        """(IOTLB entry, effective PASID, from cache) or FaultError."""
        c = self.caches
        cached = c.enabled
        if not 0 <= addr <= U64:
            raise FaultError(FR.ADDR_BEYOND_MGAW, "address is not a 64-bit value")
        spans = self._spans_of(self.mem)
        if not cached and not supervisor and not execute and self.direct:
            d = self._direct_first_stage(rtaddr, sid, addr, rpasid, write, self._span0())
            if d is not None:
                return (d[0], d[1], d[2], d[3], d[4]), d[5], False
        if cached:
            if rtaddr != c.rtaddr:
                c.set_rtaddr(rtaddr)
            ctx = c.context.get(sid)
            if ctx is None:
                ctx = c.context[sid] = self._load_context(rtaddr, sid, spans)
        else:
            ctx = self._load_context(rtaddr, sid, spans)
        need = _NEED.get((write, supervisor, execute)) or need_mask(write, supervisor, execute)

        if not ctx.scalable:
            if rpasid is not None:
                raise FaultError(FR.RTADDR_INV_TTM, "request with PASID on a legacy root table")
            tag: IotlbTag = (ctx.did, None)
            if cached:
                c.fast[(sid, None)] = tag
                hit = self._iotlb_hit(tag, addr, need)
                if hit is not None:
                    return hit, None, True
            if ctx.tt == TT_PASS_THROUGH:
                entry: IotlbEntry = (addr & ~0xFFF, 4096, _ALL_PERMS & ~PERM_X, _NAME_PT, ctx.did)
            else:
                pa, size, rw = self._ss_walk(
                    ctx.ssptptr, ctx.aw + 2, addr, write, _SS_CODES_QEMU, spans
                )
                pa &= ~(size - 1)
                self._check_intr(pa, size, FR.INTERRUPT_ADDR)
                entry = (pa, size, self._ss_perms(rw, PERM_U | PERM_S), _NAME_SS, ctx.did)
            if cached:
                c.iotlb_insert(tag, addr >> 12, entry)
            return entry, None, False

        # scalable mode
        if rpasid is None:
            pasid = ctx.rid_pasid
        else:
            pasid = rpasid
            if not ctx.paside:
                raise FaultError(FR.CONTEXT_PASIDE_CLEAR, "context entry PASIDE is clear")
            if not 0 <= pasid < 1 << 20 or pasid >> 6 >= 1 << (ctx.pdts + 7):
                raise FaultError(FR.CONTEXT_PASID_TOO_BIG, f"PASID {pasid} beyond PDTS={ctx.pdts}")
        if cached:
            pe = c.pasid.get((sid, pasid))
            if pe is None:
                pe = c.pasid[(sid, pasid)] = self._load_pasid(ctx, pasid, spans)
        else:
            pe = self._load_pasid(ctx, pasid, spans)
        if supervisor and not pe.sre:
            raise FaultError(FR.SRE_CLEAR, "supervisor request, SRE clear")
        if execute and not pe.ere:
            raise FaultError(FR.ERE_CLEAR, "execute request, ERE clear")
        tag = (pe.did, pasid)
        if cached:
            c.fast[(sid, rpasid)] = tag
            hit = self._iotlb_hit(tag, addr, need)
            if hit is not None:
                return hit, pasid, True
        base = (PERM_S if pe.sre else 0) | (PERM_X if pe.ere else 0)
        pgtt = pe.pgtt
        if pgtt == PGTT_FIRST_STAGE:
            pa, size, perm = self._fs_walk(pe, addr, write, supervisor, execute, spans, False)
            perm |= base & PERM_S
            if not pe.ere:
                perm &= ~PERM_X
            self._check_intr(pa, size, FR.SM_INTERRUPT_ADDR)
            entry = (pa, size, perm, _NAME_FS, pe.did)
        elif pgtt == PGTT_SECOND_STAGE:
            pa, size, rw = self._ss_walk(pe.ssptptr, pe.aw + 2, addr, write, _SS_CODES_QEMU, spans)
            pa &= ~(size - 1)
            self._check_intr(pa, size, FR.INTERRUPT_ADDR)
            entry = (pa, size, self._ss_perms(rw, base | PERM_U), _NAME_SS, pe.did)
        elif pgtt == PGTT_NESTED:
            pa, size, perm = self._fs_walk(pe, addr, write, supervisor, execute, spans, True)
            perm |= base & PERM_S
            if not pe.ere:
                perm &= ~PERM_X
            opa, osize, rw = self._ss_walk(
                pe.ssptptr, pe.aw + 2, pa | (addr & (size - 1)), write, _SS_CODES_NESTED_OUT, spans
            )
            if osize < size:
                size = osize
            pa = opa & ~(size - 1)
            if not rw & _SS_W:
                perm &= ~(PERM_W | PERM_SW)
            self._check_intr(pa, size, FR.SM_INTERRUPT_ADDR)
            entry = (pa, size, perm, _NAME_NESTED, pe.did)
        else:  # pass-through (PGTT validated when the entry was loaded)
            perm = PERM_R | PERM_W | PERM_U | PERM_SW | base
            entry = (addr & ~0xFFF, 4096, perm, _NAME_PT, pe.did)
        if cached:
            c.iotlb_insert(tag, addr >> 12, entry)
        return entry, pasid, False

    @staticmethod
    def _ss_perms(rw: int, base: int) -> int:
        perm = base
        if rw & _SS_R:
            perm |= PERM_R
        if rw & _SS_W:
            perm |= PERM_W | PERM_SW
        return perm

    @staticmethod
    def _check_intr(pa: int, size: int, reason: FR) -> None:
        if pa <= _INTR_HI and pa + size > _INTR_LO:
            raise FaultError(reason, f"output 0x{pa:x} is in the interrupt address range")

    def _iotlb_hit(self, tag: IotlbTag, addr: int, need: int) -> IotlbEntry | None:
        sub = self.caches.iotlb.get(tag)
        if sub is None:
            return None
        e = sub.get(addr >> 12)
        if e is None or e[2] & need != need:
            return None
        return e

    # -- direct path --------------------------------------------------------------------
    def _direct_first_stage(
        self, rtaddr: int, sid: int, addr: int, rpasid: int | None, write: bool, span: Span
    ) -> tuple[int, int, int, str, int, int] | None:
        """The common case in one straight run: scalable mode, first-stage only, every table in
        the largest region, user request, no fault. Each entry is checked with one folded
        "present, no reserved bit" mask; anything unusual returns None and the general walk
        (which reports the exact fault) takes over."""
        if rtaddr & _TTM_MASK != _TTM_SM:
            return None
        b, e, buf = span
        e -= 64
        unpack = _UNPACK_Q
        g = (rtaddr & _RTA) + ((sid >> 8) & 0xFF) * 16 + ((sid >> 4) & 8)
        if not b <= g <= e:
            return None
        half = unpack(buf, g - b)[0]
        if half & self._chk_root != _SRE_LP:
            return None
        g = (half & _SRE_LCTP) + (sid & 0x7F) * SM_CONTEXT_ENTRY_SIZE
        if not b <= g <= e:
            return None
        c0, c1, c2, c3 = _UNPACK_Q4(buf, g - b)
        if c0 & self._chk_ctx0 != 1 or c1 & _SCE_RSVD1 or c2 & _SCE_RSVD2 or c3 & _SCE_RSVD3:
            return None
        if rpasid is None:
            pasid = (c1 >> _SCE_RID_PASID_S) & _SCE_RID_PASID_M
        elif (c0 >> _SCE_PASIDE_S) & _SCE_PASIDE_M and 0 <= rpasid < 1 << 20:
            pasid = rpasid
        else:
            return None
        if pasid >> 6 >= 1 << (((c0 >> _SCE_PDTS_S) & _SCE_PDTS_M) + 7):
            return None
        g = (c0 & _SCE_DIR_M) + ((pasid >> 3) & ~7)
        if not b <= g <= e:
            return None
        pde = unpack(buf, g - b)[0]
        if pde & self._chk_pde != _PDE_P:
            return None
        g = (pde & _PDE_PTP) + ((pasid & 0x3F) << 6)  # 64-byte entries
        if not b <= g <= e:
            return None
        w = _UNPACK_QPE(buf, g - b)
        w2 = w[2]
        if w[0] & self._chk_pe0 != self._want_pe0 or w2 & self._chk_pe2 or w[1] & _PE_RSVD1:
            return None
        flpm = (w2 >> _PE_FLPM_S) & _PE_FLPM_M
        if flpm > 1:
            return None
        chk = self._chk_fs
        table = w2 & _PE_FLPTPTR_M
        if not flpm:
            # 4-level, unrolled: index * 8 == (addr >> 9 * level) & 0xFF8
            top = addr >> 47
            if top and top != 0x1FFFF:
                return None
            g = table + ((addr >> 36) & 0xFF8)
            if not b <= g <= e:
                return None
            p4 = unpack(buf, g - b)[0]
            if p4 & chk[4] != _FS_P:
                return None
            g = (p4 & _FS_ADDR) + ((addr >> 27) & 0xFF8)
            if not b <= g <= e:
                return None
            pte = unpack(buf, g - b)[0]
            if pte & chk[3] != _FS_P:
                return None
            if pte & _FS_PS:
                level, acc, xd = 3, p4 & pte, p4 | pte
            else:
                p3 = pte
                g = (p3 & _FS_ADDR) + ((addr >> 18) & 0xFF8)
                if not b <= g <= e:
                    return None
                pte = unpack(buf, g - b)[0]
                if pte & chk[2] != _FS_P:
                    return None
                if pte & _FS_PS:
                    level, acc, xd = 2, p4 & p3 & pte, p4 | p3 | pte
                else:
                    p2 = pte
                    g = (p2 & _FS_ADDR) + ((addr >> 9) & 0xFF8)
                    if not b <= g <= e:
                        return None
                    pte = unpack(buf, g - b)[0]
                    if pte & chk[1] != _FS_P:
                        return None
                    level, acc, xd = 1, p4 & p3 & p2 & pte, p4 | p3 | p2 | pte
        else:
            top = addr >> 56
            if top and top != 0xFF:
                return None
            acc = _FS_RW | _FS_US
            xd = 0
            level = 5
            while True:
                g = table + ((addr >> (9 * level)) & 0xFF8)
                if not b <= g <= e:
                    return None
                pte = unpack(buf, g - b)[0]
                if pte & chk[level] != _FS_P:
                    return None
                acc &= pte
                xd |= pte
                if level == 1 or (level <= 3 and pte & _FS_PS):
                    break
                table = pte & _FS_ADDR
                level -= 1
        size = 1 << (3 + 9 * level)
        if level > 1 and pte & self._fs_lrsvd[level]:
            return None
        if not acc & _FS_US or (write and not acc & _FS_RW):
            return None  # the general walk names the level that denies it
        pa = pte & _FS_ADDR & ~(size - 1)
        if pa <= _INTR_HI and pa + size > _INTR_LO:
            return None
        perm = PERM_R | PERM_U
        if acc & _FS_RW:
            perm |= PERM_W | PERM_SW
        elif not w2 & _PE_WPE_MASK:
            perm |= PERM_SW
        if w2 & _PE_SRE_MASK:
            perm |= PERM_S
        if w2 & _PE_ERE_MASK and not xd & _FS_XD:
            perm |= PERM_X
        did = (w[1] >> _PE_DID_S) & _PE_DID_M
        return pa, size, perm, _NAME_FS, did, pasid

    # -- root and context -----------------------------------------------------------------
    def _load_context(self, rtaddr: int, sid: int, spans: list[Span]) -> ContextInfo:
        ttm = (rtaddr >> _TTM_S) & _TTM_M
        root = rtaddr & _RTA
        bus, devfn = (sid >> 8) & 0xFF, sid & 0xFF
        above = self._above_haw
        read = self._read
        if ttm == TTM_LEGACY:
            lo, hi = read(spans, root + bus * 16, _Q2, FR.ROOT_TABLE_INV, "root entry")
            if not lo & _LRE_P:
                raise FaultError(FR.ROOT_ENTRY_P, f"bus {bus:02x}: root entry not present")
            if lo & (_LRE_RSVD[0] | above) or hi & _LRE_RSVD[1]:
                raise FaultError(FR.ROOT_ENTRY_RSVD, f"bus {bus:02x}: reserved bits in root entry")
            ce = read(
                spans, (lo & _LRE_CTP) + devfn * LEGACY_CONTEXT_ENTRY_SIZE, _Q2,
                FR.CONTEXT_TABLE_INV, "context entry",
            )  # fmt: skip
            if not (ce[0] >> _LCE_P_S) & _LCE_P_M:
                raise FaultError(FR.CONTEXT_ENTRY_P, "context entry not present")
            if ce[0] & (_LCE_RSVD[0] | above) or ce[1] & _LCE_RSVD[1]:
                raise FaultError(FR.CONTEXT_ENTRY_RSVD, "reserved bits in context entry")
            tt = (ce[0] >> _LCE_TT_S) & _LCE_TT_M
            aw = (ce[1] >> _LCE_AW_S) & _LCE_AW_M
            if tt not in (TT_MULTI_LEVEL, TT_DEV_IOTLB, TT_PASS_THROUGH):
                raise FaultError(FR.CONTEXT_ENTRY_INV, f"invalid TT {tt}")
            if tt != TT_PASS_THROUGH and not 1 <= aw <= 3:
                raise FaultError(FR.CONTEXT_ENTRY_INV, f"unsupported AW {aw}")
            return ContextInfo(
                scalable=False,
                fpd=bool((ce[0] >> _LCE_FPD_S) & _LCE_FPD_M),
                tt=tt,
                ssptptr=ce[0] & _LCE_SSPTPTR_M,
                aw=aw,
                did=(ce[1] >> _LCE_DID_S) & _LCE_DID_M,
            )
        if ttm != TTM_SCALABLE:
            raise FaultError(FR.RTADDR_INV_TTM, f"RTADDR TTM={ttm} is not supported")
        upper = devfn >> 7
        (half,) = read(spans, root + bus * 16 + 8 * upper, _Q, FR.ROOT_TABLE_INV, "root entry")
        if not half & _SRE_LP:
            raise FaultError(FR.ROOT_ENTRY_P, f"bus {bus:02x}: root entry not present")
        if half & (_SRE_RSVD | above):
            raise FaultError(FR.ROOT_ENTRY_RSVD, f"bus {bus:02x}: reserved bits in root entry")
        c0, c1, c2, c3 = read(
            spans, (half & _SRE_LCTP) + (devfn & 0x7F) * SM_CONTEXT_ENTRY_SIZE, _Q4,
            FR.CONTEXT_TABLE_INV, "context entry",
        )  # fmt: skip
        if not (c0 >> _SCE_P_S) & _SCE_P_M:
            raise FaultError(FR.CONTEXT_ENTRY_P, "context entry not present")
        if (
            c0 & (_SCE_RSVD[0] | above)
            or c1 & _SCE_RSVD[1]
            or c2 & _SCE_RSVD[2]
            or c3 & _SCE_RSVD[3]
        ):
            raise FaultError(FR.CONTEXT_ENTRY_RSVD, "reserved bits in context entry")
        return ContextInfo(
            True,
            bool((c0 >> _SCE_FPD_S) & _SCE_FPD_M),
            c0 & _SCE_DIR_M,
            (c0 >> _SCE_PDTS_S) & _SCE_PDTS_M,
            bool((c0 >> _SCE_PASIDE_S) & _SCE_PASIDE_M),
            (c1 >> _SCE_RID_PASID_S) & _SCE_RID_PASID_M,
            bool((c0 >> _SCE_PRE_S) & _SCE_PRE_M),
        )

    # -- PASID directory and table ----------------------------------------------------------
    def _load_pasid(self, ctx: ContextInfo, pasid: int, spans: list[Span]) -> PasidInfo:
        read = self._read
        if not 0 <= pasid < 1 << 20 or pasid >> 6 >= 1 << (ctx.pdts + 7):
            raise FaultError(FR.CONTEXT_PASID_TOO_BIG, f"PASID {pasid} beyond PDTS={ctx.pdts}")
        (pde,) = read(
            spans, ctx.pasid_dir + (pasid >> 6) * 8, _Q, FR.PASID_DIR_ACCESS_ERR, "PASID dir entry"
        )
        if not pde & _PDE_P:
            raise FaultError(FR.PASID_DIR_ENTRY_P, f"PASID {pasid}: directory entry not present")
        if pde & (_PDE_RSVD | self._above_haw):
            raise FaultError(FR.PASID_DIR_ENTRY_RSVD, f"PASID {pasid}: reserved bits in dir entry")
        w = read(
            spans, (pde & _PDE_PTP) + (pasid & 0x3F) * PASID_ENTRY_SIZE, _QPE,
            FR.PASID_TABLE_ACCESS_ERR, "PASID entry",
        )  # fmt: skip
        w0 = w[0]
        if not w0 & 1:
            raise FaultError(FR.PASID_ENTRY_P, f"PASID {pasid}: PASID entry not present")
        for i, rsvd in self._pe_rsvd:
            if w[i] & rsvd:
                raise FaultError(FR.PASID_ENTRY_RSVD, f"PASID {pasid}: reserved bits in qw{i}")
        w2 = w[2]
        pgtt = (w0 >> _PE_PGTT_S) & _PE_PGTT_M
        aw = (w0 >> _PE_AW_S) & _PE_AW_M
        flpm = (w2 >> _PE_FLPM_S) & _PE_FLPM_M
        if not PGTT_FIRST_STAGE <= pgtt <= PGTT_PASS_THROUGH:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: invalid PGTT {pgtt}")
        if (pgtt in (PGTT_SECOND_STAGE, PGTT_NESTED)) and not 1 <= aw <= 3:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: unsupported AW {aw}")
        if (pgtt in (PGTT_FIRST_STAGE, PGTT_NESTED)) and flpm > 1:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: invalid FLPM {flpm}")
        return PasidInfo(
            pgtt,
            (w[1] >> _PE_DID_S) & _PE_DID_M,
            bool((w0 >> _PE_FPD_S) & _PE_FPD_M),
            aw,
            w0 & _PE_SSPTPTR_M,
            w2 & _PE_FLPTPTR_M,
            flpm,
            bool((w2 >> _PE_SRE_S) & _PE_SRE_M),
            bool((w2 >> _PE_WPE_S) & _PE_WPE_M),
            bool((w2 >> _PE_ERE_S) & _PE_ERE_M),
        )

    # -- first stage ----------------------------------------------------------------------
    def _fs_walk(
        self,
        pe: PasidInfo,
        va: int,
        write: bool,
        supervisor: bool,
        execute: bool,
        spans: list[Span],
        nested: bool,
    ) -> tuple[int, int, int]:
        """(page base (GPA), page size, permission bits) of a first-stage walk."""
        levels = 4 + pe.flpm
        bits = 12 + 9 * levels
        top = va >> (bits - 1)
        if top and top != (1 << (65 - bits)) - 1:
            raise FaultError(FR.FS_NON_CANONICAL, f"0x{va:x} is not canonical ({bits}-bit)")
        user = not supervisor
        wpe = pe.wpe
        fs_spans = self._spans_of(self.nested_memory) if nested else spans
        rsvd, lrsvd = self._fs_rsvd, self._fs_lrsvd
        unpack = _Q.unpack_from
        table = pe.flptptr
        rw = us = True
        xd = False
        for level in range(levels, 0, -1):
            gpa = table + ((va >> (3 + 9 * level)) & 0x1FF) * 8
            if nested:
                gpa, _, _ = self._ss_walk(
                    pe.ssptptr, pe.aw + 2, gpa, False, _SS_CODES_NESTED_TABLE, spans
                )
            for base, end, buf in fs_spans:
                if base <= gpa and gpa + 8 <= end:
                    pte: int = unpack(buf, gpa - base)[0]
                    break
            else:
                reason = FR.PASID_ENTRY_FSPTPTR_INV if level == levels else FR.FS_PAGING_ENTRY_INV
                raise FaultError(reason, f"first-stage L{level} table 0x{gpa:x} unreadable")
            if not pte & _FS_P:
                raise FaultError(FR.FS_PAGING_ENTRY_P, f"first-stage L{level} entry not present")
            leaf = level == 1 or (level <= 3 and pte & _FS_PS)
            if pte & (lrsvd[level] if leaf and level > 1 else rsvd[level]):
                raise FaultError(FR.FS_PAGING_ENTRY_RSVD, f"reserved bits in first-stage L{level}")
            if not pte & _FS_US:
                us = False
                if user:
                    raise FaultError(FR.FS_PAGING_ENTRY_US, f"U/S clear at first-stage L{level}")
            if not pte & _FS_RW:
                rw = False
                if write and (user or wpe):
                    raise FaultError(FR.SM_WRITE, f"R/W clear at first-stage L{level}")
            if pte & _FS_XD:
                xd = True
                if execute:
                    raise FaultError(FR.FS_EXECUTE, f"XD set at first-stage L{level}")
            if leaf:
                size = 1 << (3 + 9 * level)
                perm = PERM_R
                if us:
                    perm |= PERM_U
                if rw:
                    perm |= PERM_W | PERM_SW
                elif not wpe:
                    perm |= PERM_SW
                if not xd:
                    perm |= PERM_X
                return pte & _FS_ADDR & ~(size - 1), size, perm
            table = pte & _FS_ADDR
        raise AssertionError("unreachable")  # pragma: no cover

    # -- second stage ---------------------------------------------------------------------
    def _ss_walk(
        self,
        root: int,
        levels: int,
        addr: int,
        write: bool,
        codes: tuple[FR, FR, FR, FR, FR],
        spans: list[Span],
    ) -> tuple[int, int, int]:
        """(output address, page size, accumulated R/W bits) of a second-stage walk.

        Per level, QEMU's order: the access right first (``vtd_iova_to_slpte``), then the
        reserved bits; both folded into one mask test on the common path."""
        width = min(12 + 9 * levels, self.haw)
        if addr >> width:
            raise FaultError(codes[4], f"0x{addr:x} beyond the {width}-bit second stage")
        access = _SS_W if write else _SS_R
        chk = self._ss_chk_w if write else self._ss_chk_r
        b, e, buf = spans[0] if spans else _NO_SPAN
        e -= 8
        unpack = _UNPACK_Q
        table = root
        rw = _SS_R | _SS_W
        level = levels
        while True:
            g = table + ((addr >> (9 * level)) & 0xFF8)
            if b <= g <= e:
                pte: int = unpack(buf, g - b)[0]
            else:
                pte = self._read(spans, g, _Q, codes[0], f"second-stage L{level} entry")[0]
            if pte & chk[level] != access:
                if not pte & access:
                    raise FaultError(
                        codes[1] if write else codes[2], f"second-stage L{level} denies"
                    )
                raise FaultError(codes[3], f"reserved bits in second-stage L{level}")
            rw &= pte
            if level == 1 or (level <= 3 and pte & _SS_PS):
                if level > 1 and pte & self._ss_lrsvd[level]:
                    raise FaultError(codes[3], f"reserved bits in second-stage L{level}")
                size = 1 << (3 + 9 * level)
                return (pte & _SS_ADDR & ~(size - 1)) | (addr & (size - 1)), size, rw
            table = pte & _SS_ADDR
            level -= 1
