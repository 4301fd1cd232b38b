"""First-stage (x86-64 format, VT-d §9.7) and second-stage (VT-d §9.8) paging entries.

First stage mirrors QEMU ``VTD_FS_P/RW/US/A/D`` and Linux ``DMA_FL_PTE_*``; second stage mirrors
QEMU ``VTD_SS_R/W``, ``VTD_SPTE_SNP`` and Linux ``DMA_PTE_READ/WRITE/LARGE_PAGE/SNP``. The address
field spans bits 51:12; bits above the host address width are reserved (checked by the walker).
"""

from .bitfields import F, Layout, Word

PTE_SIZE = 8
ENTRIES_PER_TABLE = 512

FIRST_STAGE_PTE = Layout(
    "first_stage_pte",
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
                F("ADDR", 51, 12, addr=True),
                F("IGN_62_52", 62, 52),  # QEMU VTD_FS_UPPER_IGNORED
                F("XD", 63),  # DMA_FL_PTE_XD
            ],
        )
    ],
    doc="VT-d §9.7 first-stage paging entry (x86-64 format); QEMU VTD_FS_*, Linux DMA_FL_PTE_*.",
)

SECOND_STAGE_PTE = Layout(
    "second_stage_pte",
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
                F("ADDR", 51, 12, addr=True),
                F("IGN_61_52", 61, 52),  # VTD_SS_IGN_COM
                F("TM", 62),  # reserved since spec 3.2; QEMU stale-tm
                F("IGN_63", 63),
            ],
        )
    ],
    doc="VT-d §9.8 second-stage paging entry; QEMU VTD_SS_R/W, Linux DMA_PTE_*.",
)
