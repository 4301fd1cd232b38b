"""Invalidation-queue descriptors (VT-d §6.5.2), 128- and 256-bit.

Type = bits 3:0 plus bits 11:9 as type[6:4] (QEMU ``VTD_INV_DESC_TYPE``). In scalable mode the
queue holds 256-bit descriptors (IQA.DW=1) whose qw2/qw3 must be zero for every type here. Each
layout below names the QEMU ``VTD_INV_DESC_*`` and Linux ``QI_*`` macros it mirrors.
"""

from .bitfields import F, Field, Layout, Word

DESC_128 = 16
DESC_256 = 32

TYPE_CC = 1  # VTD_INV_DESC_CC / QI_CC_TYPE
TYPE_IOTLB = 2  # VTD_INV_DESC_IOTLB / QI_IOTLB_TYPE
TYPE_DEVICE_TLB = 3  # VTD_INV_DESC_DEVICE / QI_DIOTLB_TYPE
TYPE_IEC = 4  # VTD_INV_DESC_IEC / QI_IEC_TYPE
TYPE_WAIT = 5  # VTD_INV_DESC_WAIT / QI_IWD_TYPE
TYPE_PIOTLB = 6  # VTD_INV_DESC_PIOTLB / QI_EIOTLB_TYPE
TYPE_PC = 7  # VTD_INV_DESC_PC / QI_PC_TYPE
TYPE_DEV_PIOTLB = 8  # VTD_INV_DESC_DEV_PIOTLB / QI_DEIOTLB_TYPE
TYPE_PGRESP = 9  # VTD_INV_DESC_PGRESP / QI_PGRP_RESP_TYPE

TYPE_NAMES = {
    TYPE_CC: "context-cache",
    TYPE_IOTLB: "iotlb",
    TYPE_DEVICE_TLB: "device-tlb",
    TYPE_IEC: "interrupt-entry-cache",
    TYPE_WAIT: "wait",
    TYPE_PIOTLB: "pasid-iotlb",
    TYPE_PC: "pasid-cache",
    TYPE_DEV_PIOTLB: "pasid-device-tlb",
    TYPE_PGRESP: "page-group-response",
}


def _type_fields() -> list[Field]:
    return [F("TYPE_LO", 3, 0), F("TYPE_HI", 11, 9)]


def desc_type(qw0: int) -> int:
    """Descriptor type from qw0 (QEMU VTD_INV_DESC_TYPE)."""
    return (qw0 & 0xF) | ((qw0 >> 5) & 0x70)


def _desc(
    name: str, qw0: list[Field], qw1: list[Field], doc: str, rsvd0: int, rsvd1: int
) -> Layout:
    return Layout(
        name,
        [Word("qw0", _type_fields() + qw0, reserved=rsvd0), Word("qw1", qw1, reserved=rsvd1)],
        doc=doc,
    )


CC_DESC = _desc(
    "context_cache_inv",
    [F("G", 5, 4), F("DID", 31, 16), F("SID", 47, 32), F("FM", 49, 48)],
    [],
    "§6.5.2.1 context-cache invalidate; VTD_INV_DESC_CC_*, QI_CC_*.",
    0xFFFC00000000F1C0 & ~0xE00,
    0xFFFFFFFFFFFFFFFF,
)
CC_GLOBAL, CC_DOMAIN, CC_DEVICE = 1, 2, 3

IOTLB_DESC = _desc(
    "iotlb_inv",
    [F("G", 5, 4), F("DW", 6), F("DR", 7), F("DID", 31, 16)],
    [F("AM", 5, 0), F("IH", 6), F("ADDR", 63, 12, addr=True)],
    "§6.5.2.3 IOTLB invalidate; VTD_INV_DESC_IOTLB_*, QI_IOTLB_*.",
    0xFFFFFFFF0000F100 & ~0xE00,
    0xF80,
)
IOTLB_GLOBAL, IOTLB_DOMAIN, IOTLB_PAGE = 1, 2, 3

DEVICE_TLB_DESC = _desc(
    "device_tlb_inv",
    [F("PFSID_LO", 15, 12), F("QDEP", 20, 16), F("SID", 47, 32), F("PFSID_HI", 63, 52)],
    [F("S", 0), F("ADDR", 63, 12, addr=True)],
    "§6.5.2.5 device-TLB invalidate; VTD_INV_DESC_DEVICE_IOTLB_*, QI_DEV_IOTLB_*.",
    0x000F0000FFE00000 & ~0xE00 & ~0x000F000000000000 | 0x1F0,
    0xFFE,
)

WAIT_DESC = _desc(
    "inv_wait",
    [F("IF", 4), F("SW", 5), F("FN", 6), F("PD", 7), F("STATUS_DATA", 63, 32)],
    [F("STATUS_ADDR", 63, 2, addr=True)],
    "§6.5.2.8 invalidation wait; VTD_INV_DESC_WAIT_*, QI_IWD_*.",
    0x00000000FFFFF100,
    0x3,
)

PIOTLB_DESC = _desc(
    "pasid_iotlb_inv",
    [F("G", 5, 4), F("DID", 31, 16), F("PASID", 51, 32)],
    [F("AM", 5, 0), F("IH", 6), F("ADDR", 63, 12, addr=True)],
    "§6.5.2.4 PASID-based IOTLB invalidate; VTD_INV_DESC_PIOTLB_*, QI_EIOTLB_*.",
    0xFFF000000000F1C0 & ~0xE00,
    0xF80,
)
PIOTLB_ALL_IN_PASID, PIOTLB_PSI_IN_PASID = 2, 3

PC_DESC = _desc(
    "pasid_cache_inv",
    [F("G", 5, 4), F("DID", 31, 16), F("PASID", 51, 32)],
    [],
    "§6.5.2.2 PASID-cache invalidate; VTD_INV_DESC_PASIDC_*, QI_PC_*.",
    0xFFF000000000F1C0 & ~0xE00,
    0xFFFFFFFFFFFFFFFF,
)
PC_DSI, PC_PASID_SI, PC_GLOBAL = 0, 1, 3

DEV_PIOTLB_DESC = _desc(
    "pasid_device_tlb_inv",
    [
        F("QDEP", 8, 4),
        F("PFSID_LO", 15, 12),
        F("SID", 31, 16),
        F("PASID", 51, 32),
        F("PFSID_HI", 63, 52),
    ],
    [F("G", 0), F("S", 11), F("ADDR", 63, 12, addr=True)],
    "§6.5.2.6 PASID-based device-TLB invalidate; "
    "VTD_INV_DESC_PASID_DEVICE_IOTLB_*, QI_DEV_EIOTLB_*.",
    0x000F000000000000,
    0x7FE,
)

IEC_DESC = _desc(
    "iec_inv",
    [F("G", 4), F("IM", 31, 27), F("IIDX", 47, 32)],
    [],
    "§6.5.2.7 interrupt-entry-cache invalidate; QEMU VTDInvDescIEC, Linux QI_IEC_*.",
    0xFFFF000007FFF1E0 & ~0xE00,
    0xFFFFFFFFFFFFFFFF,
)

PGRESP_DESC = _desc(
    "page_group_response",
    [F("PP", 4), F("PDP", 5), F("RC", 15, 12), F("RID", 31, 16), F("PASID", 51, 32)],
    [F("LPIG", 2), F("PRGI", 11, 3)],
    "§6.5.2.9 page-group response; QI_PGRP_*, VTD_INV_DESC_PGRESP_*.",
    0xFFF00000000001C0 & ~0xE00,
    0xFFFFFFFFFFFFF003,
)
RESP_SUCCESS, RESP_INVALID, RESP_FAILURE = 0, 1, 0xF

LAYOUTS: dict[int, Layout] = {
    TYPE_CC: CC_DESC,
    TYPE_IOTLB: IOTLB_DESC,
    TYPE_DEVICE_TLB: DEVICE_TLB_DESC,
    TYPE_IEC: IEC_DESC,
    TYPE_WAIT: WAIT_DESC,
    TYPE_PIOTLB: PIOTLB_DESC,
    TYPE_PC: PC_DESC,
    TYPE_DEV_PIOTLB: DEV_PIOTLB_DESC,
    TYPE_PGRESP: PGRESP_DESC,
}


def build_desc(layout: Layout, values: dict[str, int], wide: bool = True) -> bytes:
    """Build a descriptor with its type filled in; ``wide`` appends the zero qw2/qw3."""
    t = next(k for k, v in LAYOUTS.items() if v is layout)
    vals = dict(values)
    vals.setdefault("TYPE_LO", t & 0xF)
    vals.setdefault("TYPE_HI", t >> 4)
    raw = layout.build(vals)
    return raw + bytes(16) if wide else raw
