"""Context entries: legacy 128-bit (VT-d §9.3) and scalable-mode 256-bit (VT-d §9.4).

Field names follow the spec; positions follow QEMU ``VTD_CONTEXT_ENTRY_*``/``VTD_SM_CONTEXT_*``
and Linux ``context_set_*``/``context_pdts()`` (drivers/iommu/intel/iommu.h, pasid.c).
"""

from .bitfields import F, Layout, Word

LEGACY_CONTEXT_ENTRY_SIZE = 16
SM_CONTEXT_ENTRY_SIZE = 32

# TT values (QEMU VTD_CONTEXT_TT_*, Linux CONTEXT_TT_*).
TT_MULTI_LEVEL = 0
TT_DEV_IOTLB = 1
TT_PASS_THROUGH = 2

LEGACY_CONTEXT_ENTRY = Layout(
    "legacy_context_entry",
    [
        Word("qw0", [F("P", 0), F("FPD", 1), F("TT", 3, 2), F("SSPTPTR", 63, 12, addr=True)]),
        Word("qw1", [F("AW", 2, 0), F("AVAIL", 6, 3), F("DID", 23, 8)]),
    ],
    doc="VT-d §9.3 context entry; QEMU VTD_CONTEXT_ENTRY_P/FPD/TT/SSPTPTR/AW/DID.",
)

SM_CONTEXT_ENTRY = Layout(
    "sm_context_entry",
    [
        Word(
            "qw0",
            [
                F("P", 0),  # context_set_present
                F("FPD", 1),  # context_set_fault_enable clears it
                F("DTE", 2),  # context_set_sm_dte
                F("PASIDE", 3),  # CONTEXT_PASIDE
                F("PRE", 4),  # context_set_sm_pre; QEMU VTD_SM_CONTEXT_ENTRY_PRE
                # 8:5 reserved (QEMU VTD_SM_CONTEXT_ENTRY_RSVD_VAL0 0x1e0)
                F("PDTS", 11, 9),  # directory has 2^(PDTS+7) entries (Linux context_pdts)
                F("PASIDDIRPTR", 63, 12, addr=True),  # VTD_CE_GET_PASID_DIR_TABLE
            ],
        ),
        # RID_PASID 19:0 (context_set_sm_rid2pasid); bit 20 RID_PRIV set by older Linux.
        Word("qw1", [F("RID_PASID", 19, 0), F("RID_PRIV", 20)]),
        Word("qw2", []),
        Word("qw3", []),
    ],
    doc="VT-d §9.4 scalable-mode context entry (256 bit); Linux context_entry_set_pasid_table().",
)


def pasid_dir_entries(pdts: int) -> int:
    """Number of PASID-directory entries a context entry's PDTS allows (2^(PDTS+7))."""
    return 1 << (pdts + 7)
