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

Every field is read through code generated from the ``vioasid.formats`` layouts (no second
description of any layout, no bit position spelled here): the entry decoders
(``Layout.decoder``) and the direct walk (a template rendered with the layouts' masks as
literals, ``bitfields.render``).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from vioasid.formats.bitfields import render
from vioasid.formats.context import (
    LEGACY_CONTEXT_ENTRY,
    LEGACY_CONTEXT_ENTRY_SIZE,
    SM_CONTEXT_ENTRY,
    SM_CONTEXT_ENTRY_SIZE,
    TT_DEV_IOTLB,
    TT_MULTI_LEVEL,
    TT_PASS_THROUGH,
    pasid_dir_entries,
)
from vioasid.formats.fault import FaultReason as FR
from vioasid.formats.paging import (
    FIRST_STAGE_PDE_2M,
    FIRST_STAGE_PDPE_1G,
    FIRST_STAGE_PTE,
    SECOND_STAGE_PDE_2M,
    SECOND_STAGE_PDPE_1G,
    SECOND_STAGE_PTE,
)
from vioasid.formats.pasid import (
    PASID_BITS,
    PASID_DIR_ENTRY,
    PASID_DIR_ENTRY_SIZE,
    PASID_DIR_SHIFT,
    PASID_ENTRY,
    PASID_ENTRY_SIZE,
    PASID_TABLE_MASK,
    PGTT_FIRST_STAGE,
    PGTT_NAMES,
    PGTT_NESTED,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
)
from vioasid.formats.registers import RTADDR, TTM_LEGACY, TTM_SCALABLE
from vioasid.formats.root import LEGACY_ROOT_ENTRY, ROOT_ENTRY_SIZE, SM_ROOT_ENTRY

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
from .memory import GuestMemory, MemoryAccessError

U64 = (1 << 64) - 1
_PASID_LIMIT = 1 << PASID_BITS
_Q = struct.Struct("<Q")
_Q2 = struct.Struct("<2Q")
_Q4 = struct.Struct("<4Q")
_PE_WORDS = 1 + max(i for i, w in enumerate(PASID_ENTRY.words) if w.fields)  # words decoded
_QPE = struct.Struct(f"<{_PE_WORDS}Q")
assert _PE_WORDS == 3  # the direct walk unpacks qw0..qw2
_QPE_ALL = struct.Struct(f"<{len(PASID_ENTRY.words)}Q")
_UNPACK_Q = _Q.unpack_from

# -- decoders and masks generated from the layouts -----------------------------------------
# entry words -> ContextInfo / PasidInfo, every field read with literal masks.
_decode_legacy_context: Callable[[tuple[int, ...]], ContextInfo] = LEGACY_CONTEXT_ENTRY.decoder(
    [False, "FPD", 0, 0, False, 0, False, "TT", "SSPTPTR", "AW", "DID"], ContextInfo
)
_decode_sm_context: Callable[[tuple[int, ...]], ContextInfo] = SM_CONTEXT_ENTRY.decoder(
    [True, "FPD", "PASIDDIRPTR", "PDTS", "PASIDE", "RID_PASID", "PRE"], ContextInfo
)
_decode_pasid: Callable[[tuple[int, ...]], PasidInfo] = PASID_ENTRY.decoder(
    ["PGTT", "DID", "FPD", "AW", "SSPTPTR", "FLPTPTR", "FLPM", "SRE", "WPE", "ERE", "EAFE"],
    PasidInfo,
)
_TTM, _RTA = RTADDR.field("TTM"), RTADDR.mask("RTA")
_LRE_P, _LRE_CTP = LEGACY_ROOT_ENTRY.mask("P"), LEGACY_ROOT_ENTRY.mask("CTP")
_SRE_P, _SRE_CTP = SM_ROOT_ENTRY.mask("LP"), SM_ROOT_ENTRY.mask("LCTP")  # UP/UCTP: the same bits
_LCE_P, _SCE_P = LEGACY_CONTEXT_ENTRY.mask("P"), SM_CONTEXT_ENTRY.mask("P")
_PDE_P, _PDE_FPD, _PDE_PTP = (PASID_DIR_ENTRY.mask(n) for n in ("P", "FPD", "PTP"))
_PE_P, _PE_FPD = PASID_ENTRY.mask("P"), PASID_ENTRY.mask("FPD")
_FS_P, _FS_RW, _FS_US, _FS_PS, _FS_XD, _FS_ADDR = (
    FIRST_STAGE_PTE.mask(n) for n in ("P", "RW", "US", "PS", "XD", "ADDR")
)
_SS_R, _SS_W, _SS_PS, _SS_ADDR = (SECOND_STAGE_PTE.mask(n) for n in ("R", "W", "PS", "ADDR"))
assert SM_ROOT_ENTRY.mask("UP") == _SRE_P and SM_ROOT_ENTRY.mask("UCTP") == _SRE_CTP
assert SM_ROOT_ENTRY.reserved[0] == SM_ROOT_ENTRY.reserved[1]

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

# A missing entry reads as "not present"; everything else the reader refuses is "invalid".
NOT_PRESENT = frozenset(
    {FR.ROOT_ENTRY_P, FR.CONTEXT_ENTRY_P, FR.PASID_DIR_ENTRY_P, FR.PASID_ENTRY_P}
)


def need_mask(write: bool, supervisor: bool = False, execute: bool = False) -> int:
    """The IOTLB permission bits a request needs."""
    need = PERM_R | (PERM_S if supervisor else PERM_U)
    if write:
        need |= PERM_SW if supervisor else PERM_W
    if execute:
        need |= PERM_X
    return need


_NEED = {(w, s, x): need_mask(w, s, x) for w in (False, True) for s in (False, True)
         for x in (False, True)}  # fmt: skip


@dataclass(slots=True)
class WalkRequest:
    """One DMA request: source id, input address, PASID (None = request without PASID)."""

    sid: int
    addr: int
    pasid: int | None = None
    write: bool = False
    supervisor: bool = False
    execute: bool = False


Span = tuple[int, int, memoryview]  # (GPA base, GPA end, buffer)
_NO_SPAN: Span = (0, 0, memoryview(b""))


class TranslateFast(Protocol):
    def __call__(
        self, rtaddr: int, sid: int, addr: int, pasid: int | None = None, write: bool = False
    ) -> int | Fault: ...


# (rtaddr, sid, addr, count, pasid=None, write=False) -> one answer per page (Walker docstring)
TranslateRange = Callable[..., list[int | Fault]]
# (rtaddr, sid, addrs, pasid=None, write=False) -> one answer per address (Walker docstring)
TranslatePages = Callable[..., list[int | Fault]]


# -- the direct walk, generated from the layouts ---------------------------------------------
# The common uncached case in one straight run: scalable mode, first stage only (4-level), every
# table in the largest region, user request, no fault. Each entry is checked with one folded
# "present, no reserved bit" mask; anything unusual is a MISS and the general walk (which names
# the exact fault) takes over. A read past the region's end is struct.error (a MISS too); a read
# below its base is checked (``# based`` lines, left out where the region starts at GPA 0: no
# table pointer or index is negative, and the root's ``g < b`` catches a negative source id).
# Rendered as ``translate_fast`` itself (HIT: the output address) and as ``direct`` for the
# general walk (HIT: the IOTLB entry, permissions and DID; the lines marked ``# entry`` only
# there), each for a region at GPA 0 and one elsewhere. ``$X`` names are literal masks from the
# layouts (vioasid.formats.bitfields.render); the others are the PCI RID and x86 paging geometry.
_DIRECT_BODY = """
if rtaddr & $RT.TTM != $TTM_SM:
    MISS
g = (rtaddr & $RT.RTA) + (sid >> 8) * $ROOT_ENTRY_SIZE + ((sid >> 4) & 8)  # devfn >= 128: upper
if g < b:
    MISS
half = unpack(buf, g - b)[0]
if half & $CHK_ROOT != $SRE.LP:
    MISS
g = (half & $SRE.LCTP) + (sid & 0x7F) * $SM_CONTEXT_ENTRY_SIZE
if g < b:  # based
    MISS  # based
c0, c1, c2, c3 = unpack4(buf, g - b)
if c0 & $CHK_CTX0 != $SCE.P or $SCE.rsvd1(c1) or $SCE.rsvd2(c2) or $SCE.rsvd3(c3):
    MISS
if REQ is None:
    epasid = $SCE.RID_PASID(c1)
elif c0 & $SCE.PASIDE and 0 <= REQ < $PASID_LIMIT:
    epasid = REQ
else:
    MISS
if epasid >> ($SCE.PDTS(c0) + $PDTS_SHIFT):  # beyond the 2^(PDTS+7) directory entries
    MISS
g = (c0 & $SCE.PASIDDIRPTR) + (epasid >> $PASID_DIR_SHIFT) * $PASID_DIR_ENTRY_SIZE
if g < b:  # based
    MISS  # based
pde = unpack(buf, g - b)[0]
if pde & $CHK_PDE != $PDE.P:
    MISS
g = (pde & $PDE.PTP) + (epasid & $PASID_TABLE_MASK) * $PASID_ENTRY_SIZE
if g < b:  # based
    MISS  # based
w0, w1, w2 = unpack3(buf, g - b)
if w0 & $CHK_PE0 != $WANT_PE0 or $PE.rsvd1(w1) or w2 & $CHK_PE2:
    MISS
top = addr >> 47  # 4-level: bits 63:47 all equal (canonical)
if top and top != 0x1FFFF:
    MISS
FIRST_STAGE_LEVELS
if not acc & $FS.US or (write and not acc & $FS.RW):
    MISS  # the general walk names the level that denies it
if pa <= $INTR_HI and pa + size > $INTR_LO:
    MISS
perm = $PERM_RU  # entry
if acc & $FS.RW:  # entry
    perm |= $PERM_WSW  # entry
elif not w2 & $PE.WPE:  # entry
    perm |= $PERM_SW  # entry
if w2 & $PE.SRE:  # entry
    perm |= $PERM_S  # entry
if w2 & $PE.ERE and not xd & $FS.XD:  # entry
    perm |= $PERM_X  # entry
HIT
"""

# ``make`` binds the walk to one walker: ``translate_fast`` reads the largest region's
# (base, buffer) from the memory (one attribute; GuestMemory keeps it) and takes the rendering
# for that base. ``direct`` is the same walk for ``Walker._walk``.
_DIRECT_MODULE = """
def make(walker, slow, unpack, unpack3, unpack4, unpackn, name_fs, error):
    mem = walker.mem

    def translate_fast(rtaddr, sid, addr, pasid=None, write=False):
        b, buf = mem.largest
        if b:
            return translate_based(rtaddr, sid, addr, pasid, write, b, buf)
        try:
{fast_zero}
        except error:
            pass
        return slow(rtaddr, sid, addr, pasid, write)

    def translate_based(rtaddr, sid, addr, pasid, write, b, buf):
        try:
{fast_based}
        except error:
            pass
        return slow(rtaddr, sid, addr, pasid, write)

    def direct(rtaddr, sid, addr, rpasid, write):
        b, buf = mem.largest
        try:
{direct}
        except error:
            return None

    def descend(rtaddr, sid, addr, pasid, write, b, buf):
        try:
{descend}
        except error:
            return None

    def translate_range(rtaddr, sid, addr, count, pasid=None, write=False):
        out = []
        append = out.append
        if write:
            need, chk, want = {need_w}, {chk_w}, {want_w}
        else:
            need, chk, want = {need_r}, {chk_r}, {want_r}
        b, buf = mem.largest
        while count > 0:
            d = descend(rtaddr, sid, addr, pasid, write, b, buf)
            if d is not None:
                pa, size, table, up = d
                if pa >= 0:  # a large page, every check made for all of it
                    off = size - 1
                    n = ((size - (addr & off) - 1) >> 12) + 1
                    if n > count:
                        n = count
                    for a in range(addr, addr + (n << 12), 0x1000):
                        append(pa | (a & off))
                    addr += n << 12
                    count -= n
                    continue
                if up & need == need:  # else the first page faults: the walk names it
                    i = (addr >> 12) & 0x1FF
                    n = 512 - i
                    if n > count:
                        n = count
                    g = table + 8 * i
                    if g >= b:
                        try:
                            entries = unpackn(n)(buf, g - b)
                        except error:
                            entries = ()
                        off = addr & 0xFFF
                        k = 0
                        for e in entries:
                            if e & chk != want:
                                break
                            pa = e & {addr_mask}
                            if pa <= {intr_hi} and pa + 0x1000 > {intr_lo}:
                                break
                            append(pa | off)
                            k += 1
                        addr += k << 12
                        count -= k
                        if k == n:
                            continue
            # this page alone (the walk names its fault), then a fresh descent
            r = translate_fast(rtaddr, sid, addr, pasid, write)
            append(r)
            if type(r) is not int:
                return out
            addr += 0x1000
            count -= 1
        return out

    def translate_pages(rtaddr, sid, addrs, pasid=None, write=False):
        out = []
        append = out.append
        if write:
            need, chk, want = {need_w}, {chk_w}, {want_w}
        else:
            need, chk, want = {need_r}, {chk_r}, {want_r}
        b, buf = mem.largest
        leaves = {{}}  # addr >> 21 (the L4-L2 indices and the canonical bits) -> its descent
        for addr in addrs:
            d = leaves.get(addr >> 21, leaves)
            if d is leaves:
                d = leaves[addr >> 21] = descend(rtaddr, sid, addr, pasid, write, b, buf)
            if d is not None:
                pa, size, table, up = d
                if pa >= 0:  # a large page, every check made for all of it
                    append(pa | (addr & (size - 1)))
                    continue
                if up & need == need:  # else the page faults: the walk names it
                    g = table + ((addr >> 9) & 0xFF8)
                    if g >= b:
                        try:
                            e = unpack(buf, g - b)[0]
                        except error:
                            e = 0
                        if e & chk == want:
                            pa = e & {addr_mask}
                            if pa > {intr_hi} or pa + 0x1000 <= {intr_lo}:
                                append(pa | (addr & 0xFFF))
                                continue
            # this page alone: the walk names its fault (or answers what the descent does not)
            r = translate_fast(rtaddr, sid, addr, pasid, write)
            append(r)
            if type(r) is not int:
                return out
        return out

    return translate_fast, direct, translate_range, translate_pages
"""

_GENERATED: dict[int, dict[str, Any]] = {}


def _first_stage_levels(descend: bool = False) -> list[str]:
    """The template's 4-level first-stage walk, one block per level from L4: the entry read
    (index * 8 == (addr >> 9 * level) & 0xFF8) and checked; at L3 and L2 a PS entry is the
    leaf (its large-page layout's reserved bits and address), else the walk goes down; L1 is
    the leaf. The leaf sets size, pa, acc (the AND of the path: U/S, R/W) and xd (the OR).
    ``descend`` (the range walk's descent): L1 is not read; the walk returns the L1 table's
    address and the AND of the levels above (the range walk checks the L1 entries itself)."""
    lines: list[str] = []
    table, pad = "(w2 & $PE.FLPTPTR)", ""
    for level in (4, 3, 2, 1):
        if level == 1 and descend:
            lines.append(f"{pad}return -1, 0, {table}, p4 & p3 & p2")
            break
        p = f"p{level}"
        lines += [
            f"{pad}g = {table} + ((addr >> {9 * level}) & 0xFF8)",
            f"{pad}if g < b:  # based",
            f"{pad}    MISS  # based",
            f"{pad}{p} = unpack(buf, g - b)[0]",
            f"{pad}if {p} & $CHK_FS{level} != $FS.P:",
            f"{pad}    MISS",
        ]
        path = [f"p{n}" for n in range(4, level - 1, -1)]
        leaf = [
            f"size = {1 << (3 + 9 * level):#x}",
            f"pa = {p} & ${_FS_LEAF_LAYOUT.get(level, 'FS')}.ADDR",
            f"acc = {' & '.join(path)}",
            f"xd = {' | '.join(path)}  # entry",
        ]
        if level == 1:
            lines += [pad + line for line in leaf]
        elif level < 4:
            lines += [f"{pad}if {p} & $FS.PS:", f"{pad}    if {p} & $LRSVD{level}:"]
            lines += [f"{pad}        MISS", *(f"{pad}    {line}" for line in leaf), f"{pad}else:"]
            pad += "    "
        table = f"({p} & $FS.ADDR)"
    return lines


_FS_LEAF_LAYOUT = {3: "FS1G", 2: "FS2M"}  # large pages; 4 KiB: FS


def _render_body(consts: dict[str, int], *, kind: str, based: bool) -> str:
    """The direct walk's body for ``kind``: "fast" (``translate_fast``: the output address,
    the general walk on a MISS), "direct" (the IOTLB entry for ``Walker._walk``, None on a
    MISS) or "descend" (the range walk's descent: (pa, size, 0, 0) for a large page, every
    check made; (-1, 0, L1 table, AND of L4-L2) otherwise; None on a MISS)."""
    fast = kind != "direct"
    layouts = {"RT": RTADDR, "SRE": SM_ROOT_ENTRY, "SCE": SM_CONTEXT_ENTRY,
               "PDE": PASID_DIR_ENTRY, "PE": PASID_ENTRY, "FS": FIRST_STAGE_PTE,
               "FS2M": FIRST_STAGE_PDE_2M, "FS1G": FIRST_STAGE_PDPE_1G}  # fmt: skip
    if kind == "fast":
        subs = {"MISS": "return slow(rtaddr, sid, addr, pasid, write)",
                "HIT": "return pa | (addr & (size - 1))", "REQ": "pasid"}  # fmt: skip
    elif kind == "descend":
        subs = {"MISS": "return None", "HIT": "return pa, size, 0, 0", "REQ": "pasid"}
    else:
        subs = {"MISS": "return None", "REQ": "rpasid",
                "HIT": "return pa, size, perm, name_fs, $PE.DID(w1), epasid"}  # fmt: skip
    lines = []
    levels = "\n".join(_first_stage_levels(descend=kind == "descend"))
    body = _DIRECT_BODY.replace("FIRST_STAGE_LEVELS", levels)
    for line in body.splitlines():
        if (fast and line.endswith("# entry")) or (not based and line.endswith("# based")):
            continue
        if not based:
            line = line.replace("g - b", "g")
        for word, text in subs.items():
            line = line.replace(word, text)
        lines.append(line)
    return render("\n".join(lines), layouts, consts).replace(" or False", "")


def _generated(haw: int, consts: dict[str, int]) -> dict[str, Any]:
    """The direct walk's renderings for a host address width (compiled once per width)."""
    got = _GENERATED.get(haw)
    if got is None:
        src = _DIRECT_MODULE.format(
            fast_zero=_indent(_render_body(consts, kind="fast", based=False), 12),
            fast_based=_indent(_render_body(consts, kind="fast", based=True), 12),
            direct=_indent(_render_body(consts, kind="direct", based=True), 12),
            descend=_indent(_render_body(consts, kind="descend", based=True), 12),
            **{k: hex(v) for k, v in _range_consts(consts).items()},
        )
        got = {}
        exec(compile(src, f"<walker direct path, haw {haw}>", "exec"), got)  # our own template
        got["source"] = src
        _GENERATED[haw] = got
    return got


def _range_consts(consts: dict[str, int]) -> dict[str, int]:
    """The range walk's literals: per access, the U/S and R/W bits the path must grant, and the
    folded test of an L1 entry (present, no reserved bit, those bits), as the direct walk
    checks them."""
    need_r, need_w = _FS_US, _FS_US | _FS_RW
    return {
        "need_r": need_r,
        "need_w": need_w,
        "chk_r": consts["CHK_FS1"] | need_r,
        "chk_w": consts["CHK_FS1"] | need_w,
        "want_r": _FS_P | need_r,
        "want_w": _FS_P | need_w,
        "addr_mask": _FS_ADDR,
        "intr_lo": consts["INTR_LO"],
        "intr_hi": consts["INTR_HI"],
    }


@functools.cache
def _unpack_entries(n: int) -> Callable[[Any, int], tuple[int, ...]]:
    """``unpack_from`` for ``n`` consecutive 64-bit entries (one read of a leaf-table run)."""
    return struct.Struct(f"<{n}Q").unpack_from


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line if line.strip() else "" for line in text.splitlines())


def _first_stage_check(
    chk0: int, want0: int, rsvd1: int, chk2: int
) -> Callable[[tuple[int, ...]], bool]:
    def first_stage_entry_ok(w: tuple[int, ...]) -> bool:
        return w[0] & chk0 == want0 and not w[1] & rsvd1 and not w[2] & chk2

    return first_stage_entry_ok


class Walker:
    """Walks VT-d tables in ``mem``.

    ``haw``: host address width (bits above it in table pointers are reserved).
    ``caches``: the context/PASID/IOTLB caches (``Caches(enabled=False)`` for none); default a
    fresh enabled :class:`Caches`.
    ``nested_memory``: where the first-stage tables of a *nested* (PGTT=3) entry are read, at the
    address their second stage yields (default ``mem``). Root/context/PASID tables and every
    second-stage table are always read from ``mem``. The final output of a nested walk is the
    second stage's output address.

    ``translate_fast(rtaddr, sid, addr, pasid=None, write=False)`` is the hot path for
    user-privilege requests: the output address (int) or a :class:`Fault`. With caches it is an
    IOTLB lookup; without, the direct walk generated from the layouts; either falls back to the
    general walk.

    ``translate_range(rtaddr, sid, addr, count, pasid=None, write=False)``: the same answers
    for the ``count`` pages ``addr + i * 4096``, as a list that ends at the first
    :class:`Fault` (included). Without caches, the direct walk's descent runs once per leaf
    table (or large page) and the run of L1 entries the range covers in that table is read at
    once and checked entry by entry with the direct walk's tests; any page those do not pass
    (and everything the descent does not cover: other PGTTs, 5-level, tables outside the
    largest region) is walked alone by ``translate_fast``. Otherwise (caches, ``direct``
    off): :meth:`translate_by_page`.

    ``translate_pages(rtaddr, sid, addrs, pasid=None, write=False)``: the answers of
    ``translate_fast`` for the addresses ``addrs`` (any order: a request's scattered pages), as
    a list that ends at the first :class:`Fault` (included). Without caches, the descent runs
    once per 2 MiB of IOVA the addresses fall in (the upper levels shared), then each page's L1
    entry is read and checked as ``translate_range`` checks it; anything else is walked alone.
    Otherwise: :meth:`translate_each`.

    The one reader of root, context and PASID entries: :meth:`context_info`,
    :meth:`pasid_table`, :meth:`pasid_info` / :func:`decode_pasid_entry` (every present and
    reserved bit checked, FaultError with the VT-d reason otherwise).
    """

    translate_fast: TranslateFast
    translate_range: TranslateRange
    translate_pages: TranslatePages
    # Whether PASID-entry words are a present, well-formed first-stage entry (False: the
    # decode_pasid_entry names the fault, or it is another PGTT): one folded test per word.
    first_stage_entry_ok: Callable[[tuple[int, ...]], bool]

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
        self._fs_lrsvd = (0, r, r | FIRST_STAGE_PDE_2M.reserved[0],
                          r | FIRST_STAGE_PDPE_1G.reserved[0])  # fmt: skip
        # Second stage: QEMU VTD_SPTE_PAGE_L*_RSVD_MASK / VTD_SPTE_LPAGE_L*_RSVD_MASK.
        self._ss_rsvd = (0, r, r, r, r | _SS_PS, r | _SS_PS)
        self._ss_lrsvd = (0, r, r | SECOND_STAGE_PDE_2M.reserved[0],
                          r | SECOND_STAGE_PDPE_1G.reserved[0])  # fmt: skip
        self._pe_rsvd = tuple(
            (i, w.reserved | (above if any(f.addr for f in w.fields) else 0))
            for i, w in enumerate(PASID_ENTRY.words[:_PE_WORDS])
        )
        pe = PASID_ENTRY
        # a present, well-formed first-stage entry: one folded test per word (bind fast path)
        self.first_stage_entry_ok = _first_stage_check(
            _PE_P | pe.mask("PGTT") | pe.reserved[0] | above,
            _PE_P | pe.field("PGTT").put(PGTT_FIRST_STAGE),
            pe.reserved[1],
            pe.reserved[2] | above | 1 << pe.field("FLPM").hi,  # FLPM 0 or 1
        )
        self._pde_rsvd = PASID_DIR_ENTRY.reserved[0] | above
        self._chk_pde = _PDE_P | self._pde_rsvd
        self._ss_chk_r = tuple(_SS_R | m for m in self._ss_rsvd)
        self._ss_chk_w = tuple(_SS_W | m for m in self._ss_rsvd)
        self._spans: dict[int, tuple[object, int, list[Span]]] = {}
        self._direct_fast: TranslateFast
        self._direct_first_stage: Callable[..., Any]
        self._direct_range: TranslateRange
        self._direct_pages: TranslatePages
        made = _generated(haw, self._direct_consts(above))["make"](
            self, self._slow_fast, _UNPACK_Q, _QPE.unpack_from, _Q4.unpack_from, _unpack_entries,
            _NAME_FS, struct.error,
        )  # fmt: skip
        self._direct_fast, self._direct_first_stage, self._direct_range, self._direct_pages = made
        self.direct = True

    @property
    def direct(self) -> bool:
        """Whether uncached user requests try the one-run first-stage path first (the general
        walk answers alone when False: the tests compare the two)."""
        return self._direct

    @direct.setter
    def direct(self, on: bool) -> None:
        self._direct = on
        if self.caches.enabled:
            self.translate_fast = self._cached_fast()
        else:
            self.translate_fast = self._direct_fast if on else self._slow_fast
        direct_range = on and not self.caches.enabled
        self.translate_range = self._direct_range if direct_range else self.translate_by_page
        self.translate_pages = self._direct_pages if direct_range else self.translate_each

    def _direct_consts(self, above: int) -> dict[str, int]:
        """The direct walk's folded "present and no reserved bit" masks for this width."""
        pe = PASID_ENTRY
        return {
            "TTM_SM": TTM_SCALABLE << _TTM.lo,
            "ROOT_ENTRY_SIZE": ROOT_ENTRY_SIZE,
            "SM_CONTEXT_ENTRY_SIZE": SM_CONTEXT_ENTRY_SIZE,
            "PASID_LIMIT": _PASID_LIMIT,
            "PASID_DIR_SHIFT": PASID_DIR_SHIFT,
            "PDTS_SHIFT": PASID_DIR_SHIFT + 7,  # 2^(PDTS+7) directory entries of 2^6 PASIDs
            "PASID_DIR_ENTRY_SIZE": PASID_DIR_ENTRY_SIZE,
            "PASID_TABLE_MASK": PASID_TABLE_MASK,
            "PASID_ENTRY_SIZE": PASID_ENTRY_SIZE,
            "CHK_ROOT": _SRE_P | SM_ROOT_ENTRY.reserved[0] | above,
            "CHK_CTX0": _SCE_P | SM_CONTEXT_ENTRY.reserved[0] | above,
            "CHK_PDE": _PDE_P | PASID_DIR_ENTRY.reserved[0] | above,
            "CHK_PE0": _PE_P | pe.mask("PGTT") | pe.reserved[0] | above,
            "WANT_PE0": _PE_P | pe.field("PGTT").put(PGTT_FIRST_STAGE),
            # FLPM must be 0 (4-level); its high bit is caught by the folded mask too
            "CHK_PE2": pe.reserved[2] | above | pe.mask("FLPM"),
            **{f"CHK_FS{lv}": _FS_P | self._fs_rsvd[lv] for lv in (1, 2, 3, 4)},
            "LRSVD2": self._fs_lrsvd[2],
            "LRSVD3": self._fs_lrsvd[3],
            "INTR_LO": _INTR_LO,
            "INTR_HI": _INTR_HI,
            "PERM_RU": PERM_R | PERM_U,
            "PERM_WSW": PERM_W | PERM_SW,
            "PERM_SW": PERM_SW,
            "PERM_S": PERM_S,
            "PERM_X": PERM_X,
        }

    # -- public API -----------------------------------------------------------------------
    def translate(self, rtaddr: int, req: WalkRequest) -> Translation | Fault:
        """Translate one request; a :class:`Fault` for every failure, never an exception."""
        c = self.caches
        if c.enabled and c.rtaddr == rtaddr:
            tag = c.linked(req.sid, req.pasid)
            if tag is not None:
                hit = self._iotlb_hit(
                    tag, req.addr, need_mask(req.write, req.supervisor, req.execute)
                )
                if hit is not None:
                    return self._translation(req, hit, tag[1], True)
        try:
            e, pasid, cached = self._walk(
                rtaddr, req.sid, req.addr, req.pasid, req.write, req.supervisor, req.execute
            )
        except FaultError as exc:
            return Fault(exc.reason, req.addr, req.sid, req.pasid, req.write, exc.detail)
        return self._translation(req, e, pasid, cached)

    @staticmethod
    def _translation(
        req: WalkRequest, e: IotlbEntry, pasid: int | None, cached: bool
    ) -> Translation:
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

    def _cached_fast(self) -> TranslateFast:
        """The IOTLB hit path: the caches' user pages of the request's (sid, PASID), indexed
        by ``write`` (a bool, or 0/1), give the 4 KiB output page; anything missing is a
        LookupError, caught, and the general walk answers (and fills the pages)."""
        caches, fast, slow = self.caches, self.caches.fast, self._slow_fast

        def translate_fast(
            rtaddr: int, sid: int, addr: int, pasid: int | None = None, write: bool = False
        ) -> int | Fault:
            if rtaddr == caches.rtaddr:
                try:
                    return fast[sid][pasid][write][addr >> 12] | (addr & 0xFFF)
                except LookupError:
                    pass
            return slow(rtaddr, sid, addr, pasid, write)

        return translate_fast

    def translate_by_page(self, rtaddr: int, sid: int, addr: int, n: int, pasid: int | None = None,
                          write: bool = False) -> list[int | Fault]:  # fmt: skip
        """``translate_range`` one ``translate_fast`` per page (the reference it must equal)."""
        out: list[int | Fault] = []
        tf = self.translate_fast
        for a in range(addr, addr + (max(n, 0) << 12), 0x1000):
            r = tf(rtaddr, sid, a, pasid, write)
            out.append(r)
            if type(r) is not int:
                break
        return out

    def translate_each(
        self, rtaddr: int, sid: int, addrs: Iterable[int], pasid: int | None = None,
        write: bool = False,
    ) -> list[int | Fault]:  # fmt: skip
        """``translate_pages`` one ``translate_fast`` per address (the reference it must equal)."""
        out: list[int | Fault] = []
        tf = self.translate_fast
        for a in addrs:
            r = tf(rtaddr, sid, a, pasid, write)
            out.append(r)
            if type(r) is not int:
                break
        return out

    def _slow_fast(
        self, rtaddr: int, sid: int, addr: int, pasid: int | None = None, write: bool = False
    ) -> int | Fault:
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
            if ctx.fpd or not ctx.scalable:
                return ctx.fpd
            p = ctx.rid_pasid if pasid is None else pasid
            pde = self._pasid_dir_entry(ctx, p, spans, present=False)
            if pde & _PDE_FPD:
                return True
            if not pde & _PDE_P:
                return False
            (w0,) = self._read(
                spans, self._entry_gpa(pde, p), _Q, FR.PASID_TABLE_ACCESS_ERR, "PASID entry"
            )
        except FaultError:
            return False
        return bool(w0 & _PE_FPD)

    def context_info(self, rtaddr: int, sid: int) -> ContextInfo:
        """The decoded context entry for ``sid`` (raises FaultError)."""
        return self._load_context(rtaddr, sid, self._spans_of(self.mem))

    def pasid_table(self, ctx: ContextInfo, pasid: int) -> int:
        """The address of the leaf PASID table holding ``pasid`` (raises FaultError)."""
        pde = self._pasid_dir_entry(ctx, pasid, self._spans_of(self.mem), present=True)
        return pde & _PDE_PTP

    def pasid_info(self, ctx: ContextInfo, pasid: int) -> PasidInfo:
        """The decoded PASID-table entry (raises FaultError)."""
        return self._load_pasid(ctx, pasid, self._spans_of(self.mem))

    def first_stage_words(self, ctx: ContextInfo, pasid: int) -> tuple[int, ...] | None:
        """The fast path of :meth:`pasid_table` + reading the entry + ``first_stage_entry_ok``
        (one folded test per entry, as the direct walk does): the words of a present,
        well-formed first-stage entry, or None for anything else (:meth:`pasid_info` then
        names the fault, or it is another PGTT). Reads the largest region directly, as the
        direct walk does; tables elsewhere take :meth:`_first_stage_words_any`."""
        if not 0 <= pasid < _PASID_LIMIT or pasid >> (ctx.pdts + PASID_DIR_SHIFT + 7):
            return None
        b, buf = self.mem.largest
        g = ctx.pasid_dir + (pasid >> PASID_DIR_SHIFT) * PASID_DIR_ENTRY_SIZE
        try:
            if g >= b:
                pde: int = _UNPACK_Q(buf, g - b)[0]
                if pde & self._chk_pde != _PDE_P:
                    return None
                g = (pde & _PDE_PTP) + (pasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE
                if g >= b:
                    w: tuple[int, ...] = _QPE_ALL.unpack_from(buf, g - b)
                    return w if self.first_stage_entry_ok(w) else None
        except struct.error:  # past the region's end
            pass
        return self._first_stage_words_any(ctx, pasid)

    def _first_stage_words_any(self, ctx: ContextInfo, pasid: int) -> tuple[int, ...] | None:
        mem = self.mem
        try:
            pde = mem.read_u64(ctx.pasid_dir + (pasid >> PASID_DIR_SHIFT) * PASID_DIR_ENTRY_SIZE)
            if pde & self._chk_pde != _PDE_P:
                return None
            gpa = (pde & _PDE_PTP) + (pasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE
            r = mem.region_of(gpa, PASID_ENTRY_SIZE)
        except MemoryAccessError:
            return None
        w: tuple[int, ...] = _QPE_ALL.unpack_from(r.buf, gpa - r.gpa)
        return w if self.first_stage_entry_ok(w) else None

    def decode_pasid_entry(self, words: tuple[int, ...], pasid: int) -> PasidInfo:
        """Check and decode the words of a PASID-table entry read by the caller (a whole leaf
        table read at once, say); raises FaultError as :meth:`pasid_info` does."""
        return self._check_pasid(words, pasid)

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
            d = self._direct_first_stage(rtaddr, sid, addr, rpasid, write)
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
                c.link(sid, None, tag)
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
            self._check_pdts(ctx, pasid)
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
            c.link(sid, rpasid, tag)
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

    # -- root and context -----------------------------------------------------------------
    def _load_context(self, rtaddr: int, sid: int, spans: list[Span]) -> ContextInfo:
        ttm = _TTM.get(rtaddr)
        root = rtaddr & _RTA
        bus, devfn = sid >> 8, sid & 0xFF
        above = self._above_haw
        read = self._read
        if ttm == TTM_LEGACY:
            rsvd = LEGACY_ROOT_ENTRY.reserved
            lo, hi = read(spans, root + bus * ROOT_ENTRY_SIZE, _Q2, FR.ROOT_TABLE_INV, "root entry")
            if not lo & _LRE_P:
                raise FaultError(FR.ROOT_ENTRY_P, f"bus {bus:02x}: root entry not present")
            if lo & (rsvd[0] | above) or hi & rsvd[1]:
                raise FaultError(FR.ROOT_ENTRY_RSVD, f"bus {bus:02x}: reserved bits in root entry")
            ce = read(
                spans, (lo & _LRE_CTP) + devfn * LEGACY_CONTEXT_ENTRY_SIZE, _Q2,
                FR.CONTEXT_TABLE_INV, "context entry",
            )  # fmt: skip
            if not ce[0] & _LCE_P:
                raise FaultError(FR.CONTEXT_ENTRY_P, "context entry not present")
            rsvd = LEGACY_CONTEXT_ENTRY.reserved
            if ce[0] & (rsvd[0] | above) or ce[1] & rsvd[1]:
                raise FaultError(FR.CONTEXT_ENTRY_RSVD, "reserved bits in context entry")
            ctx = _decode_legacy_context(ce)
            if ctx.tt not in (TT_MULTI_LEVEL, TT_DEV_IOTLB, TT_PASS_THROUGH):
                raise FaultError(FR.CONTEXT_ENTRY_INV, f"invalid TT {ctx.tt}")
            if ctx.tt != TT_PASS_THROUGH and not 1 <= ctx.aw <= 3:
                raise FaultError(FR.CONTEXT_ENTRY_INV, f"unsupported AW {ctx.aw}")
            return ctx
        if ttm != TTM_SCALABLE:
            raise FaultError(FR.RTADDR_INV_TTM, f"RTADDR TTM={ttm} is not supported")
        upper = devfn >> 7  # devfn 128-255: the upper half (UP/UCTP)
        (half,) = read(
            spans, root + bus * ROOT_ENTRY_SIZE + 8 * upper, _Q, FR.ROOT_TABLE_INV, "root entry"
        )
        if not half & _SRE_P:
            raise FaultError(FR.ROOT_ENTRY_P, f"bus {bus:02x}: root entry not present")
        if half & (SM_ROOT_ENTRY.reserved[0] | above):
            raise FaultError(FR.ROOT_ENTRY_RSVD, f"bus {bus:02x}: reserved bits in root entry")
        ce = read(
            spans, (half & _SRE_CTP) + (devfn & 0x7F) * SM_CONTEXT_ENTRY_SIZE, _Q4,
            FR.CONTEXT_TABLE_INV, "context entry",
        )  # fmt: skip
        if not ce[0] & _SCE_P:
            raise FaultError(FR.CONTEXT_ENTRY_P, "context entry not present")
        rsvd = SM_CONTEXT_ENTRY.reserved
        if ce[0] & (rsvd[0] | above) or ce[1] & rsvd[1] or ce[2] & rsvd[2] or ce[3] & rsvd[3]:
            raise FaultError(FR.CONTEXT_ENTRY_RSVD, "reserved bits in context entry")
        return _decode_sm_context(ce)

    # -- PASID directory and table ----------------------------------------------------------
    @staticmethod
    def _check_pdts(ctx: ContextInfo, pasid: int) -> None:
        if not 0 <= pasid < _PASID_LIMIT or pasid >> PASID_DIR_SHIFT >= pasid_dir_entries(ctx.pdts):
            raise FaultError(FR.CONTEXT_PASID_TOO_BIG, f"PASID {pasid} beyond PDTS={ctx.pdts}")

    def _pasid_dir_entry(
        self, ctx: ContextInfo, pasid: int, spans: list[Span], *, present: bool
    ) -> int:
        """The PASID-directory entry for ``pasid``; ``present``: checked present and free of
        reserved bits."""
        if not 0 <= pasid < _PASID_LIMIT or pasid >> PASID_DIR_SHIFT >= 1 << (ctx.pdts + 7):
            self._check_pdts(ctx, pasid)  # raises
        (pde,) = self._read(
            spans, ctx.pasid_dir + (pasid >> PASID_DIR_SHIFT) * PASID_DIR_ENTRY_SIZE, _Q,
            FR.PASID_DIR_ACCESS_ERR, "PASID dir entry",
        )  # fmt: skip
        if present:
            if not pde & _PDE_P:
                raise FaultError(
                    FR.PASID_DIR_ENTRY_P, f"PASID {pasid}: directory entry not present"
                )
            if pde & self._pde_rsvd:
                raise FaultError(
                    FR.PASID_DIR_ENTRY_RSVD, f"PASID {pasid}: reserved bits in dir entry"
                )
        return int(pde)

    @staticmethod
    def _entry_gpa(pde: int, pasid: int) -> int:
        return (pde & _PDE_PTP) + (pasid & PASID_TABLE_MASK) * PASID_ENTRY_SIZE

    def _load_pasid(self, ctx: ContextInfo, pasid: int, spans: list[Span]) -> PasidInfo:
        pde = self._pasid_dir_entry(ctx, pasid, spans, present=True)
        w = self._read(
            spans, self._entry_gpa(pde, pasid), _QPE, FR.PASID_TABLE_ACCESS_ERR, "PASID entry"
        )
        return self._check_pasid(w, pasid)

    def _check_pasid(self, w: tuple[int, ...], pasid: int) -> PasidInfo:
        if not w[0] & _PE_P:
            raise FaultError(FR.PASID_ENTRY_P, f"PASID {pasid}: PASID entry not present")
        for i, rsvd in self._pe_rsvd:
            if w[i] & rsvd:
                raise FaultError(FR.PASID_ENTRY_RSVD, f"PASID {pasid}: reserved bits in qw{i}")
        pe = _decode_pasid(w)
        pgtt, aw, flpm = pe.pgtt, pe.aw, pe.flpm
        if not PGTT_FIRST_STAGE <= pgtt <= PGTT_PASS_THROUGH:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: invalid PGTT {pgtt}")
        if (pgtt in (PGTT_SECOND_STAGE, PGTT_NESTED)) and not 1 <= aw <= 3:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: unsupported AW {aw}")
        if (pgtt in (PGTT_FIRST_STAGE, PGTT_NESTED)) and flpm > 1:
            raise FaultError(FR.PASID_TABLE_ENTRY_INV, f"PASID {pasid}: invalid FLPM {flpm}")
        return pe

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
