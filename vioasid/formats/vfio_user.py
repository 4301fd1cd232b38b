"""vfio-user wire layouts (QEMU ``docs/interop/vfio-user.rst``, ``hw/vfio-user/protocol.h``).

Every message starts with the 16-byte header (``VFIOUserHdr``): ``u16 id``, ``u16 command``,
``u32 size`` (the whole message, header included), ``u32 flags`` (bits 3:0 type: 0 command,
1 reply; bit 4 ``VFIO_USER_NO_REPLY``; bit 5 ``VFIO_USER_ERROR``), ``u32 error`` (an errno when
the ERROR flag is set). Payloads follow, little-endian on x86-64; file descriptors travel as
SCM_RIGHTS ancillary data (DMA_MAP: the memory fd; DEVICE_SET_IRQS: one eventfd per vector).

The payload structures are the Linux VFIO ioctl structures of ``include/uapi/linux/vfio.h``
that the spec imports (``vfio_iommu_type1_dma_map``/``_unmap``, ``vfio_device_info``,
``vfio_region_info``, ``vfio_irq_info``, ``vfio_irq_set``), plus the vfio-user region and DMA
read/write headers. Each is one :class:`~vioasid.formats.record.Record` field table, from
which come the construct ``Struct`` (``.struct``) and the hot-path ``struct.Struct``
(``.packer``).
"""

from __future__ import annotations

import enum

from .record import Record

HEADER = Record(
    "vfio_user_header",
    (("id", "H"), ("cmd", "H"), ("size", "I"), ("flags", "I"), ("error", "I")),
    "vfio-user.rst 'Header': message id, command, size incl. header, flags, error (errno).",
)
HEADER_SIZE = HEADER.size  # 16

FLAGS_TYPE_MASK = 0xF  # VFIO_USER_TYPE
TYPE_COMMAND = 0x0  # VFIO_USER_REQUEST
TYPE_REPLY = 0x1  # VFIO_USER_REPLY
FLAG_NO_REPLY = 0x10  # VFIO_USER_NO_REPLY
FLAG_ERROR = 0x20  # VFIO_USER_ERROR
FLAGS_KNOWN = FLAGS_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class Command(enum.IntEnum):
    """``enum vfio_user_command`` (protocol.h; vfio-user.rst 'Commands')."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15


# -- VERSION (vfio-user.rst 'VFIO_USER_VERSION') ---------------------------------------------
VERSION = Record(
    "vfio_user_version",
    (("major", "H"), ("minor", "H")),
    "major, minor, then a NUL-terminated JSON object {'capabilities': {...}}.",
)
VERSION_MAJOR = 0  # VFIO_USER_MAJOR_VER
VERSION_MINOR = 0  # VFIO_USER_MINOR_VER
CAP_KEY = "capabilities"  # VFIO_USER_CAP
CAP_MAX_FDS = "max_msg_fds"  # VFIO_USER_CAP_MAX_FDS
CAP_MAX_XFER = "max_data_xfer_size"  # VFIO_USER_CAP_MAX_XFER
CAP_PGSIZES = "pgsizes"  # VFIO_USER_CAP_PGSIZES
CAP_MAP_MAX = "max_dma_maps"  # VFIO_USER_CAP_MAP_MAX
CAP_MIGRATION = "migration"  # VFIO_USER_CAP_MIGR
CAP_WRITE_MULTIPLE = "write_multiple"  # VFIO_USER_CAP_MULTI
DEF_MAX_FDS = 8  # VFIO_USER_DEF_MAX_FDS
MAX_MAX_FDS = 16  # VFIO_USER_MAX_MAX_FDS
DEF_MAX_XFER = 1024 * 1024  # VFIO_USER_DEF_MAX_XFER
MAX_MAX_XFER = 64 * 1024 * 1024  # VFIO_USER_MAX_MAX_XFER
DEF_PGSIZE = 4096  # VFIO_USER_DEF_PGSIZE
DEF_MAP_MAX = 65535  # VFIO_USER_DEF_MAP_MAX

# -- DMA_MAP / DMA_UNMAP (vfio_iommu_type1_dma_map / _unmap) ---------------------------------
DMA_MAP = Record(
    "vfio_user_dma_map",
    (("argsz", "I"), ("flags", "I"), ("offset", "Q"), ("address", "Q"), ("size", "Q")),
    "argsz, flags (READ/WRITE), offset into the passed fd, IOVA, size; one fd or none.",
)
DMA_MAP_FLAG_READ = 1 << 0  # VFIO_USER_F_DMA_REGION_READ
DMA_MAP_FLAG_WRITE = 1 << 1  # VFIO_USER_F_DMA_REGION_WRITE
DMA_UNMAP = Record(
    "vfio_user_dma_unmap",
    (("argsz", "I"), ("flags", "I"), ("address", "Q"), ("size", "Q")),
    "argsz, flags (GET_DIRTY_BITMAP / ALL), IOVA, size; the reply echoes it.",
)
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# -- DEVICE_GET_INFO (vfio_device_info) -----------------------------------------------------
DEVICE_INFO = Record(
    "vfio_user_device_info",
    (("argsz", "I"), ("flags", "I"), ("num_regions", "I"), ("num_irqs", "I")),
    "argsz, flags (VFIO_DEVICE_FLAGS_*), number of regions, number of IRQ indexes.",
)
DEVICE_FLAGS_RESET = 1 << 0  # VFIO_DEVICE_FLAGS_RESET
DEVICE_FLAGS_PCI = 1 << 1  # VFIO_DEVICE_FLAGS_PCI

# -- DEVICE_GET_REGION_INFO (vfio_region_info) -------------------------------------------------
REGION_INFO = Record(
    "vfio_user_region_info",
    (
        ("argsz", "I"),
        ("flags", "I"),
        ("index", "I"),
        ("cap_offset", "I"),
        ("size", "Q"),
        ("offset", "Q"),
    ),
    "argsz, flags (READ/WRITE/MMAP/CAPS), region index, capability offset, size, mmap offset.",
)
REGION_INFO_FLAG_READ = 1 << 0  # VFIO_REGION_INFO_FLAG_READ
REGION_INFO_FLAG_WRITE = 1 << 1  # VFIO_REGION_INFO_FLAG_WRITE
REGION_INFO_FLAG_MMAP = 1 << 2  # VFIO_REGION_INFO_FLAG_MMAP
REGION_INFO_FLAG_CAPS = 1 << 3  # VFIO_REGION_INFO_FLAG_CAPS


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX (linux/vfio.h)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9  # VFIO_PCI_NUM_REGIONS

# -- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS (vfio_irq_info / vfio_irq_set) --------------------
IRQ_INFO = Record(
    "vfio_user_irq_info",
    (("argsz", "I"), ("flags", "I"), ("index", "I"), ("count", "I")),
    "argsz, flags (VFIO_IRQ_INFO_*), IRQ index, number of vectors.",
)
IRQ_INFO_EVENTFD = 1 << 0  # VFIO_IRQ_INFO_EVENTFD
IRQ_INFO_MASKABLE = 1 << 1  # VFIO_IRQ_INFO_MASKABLE
IRQ_INFO_AUTOMASKED = 1 << 2  # VFIO_IRQ_INFO_AUTOMASKED
IRQ_INFO_NORESIZE = 1 << 3  # VFIO_IRQ_INFO_NORESIZE

IRQ_SET = Record(
    "vfio_user_irq_set",
    (("argsz", "I"), ("flags", "I"), ("index", "I"), ("start", "I"), ("count", "I")),
    "argsz, flags (DATA_* | ACTION_*), IRQ index, first vector, vector count; eventfds as fds.",
)
IRQ_SET_DATA_NONE = 1 << 0  # VFIO_IRQ_SET_DATA_NONE
IRQ_SET_DATA_BOOL = 1 << 1  # VFIO_IRQ_SET_DATA_BOOL
IRQ_SET_DATA_EVENTFD = 1 << 2  # VFIO_IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK = 1 << 3  # VFIO_IRQ_SET_ACTION_MASK
IRQ_SET_ACTION_UNMASK = 1 << 4  # VFIO_IRQ_SET_ACTION_UNMASK
IRQ_SET_ACTION_TRIGGER = 1 << 5  # VFIO_IRQ_SET_ACTION_TRIGGER
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX (linux/vfio.h)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5  # VFIO_PCI_NUM_IRQS

# -- REGION_READ / REGION_WRITE, DMA_READ / DMA_WRITE ----------------------------------------
REGION_RW = Record(
    "vfio_user_region_rw",
    (("offset", "Q"), ("region", "I"), ("count", "I")),
    "offset in the region, region index, byte count; data follows (write, read reply).",
)
DMA_RW = Record(
    "vfio_user_dma_rw",
    (("address", "Q"), ("count", "I")),
    "IOVA, byte count (VFIOUserDMARW); data follows (DMA_WRITE, DMA_READ reply).",
)
DMA_RW_MAX = DEF_MAX_XFER

# Fixed payload sizes per command (the part before any variable data); replies of
# REGION_READ / DMA_READ carry data after it.
FIXED_PAYLOAD: dict[Command, int] = {
    Command.VERSION: VERSION.size,
    Command.DMA_MAP: DMA_MAP.size,
    Command.DMA_UNMAP: DMA_UNMAP.size,
    Command.DEVICE_GET_INFO: DEVICE_INFO.size,
    Command.DEVICE_GET_REGION_INFO: REGION_INFO.size,
    Command.DEVICE_GET_IRQ_INFO: IRQ_INFO.size,
    Command.DEVICE_SET_IRQS: IRQ_SET.size,
    Command.REGION_READ: REGION_RW.size,
    Command.REGION_WRITE: REGION_RW.size,
    Command.DMA_READ: DMA_RW.size,
    Command.DMA_WRITE: DMA_RW.size,
    Command.DEVICE_RESET: 0,
}
