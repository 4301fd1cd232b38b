"""Root-table entries (VT-d §9.1 legacy, §9.2 scalable mode), 256 per root table, one per bus.

Mirrors QEMU ``VTD_ROOT_ENTRY_P/CTP/RSVD`` and Linux ``root_entry_lctp()/root_entry_uctp()``.
"""

from .bitfields import F, Layout, Word

ROOT_ENTRY_SIZE = 16

LEGACY_ROOT_ENTRY = Layout(
    "legacy_root_entry",
    [
        Word("qw0", [F("P", 0), F("CTP", 63, 12, addr=True)]),
        Word("qw1", []),  # 127:64 reserved in legacy mode (vtd_root_entry_rsvd_bits_check)
    ],
    doc="VT-d §9.1 root entry: P (bit 0), context-table pointer 63:12; QEMU VTD_ROOT_ENTRY_*.",
)

SM_ROOT_ENTRY = Layout(
    "sm_root_entry",
    [
        # Lower half: context table for devfn 0-127 (Linux root_entry_lctp: re->lo).
        Word("qw0", [F("LP", 0), F("LCTP", 63, 12, addr=True)]),
        # Upper half: context table for devfn 128-255 (Linux root_entry_uctp: re->hi).
        Word("qw1", [F("UP", 0), F("UCTP", 63, 12, addr=True)]),
    ],
    doc="VT-d §9.2 scalable-mode root entry: LP/LCTP (devfn 0-127), UP/UCTP (128-255).",
)
