"""Layout round-trips with known vectors (guest dumps in qemu-notes.md, Linux QI_* builders)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vioasid.formats.bitfields import Layout
from vioasid.formats.context import LEGACY_CONTEXT_ENTRY, SM_CONTEXT_ENTRY, pasid_dir_entries
from vioasid.formats.fault import FAULT_RECORD
from vioasid.formats.invalidation import (
    CC_DESC,
    IOTLB_DESC,
    LAYOUTS,
    PC_DESC,
    PIOTLB_DESC,
    TYPE_PIOTLB,
    TYPE_WAIT,
    WAIT_DESC,
    build_desc,
    desc_type,
)
from vioasid.formats.paging import FIRST_STAGE_PTE, SECOND_STAGE_PTE
from vioasid.formats.pasid import PASID_DIR_ENTRY, PASID_ENTRY, pasid_indices
from vioasid.formats.prq import PAGE_REQ_DESC
from vioasid.formats.root import LEGACY_ROOT_ENTRY, SM_ROOT_ENTRY

ALL_LAYOUTS: list[Layout] = [
    LEGACY_ROOT_ENTRY,
    SM_ROOT_ENTRY,
    LEGACY_CONTEXT_ENTRY,
    SM_CONTEXT_ENTRY,
    PASID_DIR_ENTRY,
    PASID_ENTRY,
    FIRST_STAGE_PTE,
    SECOND_STAGE_PTE,
    FAULT_RECORD,
    PAGE_REQ_DESC,
    *LAYOUTS.values(),
]


def q(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words)


def test_pasid_entry_first_stage_guest_vector() -> None:
    # qemu-notes.md: a Linux 6.12 guest under x-flts=on writes qw0 = 0x49 (P | AW=2 | PGTT=1).
    raw = q(0x49, 0x1, 0x7FA3000, 0, 0, 0, 0, 0)
    f = PASID_ENTRY.flat(raw)
    assert (f["P"], f["AW"], f["PGTT"], f["DID"], f["FLPTPTR"]) == (1, 2, 1, 1, 0x7FA3000)
    assert f["SRE"] == 0 and f["FLPM"] == 0
    assert PASID_ENTRY.build(PASID_ENTRY.parse(raw)) == raw
    assert PASID_ENTRY.build({"P": 1, "AW": 2, "PGTT": 1, "DID": 1, "FLPTPTR": 0x7FA3000}) == raw


def test_pasid_entry_second_stage_guest_vector() -> None:
    # Second stage: qw0 ...89 = P | AW=2 | PGTT=2 | SLPTPTR.
    raw = q(0x5ABC089, 0x2, 0, 0, 0, 0, 0, 0)
    f = PASID_ENTRY.flat(raw)
    assert (f["P"], f["AW"], f["PGTT"], f["SSPTPTR"], f["DID"]) == (1, 2, 2, 0x5ABC000, 2)
    assert PASID_ENTRY.build(f) == raw


def test_sm_context_entry_linux_layout() -> None:
    # context_entry_set_pasid_table(): PASIDDIRPTR | PDTS(2) | PASIDE | P, RID_PASID 0.
    raw = SM_CONTEXT_ENTRY.build({"P": 1, "PASIDE": 1, "PDTS": 2, "PASIDDIRPTR": 0x1234000})
    assert raw == q(0x1234409, 0, 0, 0)
    assert pasid_dir_entries(2) == 512
    assert SM_CONTEXT_ENTRY.parse(raw).qw0.PDTS == 2


def test_root_and_legacy_context() -> None:
    assert SM_ROOT_ENTRY.build({"LP": 1, "LCTP": 0x5000, "UP": 1, "UCTP": 0x6000}) == q(
        0x5001, 0x6001
    )
    raw = LEGACY_CONTEXT_ENTRY.build({"P": 1, "TT": 2, "SSPTPTR": 0x9000, "AW": 2, "DID": 7})
    assert raw == q(0x9009, 0x702)
    assert LEGACY_ROOT_ENTRY.words[1].reserved == (1 << 64) - 1


def test_pasid_indices() -> None:
    assert pasid_indices(0) == (0, 0)
    assert pasid_indices(0x12345) == (0x12345 >> 6, 0x05)


def test_invalidation_descriptor_vectors() -> None:
    # Linux qi_desc_piotlb_all(): QI_EIOTLB_TYPE | GRAN(2) | DID | PASID.
    raw = build_desc(PIOTLB_DESC, {"G": 2, "DID": 3, "PASID": 5})
    assert raw[:16] == q(0x6 | 0x20 | (3 << 16) | (5 << 32), 0) and raw[16:] == bytes(16)
    assert desc_type(struct.unpack_from("<Q", raw)[0]) == TYPE_PIOTLB
    # qi_submit_sync's wait: QI_IWD_STATUS_DATA(QI_DONE=1) | STATUS_WRITE | TYPE, address.
    raw = build_desc(WAIT_DESC, {"SW": 1, "STATUS_DATA": 1, "STATUS_ADDR": 0x7000}, wide=False)
    assert raw == q(0x100000025, 0x7000)
    assert desc_type(0x100000025) == TYPE_WAIT
    # Page-selective IOTLB: G=3, DID, AM=9, address.
    raw = build_desc(IOTLB_DESC, {"G": 3, "DID": 1, "AM": 9, "ADDR": 0x200000}, wide=False)
    assert raw == q(0x2 | 0x30 | (1 << 16), 0x200009)
    raw = build_desc(CC_DESC, {"G": 3, "SID": 0x18}, wide=False)
    assert raw == q(0x1 | 0x30 | (0x18 << 32), 0)
    raw = build_desc(PC_DESC, {"G": 1, "DID": 2, "PASID": 9}, wide=False)
    assert raw == q(0x7 | 0x10 | (2 << 16) | (9 << 32), 0)
    # A type needing bits 11:9 (type >= 16 does not exist here; type_hi stays 0).
    assert all(desc_type(k) == k for k in LAYOUTS)


def test_fault_record_vector() -> None:
    raw = FAULT_RECORD.build(
        {"FI": 0x1234000, "SID": 0x18, "PP": 1, "FR": 0x71, "PV": 5, "T": 1, "F": 1}
    )
    lo, hi = struct.unpack("<2Q", raw)
    assert lo == 0x1234000
    assert hi == 0x18 | (1 << 31) | (0x71 << 32) | (5 << 40) | (1 << 62) | (1 << 63)


def test_paging_entries() -> None:
    # A Linux first-level leaf: P | RW | US | A | D | XD.
    pte = FIRST_STAGE_PTE.flat(q(0x8000000000345067))
    assert pte["P"] == pte["RW"] == pte["US"] == pte["A"] == pte["D"] == pte["XD"] == 1
    assert pte["ADDR"] == 0x345000
    spte = SECOND_STAGE_PTE.flat(q(0x400083))
    assert (spte["R"], spte["W"], spte["PS"], spte["ADDR"]) == (1, 1, 1, 0x400000)


@st.composite
def layout_values(draw: st.DrawFn) -> tuple[Layout, dict[str, int]]:
    layout = draw(st.sampled_from(ALL_LAYOUTS))
    values: dict[str, int] = {}
    for name, (_, f) in layout.fields.items():
        v = draw(st.integers(0, f.vmask))
        values[name] = v << f.lo if f.addr else v
    return layout, values


@given(layout_values())
def test_every_layout_round_trips(lv: tuple[Layout, dict[str, int]]) -> None:
    layout, values = lv
    raw = layout.build(values)
    assert len(raw) == layout.size
    assert layout.flat(raw) == values
    assert layout.build(layout.parse(raw)) == raw
