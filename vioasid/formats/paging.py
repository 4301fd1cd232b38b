"""First-stage (x86-64 format, VT-d §9.7) and second-stage (VT-d §9.8) paging entries.

First stage mirrors QEMU ``VTD_FS_P/RW/US/A/D`` and Linux ``DMA_FL_PTE_*``; second stage mirrors
QEMU ``VTD_SS_R/W``, ``VTD_SPTE_SNP`` and Linux ``DMA_PTE_READ/WRITE/LARGE_PAGE/SNP``. The address
field spans bits 51:12; bits above the host address width are reserved (checked by the walker).
"""

from .bitfields import F, Field, Layout, Word

PTE_SIZE = 8
ENTRIES_PER_TABLE = 512


def _first_stage(name: str, page: list[Field], doc: str) -> Layout:
    return Layout(
        name,
        [
            Word(
                "qw0",
                [
                    F("P", 0),
                    F("RW", 1),
                    F("US", 2),
                    F("PWT", 3),
                    F("PCD", 4),
                    F("A", 5),
                    F("D", 6),
                    F("PS", 7),  # large page at PDPE/PDE; reserved in PML4E/PML5E
                    F("G", 8),
                    F("IGN_11_9", 11, 9),
                    *page,
                    F("IGN_62_52", 62, 52),  # QEMU VTD_FS_UPPER_IGNORED
                    F("XD", 63),  # DMA_FL_PTE_XD
                ],
            )
        ],
        doc=doc,
    )


FIRST_STAGE_PTE = _first_stage(
    "first_stage_pte",
    [F("ADDR", 51, 12, addr=True)],
    "VT-d §9.7 first-stage paging entry (x86-64 format); QEMU VTD_FS_*, Linux DMA_FL_PTE_*.",
)
# Large pages: PAT moves to bit 12, the address starts at the page size, the bits between are
# reserved (QEMU VTD_FPTE_LPAGE_L2_RSVD_MASK / VTD_FPTE_LPAGE_L3_RSVD_MASK).
FIRST_STAGE_PDE_2M = _first_stage(
    "first_stage_pde_2m",
    [F("PAT", 12), F("ADDR", 51, 21, addr=True)],
    "VT-d §9.7 first-stage PDE mapping a 2 MiB page (PS=1): PAT 12, bits 20:13 reserved.",
)
FIRST_STAGE_PDPE_1G = _first_stage(
    "first_stage_pdpe_1g",
    [F("PAT", 12), F("ADDR", 51, 30, addr=True)],
    "VT-d §9.7 first-stage PDPE mapping a 1 GiB page (PS=1): PAT 12, bits 29:13 reserved.",
)


def _second_stage(name: str, lo: int, doc: str) -> Layout:
    return Layout(
        name,
        [
            Word(
                "qw0",
                [
                    F("R", 0),
                    F("W", 1),
                    F("X", 2),
                    F("EMT", 5, 3),
                    F("IPAT", 6),
                    F("PS", 7),  # DMA_PTE_LARGE_PAGE
                    F("A", 8),
                    F("D", 9),
                    F("IGN_10", 10),
                    F("SNP", 11),  # VTD_SPTE_SNP
                    F("ADDR", 51, lo, addr=True),
                    F("IGN_61_52", 61, 52),  # VTD_SS_IGN_COM
                    F("TM", 62),  # reserved since spec 3.2; QEMU stale-tm
                    F("IGN_63", 63),
                ],
            )
        ],
        doc=doc,
    )


SECOND_STAGE_PTE = _second_stage(
    "second_stage_pte", 12, "VT-d §9.8 second-stage paging entry; QEMU VTD_SS_R/W, Linux DMA_PTE_*."
)
# Large pages: the address starts at the page size, the bits below it are reserved (QEMU
# VTD_SPTE_LPAGE_L2_RSVD_MASK / VTD_SPTE_LPAGE_L3_RSVD_MASK).
SECOND_STAGE_PDE_2M = _second_stage(
    "second_stage_pde_2m", 21, "VT-d §9.8 second-stage PDE mapping a 2 MiB page: 20:12 reserved."
)
SECOND_STAGE_PDPE_1G = _second_stage(
    "second_stage_pdpe_1g", 30, "VT-d §9.8 second-stage PDPE mapping a 1 GiB page: 29:12 reserved."
)
