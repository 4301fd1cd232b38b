"""Fault recording register (VT-d §10.4.14) and the fault reason codes.

Reason codes follow QEMU's ``enum VTDFaultReason`` (hw/i386/intel_iommu_internal.h) wherever QEMU
models the condition; conditions QEMU does not model use the scalable-mode code of the VT-d spec
as Linux names it in ``dma_remap_sm_fault_reasons[]`` (drivers/iommu/intel/dmar.c). Each entry
says which.
"""

from enum import IntEnum

from .bitfields import F, Layout, Word

FAULT_RECORD = Layout(
    "fault_record",
    [
        Word("qw0", [F("FI", 63, 12, addr=True)], reserved=0),  # VTD_FRCD_FI
        Word(
            "qw1",
            [
                F("SID", 15, 0),  # VTD_FRCD_SID; dma_frcd_source_id
                F("PP", 31),  # VTD_FRCD_PP; dma_frcd_pasid_present
                F("FR", 39, 32),  # VTD_FRCD_FR; dma_frcd_fault_reason
                F("PV", 59, 40),  # VTD_FRCD_PV (20 bits here; QEMU keeps 16)
                F("PRIV", 60),  # spec only
                F("EXE", 61),  # spec only
                F("T", 62),  # 1 = read, 0 = write (VTD_FRCD_T)
                F("F", 63),  # fault valid, RW1C (VTD_FRCD_F)
            ],
            reserved=0,
        ),
    ],
    doc="VT-d §10.4.14 fault recording register (128 bit); QEMU VTD_FRCD_*, Linux dma_frcd_*.",
)


class FaultReason(IntEnum):
    """VT-d fault reason codes. ``# qemu`` = QEMU emits it; ``# spec`` = Linux SM table only."""

    ROOT_ENTRY_P = 0x01  # qemu VTD_FR_ROOT_ENTRY_P
    CONTEXT_ENTRY_P = 0x02  # qemu
    CONTEXT_ENTRY_INV = 0x03  # qemu
    ADDR_BEYOND_MGAW = 0x04  # qemu
    WRITE = 0x05  # qemu (legacy second stage)
    READ = 0x06  # qemu
    PAGING_ENTRY_INV = 0x07  # qemu: cannot access second-stage entry
    ROOT_TABLE_INV = 0x08  # qemu: cannot access root entry
    CONTEXT_TABLE_INV = 0x09  # qemu: cannot access context entry
    ROOT_ENTRY_RSVD = 0x0A  # qemu
    CONTEXT_ENTRY_RSVD = 0x0B  # qemu
    PAGING_ENTRY_RSVD = 0x0C  # qemu: reserved bit in second-stage entry
    CONTEXT_ENTRY_TT = 0x0D  # qemu
    INTERRUPT_ADDR = (
        0x0E  # qemu: second-stage output in the interrupt range (VTD_FR_INTERRUPT_ADDR)
    )
    RTADDR_INV_TTM = 0x31  # qemu: legacy root table with a PASID request
    CONTEXT_PASIDE_CLEAR = 0x45  # spec: SM context PASIDE clear for request with PASID
    CONTEXT_PASID_TOO_BIG = 0x46  # spec: PASID above the directory size (PDTS)
    SM_PRE_ABS = 0x47  # qemu
    PASID_DIR_ACCESS_ERR = 0x50  # qemu
    PASID_DIR_ENTRY_P = 0x51  # qemu
    PASID_DIR_ENTRY_RSVD = 0x52  # spec
    PASID_TABLE_ACCESS_ERR = 0x58  # qemu
    PASID_ENTRY_P = 0x59  # qemu
    PASID_ENTRY_RSVD = 0x5A  # spec
    PASID_TABLE_ENTRY_INV = 0x5B  # qemu: bad PGTT / level
    ERE_CLEAR = 0x5C  # spec: execute request with ERE clear
    SRE_CLEAR = 0x5D  # spec: supervisor request with SRE clear
    FS_PAGING_ENTRY_INV = 0x70  # qemu: cannot access first-stage entry
    FS_PAGING_ENTRY_P = 0x71  # qemu
    FS_PAGING_ENTRY_RSVD = 0x72  # qemu
    PASID_ENTRY_FSPTPTR_INV = 0x73  # qemu
    NESTED_FS_TRANSLATION = 0x74  # spec: nested first-level entry's second-stage walk failed
    SS_ENTRY_ACCESS = 0x78  # spec: cannot access second-level entry (scalable mode)
    SS_ENTRY_P = 0x79  # spec: second-level entry not present (scalable mode)
    SS_ENTRY_RSVD = 0x7A  # spec: reserved bit in second-level entry (scalable mode)
    FS_NON_CANONICAL = 0x80  # qemu
    FS_PAGING_ENTRY_US = 0x81  # qemu: U/S clear for a user request
    FS_EXECUTE = 0x82  # spec: execute request to a non-executable (XD) page
    SS_BEYOND_MAX = 0x83  # spec: input beyond the second-stage address width
    SM_WRITE = 0x85  # qemu: no write permission (scalable mode)
    SM_READ = 0x86  # spec: no read permission (scalable mode)
    SM_INTERRUPT_ADDR = 0x87  # qemu
    FS_BIT_UPDATE_FAILED = 0x91  # qemu

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")
