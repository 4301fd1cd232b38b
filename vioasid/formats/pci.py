"""PCI / PCI Express configuration-space layouts (PCI Local Bus 3.0 §6.1, §6.8.1; PCI Express
Base 4.0 §7.5.1 (type-0 header), §7.5.3 (PCI Express Capability), §7.8.8 (PASID), §10.5.1
(ATS), §10.5.2 (PRI)).

Field names follow Linux ``include/uapi/linux/pci_regs.h`` (``PCI_VENDOR_ID``,
``PCI_EXP_DEVCAP2_EE_PREFIX``, ``PCI_PASID_CAP_EXEC`` ...); each structure is one
:class:`~vioasid.formats.record.Record` field table (construct ``.struct`` + ``.packer``).
"""

from __future__ import annotations

import enum

from .record import Record

CONFIG_SPACE_SIZE = 256  # PCI_CFG_SPACE_SIZE
CONFIG_SPACE_EXP_SIZE = 4096  # PCI_CFG_SPACE_EXP_SIZE
EXT_CAP_START = 0x100

# -- type-0 header (pci_regs.h PCI_VENDOR_ID .. PCI_MAX_LAT) ---------------------------------
TYPE0_HEADER = Record(
    "pci_type0_header",
    (
        ("vendor_id", "H"),  # PCI_VENDOR_ID 0x00
        ("device_id", "H"),  # PCI_DEVICE_ID 0x02
        ("command", "H"),  # PCI_COMMAND 0x04
        ("status", "H"),  # PCI_STATUS 0x06
        ("revision", "B"),  # PCI_REVISION_ID 0x08
        ("prog_if", "B"),  # PCI_CLASS_PROG 0x09
        ("subclass", "B"),  # PCI_CLASS_DEVICE 0x0a (low byte)
        ("class_code", "B"),  # PCI_CLASS_DEVICE 0x0b (high byte: base class)
        ("cache_line_size", "B"),  # PCI_CACHE_LINE_SIZE 0x0c
        ("latency_timer", "B"),  # PCI_LATENCY_TIMER 0x0d
        ("header_type", "B"),  # PCI_HEADER_TYPE 0x0e
        ("bist", "B"),  # PCI_BIST 0x0f
        ("bar0", "I"),  # PCI_BASE_ADDRESS_0 0x10
        ("bar1", "I"),
        ("bar2", "I"),
        ("bar3", "I"),
        ("bar4", "I"),
        ("bar5", "I"),  # PCI_BASE_ADDRESS_5 0x24
        ("cardbus_cis", "I"),  # PCI_CARDBUS_CIS 0x28
        ("subsystem_vendor_id", "H"),  # PCI_SUBSYSTEM_VENDOR_ID 0x2c
        ("subsystem_id", "H"),  # PCI_SUBSYSTEM_ID 0x2e
        ("rom_address", "I"),  # PCI_ROM_ADDRESS 0x30
        ("capabilities", "B"),  # PCI_CAPABILITY_LIST 0x34
        ("_rsvd", "7x"),
        ("interrupt_line", "B"),  # PCI_INTERRUPT_LINE 0x3c
        ("interrupt_pin", "B"),  # PCI_INTERRUPT_PIN 0x3d
        ("min_gnt", "B"),  # PCI_MIN_GNT 0x3e
        ("max_lat", "B"),  # PCI_MAX_LAT 0x3f
    ),
    "PCIe 4.0 §7.5.1.1-2 / PCI 3.0 §6.1: the type-0 configuration header (64 bytes).",
)
TYPE0_OFFSETS = TYPE0_HEADER.offsets

PCI_COMMAND = TYPE0_OFFSETS["command"]
PCI_STATUS = TYPE0_OFFSETS["status"]
PCI_BASE_ADDRESS_0 = TYPE0_OFFSETS["bar0"]
PCI_ROM_ADDRESS = TYPE0_OFFSETS["rom_address"]
PCI_CAPABILITY_LIST = TYPE0_OFFSETS["capabilities"]
PCI_INTERRUPT_LINE = TYPE0_OFFSETS["interrupt_line"]

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_COMMAND_WRITABLE = (
    PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
)
PCI_STATUS_CAP_LIST = 0x10
PCI_HEADER_TYPE_NORMAL = 0
PCI_BASE_ADDRESS_SPACE_MEMORY = 0x0
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = ~0xF


class CapId(enum.IntEnum):
    """Standard capability ids (PCI_CAP_ID_*)."""

    MSI = 0x05
    EXP = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    """Extended capability ids (PCI_EXT_CAP_ID_*)."""

    ATS = 0x0F
    PRI = 0x13
    PASID = 0x1B


# -- MSI, 64-bit address, no per-vector masking (pci_regs.h PCI_MSI_*) ----------------------
MSI_CAP64 = Record(
    "pci_msi_cap64",
    (
        ("cap_id", "B"),
        ("next", "B"),
        ("flags", "H"),  # PCI_MSI_FLAGS
        ("address_lo", "I"),  # PCI_MSI_ADDRESS_LO
        ("address_hi", "I"),  # PCI_MSI_ADDRESS_HI
        ("data", "H"),  # PCI_MSI_DATA_64
        ("_rsvd", "2x"),
    ),
    "PCI 3.0 §6.8.1: MSI capability with a 64-bit message address.",
)
PCI_MSI_FLAGS = MSI_CAP64.offsets["flags"]
PCI_MSI_ADDRESS_LO = MSI_CAP64.offsets["address_lo"]
PCI_MSI_ADDRESS_HI = MSI_CAP64.offsets["address_hi"]
PCI_MSI_DATA_64 = MSI_CAP64.offsets["data"]
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E  # multiple message capable (RO)
PCI_MSI_FLAGS_QSIZE = 0x0070  # multiple message enable (RW)
PCI_MSI_FLAGS_64BIT = 0x0080

# -- PCI Express capability (pci_regs.h PCI_EXP_*) -------------------------------------------
PCIE_CAP = Record(
    "pci_express_cap",
    (
        ("cap_id", "B"),
        ("next", "B"),
        ("flags", "H"),  # PCI_EXP_FLAGS: version 3:0, device/port type 7:4
        ("devcap", "I"),  # PCI_EXP_DEVCAP
        ("devctl", "H"),  # PCI_EXP_DEVCTL
        ("devsta", "H"),  # PCI_EXP_DEVSTA
        ("lnkcap", "I"),  # PCI_EXP_LNKCAP
        ("lnkctl", "H"),
        ("lnksta", "H"),
        ("sltcap", "I"),
        ("sltctl", "H"),
        ("sltsta", "H"),
        ("rtctl", "H"),
        ("rtcap", "H"),
        ("rtsta", "I"),
        ("devcap2", "I"),  # PCI_EXP_DEVCAP2 0x24
        ("devctl2", "H"),  # PCI_EXP_DEVCTL2 0x28
        ("devsta2", "H"),
        ("lnkcap2", "I"),
        ("lnkctl2", "H"),
        ("lnksta2", "H"),
        ("sltcap2", "I"),
        ("sltctl2", "H"),
        ("sltsta2", "H"),
    ),
    "PCIe 4.0 §7.5.3: the PCI Express capability structure (version 2, 60 bytes).",
)
PCI_EXP_FLAGS_VERS = 0x000F
PCI_EXP_FLAGS_TYPE_SHIFT = 4
PCI_EXP_TYPE_RC_END = 0x9  # root complex integrated endpoint
PCI_EXP_DEVCTL = PCIE_CAP.offsets["devctl"]
PCI_EXP_DEVCTL2 = PCIE_CAP.offsets["devctl2"]
PCI_EXP_DEVCAP2_EE_PREFIX = 0x00200000  # bit 21: End-End TLP Prefix Supported

# -- extended capabilities (PCIe 4.0 §7.6.3 header) --------------------------------------
EXT_CAP_HEADER = Record(
    "pci_ext_cap_header", (("header", "I"),), "id 15:0, version 19:16, next 31:20."
)


def ext_cap_header(cap_id: int, version: int, next_off: int) -> int:
    """PCI_EXT_CAP_ID / PCI_EXT_CAP_VER / PCI_EXT_CAP_NEXT packed into one dword."""
    return (cap_id & 0xFFFF) | (version & 0xF) << 16 | (next_off & 0xFFC) << 20


# the header, a capability word, a control word (PASID and ATS share the shape)
_CAP_CTRL: tuple[tuple[str, str], ...] = (("header", "I"), ("cap", "H"), ("ctrl", "H"))

PASID_CAP = Record(
    "pci_pasid_cap", _CAP_CTRL, "PCIe 4.0 §7.8.8: PASID extended capability (8 bytes)."
)
PCI_PASID_CAP = PASID_CAP.offsets["cap"]
PCI_PASID_CTRL = PASID_CAP.offsets["ctrl"]
PCI_PASID_CAP_EXEC = 0x0002
PCI_PASID_CAP_PRIV = 0x0004
PCI_PASID_CAP_WIDTH_SHIFT = 8  # Max PASID Width, bits 12:8
PCI_PASID_CAP_WIDTH = 0x1F00
PCI_PASID_CTRL_ENABLE = 0x0001
PCI_PASID_CTRL_EXEC = 0x0002
PCI_PASID_CTRL_PRIV = 0x0004

ATS_CAP = Record("pci_ats_cap", _CAP_CTRL, "PCIe 4.0 §10.5.1: ATS extended capability (8 bytes).")
PCI_ATS_CAP = ATS_CAP.offsets["cap"]
PCI_ATS_CTRL = ATS_CAP.offsets["ctrl"]
PCI_ATS_CAP_QDEP_MASK = 0x001F
PCI_ATS_CAP_PAGE_ALIGNED = 0x0020
PCI_ATS_CTRL_ENABLE = 0x8000
PCI_ATS_CTRL_STU_MASK = 0x001F

PRI_CAP = Record(
    "pci_pri_cap",
    (("header", "I"), ("ctrl", "H"), ("status", "H"), ("max_req", "I"), ("alloc_req", "I")),
    "PCIe 4.0 §10.5.2: Page Request extended capability (16 bytes).",
)
PCI_PRI_CTRL = PRI_CAP.offsets["ctrl"]
PCI_PRI_STATUS = PRI_CAP.offsets["status"]
PCI_PRI_MAX_REQ = PRI_CAP.offsets["max_req"]
PCI_PRI_ALLOC_REQ = PRI_CAP.offsets["alloc_req"]
PCI_PRI_CTRL_ENABLE = 0x0001
PCI_PRI_CTRL_RESET = 0x0002
PCI_PRI_STATUS_STOPPED = 0x0100
PCI_PRI_STATUS_PASID = 0x8000  # PRG Response PASID Required
