"""The vioasid daemon's wire protocol: message header and every payload, as construct layouts.

The framing is vhost-user's (QEMU ``docs/interop/vhost-user.rst``, "Message Specification";
``VhostUserHeader`` in ``hw/virtio/vhost-user.c``), fixed to little-endian: a 12-byte header
``u32 request, u32 flags, u32 size`` followed by ``size`` payload bytes, file descriptors as
SCM_RIGHTS ancillary data sent with the message that needs them. flags bits 1:0 are the version
(1), bit 2 marks a reply (``VHOST_USER_REPLY_MASK``), bit 3 asks for a status reply
(``VHOST_USER_NEED_REPLY_MASK``); the other flag bits are reserved and must be zero.

Request numbers below 1024 are vhost-user's, used only where the message means the same thing
(``GET_FEATURES`` 1, ``SET_FEATURES`` 2). vioasid's own requests are numbered
1024-1151 (client → daemon) and its pushed events 1152-1279 (daemon → client). docs/protocol.md
describes each message; this module is the single definition of their bytes.

Replies: ``GET_FEATURES`` answers with a bare u64 (exactly as vhost-user). Every other reply
starts with a u64 status (0 = success, else an :class:`ErrorCode`, mirroring vhost-user's
``REPLY_ACK`` u64); on success the request's result follows, on failure a UTF-8 message.

Every fixed-size layout also has a precompiled :class:`struct.Struct` derived from the construct
definition (:func:`struct_of`) for the hot path (batched DMA); there is no second description.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any

import construct as cs

from .words import WordEnum

# -- header ----------------------------------------------------------------------------------

HEADER = cs.Struct(
    "request" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "size" / cs.Int32ul,
)
"""vhost-user ``VhostUserHeader`` (request, flags, size), little-endian."""

HEADER_SIZE = 12
VERSION = 1
FLAG_VERSION_MASK = 0x3  # VHOST_USER_VERSION_MASK
FLAG_REPLY = 1 << 2  # VHOST_USER_REPLY_MASK
FLAG_NEED_REPLY = 1 << 3  # VHOST_USER_NEED_REPLY_MASK
FLAG_RESERVED = ~(FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY) & 0xFFFFFFFF

MAX_PAYLOAD = 16 << 20
"""Largest payload either side accepts (a migration stream is the biggest message)."""
MAX_FDS = 16
"""Most file descriptors one message may carry (vhost-user sends at most 8 regions)."""
MAX_REGIONS = MAX_FDS
MAX_DMA_BATCH = 4096
"""Most device requests in one ``DMA`` message."""


class Request(IntEnum):
    """Request numbers. < 1024: vhost-user's own; 1024-1151: vioasid requests;
    1152-1279: events the daemon pushes to subscribed clients."""

    GET_FEATURES = 1  # vhost-user VHOST_USER_GET_FEATURES
    SET_FEATURES = 2  # vhost-user VHOST_USER_SET_FEATURES

    REGISTER_VM = 1024
    UNREGISTER_VM = 1025
    OPEN_VM = 1026
    ATTACH_DEVICE = 1027
    DETACH_DEVICE = 1028
    SET_ROOT_TABLE = 1029
    PASID_ENTRY = 1030
    INVALIDATE = 1031
    DMA = 1032
    ENQCMD = 1033
    SUBSCRIBE = 1034
    DUMP = 1035
    EXPORT_VM = 1036
    IMPORT_VM = 1037

    FAULT_EVENT = 1152
    PAGE_REQUEST_EVENT = 1153
    PAGE_RESPONSE_EVENT = 1154


VIOASID_REQUESTS = range(1024, 1152)
VIOASID_EVENTS = range(1152, 1280)


class Feature(IntFlag):
    """The u64 feature bitmap of ``GET_FEATURES`` / ``SET_FEATURES``."""

    DMA_BATCH = 1 << 0
    EVENTS = 1 << 1
    MIGRATION = 1 << 2
    ENQCMD = 1 << 3
    PAGE_REQUESTS = 1 << 4


ALL_FEATURES = (
    Feature.DMA_BATCH | Feature.EVENTS | Feature.MIGRATION | Feature.ENQCMD | Feature.PAGE_REQUESTS
)


class ErrorCode(WordEnum):
    """Status word of a reply; its :attr:`kind` (the :attr:`~WordEnum.word`) is the scenario
    contract's error kind."""

    OK = 0
    PASID_CONFLICT = 1
    INVALID = 2
    NOT_FOUND = 3
    EXHAUSTED = 4
    MIGRATION_FAILED = 5
    NOT_OWNER = 6  # the VM belongs to another connection (docs/protocol.md "Limits and ownership")
    INTERNAL = 255  # a daemon bug, logged by the daemon; not one of the contract's kinds

    @property
    def kind(self) -> str:
        """The error kind, as the contract, the JSON views and the CLI spell it."""
        return self.word

    @classmethod
    def from_kind(cls, kind: str) -> ErrorCode:
        """The code of error kind ``kind`` (KeyError if none)."""
        return cls.from_word(kind)


class Assign(WordEnum):
    """How a guest device gets its host function (design README, "Host functions")."""

    VFIO_PCI = 0
    MDEV = 1


class Space(WordEnum):
    """Which pPASID space a binding's value came from."""

    NONE = 0
    PER_RID = 1
    GLOBAL = 2


class EventMask(IntFlag):
    """What ``SUBSCRIBE`` asks the daemon to push."""

    FAULTS = 1 << 0
    PAGE_REQUESTS = 1 << 1


class DmaFlag(IntFlag):
    """Flags of one ``DMA`` entry."""

    WRITE = 1 << 0
    BY_TAG = 1 << 1  # rid is the host function and pasid the tag on the wire (else guest view)
    PAGE_REQUEST = 1 << 2  # on a not-present fault, raise a page request instead of a fault


class DmaStatus(IntEnum):
    """Status of one ``DMA`` result entry."""

    OK = 0
    FAULT = 1
    ERROR = 2  # not a VT-d fault: the request named no VM device / no binding (code in reason)
    PAGE_REQUEST = 3  # not present; a page request was queued for the guest


ALL_VMS = 0xFFFFFFFF
"""``DUMP`` of every VM."""

# -- small pieces ----------------------------------------------------------------------------

_Name = cs.PascalString(cs.Int16ul, "utf8")

MEMORY_REGION = cs.Struct(
    "guest_phys_addr" / cs.Int64ul,
    "memory_size" / cs.Int64ul,
    "userspace_addr" / cs.Int64ul,
    "mmap_offset" / cs.Int64ul,
)
"""vhost-user ``VhostUserMemoryRegion``; one fd per region, in order."""


def status_reply(result: cs.Construct | None) -> cs.Construct:
    """A reply: u64 status, then ``result`` on success or a UTF-8 message on failure."""
    ok: cs.Construct = cs.Struct() if result is None else result
    return cs.Struct(
        "status" / cs.Int64ul,
        "body" / cs.IfThenElse(cs.this.status == 0, ok, cs.GreedyString("utf8")),
        cs.Terminated,
    )


def _fixed(*fields: Any) -> cs.Struct:
    return cs.Struct(*fields, cs.Terminated)


# -- requests (client -> daemon) ---------------------------------------------------------------

EMPTY = _fixed()

FEATURES = _fixed("features" / cs.Int64ul)
"""``GET_FEATURES`` reply and ``SET_FEATURES`` request: the u64 bitmap (vhost-user)."""

REGISTER_VM = cs.Struct(
    "flags" / cs.Int32ul,  # reserved, 0
    "nregions" / cs.Int32ul,
    "name" / _Name,
    "regions" / cs.Array(cs.this.nregions, MEMORY_REGION),
    cs.Terminated,
)
"""A new VM owned by the sending connection, with its guest memory: ``nregions`` regions laid
out as vhost-user ``SET_MEM_TABLE``'s, one fd per region (a memfd or memory-backend file)."""
REGISTER_VM_REPLY = status_reply(cs.Struct("vm" / cs.Int32ul))

VM_REF = _fixed("vm" / cs.Int32ul)
"""``UNREGISTER_VM``, ``EXPORT_VM``."""

DUMP = _fixed("vm" / cs.Int32ul, cs.Padding(4), "offset" / cs.Int64ul)
"""``DUMP`` of one VM (``ALL_VMS`` = every VM) from byte ``offset`` of the document: offset 0
renders a fresh document; later offsets page through that same rendering."""

OPEN_VM = _fixed("name" / _Name)
OPEN_VM_REPLY = REGISTER_VM_REPLY

ATTACH_DEVICE = _fixed(
    "vm" / cs.Int32ul,
    "rid" / cs.Int16ul,  # guest-visible BDF
    "function" / cs.Int16ul,  # host function's BDF
    "assign" / cs.Int8ul,  # Assign
    cs.Padding(3),
)

DETACH_DEVICE = _fixed("vm" / cs.Int32ul, "rid" / cs.Int16ul, cs.Padding(2))

SET_ROOT_TABLE = _fixed("vm" / cs.Int32ul, cs.Padding(4), "rtaddr" / cs.Int64ul)
"""The guest's RTADDR_REG value (VT-d §10.4.6; bit 10 = scalable mode)."""

PASID_ENTRY = _fixed("vm" / cs.Int32ul, "rid" / cs.Int16ul, cs.Padding(2), "vpasid" / cs.Int32ul)
"""The guest wrote PASID-table entry ``vpasid`` of device ``rid`` and invalidated it."""
PASID_ENTRY_REPLY = status_reply(
    cs.Struct(
        "bound" / cs.Int8ul,  # 1: the entry is present and bound; 0: unbound
        "space" / cs.Int8ul,  # Space
        cs.Padding(2),
        "ppasid" / cs.Int32ul,
    )
)

INVALIDATE = _fixed("vm" / cs.Int32ul, cs.Padding(4), "desc" / cs.Bytes(32))
"""One 256-bit invalidation descriptor (VT-d §6.5.2) the guest queued; see
``formats.invalidation``."""
INVALIDATE_REPLY = status_reply(cs.Struct("changes" / cs.Int32ul))

DMA_HEAD = cs.Struct("vm" / cs.Int32ul, "count" / cs.Int32ul)
DMA_ENTRY = cs.Struct(
    "rid" / cs.Int16ul,  # guest BDF, or the host function's BDF with BY_TAG
    "flags" / cs.Int16ul,  # DmaFlag
    "pasid" / cs.Int32ul,  # vPASID, or the tag on the wire with BY_TAG
    "addr" / cs.Int64ul,
)
DMA = cs.Struct(
    "vm" / cs.Int32ul,
    "count" / cs.Int32ul,
    "entries" / cs.Array(cs.this.count, DMA_ENTRY),
    cs.Terminated,
)
"""Batched device requests: replies come back in the same order."""
DMA_RESULT = cs.Struct(
    "status" / cs.Int8ul,  # DmaStatus
    "reason" / cs.Int8ul,  # VT-d fault reason (FAULT) or ErrorCode (ERROR)
    "perm" / cs.Int8ul,  # bit 0 read, bit 1 write (OK)
    cs.Padding(1),
    "tag" / cs.Int32ul,  # the PASID on the wire (pPASID), or the vPASID of a fault
    "gpa" / cs.Int64ul,  # guest-physical output (OK) / faulting address (FAULT)
    "hpa" / cs.Int64ul,  # host address reached (OK)
)
DMA_REPLY = status_reply(
    cs.Struct("count" / cs.Int32ul, cs.Padding(4), "results" / cs.Array(cs.this.count, DMA_RESULT))
)
DMA_REPLY_HEAD = cs.Struct("status" / cs.Int64ul, "count" / cs.Int32ul, cs.Padding(4))
"""The fixed head of a successful ``DMA_REPLY`` (the hot path packs/unpacks just this)."""

ENQCMD = PASID_ENTRY
ENQCMD_REPLY = status_reply(cs.Struct("ppasid" / cs.Int32ul))

SUBSCRIBE = _fixed("vm" / cs.Int32ul, "events" / cs.Int32ul)

DUMP_REPLY = status_reply(cs.Struct("total" / cs.Int64ul, "json" / cs.GreedyBytes))
"""One page (at most :data:`DUMP_PAGE` bytes from the request's offset) of a UTF-8 JSON document
of ``total`` bytes: VMs, devices, vPASID/pPASID tables, functions, allocators."""
DUMP_PAGE = 1 << 20

EXPORT_VM_REPLY = status_reply(cs.Struct("stream" / cs.GreedyBytes))
"""The engine's versioned migration stream of one VM (docs/migration-stream.md)."""

FUNCTION_MAP = cs.Struct("rid" / cs.Int16ul, "function" / cs.Int16ul)
IMPORT_VM = cs.Struct(
    "name" / _Name,
    "nregions" / cs.Int32ul,
    "regions" / cs.Array(cs.this.nregions, MEMORY_REGION),  # one fd each, as REGISTER_VM
    "nmap" / cs.Int16ul,
    "map" / cs.Array(cs.this.nmap, FUNCTION_MAP),  # guest rid -> destination host function
    "stream" / cs.Prefixed(cs.Int32ul, cs.GreedyBytes),
    cs.Terminated,
)
BINDING = cs.Struct(
    "rid" / cs.Int16ul,  # guest BDF
    "space" / cs.Int8ul,  # Space
    cs.Padding(1),
    "vpasid" / cs.Int32ul,
    "ppasid" / cs.Int32ul,
)
"""One binding re-created by ``IMPORT_VM``: 12 bytes, the record of ``IMPORT_VM_REPLY``'s
packed array (:data:`BINDING_S` packs / ``iter_unpack``s it)."""
IMPORT_VM_REPLY = status_reply(
    cs.Struct(
        "vm" / cs.Int32ul,
        "count" / cs.Int32ul,
        # ``count`` BINDING records back to back (guest rid, then vPASID ascending), kept as
        # one block: a 100,000-binding import is one slice, not 100,000 construct parses
        "bindings" / cs.Bytes(cs.this.count * BINDING.sizeof()),
    )
)
"""The imported VM's id and every binding it got: a packed array of :data:`BINDING`."""

STATUS_REPLY = status_reply(None)
"""Status reply of a request with no result (sent when the request had need_reply)."""

# -- events (daemon -> client, no reply bit) ---------------------------------------------------

FAULT_EVENT = _fixed(
    "vm" / cs.Int32ul,
    "rid" / cs.Int16ul,  # guest BDF
    "reason" / cs.Int8ul,  # VT-d fault reason (formats.fault.FaultReason)
    "flags" / cs.Int8ul,  # bit 0 PASID present, bit 1 write
    "vpasid" / cs.Int32ul,
    cs.Padding(4),
    "addr" / cs.Int64ul,
    "record" / cs.Bytes(16),  # the VT-d fault record (formats.fault.FAULT_RECORD)
)
FAULT_PASID_PRESENT = 1 << 0
FAULT_WRITE = 1 << 1

PAGE_REQUEST_EVENT = _fixed(
    "vm" / cs.Int32ul,
    cs.Padding(4),
    "desc" / cs.Bytes(32),  # VT-d page request descriptor (formats.prq.PAGE_REQ_DESC)
)

PAGE_RESPONSE_EVENT = _fixed(
    "vm" / cs.Int32ul,
    cs.Padding(4),
    "desc" / cs.Bytes(16),  # the guest's page-group response (formats.invalidation.PGRESP_DESC)
)
"""The guest answered a page request (guest RID, vPASID): for the device back-end that asked."""

# -- the table the codec works from ------------------------------------------------------------

REQUEST_LAYOUTS: dict[Request, cs.Construct] = {
    Request.GET_FEATURES: EMPTY,
    Request.SET_FEATURES: FEATURES,
    Request.REGISTER_VM: REGISTER_VM,
    Request.UNREGISTER_VM: VM_REF,
    Request.OPEN_VM: OPEN_VM,
    Request.ATTACH_DEVICE: ATTACH_DEVICE,
    Request.DETACH_DEVICE: DETACH_DEVICE,
    Request.SET_ROOT_TABLE: SET_ROOT_TABLE,
    Request.PASID_ENTRY: PASID_ENTRY,
    Request.INVALIDATE: INVALIDATE,
    Request.DMA: DMA,
    Request.ENQCMD: ENQCMD,
    Request.SUBSCRIBE: SUBSCRIBE,
    Request.DUMP: DUMP,
    Request.EXPORT_VM: VM_REF,
    Request.IMPORT_VM: IMPORT_VM,
}
"""Payload of each request the daemon accepts."""

REPLY_LAYOUTS: dict[Request, cs.Construct] = {
    Request.GET_FEATURES: FEATURES,
    Request.REGISTER_VM: REGISTER_VM_REPLY,
    Request.OPEN_VM: OPEN_VM_REPLY,
    Request.PASID_ENTRY: PASID_ENTRY_REPLY,
    Request.INVALIDATE: INVALIDATE_REPLY,
    Request.DMA: DMA_REPLY,
    Request.ENQCMD: ENQCMD_REPLY,
    Request.DUMP: DUMP_REPLY,
    Request.EXPORT_VM: EXPORT_VM_REPLY,
    Request.IMPORT_VM: IMPORT_VM_REPLY,
}
"""Requests that always get a reply, and its payload. The others reply ``STATUS_REPLY`` only
when the request had need_reply."""

EVENT_LAYOUTS: dict[Request, cs.Construct] = {
    Request.FAULT_EVENT: FAULT_EVENT,
    Request.PAGE_REQUEST_EVENT: PAGE_REQUEST_EVENT,
    Request.PAGE_RESPONSE_EVENT: PAGE_RESPONSE_EVENT,
}


def request_fds(request: Request, body: Any) -> int:
    """How many fds a parsed request must carry (one per memory region, else none)."""
    if request in (Request.REGISTER_VM, Request.IMPORT_VM):
        return int(body.nregions)
    return 0


# -- the hot path's view of the fixed layouts ----------------------------------------------------


def struct_of(layout: cs.Construct) -> struct.Struct:
    """A ``struct.Struct`` with the same bytes as a construct ``Struct`` of fixed-size integer
    fields and padding (the fast path for hot messages; derived, never written by hand)."""
    fmt = "<"
    for sub in layout.subcons:
        con = sub.subcon if isinstance(sub, cs.Renamed) else sub
        if isinstance(con, cs.FormatField):
            fmt += con.fmtstr.lstrip("<>=!")
        elif isinstance(con, cs.Const) and isinstance(con.subcon, cs.FormatField):
            fmt += con.subcon.fmtstr.lstrip("<>=!")
        elif con is cs.Terminated:
            continue
        elif isinstance(con, cs.Bytes):
            fmt += f"{con.sizeof()}s"
        else:
            # Padding(n) builds n zero bytes and has a fixed size
            fmt += f"{con.sizeof()}x"
    out = struct.Struct(fmt)
    size = sum(s.sizeof() for s in layout.subcons if s is not cs.Terminated)
    if out.size != size:
        raise ValueError(f"struct_of: {fmt} is {out.size} bytes, layout is {size}")
    return out


HEADER_S = struct_of(HEADER)
DMA_HEAD_S = struct_of(DMA_HEAD)
DMA_ENTRY_S = struct_of(DMA_ENTRY)
DMA_RESULT_S = struct_of(DMA_RESULT)
DMA_REPLY_HEAD_S = struct_of(DMA_REPLY_HEAD)
BINDING_S = struct_of(BINDING)
"""``IMPORT_VM_REPLY``'s binding record: ``pack(rid, space, vpasid, ppasid)`` per binding,
``iter_unpack(reply.bindings)`` to read them all."""


def joined(*parts: struct.Struct) -> struct.Struct:
    """One ``struct.Struct`` for consecutive layouts (e.g. header + fixed payload head), so the
    hot path packs or unpacks a whole frame head in one call; formats come from
    :func:`struct_of`, never written by hand."""
    return struct.Struct("<" + "".join(p.format.lstrip("<") for p in parts))


DMA_FRAME_S = joined(HEADER_S, DMA_HEAD_S)
"""Header + ``DMA_HEAD``: the first 20 bytes of every ``DMA`` request."""
DMA_REPLY_FRAME_S = joined(HEADER_S, DMA_REPLY_HEAD_S)
"""Header + ``DMA_REPLY_HEAD``: the first 28 bytes of a successful ``DMA`` reply."""
