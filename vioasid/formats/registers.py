"""VT-d register fields that select formats (VT-d §10.4): RTADDR, IQA, GSTS; CAP/ECAP offsets.

Mirrors QEMU ``VTD_RTADDR_*``, ``VTD_IQA_*``, ``VTD_GSTS_*`` and Linux ``DMA_RTADDR_SMT``,
``DMA_GSTS_*``, ``cap_*``/``ecap_*``.
"""

from .bitfields import F, Layout, Word

DMAR_BASE_Q35 = 0xFED90000
REG_CAP = 0x08
REG_ECAP = 0x10
REG_GSTS = 0x1C
REG_RTADDR = 0x20
REG_IQH = 0x80
REG_IQT = 0x88
REG_IQA = 0x90

RTADDR = Layout(
    "rtaddr_reg",
    [Word("qw0", [F("TTM", 11, 10), F("RTA", 63, 12, addr=True)])],
    doc="§10.4.6 RTADDR_REG: TTM 11:10 (01b = scalable mode; QEMU VTD_RTADDR_SMT), RTA 63:12.",
)
TTM_LEGACY = 0
TTM_SCALABLE = 1

IQA = Layout(
    "iqa_reg",
    [Word("qw0", [F("QS", 2, 0), F("DW", 11), F("IQA", 63, 12, addr=True)])],
    doc="§10.4.23 IQA_REG: QS (2^QS 4-KiB pages), DW (256-bit descriptors), base 63:12.",
)

IQH = Layout(
    "iqh_reg",
    [Word("qw0", [F("QH", 18, 4)])],
    doc="§10.4.21 IQH_REG: QH 18:4, the next descriptor to fetch (QEMU VTD_IQH_QH).",
)
IQT = Layout(
    "iqt_reg",
    [Word("qw0", [F("QT", 18, 4)])],
    doc="§10.4.22 IQT_REG: QT 18:4, where software writes the next descriptor (VTD_IQT_QT).",
)

GSTS = Layout(
    "gsts_reg",
    [
        Word(
            "qw0",
            [
                F("CFIS", 23),
                F("IRES", 25),
                F("IRTPS", 24),
                F("QIES", 26),
                F("WBFS", 27),
                F("AFLS", 28),
                F("FLS", 29),
                F("RTPS", 30),
                F("TES", 31),
            ],
            reserved=0,
        )
    ],
    doc="§10.4.5 GSTS_REG (32 bit, read here as the low half of a qword); QEMU VTD_GSTS_*.",
)


def is_scalable(rtaddr: int) -> bool:
    """RTADDR's TTM says scalable mode (QEMU VTD_RTADDR_SMT, bit 10)."""
    return RTADDR.field("TTM").get(rtaddr) == TTM_SCALABLE


def iq_entries(iqa: int) -> int:
    """Queue length in descriptors (QEMU ``1 << (QS + 8 - DW)``)."""
    qs = IQA.field("QS").get(iqa)
    dw = IQA.field("DW").get(iqa)
    return 1 << (qs + 8 - dw)
