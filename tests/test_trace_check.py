"""qemu_glue.trace_check: QEMU trace-line parsing and the walk-vs-trace classification.

The trace lines are real ones from QEMU 10.0.2 (log back-end) with a Linux 6.12 guest; the
walk side uses the example tables of :mod:`vioasid.model.example` (00:03.0: first stage,
IOVA 0x0-0x8000 -> 0x200000, 2 MiB read-only page at 0x40000000 -> 0x400000).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_glue.trace_check import (
    TRACE_EVENTS,
    CheckCounts,
    DmarTranslate,
    Invalidation,
    TraceChecker,
    TraceFollower,
    TraceRecord,
    compare,
    parse_line,
    parse_lines,
    trace_args,
)
from vioasid.model.cache import Caches
from vioasid.model.example import build_example
from vioasid.model.walker import Walker

SID = 0x18  # 00:03.0 in the example tables


def translate_line(iova: int, gpa: int, mask: int = 0xFFF, dev: str = "00:03.00") -> str:
    return f"vtd_dmar_translate dev {dev} iova {iova:#x} -> gpa {gpa:#x} mask {mask:#x}"


def piotlb_line(addr: int, am: int = 0) -> str:
    """A page-selective-within-PASID PASID-IOTLB invalidation (DID 3, PASID 0, IH=1)."""
    return f"vtd_inv_desc invalidate desc type p-iotlb high {addr | 0x40 | am:#x} low 0x30036"


# -- parsing ---------------------------------------------------------------------------------


def test_translate_line() -> None:
    rec = parse_line("vtd_dmar_translate dev 00:01.00 iova 0xfffff000 -> gpa 0x5a4a000 mask 0xfff")
    assert rec == DmarTranslate(0x08, 0xFFFFF000, 0x5A4A000, 0xFFF)
    assert isinstance(rec, DmarTranslate)
    assert rec.page_size == 4096 and rec.bdf == "00:01.0"


@pytest.mark.parametrize(
    "prefix", ["", "12345@1732900000.123456:", "2026-11-29T18:30:00.000001Z ", "  "]
)
def test_translate_line_with_prefixes(prefix: str) -> None:
    rec = parse_line(prefix + translate_line(0x40000000, 0x400000, 0x1FFFFF, dev="01:1f.07"))
    assert rec == DmarTranslate((1 << 8) | (0x1F << 3) | 7, 0x40000000, 0x400000, 0x1FFFFF)
    assert isinstance(rec, DmarTranslate) and rec.page_size == 2 << 20


@pytest.mark.parametrize(
    "line",
    [
        "",
        "vtd_dmar_translate dev 00:01.00 iova 0xfffff000 -> gpa 0x5a4a000",  # cut short
        "vtd_dmar_translate dev 00:01.00 iova zz -> gpa 0x5a4a000 mask 0xfff",
        "vtd_dmar_translate dev 00:20.00 iova 0x1000 -> gpa 0x1000 mask 0xfff",  # slot > 31
        "vtd_dmar_translate dev 00:01.08 iova 0x1000 -> gpa 0x1000 mask 0xfff",  # func > 7
        "vtd_dmar_translate dev 100:01.00 iova 0x1000 -> gpa 0x1000 mask 0xfff",  # bus > 255
        "xvtd_dmar_translate dev 00:01.00 iova 0x1000 -> gpa 0x1000 mask 0xfff",
        "vtd_dmar_fault sid 0x8 fault 113 addr 0x1000 write 0",
        "vtd_reg_dmar_root addr 0x4cb9000 scalable 1",
        "vtd_inv_desc_wait_sw wait invalidate status write addr 0x41dc804 data 0x1",
        "VIOASID-TEST name=page gen=0 result=pass detail=md5=x",
        "vtd_inv_desc invalidate desc type wait high 0x41dc804 low 0x200000025",
        "vtd_inv_desc invalidate desc type iec high 0x0 low 0x100000014",
    ],
)
def test_other_lines_give_nothing(line: str) -> None:
    assert parse_line(line) is None


def test_piotlb_page_selective() -> None:
    inv = parse_line(piotlb_line(0xFFFFA000))
    assert inv == Invalidation("p-iotlb", False, 0xFFFFA000, 0xFFFFB000)
    assert isinstance(inv, Invalidation)
    assert inv.covers(0xFFFFA000) and not inv.covers(0xFFFFB000) and not inv.covers(0xFFFF9000)


def test_iotlb_page_selective_with_address_mask() -> None:
    # Second-stage guest: page-selective IOTLB, DID 3, IH=1, AM=7 (128 pages).
    inv = parse_line("vtd_inv_desc invalidate desc type iotlb high 0xffe00047 low 0x300f2")
    assert inv == Invalidation("iotlb", False, 0xFFE00000, 0xFFE80000)


@pytest.mark.parametrize(
    "line",
    [
        "vtd_inv_desc invalidate desc type iotlb high 0x0 low 0x300e2",  # domain-selective
        "vtd_inv_desc invalidate desc type iotlb high 0x0 low 0xd2",  # global
        "vtd_inv_desc invalidate desc type p-iotlb high 0x0 low 0x30026",  # all in PASID
        "vtd_inv_desc invalidate desc type context-cache high 0x0 low 0x11",
        "vtd_dmar_enable enable 0",
        "vtd_dmar_enable enable 1",
    ],
)
def test_wide_invalidations_cover_everything(line: str) -> None:
    inv = parse_line(line)
    assert isinstance(inv, Invalidation) and inv.everything
    assert inv.covers(0) and inv.covers(0xFFFFF000)


def test_parse_lines_keeps_order() -> None:
    recs = parse_lines(["junk", translate_line(0x1000, 0x201000), piotlb_line(0x1000), ""])
    assert [type(r) for r in recs] == [DmarTranslate, Invalidation]


def test_trace_args() -> None:
    args = trace_args("/tmp/t.log")
    assert args[-2:] == ("-D", "/tmp/t.log")
    assert [args[i + 1] for i, a in enumerate(args) if a == "-trace"] == [
        f"enable={e}" for e in TRACE_EVENTS
    ]


# -- following a growing file ----------------------------------------------------------------


def test_follower_reads_whole_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "trace.log"
    f = TraceFollower(path)
    assert f.read_new() == []  # no file yet
    line = translate_line(0x1000, 0x201000)
    path.write_text(line + "\n" + line[:20])  # the second line is still being written
    assert f.read_new() == [DmarTranslate(SID, 0x1000, 0x201000, 0xFFF)]
    assert f.read_new() == []
    with path.open("a") as out:
        out.write(line[20:].replace("0x201000", "0x202000") + "\n")
    assert f.read_new() == [DmarTranslate(SID, 0x1000, 0x202000, 0xFFF)]
    assert f.lines_read == 2


# -- classification --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walker_rtaddr() -> tuple[Walker, int]:
    mem, rtaddr = build_example()
    return Walker(mem, haw=48, caches=Caches(enabled=False)), rtaddr


def run(walker_rtaddr: tuple[Walker, int], lines: list[str]) -> CheckCounts:
    walker, rtaddr = walker_rtaddr
    return compare(parse_lines(lines), walker, rtaddr)


def test_matching_translations_agree(walker_rtaddr: tuple[Walker, int]) -> None:
    c = run(
        walker_rtaddr,
        [
            translate_line(0x1000, 0x201000),
            translate_line(0x1000, 0x201000),
            translate_line(0x7000, 0x207000),
            translate_line(0x40000000, 0x400000, 0x1FFFFF),  # 2 MiB read-only page
        ],
    )
    assert (c.agree, c.disagree, c.stale, c.skipped) == (4, 0, 0, 0)
    assert c.unique_agree == 3 and c.pgtt == {"first-stage": 4} and c.records == 4


def test_other_page_without_invalidation_disagrees(walker_rtaddr: tuple[Walker, int]) -> None:
    c = run(
        walker_rtaddr,
        [
            piotlb_line(0x1000),  # before the translation: does not excuse it
            translate_line(0x1000, 0x999000),
            piotlb_line(0x2000),  # another page
        ],
    )
    assert (c.agree, c.disagree, c.stale) == (0, 1, 0)
    (d,) = c.disagreements
    assert d.to_json() == {
        "bdf": "00:03.0",
        "iova": "0x1000",
        "qemu_gpa": "0x999000",
        "qemu_page_size": 4096,
        "vioasid_address": "0x201000",
        "vioasid_page_size": 4096,
        "pgtt": "first-stage",
    }


def test_page_size_must_match(walker_rtaddr: tuple[Walker, int]) -> None:
    c = run(walker_rtaddr, [translate_line(0x40000000, 0x400000, 0xFFF)])
    assert c.disagree == 1


@pytest.mark.parametrize(
    "inv",
    [
        piotlb_line(0x1000),
        piotlb_line(0x0, am=1),  # 0x0-0x2000
        "vtd_inv_desc invalidate desc type iotlb high 0x0 low 0x300e2",
        "vtd_dmar_enable enable 0",
    ],
)
def test_invalidated_since_logged_is_stale(walker_rtaddr: tuple[Walker, int], inv: str) -> None:
    c = run(walker_rtaddr, [translate_line(0x1000, 0x999000), inv])
    assert (c.agree, c.disagree, c.stale, c.stale_invalidated) == (0, 0, 1, 1)
    assert c.invalidations == 1


def test_large_address_mask_range(walker_rtaddr: tuple[Walker, int]) -> None:
    # AM=12: 4096 pages (kept as a range, not a page set)
    c = run(walker_rtaddr, [translate_line(0x5000, 0x999000), piotlb_line(0x0, am=12)])
    assert (c.disagree, c.stale_invalidated) == (0, 1)
    c = run(walker_rtaddr, [translate_line(0x5000, 0x999000), piotlb_line(0x1000000, am=12)])
    assert c.disagree == 1


def test_unmapped_is_stale_not_disagreement(walker_rtaddr: tuple[Walker, int]) -> None:
    c = run(
        walker_rtaddr,
        [
            translate_line(0x9000, 0x209000),  # example tables: unmapped
            translate_line(0x1000, 0x201000, dev="00:05.00"),  # no context entry
        ],
    )
    assert (c.agree, c.disagree, c.stale, c.stale_invalidated) == (0, 0, 2, 0)


def test_interrupt_range_skipped(walker_rtaddr: tuple[Walker, int]) -> None:
    c = run(walker_rtaddr, [translate_line(0xFEE00000, 0xFEE00000)])
    assert (c.skipped, c.agree, c.disagree, c.stale) == (1, 0, 0, 0)


def test_merge_and_checker(tmp_path: Path, walker_rtaddr: tuple[Walker, int]) -> None:
    walker, rtaddr = walker_rtaddr
    path = tmp_path / "trace.log"
    checker = TraceChecker(path, walker)
    path.write_text(translate_line(0x1000, 0x201000) + "\n" + translate_line(0x1000, 0x998000))
    first = checker.check(rtaddr)  # the second line has no newline yet
    assert (first.agree, first.disagree) == (1, 0)
    with path.open("a") as out:
        out.write("\n" + translate_line(0x2000, 0x202000) + "\n")
    second = checker.check(rtaddr)
    assert (second.agree, second.disagree) == (1, 1)
    t = checker.total
    assert (t.checks, t.agree, t.disagree, t.unique_agree, t.records) == (2, 2, 1, 2, 3)
    j = t.to_json()
    assert j["agree"] == 2 and j["disagree"] == 1 and len(j["disagreements"]) == 1


def test_disagreements_kept_are_bounded(walker_rtaddr: tuple[Walker, int]) -> None:
    lines: list[str] = [translate_line(0x1000, 0x900000 + i * 0x1000) for i in range(30)]
    c = run(walker_rtaddr, lines)
    assert c.disagree == 30 and len(c.disagreements) == c.max_kept
    total = CheckCounts()
    total.merge(c).merge(c)
    assert total.disagree == 60 and len(total.disagreements) == total.max_kept


def test_records_typed() -> None:
    recs: list[TraceRecord] = parse_lines([translate_line(0x1000, 0x201000)])
    assert recs[0] == DmarTranslate(SID, 0x1000, 0x201000, 0xFFF)
