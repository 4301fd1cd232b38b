"""PASID directory entry (VT-d §9.5) and scalable-mode PASID table entry (VT-d §9.6).

Positions mirror Linux drivers/iommu/intel/pasid.h (``pasid_set_*`` helpers, ``PASID_PTE_*``,
``PDE_PFN_MASK``) and QEMU ``VTD_SM_PASID_ENTRY_*`` / ``VTD_PASID_DIR_*``.
"""

from .bitfields import F, Layout, Word

PASID_BITS = 20  # VT-d §3.4.3 / PCIe PASID TLP prefix: 20-bit PASIDs
PASID_DIR_ENTRY_SIZE = 8
PASID_ENTRY_SIZE = 64
PASID_DIR_SHIFT = 6  # Linux PASID_PDE_SHIFT; QEMU VTD_PASID_DIR_INDEX
PASID_TABLE_MASK = 0x3F  # Linux PASID_PTE_MASK; QEMU VTD_PASID_TABLE_INDEX
PASID_ENTRIES_PER_TABLE = 64

# PGTT values (Linux PASID_ENTRY_PGTT_*; QEMU VTD_SM_PASID_ENTRY_FST/SST/NESTED/PT).
PGTT_FIRST_STAGE = 1
PGTT_SECOND_STAGE = 2
PGTT_NESTED = 3
PGTT_PASS_THROUGH = 4
PGTT_NAMES = {
    PGTT_FIRST_STAGE: "first-stage",
    PGTT_SECOND_STAGE: "second-stage",
    PGTT_NESTED: "nested",
    PGTT_PASS_THROUGH: "pass-through",
}

PASID_DIR_ENTRY = Layout(
    "pasid_dir_entry",
    [Word("qw0", [F("P", 0), F("FPD", 1), F("PTP", 63, 12, addr=True)])],
    doc="VT-d §9.5 PASID directory entry: P, FPD (QEMU VTD_PASID_DIR_FPD), PTP 63:12.",
)

PASID_ENTRY = Layout(
    "pasid_entry",
    [
        Word(
            "qw0",
            [
                F("P", 0),  # pasid_set_present
                F("FPD", 1),  # PASID_PTE_FPD
                F("AW", 4, 2),  # pasid_set_address_width; SS levels = AW + 2
                F("SSEE", 5),  # second-stage execute enable (spec only)
                F("PGTT", 8, 6),  # pasid_set_translation_type
                F("SSADE", 9),  # pasid_set_ssade
                F("SSPTPTR", 63, 12, addr=True),  # pasid_set_slptr
            ],
            reserved=0xC00,  # bits 11:10
        ),
        Word(
            "qw1",
            [
                F("DID", 15, 0),  # pasid_set_domain_id
                F("PWSNP", 23),  # pasid_set_page_snoop
                F("PGSNP", 24),  # pasid_set_pgsnp
            ],
            reserved=0,  # CD/EMT/PAT etc. live here in the spec; not checked
        ),
        Word(
            "qw2",
            [
                F("SRE", 0),  # pasid_set_sre
                F("ERE", 1),  # execute-requests enable (spec; Linux fault 0x5c)
                F("FLPM", 3, 2),  # pasid_set_flpm: 0 4-level, 1 5-level
                F("WPE", 4),  # pasid_set_wpe
                F("NXE", 5),  # pasid_set_nxe (older Linux)
                F("EAFE", 7),  # pasid_set_eafe
                F("FLPTPTR", 63, 12, addr=True),  # pasid_set_flptr
            ],
            reserved=0,  # bits 11:8 ignored here (Linux/QEMU do not set them)
        ),
        Word("qw3", [], reserved=0),
        Word("qw4", [], reserved=0),
        Word("qw5", [], reserved=0),
        Word("qw6", [], reserved=0),
        Word("qw7", [], reserved=0),
    ],
    doc="VT-d §9.6 scalable-mode PASID table entry (512 bit); Linux pasid.h pasid_set_*().",
)


def pasid_indices(pasid: int) -> tuple[int, int]:
    """(directory index, table index) for a PASID (QEMU VTD_PASID_DIR_INDEX/TABLE_INDEX)."""
    return pasid >> PASID_DIR_SHIFT, pasid & PASID_TABLE_MASK
