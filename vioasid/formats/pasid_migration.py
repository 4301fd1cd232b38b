"""The PASID DMA functions' migration stream: what QEMU 11.1 does not carry for a vfio-user device.

QEMU 11.1 migrates no vfio-user state (shared/design/qemu-notes.md, "Live migration with a
vfio-user device"), so vioasid sends, next to the engine's VM stream
(:mod:`vioasid.formats.migration`: devices, bound vPASIDs, CPU PASID table, queued faults), one
record per PASID DMA function (docs/pasid-dma.md): its BAR0 register file, the portal buffer,
its whole config space as the server holds it (MSI, PCIe and PASID control included) and the
vPASIDs bound on it. No pPASID: the destination re-allocates them.

Stream = header (magic ``VIOASIDF``, version, flags) + length-prefixed body + CRC-32 (zlib) of
the prefixed body, as the VM stream. vPASID lists are packed u32 arrays.
"""

from __future__ import annotations

import construct as cs

from .migration import U32Array, checked_stream, stream_header
from .pasid_dma import PORTAL_SIZE

MAGIC = b"VIOASIDF"
VERSION = 1
HEADER_SIZE = 12

HEADER = stream_header(MAGIC)

FUNCTION_STATE = cs.Struct(
    "guest_rid" / cs.Int16ul,  # guest-visible BDF of the function
    "type" / cs.Int8ul,  # pasid_dma.FunctionType (1 dedicated .. 4 enqcmd)
    "width" / cs.Int8ul,  # the PASID width the guest sees
    # BAR0 registers (docs/pasid-dma.md "BAR0 registers"); read-only ones are derived
    "ctrl" / cs.Int32ul,
    "intr_status" / cs.Int32ul,
    "portal_status" / cs.Int32ul,
    "bind_pasid" / cs.Int32ul,
    "bind_status" / cs.Int32ul,
    "bind_info" / cs.Int64ul,
    "err_status" / cs.Int32ul,
    "err_pasid" / cs.Int32ul,
    "err_addr" / cs.Int64ul,
    "err_reason" / cs.Int32ul,
    "portal" / cs.Bytes(PORTAL_SIZE),  # a descriptor partly written (submitted ones are done)
    "config" / cs.Prefixed(cs.Int16ul, cs.GreedyBytes),  # config space, PCIe ext. included
    "count" / cs.Rebuild(cs.Int32ul, cs.len_(cs.this.vpasids)),
    "vpasids" / U32Array(cs.this.count),  # bound vPASIDs, ascending
)

PAGE_SIZE = 4096
PAGE = cs.Struct(
    "gpa" / cs.Int64ul,  # guest-physical, page-aligned
    "data" / cs.Bytes(PAGE_SIZE),
)
# Guest pages the functions wrote by DMA while the migration ran: QEMU's dirty log never saw
# those writes (vfio-user has no dirty tracking in 11.1), so they travel here, after QEMU's RAM.
PAGES = cs.PrefixedArray(cs.Int32ul, PAGE)

BODY = cs.Struct(
    "functions" / cs.PrefixedArray(cs.Int16ul, FUNCTION_STATE),
    cs.Terminated,
)

STREAM = checked_stream(HEADER, BODY)

__all__ = ["BODY", "FUNCTION_STATE", "HEADER", "HEADER_SIZE", "MAGIC", "PAGES", "STREAM", "VERSION"]
