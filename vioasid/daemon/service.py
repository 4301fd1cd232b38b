"""What each request does: the daemon's requests mapped onto the engine (:class:`Host`).

Sans-IO like the codec: :meth:`Service.handle` takes a decoded :class:`Message` from a
:class:`Session`, calls the engine, and appends the encoded reply to that session's outbox and
any fault / page-request events to the outboxes of the VM's subscribers. The server flushes.

Ownership: a VM belongs to the session that registered (or imported) it; it lives until that
session sends ``UNREGISTER_VM`` or its connection ends, and then :meth:`Host.remove_vm` frees
every pPASID, host PASID-table entry and CPU-table entry it held. Other sessions may use a VM
(``OPEN_VM``, device requests, subscriptions) but not unregister it.

Errors: an engine refusal (:class:`VioasidError`) becomes a reply with its kind's status code
(requests without a result reply only when they asked with need_reply, else the refusal is
logged). Anything else is a daemon bug: logged with its traceback, answered with ``INTERNAL``,
and the connection stays up.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats import invalidation as inv
from vioasid.formats import wire
from vioasid.formats.fault import FAULT_RECORD, FaultReason
from vioasid.formats.pasid import PASID_ENTRY
from vioasid.formats.wire import DmaFlag, DmaStatus, ErrorCode, EventMask, Request
from vioasid.model import iq
from vioasid.model.engine import Host
from vioasid.model.errors import InvalidRequest, NotFound, VioasidError
from vioasid.model.faults import Fault, bdf_str
from vioasid.model.memory import GuestMemory
from vioasid.model.migration import decode_stream, export_vm, import_vm
from vioasid.model.vm import VM
from vioasid.protocol.daemon_codec import Message, encode_error, encode_event, encode_ok

from . import sigbus
from .session import Session

log = logging.getLogger(__name__)

_DID = PASID_ENTRY.field("DID")
_DESC_S = struct.Struct("<4Q")  # wire.INVALIDATE desc: one 256-bit descriptor
_SPACE = {"per-rid": wire.Space.PER_RID, "global": wire.Space.GLOBAL}
_PAGE_REQUEST_REASONS = frozenset({FaultReason.FS_PAGING_ENTRY_P, FaultReason.SS_ENTRY_P})
_DMA_RESULT = wire.DMA_RESULT_S
_DMA_REQ = int(Request.DMA)
_REPLY_FLAGS = wire.VERSION | wire.FLAG_REPLY
_DMA_FRAME_HEAD = wire.DMA_REPLY_FRAME_S  # header + status + count, packed in one go
_DMA_REPLY_HEAD = _DMA_FRAME_HEAD.size
_PERM_R, _PERM_W = 1, 2
_DMA_ENTRY_UNPACK = wire.DMA_ENTRY_S.unpack
_DMA_ONE_REPLY = wire.joined(wire.HEADER_S, wire.DMA_REPLY_HEAD_S, wire.DMA_RESULT_S).pack
"""A whole successful one-result ``DMA`` reply frame."""
_ONE_SIZE = wire.DMA_REPLY_HEAD_S.size + wire.DMA_RESULT_S.size  # its payload size
_OK = int(DmaStatus.OK)
_F_WRITE = int(DmaFlag.WRITE)  # plain ints: IntFlag arithmetic is slow in the hot loop
_F_BY_TAG = int(DmaFlag.BY_TAG)
_BINDING_PACK = wire.BINDING_S.pack
_FAULT_EVENT_S = wire.struct_of(wire.FAULT_EVENT)
_FAULT_FRAME = wire.joined(wire.HEADER_S, _FAULT_EVENT_S).pack
_FAULT_REQ = int(Request.FAULT_EVENT)
_FAULT_SIZE = _FAULT_EVENT_S.size
_FR_FI, _FR_SID, _FR_PP, _FR_FR, _FR_PV, _FR_T, _FR_F = (
    FAULT_RECORD.field(n) for n in ("FI", "SID", "PP", "FR", "PV", "T", "F")
)
_RECORD_PACK = struct.Struct("<2Q").pack  # FAULT_RECORD's two words
_U64 = (1 << 64) - 1
_clock = time.perf_counter
_route = Host.route  # (VM, guest rid, vPASID) -> (host function, tag) | None
RESCUED = sigbus.RESCUED  # owners whose mappings a SIGBUS replaced (non-empty: rarely)


def _reply_frame(count: int) -> bytearray:
    """A whole ``DMA`` reply frame for ``count`` results: header, status 0, count; the results
    are packed in place."""
    out = bytearray(_DMA_REPLY_HEAD + count * _DMA_RESULT.size)
    _DMA_FRAME_HEAD.pack_into(out, 0, _DMA_REQ, _REPLY_FLAGS, len(out) - wire.HEADER_SIZE, 0, count)
    return out


@dataclass(eq=False)
class VmEntry:
    """A VM the daemon serves: wire id, engine name, owner, guest memory, subscribers."""

    id: int
    name: str
    owner: Session
    memory: GuestMemory
    model: VM  # the engine's VM (stable for the VM's life)
    subscribers: dict[Session, int] = field(default_factory=dict)  # session -> EventMask
    host_range: tuple[int, int] = (0, 0)  # [first, end) of the host range its requests reach
    files: PlainFiles | None = None  # the plain files its memory maps, if any

    def __post_init__(self) -> None:
        self.host_range = (self.model.hpa, self.model.hpa + self.model.memory_size)


class NotOwner(VioasidError):
    """The VM belongs to another connection (changes, subscriptions) or another user."""

    kind = "not-owner"


EVENT_BACKLOG = 1 << 20
"""An event for a client with more than this many bytes unread is dropped (and counted)."""


def _may_read(session: Session, entry: VmEntry) -> bool:
    return entry.owner is session or session.uid == 0 or session.uid == entry.owner.uid != -1


@dataclass(eq=False)
class PlainFiles:
    """The plain (unsealable) files behind a VM's memory: a dup of each fd with the end of
    what is mapped from it (size-checked before each request), and the SIGBUS guard's tokens
    for their mappings (:mod:`.sigbus`: a truncation racing a request cannot kill the daemon).
    ``lost``: a SIGBUS replaced the mappings; the VM's memory is gone for good."""

    fds: list[tuple[int, int]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    lost: bool = False

    def close(self) -> None:
        """Stop guarding (before the mappings go) and close the fds."""
        g = sigbus.guard()
        for token in self.tokens:
            g.unwatch(token)
        self.tokens.clear()
        for fd, _ in self.fds:
            os.close(fd)
        self.fds.clear()


def _check_files(entry: VmEntry) -> None:
    """A plain memory file must still hold every byte mapped from it: checked before each
    request that may touch the VM's memory (reading a page past a file's end is SIGBUS; one
    truncated during the request is caught by the SIGBUS guard, :func:`_after_rescue`)."""
    files = entry.files
    assert files is not None
    if files.lost:
        raise InvalidRequest(
            f"VM {entry.name}: its memory file shrank during a request; the daemon no longer "
            "touches that memory (unregister the VM)"
        )
    for fd, end in files.fds:
        size = os.fstat(fd).st_size
        if size < end:
            raise InvalidRequest(
                f"VM {entry.name}: its memory file shrank to 0x{size:x} bytes, below the 0x{end:x} "
                "its regions map; the daemon no longer touches that memory (unregister the VM)"
            )


def _after_rescue(vms: dict[int, VmEntry]) -> None:
    """A SIGBUS was rescued during this request (a plain memory file shrank while its pages
    were read): mark the VMs whose memory it was as lost, and refuse the request (what it
    read was zeros, not the guest's tables)."""
    owners = {id(o) for o in RESCUED}
    RESCUED.clear()
    names = []
    for entry in vms.values():
        if entry.files is not None and id(entry.files) in owners:
            entry.files.lost = True
            names.append(entry.name)
    log.warning("memory file of VM %s shrank during a request (SIGBUS caught)", ", ".join(names))
    raise InvalidRequest(
        f"VM {', '.join(names) or '?'}: its memory file shrank during this request; the daemon "
        "no longer touches that memory (unregister the VM)"
    )


def memory_seal(fd: int) -> str:
    """Make a memory fd unshrinkable if it can be: ``"sealed"`` (``F_SEAL_SHRINK`` is set
    now, the daemon adding it when the memfd allows sealing) or ``"file"`` (no seals: a plain
    file, a tmpfs file, a memfd made without ``MFD_ALLOW_SEALING``), which the daemon then
    size-checks before each request that may touch it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return "file"
    if seals & fcntl.F_SEAL_SHRINK:
        return "sealed"
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return "file"
    return "sealed"


@dataclass(eq=False)
class DmaJob:
    """A ``DMA`` batch being translated over one or more turns (:meth:`Service.step_dma`)."""

    session: Session
    entry: VmEntry
    count: int
    entries: bytes
    out: bytearray
    done: int = 0


Handler = Callable[[Session, Message], Any]
Raw = bytes | bytearray | memoryview


class _Resync:
    """The daemon's side of an invalidation (a :class:`vioasid.model.iq.Handler`): PASID-cache
    and context-cache invalidations re-read the guest entries they cover (bind / unbind),
    IOTLB ones drop the host's cached nested translations, page-group responses go to the
    page-request subscribers. Each returns how many things changed."""

    def __init__(self, service: Service, entry: VmEntry) -> None:
        self.service, self.entry = service, entry

    def context(self, did: int | None, sid: int | None, fm: int) -> int:
        if sid is None:
            return self.service._resync(self.entry, None, None)
        if sid not in self.service._model(self.entry).devices:
            return 0
        return self.service._resync(self.entry, None, None, only_rid=sid)

    def pasid_cache(self, did: int | None, pasid: int | None) -> int:
        return self.service._resync(self.entry, did, pasid)

    def iotlb(self, did: int | None, pasid: int | None, addr: int | None, am: int, ih: bool) -> int:
        return self.service.host.invalidate(self.entry.name, vpasid=pasid)

    def other(self, desc: iq.Descriptor) -> int:
        if desc.type_code == inv.TYPE_PGRESP:
            return self.service._page_response(self.entry, desc.raw())
        return 0  # wait, interrupt-entry cache and device-TLB invalidations change nothing here


class Service:
    """The daemon's state around one :class:`Host`: sessions, VM ids, subscriptions."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.sessions: dict[int, Session] = {}
        self.vms: dict[int, VmEntry] = {}
        self._by_name: dict[str, VmEntry] = {}
        self._next_session = 1
        self._next_vm = 1
        self.dirty: dict[Session, None] = {}  # sessions with output (read-only outside)
        self.events_dropped = 0  # every session's, since the daemon started
        # What the serving process reports beside the engine, by dump key: each callable
        # returns JSON-ready entries carrying their "vm" (the PASID DMA functions a process
        # serves over vfio-user: qemu_glue.pasid_dma). Listed in DUMP, per viewer like VMs.
        self.reports: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self._handlers: dict[int, Handler] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.REGISTER_VM: self._register_vm,
            Request.UNREGISTER_VM: self._unregister_vm,
            Request.OPEN_VM: self._open_vm,
            Request.ATTACH_DEVICE: self._attach_device,
            Request.DETACH_DEVICE: self._detach_device,
            Request.SET_ROOT_TABLE: self._set_root_table,
            Request.PASID_ENTRY: self._pasid_entry,
            Request.INVALIDATE: self._invalidate,
            Request.DMA: self._dma,
            Request.ENQCMD: self._enqcmd,
            Request.SUBSCRIBE: self._subscribe,
            Request.DUMP: self._dump,
            Request.EXPORT_VM: self._export_vm,
            Request.IMPORT_VM: self._import_vm,
        }

    # -- sessions -------------------------------------------------------------------------
    def open_session(self, peer: str = "", uid: int = -1) -> Session:
        session = Session(self._next_session, peer, uid)
        self._next_session += 1
        self.sessions[session.id] = session
        return session

    def end_session(self, session: Session) -> None:
        """The connection is gone: drop its subscriptions and every VM it owns."""
        if session.closed:
            return
        session.closed = True
        session.outbox.clear()
        self.dirty.pop(session, None)
        for entry in self.vms.values():
            entry.subscribers.pop(session, None)
        for vm_id in sorted(session.owned):
            try:
                self._release(vm_id, f"its owner {session} went away")
            except Exception:  # a daemon bug: keep serving the others
                log.exception("releasing VM id %d of %s failed", vm_id, session)
        self.sessions.pop(session.id, None)

    def take_dirty(self) -> list[Session]:
        """Sessions with output to flush (each once, in the order they got it)."""
        if not self.dirty:
            return []
        dirty = list(self.dirty)
        self.dirty.clear()
        return dirty

    def queue(self, session: Session, data: bytes | bytearray) -> None:
        """Append ``data`` to the session's output (after whatever is already queued)."""
        self._out(session, data)

    def _out(self, session: Session, data: bytes | bytearray) -> None:
        if not session.closed:
            session.outbox.append(data)
            self.dirty[session] = None

    def _event(self, session: Session, data: bytes) -> None:
        """A pushed event: dropped (and counted) while the client leaves too much unread, so
        a subscriber that never reads costs O(1) per event and bounded memory."""
        if session.unsent() > EVENT_BACKLOG or len(session.outbox) > EVENT_BACKLOG // 64:
            session.events_dropped += 1
            self.events_dropped += 1
            if session.events_dropped == 1 or session.events_dropped % 100_000 == 0:
                log.warning(
                    "%s: does not read its events: %d dropped", session, session.events_dropped
                )
            return
        self._out(session, data)

    # -- the request path ------------------------------------------------------------------
    def handle(self, session: Session, msg: Message) -> None:
        """Run one request; its reply (if any) goes to the session's outbox."""
        request = msg.request
        try:
            result = self._handlers[request](session, msg)
            if RESCUED:
                _after_rescue(self.vms)
        except VioasidError as exc:
            self._refuse(session, msg, ErrorCode.from_kind(exc.kind), exc.message)
            return
        except Exception as exc:
            log.exception("%s: %s failed", session, Request(request).name)
            self._refuse(session, msg, ErrorCode.INTERNAL, f"internal error: {exc!r}")
            return
        finally:
            if msg.fds:
                msg.close_fds()
        if type(result) is bytearray or type(result) is bytes:  # DMA built its reply frame
            self._out(session, result)
        elif request in wire.REPLY_LAYOUTS or msg.need_reply:
            self._out(session, encode_ok(request, result))

    def refuse_lost_fds(self, session: Session, msg: Message) -> None:
        """The kernel could not hand over this request's fds (the daemon is at its fd limit):
        refuse the request, keep the connection."""
        msg.close_fds()
        log.warning("%s: out of file descriptors: %s refused", session, Request(msg.request).name)
        self._refuse(
            session,
            msg,
            ErrorCode.EXHAUSTED,
            "the daemon is out of file descriptors: this request's fds did not arrive",
        )

    def _refuse(self, session: Session, msg: Message, code: ErrorCode, message: str) -> None:
        name = Request(msg.request).name
        if msg.request in wire.REPLY_LAYOUTS or msg.need_reply:
            log.info("%s: %s refused: %s: %s", session, name, code.kind, message)
            self._out(session, encode_error(msg.request, code, message))
        else:
            log.warning(
                "%s: %s refused (no reply asked): %s: %s", session, name, code.kind, message
            )

    # -- helpers --------------------------------------------------------------------------
    def _entry(self, vm_id: int, *, touch: bool = True) -> VmEntry:
        """The VM; with ``touch`` (the request may read its memory) refused when a plain file
        behind its memory shrank."""
        entry = self.vms.get(vm_id)
        if entry is None:
            raise NotFound(f"no VM with id {vm_id}")
        if entry.files and touch:
            _check_files(entry)
        return entry

    def _owned(self, session: Session, vm_id: int, *, touch: bool = True) -> VmEntry:
        """The VM, for a request that changes it or subscribes to it: its owner only."""
        entry = self._entry(vm_id, touch=touch)
        if entry.owner is not session:
            raise NotOwner(f"VM {entry.name} belongs to {entry.owner}, not {session}")
        return entry

    def _visible(self, session: Session, vm_id: int) -> VmEntry:
        """The VM, for a request that reads it (open, dump, export, device requests): its
        owner, another connection of the owner's uid, or root."""
        entry = self._entry(vm_id)
        if not _may_read(session, entry):
            raise NotOwner(f"VM {entry.name} belongs to another user's {entry.owner}")
        return entry

    def _model(self, entry: VmEntry) -> VM:
        return entry.model

    def _add_entry(
        self, session: Session, vm: VM, memory: GuestMemory, files: PlainFiles | None
    ) -> VmEntry:
        name = vm.name
        entry = VmEntry(self._next_vm, name, session, memory, vm, files=files)
        self._next_vm += 1
        self.vms[entry.id] = entry
        self._by_name[name] = entry
        session.owned.add(entry.id)
        log.info("%s: VM %s (id %d) registered", session, name, entry.id)
        return entry

    def _release(self, vm_id: int, why: str) -> None:
        entry = self.vms.pop(vm_id)
        self._by_name.pop(entry.name, None)
        entry.owner.owned.discard(vm_id)
        try:
            self.host.remove_vm(entry.name)
        finally:
            if entry.files is not None:
                entry.files.close()
            entry.memory.close()
        log.info("VM %s (id %d) released: %s", entry.name, vm_id, why)

    @staticmethod
    def _map_memory(regions: Any, fds: list[int]) -> tuple[GuestMemory, PlainFiles | None]:
        """Guest memory from vhost-user style regions and their fds, and the plain files to
        watch. Nothing the client does to its memory afterwards may SIGBUS the daemon: a memfd
        is sealed against shrinking first (:func:`memory_seal`); what cannot be sealed is kept
        (a dup) and its size checked before every request that may touch it (:func:`_check_files`),
        and its mapping is guarded (:mod:`.sigbus`) against a truncation during a request;
        a region must lie inside its file when it is registered."""
        if len(regions) > wire.MAX_REGIONS:
            raise InvalidRequest(f"{len(regions)} memory regions (max {wire.MAX_REGIONS})")
        mem = GuestMemory()
        files = PlainFiles()
        try:
            for i, (r, fd) in enumerate(zip(regions, fds, strict=True)):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise InvalidRequest(f"memory region {i}: fd is not a file or memfd")
                kind = memory_seal(fd)
                st = os.fstat(fd)
                if r.memory_size == 0 or r.mmap_offset + r.memory_size > st.st_size:
                    raise InvalidRequest(
                        f"memory region {i}: 0x{r.mmap_offset:x}+0x{r.memory_size:x} is not "
                        f"inside its file (0x{st.st_size:x} bytes)"
                    )
                try:
                    region = mem.add_fd(
                        fd,
                        r.mmap_offset,
                        r.memory_size,
                        r.guest_phys_addr,
                        uaddr=r.userspace_addr or None,
                        name=f"region{i}",
                    )
                except (OSError, ValueError) as exc:
                    raise InvalidRequest(f"memory region {i}: {exc}") from None
                if kind == "file":
                    files.fds.append((os.dup(fd), r.mmap_offset + r.memory_size))
                    files.tokens.append(sigbus.guard().watch(region.buf, region.size, files))
        except BaseException:
            files.close()
            mem.close()
            raise
        return mem, (files if files.fds else None)

    # -- features -------------------------------------------------------------------------
    def _get_features(self, session: Session, msg: Message) -> int:
        return int(wire.ALL_FEATURES)

    def _set_features(self, session: Session, msg: Message) -> None:
        features = msg.body.features
        unknown = features & ~int(wire.ALL_FEATURES)
        if unknown:
            raise InvalidRequest(f"features 0x{unknown:x} not offered")
        session.features = features

    # -- VMs ------------------------------------------------------------------------------
    def _register_vm(self, session: Session, msg: Message) -> dict[str, int]:
        body = msg.body
        if body.flags:
            raise InvalidRequest(f"REGISTER_VM flags 0x{body.flags:x} are reserved")
        if not body.regions:
            raise InvalidRequest(f"VM {body.name!r} has no memory regions")
        mem, files = self._map_memory(body.regions, msg.fds)
        try:
            vm = self.host.add_vm(body.name, mem)
        except BaseException:
            if files is not None:
                files.close()
            mem.close()
            raise
        return {"vm": self._add_entry(session, vm, mem, files).id}

    def _unregister_vm(self, session: Session, msg: Message) -> None:
        entry = self._owned(session, msg.body.vm, touch=False)  # also a VM whose memory shrank
        self._release(entry.id, "unregistered")

    def _open_vm(self, session: Session, msg: Message) -> dict[str, int]:
        entry = self._by_name.get(msg.body.name)
        if entry is None:
            raise NotFound(f"no VM named {msg.body.name!r}")
        return {"vm": self._visible(session, entry.id).id}

    def _attach_device(self, session: Session, msg: Message) -> None:
        b = msg.body
        try:
            assign = wire.Assign(b.assign).word
        except ValueError:
            raise InvalidRequest(
                f"assign {b.assign} is neither vfio-pci (0) nor mdev (1)"
            ) from None
        self.host.attach_device(self._owned(session, b.vm).name, b.rid, b.function, assign)  # type: ignore[arg-type]

    def _detach_device(self, session: Session, msg: Message) -> None:
        self.host.detach_device(self._owned(session, msg.body.vm).name, msg.body.rid)

    # -- guest-side notifications -----------------------------------------------------------
    def _set_root_table(self, session: Session, msg: Message) -> None:
        self.host.set_rtaddr(self._owned(session, msg.body.vm).name, msg.body.rtaddr)

    def _pasid_entry(self, session: Session, msg: Message) -> dict[str, int]:
        b = msg.body
        binding = self.host.sync_pasid(self._owned(session, b.vm).name, b.rid, b.vpasid)
        if binding is None:
            return {"bound": 0, "space": wire.Space.NONE, "ppasid": 0}
        return {"bound": 1, "space": _SPACE[binding.space], "ppasid": binding.ppasid}

    def _invalidate(self, session: Session, msg: Message) -> dict[str, int]:
        entry = self._owned(session, msg.body.vm)
        return {"changes": self._apply_invalidation(entry, msg.body.desc)}

    def _apply_invalidation(self, entry: VmEntry, desc: bytes) -> int:
        """One guest invalidation descriptor (VT-d §6.5.2.x) → binds, unbinds, cache drops,
        through the model's one decoder and dispatcher (:mod:`vioasid.model.iq`)."""
        d = iq.decode(_DESC_S.unpack_from(desc))
        if d.error:
            raise InvalidRequest(d.error)
        return iq.dispatch(d, _Resync(self, entry))

    def _page_response(self, entry: VmEntry, desc: bytes) -> int:
        """The guest answered a page request: pass it to the page-request subscribers (the
        device back-ends). Returns how many got it."""
        data = encode_event(Request.PAGE_RESPONSE_EVENT, {"vm": entry.id, "desc": desc})
        takers = [s for s, m in entry.subscribers.items() if m & EventMask.PAGE_REQUESTS]
        for s in takers:
            self._event(s, data)
        return len(takers)

    def _guest_did(self, vm: VM, rid: int, vpasid: int) -> int | None:
        """The DID of the guest's present PASID entry, or None (missing or unreadable)."""
        try:
            words = vm.tables.pasid_entry(vm.tables.context(vm.rtaddr, rid), rid, vpasid)
        except VioasidError:
            return None
        return _DID.get(words[1])

    def _resync(
        self, entry: VmEntry, did: int | None, vpasid: int | None, only_rid: int | None = None
    ) -> int:
        """Re-read the guest entries a PASID-cache / context-cache invalidation covers: the
        bound (device, vPASID)s it names, and for a PASID-selective one every device whose
        guest entry for that vPASID is present under the DID (a new binding)."""
        vm = self._model(entry)
        work: list[tuple[int, int]] = []
        for rid, dev in sorted(vm.devices.items()):
            if only_rid is not None and rid != only_rid:
                continue
            if vpasid is not None:
                gdid = self._guest_did(vm, rid, vpasid)
                if vpasid in dev.ppasids or (gdid is not None and gdid == did):
                    work.append((rid, vpasid))
                continue
            for x in sorted(dev.ppasids):
                gdid = self._guest_did(vm, rid, x)
                if did is None or gdid is None or gdid == did:
                    work.append((rid, x))
        for rid, x in work:
            self.host.sync_pasid(entry.name, rid, x)
        return len(work)

    # -- device side ----------------------------------------------------------------------
    def _dma(self, session: Session, msg: Message) -> bytes | bytearray:
        batch = msg.body
        return self._dma_frame(session, batch.vm, batch.count, batch.entries)

    def handle_dma(
        self, session: Session, flags: int, vm_id: int, count: int, entries: Raw
    ) -> bytes | bytearray | None:
        """The hot path's :meth:`handle` for one ``DMA`` request the codec framed and checked
        (:meth:`Codec.take_dma`): the reply frame to send, or None when the request was
        refused (the error reply, if any, is then in the session's outbox, as with
        :meth:`handle`). ``entries`` is only read during the call."""
        try:
            entry = self.vms.get(vm_id)
            if entry is None or entry.owner is not session or entry.files:
                entry = self._visible(session, vm_id)
            if count == 1:  # _dma_frame without its frame: this is the round-trip path
                reply = self._dma_one(entry, entries) or self._dma_batch(entry, 1, entries)
            else:
                reply = self._dma_batch(entry, count, entries)
            if RESCUED:
                _after_rescue(self.vms)
            return reply
        except VioasidError as exc:
            msg = Message(_DMA_REQ, flags)
            self._refuse(session, msg, ErrorCode.from_kind(exc.kind), exc.message)
        except Exception as exc:
            log.exception("%s: DMA failed", session)
            msg = Message(_DMA_REQ, flags)
            self._refuse(session, msg, ErrorCode.INTERNAL, f"internal error: {exc!r}")
        return None

    def _dma_one(self, entry: VmEntry, entries: Raw) -> bytes | bytearray | None:
        """One request in the guest's terms: with a cached translation the whole reply frame
        is one pack. None: a by-tag request or no route, for the general loop."""
        rid, flags, pasid, addr = _DMA_ENTRY_UNPACK(entries)
        if flags & _F_BY_TAG:
            return None
        route = _route(entry.model, rid, pasid)
        if route is None:
            return None
        function, tag = route
        write = flags & _F_WRITE
        hpa = self.host.dma_fast(function, tag, addr, write)
        base, top = entry.host_range
        if type(hpa) is not int or not base <= hpa < top:  # the full path decides
            out = _reply_frame(1)
            self._dma_slow(
                entry, entry.model, out, _DMA_REPLY_HEAD, rid, flags, pasid, addr, bool(write)
            )
            if entry.subscribers:
                self._deliver(entry)
            return out
        if entry.subscribers:
            self._deliver(entry)
        perm = _PERM_R | _PERM_W if write else _PERM_R
        return _DMA_ONE_REPLY(  # header, status 0, count 1, the result
            _DMA_REQ, _REPLY_FLAGS, _ONE_SIZE, 0, 1,
            _OK, 0, perm, tag, hpa - base, hpa,
        )  # fmt: skip

    def _dma_frame(
        self, session: Session, vm_id: int, count: int, entries: Raw
    ) -> bytes | bytearray:
        """Batched device requests: the hot path (cached translations never leave the daemon;
        faults and errors take the engine's full path so the guest sees them). Returns the
        whole reply frame."""
        entry = self._visible(session, vm_id)
        if count == 1:
            return self._dma_one(entry, entries) or self._dma_batch(entry, 1, entries)
        return self._dma_batch(entry, count, entries)

    def _dma_batch(self, entry: VmEntry, count: int, entries: Raw) -> bytearray:
        """The general loop: every entry, faults and errors included."""
        out = _reply_frame(count)
        self._dma_range(entry, entries, out, 0, count)
        if entry.subscribers:
            self._deliver(entry)
        return out

    # A big batch is translated a slice at a time (Connection interleaves other clients):
    def start_dma(
        self, session: Session, flags: int, vm_id: int, count: int, entries: Raw
    ) -> DmaJob | None:
        """A ``DMA`` request to be translated in slices (:meth:`step_dma`); None when it is
        refused (the error reply is then queued)."""
        try:
            entry = self._visible(session, vm_id)
        except VioasidError as exc:
            self._refuse(
                session, Message(_DMA_REQ, flags), ErrorCode.from_kind(exc.kind), exc.message
            )
            return None
        return DmaJob(session, entry, count, bytes(entries), _reply_frame(count))

    def step_dma(self, job: DmaJob, deadline: float) -> bool:
        """Translate more entries of ``job`` until ``deadline`` (``time.perf_counter``) or
        the end; True when it is finished (its reply queued).
        Entries of a VM released meanwhile come back as ``not-found`` errors."""
        entry = job.entry
        if self.vms.get(entry.id) is not entry:
            for i in range(job.done, job.count):
                _DMA_RESULT.pack_into(
                    job.out, _DMA_REPLY_HEAD + i * _DMA_RESULT.size,
                    DmaStatus.ERROR, ErrorCode.NOT_FOUND, 0, 0, 0, 0,
                )  # fmt: skip
            job.done = job.count
        try:
            if job.done < job.count:
                job.done = self._dma_range(
                    entry, job.entries, job.out, job.done, job.count, deadline
                )
            if RESCUED:
                _after_rescue(self.vms)
        except VioasidError as exc:
            msg = Message(_DMA_REQ, wire.VERSION)
            self._refuse(job.session, msg, ErrorCode.from_kind(exc.kind), exc.message)
            return True
        except Exception as exc:  # a daemon bug: this request fails, the daemon goes on
            log.exception("%s: DMA failed", job.session)
            msg = Message(_DMA_REQ, wire.VERSION)
            self._refuse(job.session, msg, ErrorCode.INTERNAL, f"internal error: {exc!r}")
            return True
        if job.done < job.count:
            return False
        if entry.subscribers and self.vms.get(entry.id) is entry:
            self._deliver(entry)
        self._out(job.session, job.out)
        return True

    def _dma_range(
        self,
        entry: VmEntry,
        entries: Raw,
        out: bytearray,
        start: int,
        stop: int,
        deadline: float | None = None,
    ) -> int:
        """Entries ``[start, stop)`` of a batch into their slots of the reply frame ``out``;
        with a ``deadline``, stops once past it (looking at the clock after every entry that
        took the slow path and every 64 that did not). Returns where it stopped."""
        vm = entry.model
        host = self.host
        pack = _DMA_RESULT.pack_into
        fast = host.dma_fast  # (function, tag, addr, write) -> host address | Fault
        base, top = entry.host_range
        size = _DMA_RESULT.size
        off = _DMA_REPLY_HEAD + start * size
        esize = wire.DMA_ENTRY_S.size
        key = -1  # (rid, pasid) of the previous entry: batches repeat them, look up once
        route: tuple[int, int] | None = None  # (host function, tag) for key
        view = memoryview(entries)[start * esize : stop * esize]
        i = start
        for rid, flags, pasid, addr in wire.DMA_ENTRY_S.iter_unpack(view):
            i += 1
            write = flags & _F_WRITE
            if not flags & _F_BY_TAG:
                if (rid << 32 | pasid) != key:
                    key = rid << 32 | pasid
                    route = _route(vm, rid, pasid)
                if route is not None:
                    hpa = fast(route[0], route[1], addr, write)
                    if type(hpa) is int and base <= hpa < top:
                        pack(out, off, 0, 0, 3 if write else 1, route[1], hpa - base, hpa)
                        off += size
                        if deadline is not None and not i & 63 and _clock() >= deadline:
                            return i
                        continue
            self._dma_slow(entry, vm, out, off, rid, flags, pasid, addr, bool(write))
            off += size
            if deadline is not None and _clock() >= deadline:
                return i
        return stop

    def _dma_slow(
        self,
        entry: VmEntry,
        vm: VM,
        out: bytearray,
        off: int,
        rid: int,
        flags: int,
        pasid: int,
        addr: int,
        write: bool,
    ) -> None:
        host = self.host
        try:
            if flags & DmaFlag.BY_TAG:
                if not host.tag_belongs_to(vm.name, rid, pasid):
                    raise NotFound(
                        f"tag {pasid} on {bdf_str(rid)} is not a binding of VM {vm.name}"
                    )
                res = host.dma_tag(rid, pasid, addr, write=write)
            else:
                res = host.dma(entry.name, rid, pasid, addr, write=write)
        except VioasidError as exc:
            code = ErrorCode.from_kind(exc.kind)
            _DMA_RESULT.pack_into(out, off, DmaStatus.ERROR, code, 0, 0, addr, 0)
            return
        f = res.fault
        if f is None:
            assert res.hpa is not None and res.gpa is not None
            if not entry.host_range[0] <= res.hpa < entry.host_range[1]:  # never another VM's
                _DMA_RESULT.pack_into(out, off, DmaStatus.ERROR, ErrorCode.NOT_FOUND, 0, 0, addr, 0)
                return
            perm = _PERM_R | (_PERM_W if write else 0)
            _DMA_RESULT.pack_into(out, off, DmaStatus.OK, 0, perm, res.tag or 0, res.gpa, res.hpa)
            return
        status = DmaStatus.FAULT
        if flags & DmaFlag.PAGE_REQUEST and f.reason in _PAGE_REQUEST_REASONS and f.pasid:
            host.fault_to_page_request(entry.name, f, write=write)
            status = DmaStatus.PAGE_REQUEST
        _DMA_RESULT.pack_into(out, off, status, int(f.reason), 0, f.pasid or 0, addr, 0)

    def _enqcmd(self, session: Session, msg: Message) -> dict[str, int]:
        b = msg.body
        return {"ppasid": self.host.enqcmd(self._visible(session, b.vm).name, b.rid, b.vpasid)}

    # -- events ---------------------------------------------------------------------------
    def _subscribe(self, session: Session, msg: Message) -> None:
        entry = self._owned(session, msg.body.vm)
        mask = msg.body.events
        if mask & ~int(EventMask.FAULTS | EventMask.PAGE_REQUESTS):
            raise InvalidRequest(f"event mask 0x{mask:x} has undefined bits")
        if mask:
            entry.subscribers[session] = mask
        else:
            entry.subscribers.pop(session, None)
        self._deliver(entry)

    def _deliver(self, entry: VmEntry) -> None:
        """Push the VM's queued faults / page requests to its subscribers; what was delivered
        leaves the queue (what nobody took stays queued, bounded, and migrates)."""
        if not entry.subscribers:
            return
        vm = self._model(entry)
        if vm.faults:
            takers = [s for s, m in entry.subscribers.items() if m & EventMask.FAULTS]
            if takers:
                for f in self.host.drain_faults(entry.name):
                    data = self._fault_event(entry.id, f)
                    for s in takers:
                        self._event(s, data)
        if vm.page_requests:
            takers = [s for s, m in entry.subscribers.items() if m & EventMask.PAGE_REQUESTS]
            if takers:
                for desc in self.host.drain_page_requests(entry.name):
                    data = encode_event(Request.PAGE_REQUEST_EVENT, {"vm": entry.id, "desc": desc})
                    for s in takers:
                        self._event(s, data)

    @staticmethod
    def _fault_event(vm_id: int, f: Fault) -> bytes:
        """A whole ``FAULT_EVENT`` frame, packed with the structs derived from its layouts
        (one per fault of a flood: construct's build costs ~100x more)."""
        flags = (wire.FAULT_PASID_PRESENT if f.pasid is not None else 0) | (
            wire.FAULT_WRITE if f.write else 0
        )
        qw1 = (
            _FR_SID.put(f.sid) | _FR_PP.put(f.pasid is not None) | _FR_FR.put(int(f.reason))
            | _FR_PV.put(f.pasid or 0) | _FR_T.put(not f.write) | _FR_F.put(1)
        )  # fmt: skip
        record = _RECORD_PACK(f.addr & _FR_FI.mask, qw1)
        return _FAULT_FRAME(
            _FAULT_REQ, wire.VERSION, _FAULT_SIZE,
            vm_id, f.sid, int(f.reason), flags, f.pasid or 0, f.addr & _U64, record,
        )  # fmt: skip

    # -- state ----------------------------------------------------------------------------
    def _dump(self, session: Session, msg: Message) -> dict[str, Any]:
        """One page of the document: offset 0 renders it (what this connection may read) and
        keeps it for the later pages, so a document of any size arrives whole and
        consistent, in replies of at most ``wire.DUMP_PAGE`` bytes."""
        b = msg.body
        if b.offset == 0:
            name = None if b.vm == wire.ALL_VMS else self._visible(session, b.vm).name
            session.dump = json.dumps(self.dump(name, viewer=session), sort_keys=True).encode()
        data = session.dump
        if data is None or b.offset >= len(data):
            raise InvalidRequest(f"DUMP offset {b.offset}: no document is being paged there")
        page = data[b.offset : b.offset + wire.DUMP_PAGE]
        if b.offset + len(page) >= len(data):
            session.dump = None
        return {"total": len(data), "json": page}

    def dump(self, name: str | None = None, *, viewer: Session | None = None) -> dict[str, Any]:
        """The engine's dump plus the daemon's view: VM ids, owners, subscribers, sessions, and
        the allocators' and host tables' occupancy (what a released VM must leave empty).
        With ``viewer``, only the VMs that connection may read are listed."""
        host = self.host
        doc = host.dump(name)
        if viewer is not None:
            for entry in self.vms.values():
                if not _may_read(viewer, entry):
                    doc["vms"].pop(entry.name, None)
        dropped = {str(s.id): s.events_dropped for s in self.sessions.values() if s.events_dropped}
        if dropped:
            doc["events_dropped"] = dropped
        doc["events_dropped_total"] = self.events_dropped
        for entry in self.vms.values():
            v = doc["vms"].get(entry.name)
            if v is not None:
                v["id"] = entry.id
                v["owner"] = entry.owner.id
                v["subscribers"] = sorted(s.id for s in entry.subscribers)
                v["memory"] = [
                    {"gpa": hex(r.gpa), "size": hex(r.size)} for r in entry.memory.regions
                ]
        for key, report in self.reports.items():
            doc[key] = [e for e in report() if e.get("vm") in doc["vms"]]
        doc["sessions"] = sorted(self.sessions)
        doc["allocators"] = {
            "global": sorted(host.global_alloc.used()),
            "domain_ids": sorted(host.did_alloc.used()),
            "functions": {
                fn.bdf: {
                    "per_rid": sorted(fn.allocator.used()),
                    "host_entries": sorted(host.iommu.present_entries(rid)),
                }
                for rid, fn in sorted(host.functions.items())
            },
            "cpu_tables": {n: len(v.cpu_table) for n, v in sorted(host.vms.items())},
        }
        return doc

    # -- migration ------------------------------------------------------------------------
    def _export_vm(self, session: Session, msg: Message) -> dict[str, bytes]:
        return {"stream": export_vm(self.host, self._visible(session, msg.body.vm).name)}

    def _import_vm(self, session: Session, msg: Message) -> dict[str, Any]:
        b = msg.body
        functions = {m.rid: m.function for m in b.map}
        if len(functions) != len(b.map):
            raise InvalidRequest("function map names a guest device twice")
        if not functions:  # default: the same function RIDs as on the source
            functions = {d.guest_rid: d.function for d in decode_stream(b.stream).devices}
        mem, files = self._map_memory(b.regions, msg.fds)
        try:
            vm = import_vm(self.host, b.stream, mem, functions, name=b.name or None)
        except BaseException:
            if files is not None:
                files.close()
            mem.close()
            raise
        entry = self._add_entry(session, vm, mem, files)
        # the reply's packed BINDING array, one struct pack per binding (no construct per record)
        pack = _BINDING_PACK
        records: list[bytes] = []
        for dev in sorted(vm.devices.values(), key=lambda d: d.guest_rid):
            rid, space = dev.guest_rid, int(_SPACE[dev.rule.space])
            records += [pack(rid, space, x, pp) for x, pp in sorted(dev.ppasids.items())]
        return {"vm": entry.id, "count": len(records), "bindings": b"".join(records)}
