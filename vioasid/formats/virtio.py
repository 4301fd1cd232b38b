"""Virtio split-ring, virtio-blk and vhost-user wire layouts, as construct definitions.

Each structure is one :class:`~vioasid.formats.record.Record` field table (construct
``.struct`` and a precompiled ``.packer``): there is no second description of any layout.

Sources:

* Virtio 1.2 (OASIS), §2.7 "Split Virtqueues": ``struct virtq_desc`` (§2.7.5), ``virtq_avail``
  (§2.7.6), ``virtq_used`` / ``virtq_used_elem`` (§2.7.8); §5.2 "Block Device":
  ``struct virtio_blk_config`` (§5.2.4), ``struct virtio_blk_req`` (§5.2.6); §6 feature bits.
  Little-endian (virtio 1.x, ``VIRTIO_F_VERSION_1``).
* QEMU ``docs/interop/vhost-user.rst``: the message header, "Message types" and the payloads
  (``u64``, vring state, vring address, memory regions description, log description, IOTLB
  message, device config space). Native endian; on x86-64 that is little-endian.
"""

from __future__ import annotations

import enum

from .record import Record

# -- virtio split virtqueue (virtio 1.2 §2.7) -----------------------------------------------

VRING_DESC = Record(
    "virtq_desc",
    (("addr", "Q"), ("len", "I"), ("flags", "H"), ("next", "H")),
    "§2.7.5 The Virtqueue Descriptor Table: buffer address, length, flags, next index.",
)
VRING_DESC_F_NEXT = 1  # VIRTQ_DESC_F_NEXT: the chain continues at ``next``
VRING_DESC_F_WRITE = 2  # VIRTQ_DESC_F_WRITE: device-writable buffer
VRING_DESC_F_INDIRECT = 4  # VIRTQ_DESC_F_INDIRECT: buffer holds a descriptor table (§2.7.5.3)

VRING_AVAIL_HDR = Record(
    "virtq_avail",
    (("flags", "H"), ("idx", "H")),
    "§2.7.6 The Virtqueue Available Ring header; ``ring[num]`` of u16 follows, then used_event.",
)
VRING_AVAIL_ENTRY = Record("virtq_avail.ring[]", (("id", "H"),), "§2.7.6 one available entry.")
VRING_AVAIL_F_NO_INTERRUPT = 1

VRING_USED_HDR = Record(
    "virtq_used",
    (("flags", "H"), ("idx", "H")),
    "§2.7.8 The Virtqueue Used Ring header; ``ring[num]`` of virtq_used_elem follows.",
)
VRING_USED_ELEM = Record(
    "virtq_used_elem",
    (("id", "I"), ("len", "I")),
    "§2.7.8 head index of the used chain and bytes written into device-writable buffers.",
)
VRING_ALIGN_USED = 4  # §2.7.2: the used ring is 4-byte aligned, descriptors 16, avail 2


class VirtioFeature(enum.IntEnum):
    """Device-independent feature bits (virtio 1.2 §6) plus the vhost/vhost-user ones."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES (vhost-user.rst)
    LOG_ALL = 26  # VHOST_F_LOG_ALL (dirty logging for migration)
    VERSION_1 = 32
    ACCESS_PLATFORM = 33  # VIRTIO_F_ACCESS_PLATFORM (formerly IOMMU_PLATFORM)
    RING_PACKED = 34


# -- virtio-blk (virtio 1.2 §5.2) -----------------------------------------------------------


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bits (§5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class BlkType(enum.IntEnum):
    """``virtio_blk_req.type`` (§5.2.6): VIRTIO_BLK_T_*."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(enum.IntEnum):
    """The status byte the device writes last (§5.2.6): VIRTIO_BLK_S_*."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


BLK_SECTOR_SIZE = 512
BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

BLK_REQ_HDR = Record(
    "virtio_blk_outhdr",
    (("type", "I"), ("reserved", "I"), ("sector", "Q")),
    "§5.2.6 request header (Linux ``struct virtio_blk_outhdr``; reserved was ioprio).",
)

BLK_CONFIG = Record(
    "virtio_blk_config",
    (
        ("capacity", "Q"),
        ("size_max", "I"),
        ("seg_max", "I"),
        ("cylinders", "H"),
        ("heads", "B"),
        ("sectors", "B"),
        ("blk_size", "I"),
        ("physical_block_exp", "B"),
        ("alignment_offset", "B"),
        ("min_io_size", "H"),
        ("opt_io_size", "I"),
        ("writeback", "B"),
        ("unused0", "B"),
        ("num_queues", "H"),
        ("max_discard_sectors", "I"),
        ("max_discard_seg", "I"),
        ("discard_sector_alignment", "I"),
        ("max_write_zeroes_sectors", "I"),
        ("max_write_zeroes_seg", "I"),
        ("write_zeroes_may_unmap", "B"),
        ("unused1", "3x"),
        ("max_secure_erase_sectors", "I"),
        ("max_secure_erase_seg", "I"),
        ("secure_erase_sector_alignment", "I"),
    ),
    "§5.2.4 Device configuration layout (``struct virtio_blk_config`` without the zoned part).",
)

# -- vhost-user (QEMU docs/interop/vhost-user.rst) ------------------------------------------

VHOST_USER_HDR = Record(
    "vhost_user_header",
    (("request", "I"), ("flags", "I"), ("size", "I")),
    "vhost-user.rst 'Message format': request type, flags, payload size.",
)
VHOST_USER_VERSION = 0x1  # flags bits 0-1: protocol version
VHOST_USER_REPLY = 0x4  # flags bit 2: this is a reply
VHOST_USER_NEED_REPLY = 0x8  # flags bit 3: sender wants a REPLY_ACK
VHOST_USER_MAX_PAYLOAD = 4096 + 8  # larger than any payload we accept (config is 256 + 12)


class VhostUserRequest(enum.IntEnum):
    """Front-end → back-end message types (vhost-user.rst 'Front-end message types')."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class VhostUserBackendRequest(enum.IntEnum):
    """Back-end → front-end messages on the backend channel (vhost-user.rst)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class VhostUserProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers (vhost-user.rst 'Protocol features')."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


VHOST_USER_U64 = Record("u64", (("u64", "Q"),), "vhost-user.rst 'A single 64-bit integer'.")
VHOST_USER_VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR: bits 0-7 vring index
VHOST_USER_VRING_NOFD = 0x100  # bit 8: no file descriptor is passed

VHOST_USER_VRING_STATE = Record(
    "vring_state",
    (("index", "I"), ("num", "I")),
    "vhost-user.rst 'Vring state description': vring index and a number (size, base, enable).",
)
VHOST_USER_VRING_ADDR = Record(
    "vring_addr",
    (
        ("index", "I"),
        ("flags", "I"),
        ("desc", "Q"),
        ("used", "Q"),
        ("avail", "Q"),
        ("log", "Q"),
    ),
    "vhost-user.rst 'Vring address description': IOVAs with ACCESS_PLATFORM, else front-end "
    "virtual addresses; flags bit 0 VHOST_VRING_F_LOG.",
)
VHOST_VRING_F_LOG = 1

VHOST_USER_MEM_HDR = Record(
    "memory_regions_hdr",
    (("num_regions", "I"), ("padding", "I")),
    "vhost-user.rst 'Memory regions description' header; regions follow, one fd each.",
)
VHOST_USER_MEM_REGION = Record(
    "memory_region",
    (
        ("guest_phys_addr", "Q"),
        ("memory_size", "Q"),
        ("userspace_addr", "Q"),
        ("mmap_offset", "Q"),
    ),
    "vhost-user.rst 'Memory region description'.",
)
VHOST_USER_MAX_RAM_SLOTS = 8  # VHOST_MEMORY_BASELINE_NREGIONS

VHOST_USER_SINGLE_MEM_REGION = Record(
    "single_memory_region",
    (
        ("padding", "Q"),
        ("guest_phys_addr", "Q"),
        ("memory_size", "Q"),
        ("userspace_addr", "Q"),
        ("mmap_offset", "Q"),
    ),
    "vhost-user.rst 'Single memory region description' (ADD_MEM_REG / REM_MEM_REG).",
)

VHOST_USER_LOG = Record(
    "log_description",
    (("mmap_size", "Q"), ("mmap_offset", "Q")),
    "vhost-user.rst 'Log description' (SET_LOG_BASE; one bit per 4 KiB guest page).",
)

VHOST_USER_IOTLB = Record(
    "iotlb_msg",
    (
        ("iova", "Q"),
        ("size", "Q"),
        ("uaddr", "Q"),
        ("perm", "B"),
        ("type", "B"),
        ("padding", "6x"),
    ),
    "vhost-user.rst 'IOTLB message' (Linux ``struct vhost_iotlb_msg``, padded to 32 bytes): "
    "no PASID field.",
)


class IotlbPerm(enum.IntEnum):
    """``VHOST_ACCESS_*`` (Linux ``vhost_types.h``)."""

    RO = 1
    WO = 2
    RW = 3


class IotlbType(enum.IntEnum):
    """``VHOST_IOTLB_*`` message types (Linux ``vhost_types.h``)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


VHOST_USER_CONFIG_HDR = Record(
    "device_config_hdr",
    (("offset", "I"), ("size", "I"), ("flags", "I")),
    "vhost-user.rst 'Device Configuration Space': offset, size, flags, then up to 256 bytes.",
)
VHOST_USER_CONFIG_MAX = 256
