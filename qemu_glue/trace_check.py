"""Cross-check vioasid's walker against QEMU's own translations (its ``vtd_dmar_translate`` trace).

QEMU (log trace back-end, ``-trace vtd_dmar_translate -trace vtd_inv_desc -D FILE``) writes one
line per DMA translation its intel-iommu made and one per invalidation descriptor it processed::

    vtd_dmar_translate dev 00:03.00 iova 0xfffff000 -> gpa 0x5a4a000 mask 0xfff
    vtd_inv_desc invalidate desc type p-iotlb high 0xffffa040 low 0x30036

(``high``/``low`` are the descriptor's qw1/qw0; an optional ``PID@SEC.USEC:`` prefix is
accepted.) :func:`parse_line` turns such lines into :class:`DmarTranslate` /
:class:`Invalidation` records; :class:`TraceFollower` reads a growing trace file incrementally;
:func:`compare` walks every logged IOVA with a :class:`~vioasid.model.walker.Walker` over the
guest's memory and counts, per record:

- ``agree``: the walk gives QEMU's output page (address and page size);
- ``stale``: the mapping changed since QEMU logged it — the walk faults (unmapped; in lazy mode
  the IOTLB flush may still be pending), or an invalidation covering the IOVA was logged after
  the record (the IOVA may have been unmapped and reused);
- ``disagree``: the walk translates to another page although no invalidation covering the IOVA
  followed the record. Linux never re-maps an IOVA before invalidating it (strict mode flushes
  before freeing the IOVA, lazy mode frees it only after the flush-queue flush), so this is a
  real difference between vioasid's walk and QEMU's;
- ``skipped``: IOVAs in the interrupt range (QEMU handles them 1:1 outside the page walk).

Compare while the guest is paused (:func:`check_paused` stops it through QMP, compares the
records logged since the previous check, and resumes it), so the tables cannot change under
the walk. Used by guest_tests/test_walk_vs_qemu_trace.py and available to ``vioasid demo``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu_glue.qemu.qmp import Qmp, QmpError
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.formats.invalidation import (
    TYPE_IEC,
    TYPE_PGRESP,
    TYPE_WAIT,
)
from vioasid.model.faults import Translation, bdf_str
from vioasid.model.iq import Descriptor, decode, dispatch
from vioasid.model.walker import Walker, WalkRequest

log = logging.getLogger(__name__)

#: The QEMU trace points this module reads (pass them to ``-trace``).
TRACE_EVENTS: tuple[str, ...] = ("vtd_dmar_translate", "vtd_inv_desc", "vtd_dmar_enable")

INTR_LO, INTR_HI = 0xFEE00000, 0xFEEFFFFF  # VT-d §3.15: not translated by the page walk
PAGE_SHIFT = 12
_SMALL_RANGE_PAGES = 1 << 10  # page-selective ranges up to this size are kept as page sets

_PREFIX = r"(?:^|[\s:])"
_TRANSLATE_RE = re.compile(
    _PREFIX + r"vtd_dmar_translate dev ([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+) "
    r"iova 0x([0-9a-fA-F]+) -> gpa 0x([0-9a-fA-F]+) mask 0x([0-9a-fA-F]+)\s*$"
)
_INV_DESC_RE = re.compile(
    _PREFIX + r"vtd_inv_desc invalidate desc type (\S+) high 0x([0-9a-fA-F]+) "
    r"low 0x([0-9a-fA-F]+)\s*$"
)
_ENABLE_RE = re.compile(_PREFIX + r"vtd_dmar_enable enable (\d+)\s*$")

_NOT_MAPPING = frozenset({TYPE_WAIT, TYPE_IEC, TYPE_PGRESP})  # never drop a DMA mapping


@dataclass(frozen=True, slots=True)
class DmarTranslate:
    """One ``vtd_dmar_translate`` line: QEMU translated ``iova`` (page base) to ``gpa``."""

    sid: int
    iova: int
    gpa: int
    mask: int  # QEMU's addr_mask: page size - 1

    @property
    def page_size(self) -> int:
        return self.mask + 1

    @property
    def bdf(self) -> str:
        return bdf_str(self.sid)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Something that may drop mappings: an invalidation descriptor or a DMAR enable change.

    ``start``/``end`` (exclusive) bound the IOVAs a page-selective IOTLB / PASID-IOTLB
    invalidation covers; ``everything`` for every other kind (conservatively: DID, PASID and
    source are ignored, so an invalidation of another domain still counts).
    """

    kind: str
    everything: bool
    start: int = 0
    end: int = 0

    def covers(self, iova: int) -> bool:
        return self.everything or self.start <= iova < self.end


TraceRecord = DmarTranslate | Invalidation


class _Dropped:
    """What a descriptor may drop from the mappings, as a :class:`vioasid.model.iq.Handler`:
    ``span`` for a page-selective IOTLB / PASID-IOTLB one, ``everything`` for the rest."""

    def __init__(self) -> None:
        self.everything = False
        self.span: tuple[int, int] | None = None

    def context(self, did: int | None, sid: int | None, fm: int) -> int:
        self.everything = True
        return 0

    def pasid_cache(self, did: int | None, pasid: int | None) -> int:
        self.everything = True
        return 0

    def iotlb(self, did: int | None, pasid: int | None, addr: int | None, am: int, ih: bool) -> int:
        if addr is None:
            self.everything = True
        else:
            self.span = (addr, addr + (1 << (PAGE_SHIFT + am)))
        return 0

    def other(self, desc: Descriptor) -> int:
        self.everything = desc.type_code not in _NOT_MAPPING  # device-TLB types: be safe
        return 0


def decode_invalidation(kind: str, qw1: int, qw0: int) -> Invalidation | None:
    """The mappings a descriptor (``qw0``/``qw1`` as QEMU traces them) may drop; None if none.
    Decoded and dispatched by the model's one IQ decoder (:mod:`vioasid.model.iq`)."""
    d = decode((qw0, qw1), wide=False)
    if d.type_code in _NOT_MAPPING:
        return None
    if d.error:
        return Invalidation(kind, True)
    got = _Dropped()
    dispatch(d, got)
    if got.span is not None:
        return Invalidation(kind, False, *got.span)
    return Invalidation(kind, got.everything) if got.everything else None


def parse_line(line: str) -> TraceRecord | None:
    """The record one trace line holds, or None for any other line (never raises)."""
    if "vtd_" not in line:
        return None
    m = _TRANSLATE_RE.search(line)
    if m:
        bus, slot, fn, iova, gpa, mask = (int(g, 16) for g in m.groups())
        if bus > 0xFF or slot > 0x1F or fn > 7:
            return None
        return DmarTranslate((bus << 8) | (slot << 3) | fn, iova, gpa, mask)
    m = _INV_DESC_RE.search(line)
    if m:
        return decode_invalidation(m.group(1), int(m.group(2), 16), int(m.group(3), 16))
    m = _ENABLE_RE.search(line)
    if m:
        return Invalidation(f"dmar-enable-{m.group(1)}", True)
    return None


def parse_lines(lines: Iterable[str]) -> list[TraceRecord]:
    """Every record in ``lines``, in order."""
    out: list[TraceRecord] = []
    for line in lines:
        rec = parse_line(line)
        if rec is not None:
            out.append(rec)
    return out


class TraceFollower:
    """Reads the complete lines a QEMU trace file gained since the last :meth:`read_new`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.offset = 0
        self.lines_read = 0

    def read_new(self) -> list[TraceRecord]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        chunk = data[: end + 1]
        self.offset += len(chunk)
        lines = chunk.decode("utf-8", "replace").splitlines()
        self.lines_read += len(lines)
        return parse_lines(lines)


@dataclass(frozen=True, slots=True)
class Disagreement:
    """A record vioasid's walk translated differently, with no invalidation since."""

    record: DmarTranslate
    address: int
    page_size: int
    pgtt: str

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "bdf": r.bdf,
            "iova": hex(r.iova),
            "qemu_gpa": hex(r.gpa),
            "qemu_page_size": r.page_size,
            "vioasid_address": hex(self.address),
            "vioasid_page_size": self.page_size,
            "pgtt": self.pgtt,
        }


@dataclass
class CheckCounts:
    """Agreement counts over one or more checks (records, not unique IOVAs)."""

    agree: int = 0
    disagree: int = 0
    stale: int = 0
    stale_invalidated: int = 0  # of ``stale``: an invalidation covering the IOVA followed
    skipped: int = 0
    invalidations: int = 0
    checks: int = 0
    agreeing: set[tuple[int, int, int]] = field(default_factory=set)  # (sid, iova, gpa)
    pgtt: dict[str, int] = field(default_factory=dict)  # agreeing records per walk mode
    disagreements: list[Disagreement] = field(default_factory=list)
    max_kept: int = 20  # disagreements kept for the report

    @property
    def records(self) -> int:
        return self.agree + self.disagree + self.stale + self.skipped

    @property
    def unique_agree(self) -> int:
        return len(self.agreeing)

    def merge(self, other: CheckCounts) -> CheckCounts:
        self.agree += other.agree
        self.disagree += other.disagree
        self.stale += other.stale
        self.stale_invalidated += other.stale_invalidated
        self.skipped += other.skipped
        self.invalidations += other.invalidations
        self.checks += other.checks
        self.agreeing |= other.agreeing
        for k, v in other.pgtt.items():
            self.pgtt[k] = self.pgtt.get(k, 0) + v
        room = self.max_kept - len(self.disagreements)
        self.disagreements.extend(other.disagreements[: max(room, 0)])
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "agree": self.agree,
            "unique_agree": self.unique_agree,
            "disagree": self.disagree,
            "stale": self.stale,
            "stale_invalidated": self.stale_invalidated,
            "skipped": self.skipped,
            "invalidations": self.invalidations,
            "checks": self.checks,
            "pgtt": dict(self.pgtt),
            "disagreements": [d.to_json() for d in self.disagreements],
        }


class _Covered:
    """The IOVAs invalidated after a point (filled walking the records backwards)."""

    def __init__(self) -> None:
        self.everything = False
        self.pages: set[int] = set()
        self.ranges: list[tuple[int, int]] = []

    def add(self, inv: Invalidation) -> None:
        if inv.everything:
            self.everything = True
            return
        first, last = inv.start >> PAGE_SHIFT, (inv.end - 1) >> PAGE_SHIFT
        if last - first < _SMALL_RANGE_PAGES:
            self.pages.update(range(first, last + 1))
        else:
            self.ranges.append((inv.start, inv.end))

    def covers(self, iova: int) -> bool:
        if self.everything or (iova >> PAGE_SHIFT) in self.pages:
            return True
        return any(s <= iova < e for s, e in self.ranges)


def walk_record(walker: Walker, rtaddr: int, rec: DmarTranslate) -> Translation | None:
    """vioasid's translation of a logged IOVA: read first, then write (a mapping may be
    write-only, e.g. second stage for DMA_FROM_DEVICE); None when both fault."""
    for write in (False, True):
        t = walker.translate(rtaddr, WalkRequest(rec.sid, rec.iova, None, write))
        if isinstance(t, Translation):
            return t
    return None


def compare(records: Sequence[TraceRecord], walker: Walker, rtaddr: int) -> CheckCounts:
    """Classify every :class:`DmarTranslate` in ``records`` against a walk of the tables as
    they are now (the guest paused). ``records`` must be in trace order: an invalidation later
    in the sequence than a translation makes a mismatch of that translation ``stale``."""
    counts = CheckCounts(checks=1)
    covered = _Covered()
    for rec in reversed(records):
        if isinstance(rec, Invalidation):
            counts.invalidations += 1
            covered.add(rec)
            continue
        if INTR_LO <= rec.iova <= INTR_HI:
            counts.skipped += 1
            continue
        t = walk_record(walker, rtaddr, rec)
        if t is not None and t.address == rec.gpa and t.page_size == rec.page_size:
            counts.agree += 1
            counts.agreeing.add((rec.sid, rec.iova, rec.gpa))
            counts.pgtt[t.pgtt] = counts.pgtt.get(t.pgtt, 0) + 1
        elif covered.covers(rec.iova):
            counts.stale += 1
            counts.stale_invalidated += 1
        elif t is None:
            counts.stale += 1
        else:
            counts.disagree += 1
            if len(counts.disagreements) < counts.max_kept:
                counts.disagreements.append(Disagreement(rec, t.address, t.page_size, t.pgtt))
    return counts


class TraceChecker:
    """Follows one QEMU's trace file and compares each new batch of records with a walker.

    ``total`` accumulates every :meth:`check`.
    """

    def __init__(self, trace_file: Path | str, walker: Walker) -> None:
        self.follower = TraceFollower(trace_file)
        self.walker = walker
        self.total = CheckCounts()

    def check(self, rtaddr: int) -> CheckCounts:
        """Compare the records logged since the last check (call with the guest paused)."""
        counts = compare(self.follower.read_new(), self.walker, rtaddr)
        self.total.merge(counts)
        return counts


async def check_paused(qmp: Qmp, checker: TraceChecker, rtaddr: int | None = None) -> CheckCounts:
    """Pause the guest (QMP ``stop``), :meth:`TraceChecker.check`, resume (``cont``).

    ``rtaddr`` None reads the live RTADDR register (q35 DMAR base) while paused.
    """
    await qmp.execute("stop")
    try:
        if rtaddr is None:
            rtaddr = await VtdRegisterReader(qmp).rtaddr()
        return checker.check(rtaddr)
    finally:
        with contextlib.suppress(QmpError):
            await qmp.execute("cont")


def trace_args(trace_file: Path | str, events: Sequence[str] = TRACE_EVENTS) -> tuple[str, ...]:
    """QEMU arguments enabling ``events`` into ``trace_file`` (log back-end: ``-D``)."""
    args: list[str] = []
    for ev in events:
        args += ["-trace", f"enable={ev}"]
    return (*args, "-D", os.fspath(trace_file))
