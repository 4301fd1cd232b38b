"""The PASID DMA function's register file, descriptor and completion record.

The contract is ``docs/pasid-dma.md`` (vioasid's own device; the descriptor and completion-record
ideas follow Intel DSA's public specification, but the layouts are this project's). All values
little-endian. Each structure is one :class:`~vioasid.formats.record.Record` field table.
"""

from __future__ import annotations

import enum

from .record import Record
from .words import WordEnum

VENDOR_ID = 0x7A50  # vioasid's own (emulation only; not a PCI-SIG assignment)
DEVICE_ID = 0x0001
CLASS_CODE = 0x088000  # base system peripheral, other
REVISION = 1
BAR0_SIZE = 64 * 1024
PORTAL_OFFSET = 0x1000
PORTAL_SIZE = 64
PORTAL_SUBMIT_QWORD = 0x1038  # the write covering this offset submits the descriptor

ID_VALUE = 0x414D4456  # "VDMA"
VERSION_VALUE = 1
MAX_XFER = 1 << 20
MAX_BATCH = 1024
CAPS_PASID_WIDTH_MASK = 0x1F  # bits 4:0
CAPS_SWQ = 1 << 8  # portal is a shared work queue (ENQCMD semantics)
CAPS_BATCH = 1 << 9


class FunctionType(WordEnum):
    """``TYPE`` register and subsystem id: the seed's device personalities."""

    DEDICATED = 1
    TRANSLATING = 2
    MDEV = 3
    ENQCMD = 4


class Reg(enum.IntEnum):
    """BAR0 register offsets (docs/pasid-dma.md 'BAR0 registers')."""

    ID = 0x000
    VERSION = 0x004
    TYPE = 0x008
    CAPS = 0x00C
    MAX_XFER = 0x010
    MAX_BATCH = 0x014
    CTRL = 0x018
    STATUS = 0x01C
    INTR_STATUS = 0x020
    PORTAL_STATUS = 0x024
    BIND_PASID = 0x030
    BIND_CMD = 0x034
    BIND_STATUS = 0x038
    BIND_INFO = 0x040  # 8 bytes
    BOUND_COUNT = 0x048
    ERR_STATUS = 0x080
    ERR_PASID = 0x084
    ERR_ADDR = 0x088  # 8 bytes
    ERR_REASON = 0x090


REG_SIZE: dict[Reg, int] = {r: 4 for r in Reg} | {Reg.BIND_INFO: 8, Reg.ERR_ADDR: 8}

CTRL_ENABLE = 1 << 0
CTRL_INTR_ENABLE = 1 << 1
CTRL_RESET = 1 << 31
STATUS_ENABLED = 1 << 0
INTR_COMPLETION = 1 << 0
ERR_RECORD_WRITE = 1 << 0
ERR_REASON_WRITE = 1 << 8


class PortalStatus(enum.IntEnum):
    ACCEPTED = 0
    REFUSED = 1  # ENQCMD: vPASID not in the VM's CPU PASID table
    INVALID = 2
    NOT_ENABLED = 3


class BindCmd(enum.IntEnum):
    BIND = 1
    UNBIND = 2


class BindStatus(WordEnum):
    """``BIND_STATUS`` codes; ``word`` is what the driver prints, ``errno`` what it returns."""

    OK = 0
    INVALID = 1
    NOT_PRESENT = 2
    PASID_CONFLICT = 3
    EXHAUSTED = 4
    NOT_BOUND = 5
    INTERNAL = 6


class Opcode(enum.IntEnum):
    NOOP = 0
    COPY = 1
    FILL = 2
    COMPARE = 3
    BATCH = 4


DESC_FLAG_COMPLETION = 1 << 0  # completion record address valid
DESC_FLAG_INTERRUPT = 1 << 1
DESC_FLAGS_KNOWN = DESC_FLAG_COMPLETION | DESC_FLAG_INTERRUPT
DESC_PASID_MASK = 0xFFFFF  # bits 19:0
DESC_PRIV = 1 << 31
DESC_PASID_RESERVED = 0x7FF00000  # bits 30:20

DESCRIPTOR = Record(
    "pasid_dma_descriptor",
    (
        ("pasid", "I"),  # 0x00: bits 19:0 PASID, bit 31 priv
        ("opcode", "B"),  # 0x04
        ("flags", "B"),  # 0x05
        ("rsvd0", "H"),  # 0x06
        ("completion", "Q"),  # 0x08
        ("src", "Q"),  # 0x10
        ("dst", "Q"),  # 0x18
        ("size", "I"),  # 0x20
        ("rsvd1", "I"),  # 0x24
        ("pattern", "Q"),  # 0x28
        ("rsvd2", "Q"),  # 0x30
        ("rsvd3", "Q"),  # 0x38
    ),
    "docs/pasid-dma.md 'Descriptor': 64 bytes written to PORTAL.",
)
DESCRIPTOR_SIZE = DESCRIPTOR.size  # 64


class CompletionStatus(enum.IntEnum):
    NOT_DONE = 0
    SUCCESS = 1
    FAULT = 2
    INVALID = 3
    NOT_BOUND = 4
    BATCH_FAILED = 5
    TOO_BIG = 6


COMPLETION_RECORD = Record(
    "pasid_dma_completion",
    (
        ("status", "B"),  # 0x00
        ("fault_reason", "B"),  # 0x01
        ("fault_flags", "B"),  # 0x02: bit 0 write
        ("result", "B"),  # 0x03: compare 0 equal, 1 different
        ("bytes_done", "I"),  # 0x04
        ("fault_addr", "Q"),  # 0x08
        ("fault_pasid", "I"),  # 0x10
        ("_rsvd", "12x"),  # 0x14
    ),
    "docs/pasid-dma.md 'Completion record': 32 bytes, 32-byte aligned.",
)
COMPLETION_SIZE = COMPLETION_RECORD.size  # 32
COMPLETION_ALIGN = 32
FAULT_FLAG_WRITE = 1 << 0
