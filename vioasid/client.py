"""asyncio client of the vioasid daemon: one typed method per request, typed errors, events.

::

    async with await Client.connect("/run/vioasid.sock") as c:
        vm = await c.register_vm("vm1", [MemoryRegion(fd, gpa=0, size=64 << 20)])
        await c.attach_device(vm, "00:03.0", "3a:00.0", "vfio-pci")
        await c.set_root_table(vm, rtaddr)
        binding = await c.pasid_entry(vm, "00:03.0", 5)      # guest wrote + invalidated entry 5
        [res] = await c.dma(vm, [DmaRequest("00:03.0", 5, 0x400010, write=True)])
        stream = await c.export_vm(vm)                        # live migration, source side

Requests are pipelined: any number may be in flight, the daemon answers in order. A refused
request raises a :class:`RequestError` subclass named after its error kind
(:class:`PasidConflict`, :class:`Invalid`, :class:`NotFound`, :class:`Exhausted`,
:class:`MigrationFailed`) with ``.kind`` and ``.message``. Faults and page requests of VMs this
client subscribed to arrive on :meth:`Client.next_event` / :meth:`Client.events`, pushed by
the daemon (with the guest's page-group responses, for device back-ends subscribed to page
requests). Methods that take a device accept a BDF string (``"00:03.0"``) or its source-id int.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import construct as cs

from vioasid.formats import invalidation as inv
from vioasid.formats import prq, wire
from vioasid.formats.fault import FaultReason
from vioasid.formats.wire import (
    Assign,
    DmaFlag,
    DmaStatus,
    ErrorCode,
    EventMask,
    Feature,
    Request,
    Space,
)
from vioasid.model.faults import bdf_str, parse_bdf
from vioasid.protocol.daemon_codec import (
    BAD_PAYLOAD,
    Codec,
    DmaResults,
    Message,
    ProtocolViolation,
    Role,
    encode_request,
)
from vioasid.protocol.transport import Transport

__all__ = [
    "Binding",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonProtocolError",
    "DmaRequest",
    "DmaResult",
    "EventMask",
    "Exhausted",
    "FaultEvent",
    "Feature",
    "ImportResult",
    "InternalError",
    "Invalid",
    "MemoryRegion",
    "MigrationFailed",
    "NotFound",
    "NotOwner",
    "PageRequestEvent",
    "PageResponseEvent",
    "PasidConflict",
    "PasidEntryResult",
    "RequestError",
]

Rid = str | int
_FLAG_REPLY = wire.FLAG_REPLY
_FLAGS = wire.VERSION
_NEED_REPLY_FLAGS = wire.VERSION | wire.FLAG_NEED_REPLY
_HEADER_PACK = wire.HEADER_S.pack
_DMA_FRAME_PACK = wire.DMA_FRAME_S.pack
_DMA_HEAD_SIZE = wire.DMA_HEAD_S.size
_GET_FEATURES = int(Request.GET_FEATURES)
_DMA = int(Request.DMA)


def _rid(value: Rid) -> int:
    if isinstance(value, int):
        if not 0 <= value < 0x10000:
            raise ValueError(f"source id {value} out of range")
        return value
    return parse_bdf(value)


# -- errors ---------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error this module raises."""


class ConnectionLost(ClientError):
    """The connection closed (or was closed) before the reply arrived."""


class DaemonProtocolError(ClientError):
    """The daemon sent something this client cannot decode (the connection is closed)."""


class RequestError(ClientError):
    """The daemon refused a request: ``kind`` is the error kind, ``message`` its text."""

    code: ErrorCode = ErrorCode.INVALID

    def __init__(self, request: Request, message: str) -> None:
        super().__init__(f"{self.kind}: {message}")
        self.request = request
        self.message = message

    @property
    def kind(self) -> str:
        return self.code.kind


class PasidConflict(RequestError):
    code = ErrorCode.PASID_CONFLICT


class Invalid(RequestError):
    code = ErrorCode.INVALID


class NotFound(RequestError):
    code = ErrorCode.NOT_FOUND


class Exhausted(RequestError):
    code = ErrorCode.EXHAUSTED


class MigrationFailed(RequestError):
    code = ErrorCode.MIGRATION_FAILED


class NotOwner(RequestError):
    """The VM belongs to another connection (changes, subscriptions) or another user."""

    code = ErrorCode.NOT_OWNER


class InternalError(RequestError):
    code = ErrorCode.INTERNAL


_ERRORS: dict[int, type[RequestError]] = {
    cls.code: cls
    for cls in (
        PasidConflict, Invalid, NotFound, Exhausted, MigrationFailed, NotOwner, InternalError
    )
}  # fmt: skip


def error_for(request: int, status: int, message: str) -> RequestError:
    cls = _ERRORS.get(status, InternalError)
    text = message if status in _ERRORS else f"status {status}: {message}"
    try:
        return cls(Request(request), text)
    except ValueError:
        return _refused(cls, text)


def _refused(cls: type[RequestError], text: str) -> RequestError:
    """The error of a connection the daemon refused (a reply to request 0)."""
    err = cls(Request.GET_FEATURES, f"connection refused: {text}")
    return err


# -- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A guest memory region handed to the daemon: ``size`` bytes of ``fd`` from ``offset``
    appear at guest-physical ``gpa`` (``uaddr``: the front-end's address, for vhost-user)."""

    fd: int
    gpa: int
    size: int
    offset: int = 0
    uaddr: int = 0


@dataclass(frozen=True, slots=True)
class PasidEntryResult:
    """What the daemon did with a guest PASID entry: bound (pPASID, space) or unbound."""

    bound: bool
    ppasid: int
    space: str  # "per-rid" | "global" | "none"


@dataclass(frozen=True, slots=True)
class DmaRequest:
    """One device request: guest device + vPASID (or, ``by_tag``, host function + wire tag)."""

    rid: Rid
    pasid: int
    addr: int
    write: bool = False
    by_tag: bool = False
    page_request: bool = False

    def pack(self) -> bytes:
        flags = (
            (DmaFlag.WRITE if self.write else 0)
            | (DmaFlag.BY_TAG if self.by_tag else 0)
            | (DmaFlag.PAGE_REQUEST if self.page_request else 0)
        )
        return wire.DMA_ENTRY_S.pack(_rid(self.rid), int(flags), self.pasid, self.addr)


@dataclass(frozen=True, slots=True)
class DmaResult:
    """One device request's outcome. ``ok``: ``tag`` (the PASID on the wire), ``gpa``, ``hpa``,
    ``read``/``write`` permissions. A fault: ``fault`` (VT-d reason), ``gpa`` = faulting address,
    ``tag`` = vPASID. ``error`` (an error kind) when the request named nothing the VM has."""

    status: DmaStatus
    tag: int
    gpa: int
    hpa: int
    reason: int = 0
    perm: int = 0

    @property
    def ok(self) -> bool:
        return self.status == DmaStatus.OK

    @property
    def fault(self) -> FaultReason | None:
        if self.status != DmaStatus.FAULT:
            return None
        try:
            return FaultReason(self.reason)
        except ValueError:
            return None

    @property
    def error(self) -> str | None:
        if self.status != DmaStatus.ERROR:
            return None
        try:
            return ErrorCode(self.reason).kind
        except ValueError:
            return "internal"

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True, "ppasid": self.tag, "gpa": hex(self.gpa), "hpa": hex(self.hpa)}
        if self.status == DmaStatus.ERROR:
            return {"ok": False, "error": self.error}
        out: dict[str, Any] = {"ok": False, "reason": self.reason, "addr": hex(self.gpa)}
        if self.status == DmaStatus.PAGE_REQUEST:
            out["page_request"] = True
        return out


class Binding(NamedTuple):
    """A (device, vPASID) → pPASID binding as re-created by an import. (A tuple: an import
    returns up to 100,000 of them, built with ``tuple.__new__``, no Python-level ``__init__``.)"""

    rid: str
    vpasid: int
    ppasid: int
    space: str


@dataclass(frozen=True, slots=True)
class ImportResult:
    vm: int
    bindings: list[Binding]

    def ppasids(self) -> dict[str, dict[int, int]]:
        """``{guest rid: {vpasid: ppasid}}`` (the scenario ``migrate`` result)."""
        out: dict[str, dict[int, int]] = {}
        for b in self.bindings:
            out.setdefault(b.rid, {})[b.vpasid] = b.ppasid
        return out


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A DMA fault of a subscribed VM, as the guest's driver would read it."""

    vm: int
    rid: str
    reason: int
    vpasid: int | None
    addr: int
    write: bool
    record: bytes  # the 128-bit VT-d fault record

    @property
    def name(self) -> str:
        try:
            return FaultReason(self.reason).label
        except ValueError:
            return f"reason-0x{self.reason:x}"


@dataclass(frozen=True, slots=True)
class PageRequestEvent:
    """A page request of a subscribed VM (guest RID and vPASID), as the VT-d descriptor."""

    vm: int
    rid: str
    vpasid: int | None
    addr: int
    read: bool
    write: bool
    last: bool
    prgi: int
    desc: bytes

    @classmethod
    def from_desc(cls, vm: int, desc: bytes) -> PageRequestEvent:
        f = prq.PAGE_REQ_DESC.flat(desc)
        return cls(
            vm=vm,
            rid=bdf_str(f["RID"]),
            vpasid=f["PASID"] if f["PP"] else None,
            addr=f["ADDR"],
            read=bool(f["RD"]),
            write=bool(f["WR"]),
            last=bool(f["LPIG"]),
            prgi=f["PRGI"],
            desc=desc,
        )


@dataclass(frozen=True, slots=True)
class PageResponseEvent:
    """The guest's page-group response to a page request (guest RID, vPASID, response code:
    0 success, 1 invalid, 0xF failure)."""

    vm: int
    rid: str
    vpasid: int | None
    prgi: int
    last: bool
    code: int
    desc: bytes

    @classmethod
    def from_desc(cls, vm: int, desc: bytes) -> PageResponseEvent:
        f = inv.PGRESP_DESC.flat(desc)
        return cls(
            vm=vm,
            rid=bdf_str(f["RID"]),
            vpasid=f["PASID"] if f["PP"] else None,
            prgi=f["PRGI"],
            last=bool(f["LPIG"]),
            code=f["RC"],
            desc=desc,
        )


Event = FaultEvent | PageRequestEvent | PageResponseEvent


# -- the client -----------------------------------------------------------------------------------


class Client:
    """A connection to the daemon. Create with :meth:`connect`; close with :meth:`close` or
    ``async with``. Closing the connection releases every VM it registered or imported."""

    def __init__(self, sock: socket.socket) -> None:
        self._codec = Codec(Role.CLIENT, tolerant=True)
        self._pending: deque[tuple[int, asyncio.Future[Any]]] = deque()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._error: ClientError | None = None
        self._loop = asyncio.get_running_loop()
        self._transport = Transport(sock, self._on_data, self._on_close, self._loop)
        self._transport.start()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = 5.0) -> Client:
        """Connect to the daemon's unix socket (retrying until ``timeout`` while it starts)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, os.fspath(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    async def close(self) -> None:
        self._transport.close(None)

    @property
    def closed(self) -> bool:
        return self._transport.closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------
    def _on_data(self, data: bytes | memoryview, fds: list[int]) -> None:
        if not fds:
            results = self._codec.take_dma_reply(data)
            if results is not None:  # the hot path: exactly one successful DMA reply arrived
                pending = self._pending
                if pending and pending[0][0] == _DMA:
                    fut = pending.popleft()[1]
                    if not fut.done():
                        fut.set_result(results)
                    return
        try:
            self._codec.receive(data, fds)
            while True:
                msg = self._codec.next_message()
                if msg is None:
                    return
                self._dispatch(msg)
        except ProtocolViolation as exc:
            self._transport.close(f"daemon sent malformed data: {exc}")

    def _dispatch(self, msg: Message) -> None:
        if not msg.flags & _FLAG_REPLY:
            if msg.body is not BAD_PAYLOAD:
                self._event(msg)
            return
        if msg.request == 0:  # the daemon refused this connection (a limit): say why
            status = msg.body.status if msg.body is not BAD_PAYLOAD else int(ErrorCode.INTERNAL)
            text = msg.body.body if msg.body is not BAD_PAYLOAD else "refused"
            self._error = _refused(_ERRORS.get(status, InternalError), str(text))
            self._transport.close(str(self._error))
            return
        pending = self._pending
        if not pending or pending[0][0] != msg.request:
            raise ProtocolViolation(f"unexpected reply to request {msg.request}")
        request, fut = pending.popleft()
        if fut.done():
            return
        body = msg.body
        if body is BAD_PAYLOAD:  # framed fine, payload undecodable: this request fails alone
            fut.set_exception(DaemonProtocolError(f"undecodable reply to {Request(request).name}"))
            return
        if request == _GET_FEATURES:
            fut.set_result(body.features)
        elif body.status == 0:
            fut.set_result(body.body)
        else:
            fut.set_exception(error_for(request, body.status, body.body))

    def _event(self, msg: Message) -> None:
        body = msg.body
        if msg.request == Request.FAULT_EVENT:
            self._events.put_nowait(
                FaultEvent(
                    vm=body.vm,
                    rid=bdf_str(body.rid),
                    reason=body.reason,
                    vpasid=body.vpasid if body.flags & wire.FAULT_PASID_PRESENT else None,
                    addr=body.addr,
                    write=bool(body.flags & wire.FAULT_WRITE),
                    record=body.record,
                )
            )
        elif msg.request == Request.PAGE_REQUEST_EVENT:
            self._events.put_nowait(PageRequestEvent.from_desc(body.vm, body.desc))
        elif msg.request == Request.PAGE_RESPONSE_EVENT:
            self._events.put_nowait(PageResponseEvent.from_desc(body.vm, body.desc))

    def _on_close(self, reason: str | None) -> None:
        self._codec.close()
        err: ClientError = self._error or (
            DaemonProtocolError(reason)
            if reason and "malformed" in reason
            else ConnectionLost(reason or "connection closed")
        )
        self._error = err
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._events.put_nowait(None)

    def _send(
        self, request: int, payload: bytes, fds: Sequence[int] = (), need_reply: bool = False
    ) -> asyncio.Future[Any]:
        if self._error is not None or self._transport.closed:
            raise self._error or ConnectionLost("connection closed")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((request, fut))
        flags = _NEED_REPLY_FLAGS if need_reply else _FLAGS
        self._transport.send(_HEADER_PACK(request, flags, len(payload)) + payload, fds)
        return fut

    async def _call(self, request: Request, body: Any = None, fds: Sequence[int] = ()) -> Any:
        """Send a request and wait for its reply; requests without a result ask for a status
        reply (need_reply) so a refusal raises here."""
        need = request not in wire.REPLY_LAYOUTS
        try:
            raw = encode_request(request, body)[wire.HEADER_SIZE :]
        except (cs.ConstructError, UnicodeError, ValueError, OverflowError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise Invalid(request, f"not sent: {first}") from None
        if len(raw) > wire.MAX_PAYLOAD:
            raise Invalid(request, f"not sent: {len(raw)} bytes (max {wire.MAX_PAYLOAD})")
        if len(fds) > wire.MAX_FDS:
            raise Invalid(request, f"not sent: {len(fds)} fds (max {wire.MAX_FDS})")
        return await self._send(request, raw, fds, need_reply=need)

    # -- features -------------------------------------------------------------------------
    async def get_features(self) -> Feature:
        """The daemon's feature bitmap (vhost-user GET_FEATURES)."""
        return Feature(await self._send(Request.GET_FEATURES, b""))

    async def set_features(self, features: int) -> None:
        """Acknowledge features (a subset of :meth:`get_features`)."""
        await self._call(Request.SET_FEATURES, {"features": int(features)})

    # -- VMs ------------------------------------------------------------------------------
    async def register_vm(self, name: str, regions: Sequence[MemoryRegion]) -> int:
        """Create VM ``name`` with its guest memory (the fds are sent, not kept by the daemon's
        caller: close yours when you like). Owned by this connection. Returns the VM id. A memfd
        made with ``MFD_ALLOW_SEALING`` is sealed against shrinking by the daemon (the cheapest
        kind); other files are size-checked before each request."""
        _check_regions(Request.REGISTER_VM, regions)
        body = {"flags": 0, "nregions": len(regions), "name": name, "regions": _regions(regions)}
        result = await self._call(Request.REGISTER_VM, body, [r.fd for r in regions])
        return int(result.vm)

    async def unregister_vm(self, vm: int) -> None:
        """Destroy the VM and free every pPASID and table entry it held."""
        await self._call(Request.UNREGISTER_VM, {"vm": vm})

    async def open_vm(self, name: str) -> int:
        """The id of an existing VM (for device clients that do not own it)."""
        return int((await self._call(Request.OPEN_VM, {"name": name})).vm)

    async def attach_device(
        self, vm: int, rid: Rid, function: Rid, assign: str | Assign = "vfio-pci"
    ) -> None:
        """Give guest device ``rid`` the host function ``function`` (vfio-pci or mdev)."""
        mode = assign if isinstance(assign, Assign) else Assign[assign.upper().replace("-", "_")]
        await self._call(
            Request.ATTACH_DEVICE,
            {"vm": vm, "rid": _rid(rid), "function": _rid(function), "assign": int(mode)},
        )

    async def detach_device(self, vm: int, rid: Rid) -> None:
        """Remove a guest device (its bindings are torn down first)."""
        await self._call(Request.DETACH_DEVICE, {"vm": vm, "rid": _rid(rid)})

    # -- guest-side notifications -----------------------------------------------------------
    async def set_root_table(self, vm: int, rtaddr: int) -> None:
        """The guest programmed RTADDR_REG (root table address; bit 10 = scalable mode)."""
        await self._call(Request.SET_ROOT_TABLE, {"vm": vm, "rtaddr": rtaddr})

    async def pasid_entry(self, vm: int, rid: Rid, vpasid: int) -> PasidEntryResult:
        """The guest wrote PASID entry ``vpasid`` of ``rid`` and invalidated it: the daemon
        re-reads it and binds (entry present) or unbinds (not present)."""
        r = await self._call(Request.PASID_ENTRY, {"vm": vm, "rid": _rid(rid), "vpasid": vpasid})
        return PasidEntryResult(bool(r.bound), r.ppasid, _space(r.space))

    async def invalidate(self, vm: int, desc: bytes) -> int:
        """Process one invalidation descriptor the guest queued (16 or 32 bytes, VT-d §6.5.2).
        Returns how many bindings/cached entries changed."""
        if len(desc) not in (16, 32):
            raise ValueError("an invalidation descriptor is 16 or 32 bytes")
        body = {"vm": vm, "desc": bytes(desc).ljust(32, b"\0")}
        return int((await self._call(Request.INVALIDATE, body)).changes)

    # -- device side ----------------------------------------------------------------------
    def dma_nowait(self, vm: int, requests: Sequence[DmaRequest]) -> asyncio.Future[Any]:
        """Send one ``DMA`` message without waiting (pipelining); await the future, then
        :meth:`dma_results`."""
        return self.dma_packed_nowait(vm, len(requests), b"".join(r.pack() for r in requests))

    def dma_packed_nowait(self, vm: int, count: int, entries: bytes) -> asyncio.Future[Any]:
        """Like :meth:`dma_nowait` with entries already packed with ``wire.DMA_ENTRY_S``."""
        # _send inlined (the device side's hot path): header and DMA head packed in one go
        if self._error is not None or self._transport.closed:
            raise self._error or ConnectionLost("connection closed")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((_DMA, fut))
        head = _DMA_FRAME_PACK(_DMA, _FLAGS, _DMA_HEAD_SIZE + len(entries), vm, count)
        self._transport.send(head + entries)
        return fut

    @staticmethod
    def dma_results(raw: DmaResults) -> list[DmaResult]:
        return [
            DmaResult(DmaStatus(status), tag, gpa, hpa, reason, perm)
            for status, reason, perm, tag, gpa, hpa in wire.DMA_RESULT_S.iter_unpack(raw.results)
        ]

    async def dma(self, vm: int, requests: Sequence[DmaRequest]) -> list[DmaResult]:
        """Translate a batch of device requests (at most ``wire.MAX_DMA_BATCH``); results come
        back in order. Faults are also pushed to the VM's subscribers."""
        return self.dma_results(await self.dma_nowait(vm, requests))

    async def dma_one(
        self, vm: int, rid: Rid, vpasid: int, addr: int, *, write: bool = False
    ) -> DmaResult:
        """One device request in the guest's terms (device, vPASID)."""
        [result] = await self.dma(vm, [DmaRequest(rid, vpasid, addr, write)])
        return result

    async def enqcmd(self, vm: int, rid: Rid, vpasid: int) -> int:
        """The guest CPU submits ENQCMD with ``vpasid`` to device ``rid``'s work queue: the
        PASID the CPU writes into the descriptor (the VM's CPU-table entry)."""
        r = await self._call(Request.ENQCMD, {"vm": vm, "rid": _rid(rid), "vpasid": vpasid})
        return int(r.ppasid)

    # -- events ---------------------------------------------------------------------------
    async def subscribe(
        self, vm: int, events: EventMask = EventMask.FAULTS | EventMask.PAGE_REQUESTS
    ) -> None:
        """Have the daemon push this VM's faults (``FAULTS``) and page requests plus the
        guest's page responses (``PAGE_REQUESTS``) to this connection (``EventMask(0)``
        unsubscribes)."""
        await self._call(Request.SUBSCRIBE, {"vm": vm, "events": int(events)})

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next pushed event (raises ``ConnectionLost`` once the connection is gone)."""
        async with asyncio.timeout(timeout):
            ev = await self._events.get()
        if ev is None:
            self._events.put_nowait(None)
            raise self._error or ConnectionLost("connection closed")
        return ev

    async def events(self) -> AsyncIterator[Event]:
        """Every pushed event until the connection closes."""
        while True:
            try:
                yield await self.next_event()
            except ConnectionLost:
                return

    def pending_events(self) -> list[Event]:
        """Events already received, without waiting."""
        out: list[Event] = []
        while not self._events.empty():
            ev = self._events.get_nowait()
            if ev is None:
                self._events.put_nowait(None)
                break
            out.append(ev)
        return out

    # -- state ----------------------------------------------------------------------------
    async def dump(self, vm: int | None = None) -> dict[str, Any]:
        """The daemon's state as JSON: VMs, devices, vPASID/pPASID tables, functions and
        allocators (one VM, or every VM when ``vm`` is None)."""
        ref = wire.ALL_VMS if vm is None else vm
        r = await self._call(Request.DUMP, {"vm": ref, "offset": 0})
        total, parts = r.total, [bytes(r.json)]
        got = len(parts[0])
        while got < total:  # a document bigger than one reply comes in pages
            r = await self._call(Request.DUMP, {"vm": ref, "offset": got})
            if not r.json or r.total != total:
                raise DaemonProtocolError("DUMP pages do not add up")
            parts.append(bytes(r.json))
            got += len(r.json)
        try:
            doc: dict[str, Any] = json.loads(b"".join(parts))
        except ValueError as exc:
            raise DaemonProtocolError(f"DUMP: {exc}") from None
        return doc

    # -- migration ------------------------------------------------------------------------
    async def export_vm(self, vm: int) -> bytes:
        """The VM's migration stream (bindings, vIOMMU state, queued faults / page requests);
        the VM keeps running here unchanged."""
        return bytes((await self._call(Request.EXPORT_VM, {"vm": vm})).stream)

    async def import_vm(
        self,
        name: str,
        stream: bytes,
        regions: Sequence[MemoryRegion] = (),
        functions: Mapping[Rid, Rid] | None = None,
    ) -> ImportResult:
        """Re-create a VM from ``stream`` on this daemon's host with its guest memory
        ``regions`` (as :meth:`register_vm`), guest device → host function per ``functions``
        (default: the same function RIDs as on the source). Every binding gets a pPASID under
        this host's occupancy and policy, or the import fails (:class:`MigrationFailed`) and
        this daemon keeps nothing. The new VM is owned by this connection."""
        _check_regions(Request.IMPORT_VM, regions)
        mapping = [{"rid": _rid(k), "function": _rid(v)} for k, v in (functions or {}).items()]
        body = {
            "name": name,
            "nregions": len(regions),
            "regions": _regions(regions),
            "nmap": len(mapping),
            "map": mapping,
            "stream": stream,
        }
        r = await self._call(Request.IMPORT_VM, body, [r.fd for r in regions])
        return ImportResult(int(r.vm), _bindings(r.bindings))


def _check_regions(request: Request, regions: Sequence[MemoryRegion]) -> None:
    """What the daemon would refuse, refused here (a 17th fd would cost the connection)."""
    if len(regions) > wire.MAX_REGIONS:
        raise Invalid(request, f"{len(regions)} memory regions (max {wire.MAX_REGIONS})")


def _regions(regions: Sequence[MemoryRegion]) -> list[dict[str, int]]:
    return [
        {
            "guest_phys_addr": r.gpa,
            "memory_size": r.size,
            "userspace_addr": r.uaddr,
            "mmap_offset": r.offset,
        }
        for r in regions
    ]


def _bindings(records: bytes) -> list[Binding]:
    """``IMPORT_VM_REPLY``'s packed :data:`~vioasid.formats.wire.BINDING` array as
    :class:`Binding` s (one ``iter_unpack``; rid / space names computed once per value)."""
    rows = list(_BINDING_UNPACK(records))
    rids = {rid: bdf_str(rid) for rid in {row[0] for row in rows}}
    spaces = {space: _space(space) for space in {row[1] for row in rows}}
    new = _new_tuple
    return [new(Binding, (rids[rid], x, pp, spaces[space])) for rid, space, x, pp in rows]


_BINDING_UNPACK = wire.BINDING_S.iter_unpack
_new_tuple = tuple.__new__


def _space(value: int) -> str:
    try:
        return Space(value).word
    except ValueError:
        return "none"


@contextlib.asynccontextmanager
async def connect(path: str | os.PathLike[str], timeout: float = 5.0) -> AsyncIterator[Client]:
    """``async with connect(path) as client:``"""
    client = await Client.connect(path, timeout=timeout)
    try:
        yield client
    finally:
        await client.close()
