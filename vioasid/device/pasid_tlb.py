"""The PASID DMA function's device TLB: engine translations kept across doorbells, each checked
against the guest's own paging entries before a new job uses it.

Why not follow the invalidations: QEMU forwards none to a vfio-user server, and the guest's
invalidation queue can only be followed through QMP (IQT is a register, not RAM), which a
vfio-user message must never wait on and which lags the guest: the guest's invalidation has
completed (QEMU processes the queue in the vCPU's own IQT write) before vioasid could read it,
so a doorbell right after an unmap would find a stale entry. The queue's slots in RAM do not
help either: Linux rewrites a slot with the same bytes once the ring wraps (the same
invalidation of the same page, the same wait descriptor), so a changed-slot test misses them.

What the cache checks instead: every translation is a function of (1) the guest's context and
PASID entry and the host state for its tag, and (2) the guest's paging entries on the page's
path, all readable in guest RAM. (1) is the space's signature, compared once per job
(:meth:`PasidTlb.begin`; a different one empties the space). (2) is checked once per 2 MiB
region and job, before the region's first use in the job: the entries above the leaf table by
value, the leaf table by one byte compare of its 4 KiB; on a difference only the pages whose own
entry changed are dropped. A changed entry drops its translation at once, before the guest has
invalidated it: more coherent than VT-d requires, never less. The entry values a translation is
filed under are read before and after its engine walk and must agree (and agree with the walk's
output address and access), so a translation is never filed under entries it was not walked
from, even while another vCPU rewrites them.

Only guest first-stage entries (PGTT=1, nested by the engine) and guest second-stage entries
(PGTT=2, walked in software) are cached; anything else, a path the reader cannot follow, and
every fault go to the engine each time. Memory is bounded: at most ``limit`` pages,
``region_limit`` regions (each keeps a 4 KiB copy of its leaf table) and ``space_limit``
spaces; beyond any of them the cache empties and fills again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats.paging import (
    FIRST_STAGE_PDE_2M,
    FIRST_STAGE_PDPE_1G,
    FIRST_STAGE_PTE,
    PTE_SIZE,
    SECOND_STAGE_PDE_2M,
    SECOND_STAGE_PDPE_1G,
    SECOND_STAGE_PTE,
)
from vioasid.formats.pasid import PGTT_FIRST_STAGE, PGTT_SECOND_STAGE
from vioasid.model.faults import Fault
from vioasid.model.memory import GuestMemory, MemoryAccessError

from .translator import Resolved

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
REGION_SHIFT = 9  # pages per leaf table: a region is the 2 MiB one leaf table maps
TABLE_BYTES = PAGE_SIZE
DEFAULT_LIMIT = 1 << 16
DEFAULT_REGION_LIMIT = 2048  # 8 MiB of leaf-table copies
DEFAULT_SPACE_LIMIT = 4096


@dataclass(frozen=True)
class PagingFormat:
    """What the reader needs of one paging-entry format: the bits an access needs on every
    level, the large-page bit and the address fields per leaf level."""

    name: str
    read: int  # bits every entry of the path has for a readable page
    write: int  # ... for a writable one
    user: int  # ... for a user request (0: the format has none)
    ps: int
    addr: tuple[int, int, int]  # address mask of a leaf at level 1, 2, 3

    def need(self, write: bool, supervisor: bool) -> int:
        return (self.write if write else self.read) | (0 if supervisor else self.user)


FIRST_STAGE = PagingFormat(
    "first-stage",
    read=FIRST_STAGE_PTE.mask("P"),
    write=FIRST_STAGE_PTE.mask("P") | FIRST_STAGE_PTE.mask("RW"),
    user=FIRST_STAGE_PTE.mask("US"),
    ps=FIRST_STAGE_PTE.mask("PS"),
    addr=(
        FIRST_STAGE_PTE.mask("ADDR"),
        FIRST_STAGE_PDE_2M.mask("ADDR"),
        FIRST_STAGE_PDPE_1G.mask("ADDR"),
    ),
)
SECOND_STAGE = PagingFormat(
    "second-stage",
    read=SECOND_STAGE_PTE.mask("R"),
    write=SECOND_STAGE_PTE.mask("W"),
    user=0,
    ps=SECOND_STAGE_PTE.mask("PS"),
    addr=(
        SECOND_STAGE_PTE.mask("ADDR"),
        SECOND_STAGE_PDE_2M.mask("ADDR"),
        SECOND_STAGE_PDPE_1G.mask("ADDR"),
    ),
)
_TABLE_ADDR = FIRST_STAGE_PTE.mask("ADDR")  # a non-leaf entry's table address (both formats)
assert SECOND_STAGE_PTE.mask("ADDR") == _TABLE_ADDR

# (gpa, value) of the entries above the leaf table; the leaf table's address (-1: none, the
# path ends in a large page); the leaf entry's own address and value.
Path = tuple[tuple[tuple[int, int], ...], int, int, int]


@dataclass(slots=True)
class _Region:
    upper: tuple[tuple[int, int], ...]
    leaf_gpa: int
    leaf: bytearray  # for every cached page, its slot holds the entry it was filed under
    pages: dict[int, tuple[int, bool, bool]] = field(default_factory=dict)
    epoch: int = -1


@dataclass(slots=True)
class _Space:
    signature: tuple[Any, ...]
    fmt: PagingFormat
    root: int
    levels: int
    regions: dict[int, _Region] = field(default_factory=dict)


@dataclass
class TlbStats:
    hits: int = 0
    misses: int = 0
    filled: int = 0
    unfiled: int = 0  # walked but not filed (no cacheable path, or the entries moved)
    revalidations: int = 0
    dropped: int = 0  # pages dropped because an entry on their path changed
    spaces_dropped: int = 0
    wipes: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class PasidTlb:
    """The device TLB of one function: spaces keyed by (vPASID, tag, privilege)."""

    def __init__(self, memory: GuestMemory, *, limit: int = DEFAULT_LIMIT,
                 region_limit: int = DEFAULT_REGION_LIMIT,
                 space_limit: int = DEFAULT_SPACE_LIMIT) -> None:  # fmt: skip
        self.mem = memory
        self.limit, self.region_limit, self.space_limit = limit, region_limit, space_limit
        self.regions = 0
        self.spaces: dict[tuple[int, int, bool], _Space] = {}
        self.space: _Space | None = None  # the current job's
        self.epoch = 0
        self.pages = 0
        self.stats = TlbStats()

    # -- per job ------------------------------------------------------------------------------
    def begin(
        self,
        key: tuple[int, int, bool] | None,
        signature: tuple[Any, ...] | None = None,
        pgtt: int = 0,
        root: int = 0,
        levels: int = 0,
        memory: GuestMemory | None = None,
    ) -> None:
        """A new job (a doorbell): ``key`` (vPASID, tag, supervisor) and the space's signature
        (context entry, PASID entry words, host state); None: this job is not cached. Entries
        are checked again before their first use in this job. ``memory``: the guest's RAM now
        (another one empties the cache)."""
        self.epoch += 1
        if memory is not None and memory is not self.mem:
            self.clear()
            self.mem = memory
        if key is None or pgtt not in (PGTT_FIRST_STAGE, PGTT_SECOND_STAGE):
            self.space = None
            return
        sp = self.spaces.get(key)
        if sp is not None and sp.signature != signature:
            self._drop_space(key)
            sp = None
        if sp is None:
            if len(self.spaces) >= self.space_limit:
                self.stats.wipes += 1
                self.clear()
            fmt = FIRST_STAGE if pgtt == PGTT_FIRST_STAGE else SECOND_STAGE
            sp = self.spaces[key] = _Space(signature or (), fmt, root, levels)
        self.space = sp

    def drop_pasid(self, vpasid: int) -> None:
        """Forget every space of ``vpasid`` (unbind)."""
        for key in [k for k in self.spaces if k[0] == vpasid]:
            self._drop_space(key)

    def clear(self) -> None:
        self.spaces.clear()
        self.space = None
        self.pages = 0
        self.regions = 0

    def _drop_space(self, key: tuple[int, int, bool]) -> None:
        sp = self.spaces.pop(key)
        self.pages -= sum(len(r.pages) for r in sp.regions.values())
        self.regions -= len(sp.regions)
        self.stats.spaces_dropped += 1
        if self.space is sp:
            self.space = None

    # -- lookup -------------------------------------------------------------------------------
    def lookup(self, page: int, write: bool) -> int | None:
        """The guest-physical page base cached for ``page`` (a 4 KiB page number) and the
        access, checked in this job; None: ask the engine (then :meth:`fill`)."""
        sp = self.space
        if sp is None:
            return None
        reg = sp.regions.get(page >> REGION_SHIFT)
        if reg is not None:
            if reg.epoch != self.epoch and not self._revalidate(sp, page >> REGION_SHIFT, reg):
                reg = None
            if reg is not None:
                e = reg.pages.get(page)
                if e is not None and (e[2] if write else e[1]):
                    self.stats.hits += 1
                    return e[0]
        self.stats.misses += 1
        return None

    def _revalidate(self, sp: _Space, rkey: int, reg: _Region) -> bool:
        """Before a region's first use in a job: drop what an entry change made stale."""
        self.stats.revalidations += 1
        mem = self.mem
        try:
            for gpa, val in reg.upper:
                if mem.read_u64(gpa) != val:
                    raise LookupError
            if reg.leaf_gpa >= 0:
                cur = mem.read(reg.leaf_gpa, TABLE_BYTES)
                old = reg.leaf
                if cur != old:
                    for page in [
                        p
                        for p in reg.pages
                        if cur[(i := (p & 511) * PTE_SIZE) : i + PTE_SIZE] != old[i : i + PTE_SIZE]
                    ]:
                        del reg.pages[page]
                        self.pages -= 1
                        self.stats.dropped += 1
                    old[:] = cur
        except (LookupError, MemoryAccessError):
            self.pages -= len(reg.pages)
            self.stats.dropped += len(reg.pages)
            del sp.regions[rkey]
            self.regions -= 1
            return False
        reg.epoch = self.epoch
        return True

    # -- fill ---------------------------------------------------------------------------------
    def fill(
        self,
        iova: int,
        write: bool,
        supervisor: bool,
        resolve: Callable[[int, bool], Resolved | Fault],
    ) -> Resolved | Fault:
        """Walk ``iova`` through the engine (``resolve``) and file the answer under the guest
        entries it came from. Faults are returned, never filed."""
        sp = self.space
        if sp is None:
            return resolve(iova, write)
        before = self._path(sp, iova)
        res = resolve(iova, write)
        if isinstance(res, Fault):
            return res
        if (
            before is None
            or self._path(sp, iova) != before
            or not self._agrees(sp, before, iova, res, write, supervisor)
        ):
            self.stats.unfiled += 1
            return res
        self._file(sp, iova, before, res)
        return res

    def _agrees(
        self, sp: _Space, path: Path, iova: int, res: Resolved, write: bool, supervisor: bool
    ) -> bool:
        """The walk's answer is what the entries say: output page and the access's bits."""
        upper, _, _, pte = path
        fmt = sp.fmt
        level = sp.levels - len(upper)  # of the leaf entry: 1, or 2/3 for a large page
        size = 1 << (PAGE_SHIFT + 9 * (level - 1))
        want = (pte & fmt.addr[level - 1]) | (iova & (size - 1) & ~(PAGE_SIZE - 1))
        need = fmt.need(write, supervisor)
        if want != res.gpa or pte & need != need:
            return False
        return all(v & need == need for _, v in upper)

    def _file(self, sp: _Space, iova: int, path: Path, res: Resolved) -> None:
        upper, leaf_gpa, pte_gpa, pte = path
        if leaf_gpa < 0:  # a large page: its own entry is checked with the ones above it
            upper = (*upper, (pte_gpa, pte))
        page = iova >> PAGE_SHIFT
        rkey = page >> REGION_SHIFT
        reg = sp.regions.get(rkey)
        if reg is not None and (reg.upper != upper or reg.leaf_gpa != leaf_gpa):
            self.pages -= len(reg.pages)
            del sp.regions[rkey]
            self.regions -= 1
            reg = None
        if (reg is None and self.regions >= self.region_limit) or (
            (reg is None or page not in reg.pages) and self.pages >= self.limit
        ):
            self.stats.wipes += 1  # bounded: start again
            for other in self.spaces.values():
                other.regions.clear()
            self.pages = self.regions = 0
            reg = None
        if reg is None:
            try:
                leaf = bytearray(self.mem.read(leaf_gpa, TABLE_BYTES)) if leaf_gpa >= 0 else None
            except MemoryAccessError:
                self.stats.unfiled += 1
                return
            reg = sp.regions[rkey] = _Region(upper, leaf_gpa, leaf or bytearray(), epoch=self.epoch)
            self.regions += 1
        if leaf_gpa >= 0:
            i = pte_gpa - leaf_gpa
            reg.leaf[i : i + PTE_SIZE] = pte.to_bytes(PTE_SIZE, "little")
        old = reg.pages.get(page)
        if old is None:
            self.pages += 1
            entry = (res.gpa, res.read, res.write)
        elif old[0] == res.gpa:
            entry = (res.gpa, res.read or old[1], res.write or old[2])
        else:
            entry = (res.gpa, res.read, res.write)
        reg.pages[page] = entry
        self.stats.filled += 1

    def _path(self, sp: _Space, iova: int) -> Path | None:
        """The guest's entries on ``iova``'s path as they are now; None when the reader cannot
        follow it (not present, outside guest RAM, a large page where none can be)."""
        mem = self.mem
        fmt = sp.fmt
        table = sp.root & _TABLE_ADDR
        upper: list[tuple[int, int]] = []
        try:
            for level in range(sp.levels, 1, -1):
                gpa = table + ((iova >> (PAGE_SHIFT + 9 * (level - 1))) & 511) * 8
                pte = mem.read_u64(gpa)
                if not pte & fmt.read:
                    return None
                if pte & fmt.ps:
                    if level > 3:
                        return None
                    return tuple(upper), -1, gpa, pte
                upper.append((gpa, pte))
                table = pte & _TABLE_ADDR
            gpa = table + ((iova >> PAGE_SHIFT) & 511) * 8
            pte = mem.read_u64(gpa)
        except MemoryAccessError:
            return None
        return tuple(upper), table, gpa, pte
