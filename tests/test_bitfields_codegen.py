"""The code generated from the layouts reads exactly what the field tables say."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.formats import context, invalidation, paging, pasid, registers, root
from vioasid.formats.bitfields import F, Layout, Word, render

LAYOUTS: list[Layout] = [
    root.LEGACY_ROOT_ENTRY,
    root.SM_ROOT_ENTRY,
    context.LEGACY_CONTEXT_ENTRY,
    context.SM_CONTEXT_ENTRY,
    pasid.PASID_DIR_ENTRY,
    pasid.PASID_ENTRY,
    paging.FIRST_STAGE_PTE,
    paging.FIRST_STAGE_PDE_2M,
    paging.FIRST_STAGE_PDPE_1G,
    paging.SECOND_STAGE_PTE,
    paging.SECOND_STAGE_PDE_2M,
    paging.SECOND_STAGE_PDPE_1G,
    registers.RTADDR,
    *invalidation.LAYOUTS.values(),
]
U64S = st.integers(0, (1 << 64) - 1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decoder_matches_the_construct_parse(layout: Layout, data: st.DataObject) -> None:
    words = tuple(data.draw(U64S) for _ in layout.words)
    flat = layout.flat(struct.pack(f"<{len(words)}Q", *words))
    decoded = layout.decoder()(words)
    assert decoded == flat  # bools compare equal to 0/1
    one_bit = {n for n, (_, f) in layout.fields.items() if f.width == 1 and not f.addr}
    assert all(isinstance(decoded[n], bool) for n in one_bit)


def test_decoder_into_passes_constants_and_fields_in_order() -> None:
    dec = pasid.PASID_ENTRY.decoder(["PGTT", 7, "FPD", "FLPTPTR"], lambda *a: a)
    w0 = pasid.PASID_ENTRY.words[0].encode({"P": 1, "FPD": 1, "PGTT": 3})
    w2 = pasid.PASID_ENTRY.words[2].encode({"FLPTPTR": 0xABC000})
    assert dec((w0, 0, w2)) == (3, 7, True, 0xABC000)


@settings(max_examples=100, deadline=None)
@given(word=U64S)
def test_render_reads_fields_and_masks_as_literals(word: int) -> None:
    layout = Layout("t", [Word("qw0", [F("A", 0), F("B", 7, 4), F("PTR", 63, 12, addr=True)])])
    src = render("($T.A(w), $T.B(w), $T.PTR(w), $T.B, $T.rsvd0, $K)", {"T": layout}, {"K": 5})
    assert "$" not in src and "T." not in src
    got = eval(src, {"w": word})  # the rendered text is an expression over w
    assert got == (
        bool(word & 1),
        (word >> 4) & 0xF,
        word & ~0xFFF & ((1 << 64) - 1),
        0xF0,
        0xF0E,
        5,
    )


def test_large_page_layouts_reserve_the_bits_below_the_page() -> None:
    # QEMU VTD_FPTE_LPAGE_L2/L3_RSVD_MASK and VTD_SPTE_LPAGE_L2/L3_RSVD_MASK (below haw)
    assert paging.FIRST_STAGE_PDE_2M.reserved[0] == 0x1FE000
    assert paging.FIRST_STAGE_PDPE_1G.reserved[0] == 0x3FFFE000
    assert paging.SECOND_STAGE_PDE_2M.reserved[0] == 0x1FF000
    assert paging.SECOND_STAGE_PDPE_1G.reserved[0] == 0x3FFFF000
