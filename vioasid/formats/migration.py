"""The migration stream of one VM: versioned, checksummed, little-endian (docs/migration-stream.md).

What moves is everything guest-visible that is not in guest RAM: the vIOMMU registers the guest
programmed (RTADDR...), its devices, every (device, vPASID) binding, the vPASIDs of its CPU
PASID translation table, and its queued fault records (VT-d §10.4.14, ``fault.FAULT_RECORD``)
and page request descriptors (VT-d §9.11, ``prq.PAGE_REQ_DESC``). pPASIDs never travel: the
destination re-allocates them. Guest PASID entries and page tables travel in guest RAM.

Stream = header (magic ``VIOASIDM``, version, flags) + length-prefixed body + CRC-32 (zlib) of
the prefixed body. A reader checks the header first so a future version is refused before its
body is parsed. vPASID lists are packed u32 arrays (4 bytes per binding).
"""

from __future__ import annotations

import sys
import zlib
from array import array
from typing import Any

import construct as cs

from .fault import FAULT_RECORD
from .prq import PAGE_REQ_DESC

MAGIC = b"VIOASIDM"
VERSION = 2  # 2: the VM name's length is a u16, as on the wire (formats/wire.py)
HEADER_SIZE = 12

ASSIGN_CODES = {"vfio-pci": 0, "mdev": 1}
ASSIGN_NAMES = {v: k for k, v in ASSIGN_CODES.items()}


class U32Array(cs.Adapter):  # type: ignore[misc]
    """``count`` little-endian u32 values as one ``Bytes`` field <-> a Python ``array('I')``."""

    def __init__(self, count: Any) -> None:
        super().__init__(cs.Bytes(count * 4))

    def _decode(self, obj: bytes, context: Any, path: Any) -> array[int]:
        arr = array("I")
        arr.frombytes(obj)
        if sys.byteorder != "little":  # pragma: no cover
            arr.byteswap()
        return arr

    def _encode(self, obj: Any, context: Any, path: Any) -> bytes:
        arr = obj if isinstance(obj, array) and obj.typecode == "I" else array("I", obj)
        if sys.byteorder != "little":  # pragma: no cover
            arr = array("I", arr)
            arr.byteswap()
        return arr.tobytes()


def stream_header(magic: bytes) -> Any:
    """The 12-byte header of a vioasid stream: the 8-byte ``magic``, a u16 version, u16 flags."""
    return cs.Struct(
        "magic" / cs.Const(magic),
        "version" / cs.Int16ul,
        "flags" / cs.Int16ul,  # reserved, 0
    )


def checked_stream(header: Any, body: Any) -> Any:
    """``header`` + the u32-length-prefixed ``body`` + CRC-32 (zlib) of the prefixed body."""
    return cs.Struct(
        "header" / header,
        "body" / cs.RawCopy(cs.Prefixed(cs.Int32ul, body)),
        "crc32" / cs.Checksum(cs.Int32ul, zlib.crc32, cs.this.body.data),
        cs.Terminated,
    )


HEADER = stream_header(MAGIC)

REGISTER = cs.Struct(
    "offset" / cs.Int16ul,  # VT-d register offset (0x20 RTADDR_REG, ...)
    "value" / cs.Int64ul,
)

DEVICE = cs.Struct(
    "guest_rid" / cs.Int16ul,  # guest-visible BDF
    "assign" / cs.Int8ul,  # ASSIGN_CODES
    "caps" / cs.FlagsEnum(cs.Int8ul, enqcmd=1, translating=2),  # of the source function
    "function" / cs.Int16ul,  # source host RID (informational; the destination maps devices)
    "count" / cs.Rebuild(cs.Int32ul, cs.len_(cs.this.vpasids)),
    "vpasids" / U32Array(cs.this.count),  # bound vPASIDs, ascending
)

BODY = cs.Struct(
    "name" / cs.PascalString(cs.Int16ul, "utf8"),  # a wire VM name: up to 65,535 bytes
    "memory_size" / cs.Int64ul,  # guest RAM bytes (top of the highest region)
    "registers" / cs.PrefixedArray(cs.Int8ul, REGISTER),
    "devices" / cs.PrefixedArray(cs.Int16ul, DEVICE),
    "cpu_count" / cs.Rebuild(cs.Int32ul, cs.len_(cs.this.cpu_vpasids)),
    "cpu_vpasids" / U32Array(cs.this.cpu_count),  # vPASIDs of the CPU PASID translation table
    "faults" / cs.PrefixedArray(cs.Int32ul, FAULT_RECORD.struct),
    "fault_overflow" / cs.Int32ul,
    "page_requests" / cs.PrefixedArray(cs.Int32ul, PAGE_REQ_DESC.struct),
    "prq_overflow" / cs.Int32ul,
    cs.Terminated,
)

STREAM = checked_stream(HEADER, BODY)
