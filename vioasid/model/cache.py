"""Translation caches as the VT-d caching model allows them (VT-d §6.2, §6.5).

* context cache: source id -> decoded context entry (tagged by the RTADDR it came from);
* PASID cache: (source id, PASID) -> decoded PASID-table entry (with its DID);
* IOTLB: (DID, PASID) -> {4 KiB page number -> entry}; an entry for a 2 MiB / 1 GiB page is
  filed under every 4 KiB page looked up through it and remembers its real size, so one dict
  lookup answers a hit and a range invalidation drops every entry overlapping the range.

Each ``invalidate_*`` method matches one invalidation-descriptor granularity (context-cache
global/domain/device, IOTLB global/domain/page with AM, PASID-cache domain/PASID/global,
P_IOTLB all-in-PASID / page-selective); device-TLB invalidations are only counted (vioasid keeps
no device TLB).

The walker's hot path reads a view of the IOTLB kept beside it: per tag, the 4 KiB pages a
user-privilege read (and, a second dict, write) may use, each page number -> the 4 KiB output
page (``user``), and ``fast[sid][requested PASID]`` -> that pair for the tag the PASID entry
names (``tags`` the same link by key, for :meth:`Walker.translate`). So a hit is three dict
subscripts and a tuple index, nothing to compare. Every change to the IOTLB changes the view
with it; links are dropped whenever a context or PASID cache entry is. A page dict leaving the
IOTLB is emptied in place, so a link still pointing at it only misses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# IOTLB permission bits (what a cached translation allows).
PERM_R = 1
PERM_W = 2  # user-mode write
PERM_X = 4
PERM_U = 8  # user requests allowed (U/S set on every level, or no first stage)
PERM_S = 16  # supervisor requests allowed (SRE, or no first stage)
PERM_SW = 32  # supervisor write allowed (R/W set, or WPE clear)


@dataclass(slots=True)
class ContextInfo:
    """A decoded context entry (legacy or scalable)."""

    scalable: bool
    fpd: bool
    # scalable mode
    pasid_dir: int = 0
    pdts: int = 0
    paside: bool = False
    rid_pasid: int = 0
    pre: bool = False
    # legacy mode
    tt: int = 0
    ssptptr: int = 0
    aw: int = 0
    did: int = 0


@dataclass(slots=True)
class PasidInfo:
    """A decoded scalable-mode PASID-table entry."""

    pgtt: int
    did: int
    fpd: bool
    aw: int
    ssptptr: int
    flptptr: int
    flpm: int
    sre: bool
    wpe: bool
    ere: bool
    eafe: bool = False


# (output page base, page size, permission bits, PGTT name, DID)
IotlbEntry = tuple[int, int, int, str, int]
IotlbTag = tuple[int, int | None]  # (DID, PASID); PASID None for legacy-mode entries
# (user-read pages, user-write pages): 4 KiB page number -> 4 KiB output page; index by ``write``
UserPages = tuple[dict[int, int], dict[int, int]]
USER_READ = PERM_R | PERM_U  # what a user read needs (a user write: also PERM_W)


class Caches:
    """Context cache, PASID cache and IOTLB with the VT-d invalidation granularities."""

    def __init__(self, *, iotlb_limit: int = 1 << 16, enabled: bool = True) -> None:
        self.enabled = enabled
        self.iotlb_limit = iotlb_limit
        self.rtaddr: int | None = None
        self.context: dict[int, ContextInfo] = {}
        self.pasid: dict[tuple[int, int], PasidInfo] = {}
        self.iotlb: dict[IotlbTag, dict[int, IotlbEntry]] = {}
        self.user: dict[IotlbTag, UserPages] = {}
        # sid -> requested PASID -> the user pages of its tag (the walker's hot path; cleared in
        # place, never replaced: the walker holds this dict)
        self.fast: dict[int, dict[int | None, UserPages]] = {}
        self.tags: dict[tuple[int, int | None], IotlbTag] = {}
        self.iotlb_count = 0
        self.stats: Counter[str] = Counter()

    # -- filling --------------------------------------------------------------------------
    def set_rtaddr(self, rtaddr: int) -> None:
        """A new root table (SRTP) makes every cached entry stale."""
        if rtaddr != self.rtaddr:
            self.flush_all()
            self.rtaddr = rtaddr

    def pages_of(self, tag: IotlbTag) -> dict[int, IotlbEntry]:
        """The IOTLB's page dict of ``tag`` (made empty when there is none)."""
        sub = self.iotlb.get(tag)
        if sub is None:
            sub = self.iotlb[tag] = {}
        return sub

    def user_pages(self, tag: IotlbTag) -> UserPages:
        """The hot path's view of ``tag`` (made empty when there is none)."""
        got = self.user.get(tag)
        if got is None:
            got = self.user[tag] = ({}, {})
        return got

    def link(self, sid: int, rpasid: int | None, tag: IotlbTag) -> None:
        """Requests of ``sid`` with ``rpasid`` (None: without PASID) use ``tag``'s entries."""
        self.tags[(sid, rpasid)] = tag
        per_sid = self.fast.get(sid)
        if per_sid is None:
            per_sid = self.fast[sid] = {}
        per_sid[rpasid] = self.user_pages(tag)

    def linked(self, sid: int, rpasid: int | None) -> IotlbTag | None:
        return self.tags.get((sid, rpasid))

    def iotlb_insert(self, tag: IotlbTag, vpn: int, entry: IotlbEntry) -> None:
        if self.iotlb_count >= self.iotlb_limit:
            self._clear_iotlb()  # like QEMU: wipe when full (bounded memory)
            self.stats["iotlb_wipe"] += 1
        self.pages_of(tag)[vpn] = entry
        read, write = self.user_pages(tag)
        perm = entry[2]
        if perm & USER_READ == USER_READ:
            read[vpn] = out = entry[0] | ((vpn << 12) & (entry[1] - 1))
            if perm & PERM_W:
                write[vpn] = out
            else:
                write.pop(vpn, None)
        else:
            read.pop(vpn, None)
            write.pop(vpn, None)
        self.iotlb_count += 1

    def flush_all(self) -> None:
        self.context.clear()
        self.pasid.clear()
        self._clear_iotlb()
        self._unlink_all()

    def _unlink_all(self) -> None:
        self.fast.clear()
        self.tags.clear()

    def _clear_iotlb(self) -> None:
        for sub in self.iotlb.values():
            sub.clear()
        for read, write in self.user.values():
            read.clear()
            write.clear()
        self.iotlb.clear()
        self.user.clear()
        self.iotlb_count = 0

    def _drop_tag(self, tag: IotlbTag) -> None:
        sub = self.iotlb.pop(tag, None)
        if sub is not None:
            sub.clear()
        user = self.user.pop(tag, None)
        if user is not None:
            user[0].clear()
            user[1].clear()

    # -- context cache (descriptor type 1) --------------------------------------------------
    def invalidate_context_global(self) -> None:
        self.stats["cc_global"] += 1
        self.context.clear()
        self.pasid.clear()
        self._unlink_all()

    def invalidate_context_domain(self, did: int) -> None:
        """Domain-selective. In scalable mode the DID is ignored (Linux comment in
        ``intel_context_flush_no_pasid``), so every scalable entry is dropped."""
        self.stats["cc_domain"] += 1
        drop = [s for s, c in self.context.items() if c.scalable or c.did == did]
        self._drop_sids(drop)

    def invalidate_context_device(self, sid: int, fm: int = 0) -> None:
        """Device-selective; FM masks 0-3 low bits of the function number (VT-d §6.5.2.1)."""
        self.stats["cc_device"] += 1
        mask = 0xFFFF & ~(0, 4, 6, 7)[fm & 3]
        drop = [s for s in self.context if s & mask == sid & mask]
        self._drop_sids(drop)

    def _drop_sids(self, sids: list[int]) -> None:
        dropped = set(sids)
        for s in sids:
            self.context.pop(s, None)
        for pkey in [k for k in self.pasid if k[0] in dropped]:
            del self.pasid[pkey]
        for s in dropped:
            self.fast.pop(s, None)
        for tkey in [k for k in self.tags if k[0] in dropped]:
            del self.tags[tkey]

    # -- PASID cache (type 7) -------------------------------------------------------------
    def invalidate_pasid_global(self) -> None:
        self.stats["pc_global"] += 1
        self.pasid.clear()
        self._unlink_all()

    def invalidate_pasid_domain(self, did: int) -> None:
        self.stats["pc_dsi"] += 1
        self._drop_pasid(lambda k, p: p.did == did)

    def invalidate_pasid_pasid(self, did: int, pasid: int) -> None:
        self.stats["pc_pasid_si"] += 1
        self._drop_pasid(lambda k, p: k[1] == pasid and p.did == did)

    def _drop_pasid(self, pred: object) -> None:
        assert callable(pred)
        gone = [k for k, p in self.pasid.items() if pred(k, p)]
        for k in gone:
            del self.pasid[k]
        if gone:
            self._unlink_all()

    # -- IOTLB (type 2) and P_IOTLB (type 6) ------------------------------------------------
    def invalidate_iotlb_global(self) -> None:
        self.stats["iotlb_global"] += 1
        self._clear_iotlb()

    def invalidate_iotlb_domain(self, did: int) -> None:
        self.stats["iotlb_domain"] += 1
        for tag in [t for t in self.iotlb if t[0] == did]:
            self._drop_tag(tag)

    def invalidate_iotlb_page(self, did: int, addr: int, am: int = 0, ih: bool = False) -> None:
        """Page-selective-within-domain: ``2^AM`` pages from ``addr`` (aligned down)."""
        self.stats["iotlb_page"] += 1
        for tag in [t for t in self.iotlb if t[0] == did]:
            self._drop_range(tag, addr, am)

    def invalidate_piotlb_pasid(self, did: int, pasid: int) -> None:
        """All entries of (DID, PASID) (P_IOTLB granularity 2)."""
        self.stats["piotlb_pasid"] += 1
        self._drop_tag((did, pasid))

    def invalidate_piotlb_page(
        self, did: int, pasid: int, addr: int, am: int = 0, ih: bool = False
    ) -> None:
        """Page-selective-within-PASID (P_IOTLB granularity 3)."""
        self.stats["piotlb_page"] += 1
        self._drop_range((did, pasid), addr, am)

    def _drop_range(self, tag: IotlbTag, addr: int, am: int) -> None:
        sub = self.iotlb.get(tag)
        if not sub:
            return
        am = min(am, 52)
        first = (addr >> 12) & ~((1 << am) - 1)
        npages = 1 << am
        large = any(e[1] > 4096 for e in sub.values()) if npages <= len(sub) else True
        if not large and npages <= len(sub):
            gone: Iterable[int] = range(first, first + npages)
        else:
            lo, hi = first << 12, (first + npages) << 12
            gone = [v for v, e in sub.items() if self._overlaps(v, e, lo, hi)]
        read, write = self.user_pages(tag)
        for vpn in gone:
            sub.pop(vpn, None)
            read.pop(vpn, None)
            write.pop(vpn, None)

    @staticmethod
    def _overlaps(vpn: int, e: IotlbEntry, lo: int, hi: int) -> bool:
        size = e[1]
        base = (vpn << 12) & ~(size - 1)
        return base < hi and lo < base + size

    # -- one entry of the host's own tables --------------------------------------------------
    def invalidate_pasid_entry(self, sid: int, pasid: int, did: int) -> None:
        """The PASID entry of (``sid``, ``pasid``) with domain ``did`` was rewritten or cleared:
        its PASID-cache entry and its IOTLB entries go (what a PASID-selective PASID-cache
        plus P_IOTLB invalidation does, scoped to the one source id that owns the table)."""
        self.stats["pasid_entry"] += 1
        self.pasid.pop((sid, pasid), None)
        self.tags.pop((sid, pasid), None)
        self.fast.get(sid, {}).pop(pasid, None)
        self._drop_tag((did, pasid))

    # -- device TLB (types 3, 8): no device TLB here; counted only -------------------------
    def note_device_tlb(self, kind: str) -> None:
        self.stats[kind] += 1
