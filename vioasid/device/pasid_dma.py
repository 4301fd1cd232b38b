"""The PASID DMA function (docs/pasid-dma.md): registers, portal, copy/fill/compare/batch.

:class:`PasidDmaFunction` is one device model on top of the reusable vfio-user
:class:`~vioasid.vfio_user.function.PciFunction`. It owns BAR0's registers and the 64-byte
portal; everything else (config space, MSI, DMA_MAP bookkeeping, the protocol) is the base's.

Every byte the function reads or writes in guest memory goes through the engine
(:class:`vioasid.model.engine.Host`): ``Host.dma(vm, guest_rid, vpasid, addr, write=,
supervisor=)`` for the dedicated, translating and mdev types (the engine applies the type's
pPASID and tag, the host table, the nested walk of the guest's first stage and the VM's second
stage), and for the enqcmd type ``Host.enqcmd()`` (the VM's CPU PASID translation table, as
ENQCMD would) followed by ``Host.dma_tag()`` with that tag. A translation yields a
guest-physical address; only then is guest RAM touched, one page at a time, so no byte the
guest did not map for that PASID with that permission is ever reached.

Binding is mediated: ``BIND_CMD = 1`` reads the guest's PASID entry through ``Host.bind()``;
the engine's refusals become ``BIND_STATUS`` codes (``BIND_INFO`` = the pPASID in the way).

How the function tags a request is its personality (the issue's seed types), and the engine
sees it so (:class:`~vioasid.device.translator.EngineResolver`): a *dedicated* function puts the
guest's vPASID on the wire (vPASID == pPASID) and a *translating* one the pPASID of its own
vPASID -> pPASID table, which the host programs at bind (``self.bound``), both arriving as
``Host.dma_tag(function, tag)``; an *mdev* slice's requests are converted by its parent's host
driver (``Host.dma``); an *enqcmd* portal's tag is the CPU PASID table's (``Host.enqcmd``).

Coherence: QEMU forwards no invalidation to a vfio-user server, and a strict-mode guest reuses
IOVAs within a millisecond. So at every doorbell, before the job runs, the function drops the
engine's cached state for this device (the context cache, the nested IOTLB via
``Host.invalidate(vm, guest_rid=...)``) and re-reads the guest's PASID entry of the PASID it is
about to use (``Host.sync_pasid``). Its own device TLB (:mod:`vioasid.device.pasid_tlb`) keeps
the engine's translations across doorbells, each checked against the guest's paging entries it
came from before a job uses it (a changed entry drops it), so repeated jobs over the same
buffers do not walk again. QEMU's vfio-user messages of one function are handled
strictly in order: a job sees the guest's tables as they were at its doorbell or later, and is
done before any later access of the driver to the function is answered (the driver reads
``PORTAL_STATUS`` right after submitting, and does not change a job's mappings before its
completion, as with any DMA engine).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from vioasid.device.pasid_tlb import PasidTlb
from vioasid.device.translator import EngineResolver, Resolved
from vioasid.formats import pasid_dma as pd
from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import PGTT_SECOND_STAGE
from vioasid.formats.pasid_dma import (
    BindStatus,
    CompletionStatus,
    FunctionType,
    Opcode,
    PortalStatus,
    Reg,
)
from vioasid.model.engine import Host
from vioasid.model.errors import Exhausted, InvalidRequest, NotFound, PasidConflict, VioasidError
from vioasid.model.faults import Fault, bdf_str
from vioasid.model.memory import MemoryAccessError
from vioasid.vfio_user.function import Bar, Identity, PciFunction

log = logging.getLogger(__name__)

PAGE = 4096
_DESC = pd.DESCRIPTOR.packer
_CR = pd.COMPLETION_RECORD.packer
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_REG_END = 0x100
_PORTAL_END = pd.PORTAL_OFFSET + pd.PORTAL_SIZE


class _JobFault(Exception):
    def __init__(self, fault: Fault, done: int) -> None:
        super().__init__(fault.name)
        self.fault = fault
        self.done = done


@dataclass
class Job:
    """What one descriptor did (statistics, ``--json`` and tests)."""

    opcode: int
    vpasid: int
    status: int
    size: int
    bytes_done: int
    fault: Fault | None = None


class PasidDmaFunction(PciFunction):
    """The PASID DMA device model. The engine device ``guest_rid`` must be attached already."""

    def __init__(
        self,
        host: Host,
        vm: str,
        guest_rid: int,
        ftype: FunctionType,
        *,
        name: str | None = None,
        ats: bool = False,
        pri: bool = False,
        width: int | None = None,
    ) -> None:
        """``width``: the PASID width the guest sees (default the host function's; an mdev
        slice may show a wider virtual PASID space than its parent's table holds)."""
        self.host = host
        self.vm = vm
        self.guest_rid = guest_rid
        self.ftype = FunctionType(ftype)
        dev = host.vm(vm).devices[guest_rid]
        self.engine_device = dev
        self.function_rid = dev.function.rid
        self.width = width if width is not None else dev.function.pasid_bits
        super().__init__(
            Identity(
                vendor_id=pd.VENDOR_ID,
                device_id=pd.DEVICE_ID,
                class_code=pd.CLASS_CODE,
                revision=pd.REVISION,
                subsystem_vendor_id=pd.VENDOR_ID,
                subsystem_id=int(self.ftype),
            ),
            (Bar(0, pd.BAR0_SIZE, is64=True),),
            name=name or f"pasid-dma {bdf_str(guest_rid)}",
            pasid_width=self.width,
            ats=ats,
            pri=pri,
        )
        self.bound: dict[int, int] = {}  # vPASID -> pPASID (the tag on the wire)
        self.jobs: list[Job] = []
        self.max_jobs_kept = 10_000
        self.jobs_ok = 0
        self.jobs_failed = 0
        self.faults: list[Fault] = []
        self.doorbells = 0
        self.busy_s = 0.0  # wall time spent running submitted descriptors
        self.bytes_moved = 0  # bytes copied / filled / compared by successful jobs
        self.bind_log: list[dict[str, Any]] = []
        # guest page frames the function wrote while set (a live migration: QEMU does not see
        # these writes, so vioasid sends the pages itself; qemu_glue.migration.pasid)
        self.dirty: set[int] | None = None
        self._enq_tag: int | None = None  # the current ENQCMD job's tag (CPU PASID table)
        tag_of = {
            FunctionType.DEDICATED: lambda x: x,
            FunctionType.TRANSLATING: self.bound.get,
            FunctionType.MDEV: None,
            FunctionType.ENQCMD: lambda x: self._enq_tag,
        }[self.ftype]
        self.resolvers = {
            priv: EngineResolver(host, vm, guest_rid, tag_of=tag_of, supervisor=priv)
            for priv in (False, True)
        }
        self.tlb = PasidTlb(host.vm(vm).memory)
        self._reset_regs()

    # -- registers ----------------------------------------------------------------------------
    def _reset_regs(self) -> None:
        self.ctrl = 0
        self.intr_status = 0
        self.portal_status = 0
        self.bind_pasid = 0
        self.bind_status = 0
        self.bind_info = 0
        self.err_status = 0
        self.err_pasid = 0
        self.err_addr = 0
        self.err_reason = 0
        self.portal = bytearray(pd.PORTAL_SIZE)

    @property
    def caps(self) -> int:
        c = (self.width & pd.CAPS_PASID_WIDTH_MASK) | pd.CAPS_BATCH
        if self.ftype is FunctionType.ENQCMD:
            c |= pd.CAPS_SWQ
        return c

    def _regs(self) -> bytearray:
        r = bytearray(_REG_END)
        vals: dict[Reg, int] = {
            Reg.ID: pd.ID_VALUE,
            Reg.VERSION: pd.VERSION_VALUE,
            Reg.TYPE: int(self.ftype),
            Reg.CAPS: self.caps,
            Reg.MAX_XFER: pd.MAX_XFER,
            Reg.MAX_BATCH: pd.MAX_BATCH,
            Reg.CTRL: self.ctrl,
            Reg.STATUS: pd.STATUS_ENABLED if self.ctrl & pd.CTRL_ENABLE else 0,
            Reg.INTR_STATUS: self.intr_status,
            Reg.PORTAL_STATUS: self.portal_status,
            Reg.BIND_PASID: self.bind_pasid,
            Reg.BIND_CMD: 0,
            Reg.BIND_STATUS: self.bind_status,
            Reg.BIND_INFO: self.bind_info,
            Reg.BOUND_COUNT: len(self.bound),
            Reg.ERR_STATUS: self.err_status,
            Reg.ERR_PASID: self.err_pasid,
            Reg.ERR_ADDR: self.err_addr,
            Reg.ERR_REASON: self.err_reason,
        }
        for reg, v in vals.items():
            if pd.REG_SIZE[reg] == 8:
                _U64.pack_into(r, reg, v)
            else:
                _U32.pack_into(r, reg, v)
        return r

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        if index != 0 or offset >= _REG_END:
            return bytes(count)  # the portal and the rest of BAR0 read as 0
        end = min(offset + count, _REG_END)
        return bytes(self._regs()[offset:end]) + bytes(count - (end - offset))

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0:
            return
        end = offset + len(data)
        if offset < _PORTAL_END and end > pd.PORTAL_OFFSET:
            lo = max(offset, pd.PORTAL_OFFSET)
            hi = min(end, _PORTAL_END)
            self.portal[lo - pd.PORTAL_OFFSET : hi - pd.PORTAL_OFFSET] = data[
                lo - offset : hi - offset
            ]
            if lo <= pd.PORTAL_SUBMIT_QWORD < hi:
                self.doorbells += 1
                self.submit(bytes(self.portal))
            return
        for reg in Reg:
            size = pd.REG_SIZE[reg]
            if offset <= reg and reg + size <= end:
                raw = data[reg - offset : reg - offset + size]
                self._write_reg(reg, int.from_bytes(raw, "little"))

    def _write_reg(self, reg: Reg, v: int) -> None:
        if reg is Reg.CTRL:
            if v & pd.CTRL_RESET:
                self.reset_device()
            else:
                self.ctrl = v & (pd.CTRL_ENABLE | pd.CTRL_INTR_ENABLE)
        elif reg is Reg.INTR_STATUS:
            self.intr_status &= ~v
        elif reg is Reg.ERR_STATUS:
            self.err_status &= ~v
        elif reg is Reg.BIND_PASID:
            self.bind_pasid = v
        elif reg is Reg.BIND_CMD:
            self.bind_command(v, self.bind_pasid)
        # every other register is read-only: the write is ignored

    # -- bind / unbind (mediated) ----------------------------------------------------------------
    def bind_command(self, cmd: int, pasid: int) -> BindStatus:
        """Execute ``BIND_CMD`` for ``pasid``; sets BIND_STATUS / BIND_INFO and returns it."""
        self.bind_info = 0
        try:
            st = self._bind_command(cmd, pasid)
        except Exception:
            log.exception("%s: bind command %d for PASID %d failed", self.name, cmd, pasid)
            st = BindStatus.INTERNAL
        self.bind_status = int(st)
        if len(self.bind_log) < self.max_jobs_kept:
            entry: dict[str, Any] = {
                "device": bdf_str(self.guest_rid),
                "type": self.ftype.word,
                "cmd": "bind" if cmd == pd.BindCmd.BIND else "unbind" if cmd == 2 else cmd,
                "vpasid": pasid,
                "status": st.word,
            }
            if st is BindStatus.OK and cmd == pd.BindCmd.BIND:
                entry["ppasid"] = entry["tag"] = self.bound[pasid]
            if st is BindStatus.PASID_CONFLICT:
                entry["in_the_way"] = self.bind_info
            self.bind_log.append(entry)
        return st

    def _bind_command(self, cmd: int, p: int) -> BindStatus:
        if cmd not in (pd.BindCmd.BIND, pd.BindCmd.UNBIND) or not 1 <= p < 1 << self.width:
            return BindStatus.INVALID
        if cmd == pd.BindCmd.UNBIND:
            if p not in self.bound:
                return BindStatus.NOT_BOUND
            del self.bound[p]
            self.tlb.drop_pasid(p)
            # NotFound: the engine already dropped it (the guest cleared its entry)
            with contextlib.suppress(NotFound):
                self.host.unbind(self.vm, self.guest_rid, p)
            log.info("%s: unbound PASID %d", self.name, p)
            return BindStatus.OK
        try:
            self.host.invalidate_context(self.vm, self.guest_rid)
            b = self.host.bind(self.vm, self.guest_rid, p)
        except Exhausted as e:
            log.info("%s: bind PASID %d refused: %s", self.name, p, e)
            return BindStatus.EXHAUSTED
        except PasidConflict as e:
            log.info("%s: bind PASID %d refused: %s", self.name, p, e)
            self.bind_info = max(e.ppasid, 0)
            return BindStatus.PASID_CONFLICT
        except (NotFound, InvalidRequest) as e:
            log.info("%s: bind PASID %d refused: %s", self.name, p, e)
            return BindStatus.NOT_PRESENT
        except VioasidError as e:
            log.warning("%s: bind PASID %d failed: %s", self.name, p, e)
            return BindStatus.INTERNAL
        self.bound[p] = b.ppasid
        log.info("%s: bound vPASID %d -> pPASID %d", self.name, p, b.ppasid)
        return BindStatus.OK

    def unbind_all(self) -> None:
        for p in sorted(self.bound):
            with contextlib.suppress(VioasidError):
                self.host.unbind(self.vm, self.guest_rid, p)
        self.bound.clear()
        self.tlb.clear()

    def bindings(self) -> list[dict[str, Any]]:
        return [
            {
                "device": bdf_str(self.guest_rid),
                "type": self.ftype.word,
                "vpasid": x,
                "ppasid": pp,
                "tag": pp,
            }
            for x, pp in sorted(self.bound.items())
        ]

    # -- reset / lifetime / state ----------------------------------------------------------------
    def reset_device(self) -> None:
        self.unbind_all()
        self._reset_regs()

    def connection_lost(self) -> None:
        self.unbind_all()
        super().connection_lost()

    def device_state(self) -> dict[str, Any]:
        return {
            "ctrl": self.ctrl,
            "intr_status": self.intr_status,
            "err": [self.err_status, self.err_pasid, self.err_addr, self.err_reason],
            "bound": sorted(self.bound),
        }

    def load_device_state(self, state: dict[str, Any]) -> None:
        self.ctrl = int(state.get("ctrl", 0))
        self.intr_status = int(state.get("intr_status", 0))
        err = state.get("err", [0, 0, 0, 0])
        self.err_status, self.err_pasid, self.err_addr, self.err_reason = (int(x) for x in err)
        for p in state.get("bound", []):
            self.bind_command(pd.BindCmd.BIND, int(p))

    # -- live migration (vioasid.formats.pasid_migration; qemu_glue.migration.pasid) ----------
    def migration_state(self) -> dict[str, Any]:
        """This function's record of the PASID migration stream: registers, portal buffer,
        config space, bound vPASIDs (never a pPASID). Take it with the VM stopped."""
        return {
            "guest_rid": self.guest_rid,
            "type": int(self.ftype),
            "width": self.width,
            "ctrl": self.ctrl,
            "intr_status": self.intr_status,
            "portal_status": self.portal_status,
            "bind_pasid": self.bind_pasid,
            "bind_status": self.bind_status,
            "bind_info": self.bind_info,
            "err_status": self.err_status,
            "err_pasid": self.err_pasid,
            "err_addr": self.err_addr,
            "err_reason": self.err_reason,
            "portal": bytes(self.portal),
            "config": bytes(self.config.data),
            "vpasids": sorted(self.bound),
        }

    def adopt_engine_device(self) -> None:
        """The engine VM was (re-)created (a migration import): follow its device and take
        the bindings the engine made (vPASID -> pPASID under this host's policy)."""
        dev = self.host.vm(self.vm).devices[self.guest_rid]
        self.engine_device = dev
        self.function_rid = dev.function.rid
        self.bound.clear()  # in place: the resolvers' tag lookup holds this dict
        self.bound.update(dev.ppasids)
        self.tlb.clear()  # nothing cached for the VM this function served before

    def load_migration_state(self, st: Any, *, config: bool = True) -> None:
        """Registers (and the config space) of a source function's record; the bindings come
        from the engine import (:meth:`adopt_engine_device`), which the caller ran first.
        Raises ValueError when the record is not for a function like this one."""
        if int(st.type) != int(self.ftype) or int(st.width) != self.width:
            raise ValueError(
                f"{self.name}: source function is type {int(st.type)} width {int(st.width)}, "
                f"this one type {int(self.ftype)} width {self.width}"
            )
        if len(st.config) != self.config.size or len(st.portal) != pd.PORTAL_SIZE:
            raise ValueError(f"{self.name}: config space / portal of the wrong size")
        self.adopt_engine_device()
        if set(self.bound) != set(st.vpasids):
            raise ValueError(
                f"{self.name}: engine holds vPASIDs {sorted(self.bound)}, the source function "
                f"{list(st.vpasids)}"
            )
        self.ctrl = int(st.ctrl) & (pd.CTRL_ENABLE | pd.CTRL_INTR_ENABLE)
        self.intr_status = int(st.intr_status)
        self.portal_status = int(st.portal_status)
        self.bind_pasid = int(st.bind_pasid)
        self.bind_status = int(st.bind_status)
        self.bind_info = int(st.bind_info)
        self.err_status = int(st.err_status)
        self.err_pasid = int(st.err_pasid)
        self.err_addr = int(st.err_addr)
        self.err_reason = int(st.err_reason)
        self.portal = bytearray(st.portal)
        if config:
            self.config.data[:] = st.config

    def stats(self) -> dict[str, Any]:
        return {
            "device": bdf_str(self.guest_rid),
            "type": self.ftype.word,
            "doorbells": self.doorbells,
            "busy_s": round(self.busy_s, 4),
            "bytes_moved": self.bytes_moved,
            "jobs": {"ok": self.jobs_ok, "failed": self.jobs_failed},
            "faults": len(self.faults),
            "tlb": self.tlb.stats.to_json(),
            "bindings": self.bindings(),
        }

    # -- the portal ---------------------------------------------------------------------------
    def submit(self, raw: bytes) -> PortalStatus:
        """One descriptor written to the portal: run it to completion. Sets PORTAL_STATUS."""
        t0 = time.perf_counter()
        try:
            st = self._submit(raw)
        except Exception:
            log.exception("%s: descriptor failed", self.name)
            st = PortalStatus.INVALID
        self.busy_s += time.perf_counter() - t0
        self.portal_status = int(st)
        return st

    def _submit(self, raw: bytes) -> PortalStatus:
        if not self.ctrl & pd.CTRL_ENABLE:
            return PortalStatus.NOT_ENABLED
        d = _DESC.unpack(raw)
        pasid_f = d[0]
        if pasid_f & pd.DESC_PASID_RESERVED:
            return PortalStatus.INVALID
        x = pasid_f & pd.DESC_PASID_MASK
        priv = bool(pasid_f & pd.DESC_PRIV)
        tag: int | None = None
        if self.ftype is FunctionType.ENQCMD:
            try:
                tag = self.host.enqcmd(self.vm, self.guest_rid, x)
            except VioasidError as e:
                log.info("%s: ENQCMD refused: %s", self.name, e)
                return PortalStatus.REFUSED
        elif not 1 <= x < 1 << self.width:
            return PortalStatus.INVALID
        self._enq_tag = tag
        entry = self._guest_entry(x) if x in self.bound else None
        self._refresh(x)
        self._begin_tlb(x, priv, tag, entry)
        ctx = _Ctx(self, x, priv)
        self._run(ctx, d, top=True)
        return PortalStatus.ACCEPTED

    def _guest_entry(self, x: int) -> tuple[Any, tuple[int, ...], Any] | None:
        """The guest's context entry, PASID entry words and their decoding for ``x``, read
        from guest RAM now (None: unusable, the engine decides each access)."""
        v = self.host.vm(self.vm)
        try:
            ctx = v.tables.context(v.rtaddr, self.guest_rid)
            words = v.tables.pasid_entry(ctx, self.guest_rid, x)
            return ctx, words, v.tables.reader.decode_pasid_entry(words, x)
        except Exception as e:
            log.debug("%s: PASID %d not cached: %r", self.name, x, e)
            return None

    def _begin_tlb(
        self, x: int, priv: bool, tag: int | None, entry: tuple[Any, tuple[int, ...], Any] | None
    ) -> None:
        """This job's space in the device TLB: what its translations are a function of: the
        guest's context and PASID entry (``entry``, read *before* the refresh gave the engine
        its host entry, so a rewrite in between changes the next job's signature), the tag and
        the VM's second stage. A PASID not bound here (or an ENQCMD tag that is not this
        binding's) is not cached."""
        pp = self.bound.get(x)
        v = self.host.vm(self.vm)
        if entry is None or pp is None or (tag is not None and tag != pp):
            self.tlb.begin(None, memory=v.memory)
            return
        ctx, words, pe = entry
        if pe.pgtt == PGTT_SECOND_STAGE:
            root, levels = pe.ssptptr, pe.aw + 2
        else:
            root, levels = pe.flptptr, 4 + pe.flpm
        sig = (ctx, words, pp, v.second_stage.root, v.hpa)
        self.tlb.begin((x, pp, priv), sig, pe.pgtt, root, levels, memory=v.memory)

    def _refresh(self, x: int) -> None:
        """Coherence at the doorbell: no cached translation of this device survives, and the
        guest's PASID entry of ``x`` is read again (module docstring)."""
        h, vm, rid = self.host, self.vm, self.guest_rid
        h.invalidate_context(vm, rid)
        if x in self.bound:
            try:
                b = h.sync_pasid(vm, rid, x)
            except VioasidError as e:
                log.info("%s: PASID %d entry no longer usable (%s): unbound", self.name, x, e)
                b = None
                with contextlib.suppress(VioasidError):
                    h.unbind(vm, rid, x)
            if b is None:
                self.bound.pop(x, None)
            else:
                self.bound[x] = b.ppasid
        h.invalidate(vm, guest_rid=rid)
        tag = self._enq_tag
        if tag is not None:  # an ENQCMD tag bound by another device of the function: its too
            own = h.tag_owner(self.function_rid, tag)
            if own is not None and (own[0].name, own[1].guest_rid) != (vm, rid):
                ov, odev, ox = own
                with contextlib.suppress(VioasidError):
                    h.invalidate_context(ov.name, odev.guest_rid)
                    h.sync_pasid(ov.name, odev.guest_rid, ox)
                with contextlib.suppress(VioasidError):
                    h.invalidate(ov.name, guest_rid=odev.guest_rid)

    def _run(self, ctx: _Ctx, d: tuple[int, ...], *, top: bool) -> int:
        """Run one descriptor; write its completion record if asked. Returns the status."""
        _pasid, opcode, flags, r0, comp, src, dst, size, r1, pattern, r2, r3 = d
        status = CompletionStatus.SUCCESS
        result = 0
        done = 0
        fault: Fault | None = None
        if (
            r0 or r1 or r2 or r3 or flags & ~pd.DESC_FLAGS_KNOWN
            or (flags & pd.DESC_FLAG_COMPLETION and comp % pd.COMPLETION_ALIGN)
        ):  # fmt: skip
            status = CompletionStatus.INVALID
        elif ctx.x not in self.bound and self.ftype is not FunctionType.ENQCMD:
            status = CompletionStatus.NOT_BOUND
        else:
            try:
                if opcode == Opcode.NOOP:
                    pass
                elif opcode == Opcode.BATCH:
                    if not top or size == 0:
                        status = CompletionStatus.INVALID
                    elif size > pd.MAX_BATCH:
                        status = CompletionStatus.TOO_BIG
                    else:
                        status, done = self._batch(ctx, src, size)
                elif opcode in (Opcode.COPY, Opcode.FILL, Opcode.COMPARE):
                    if size > pd.MAX_XFER:
                        status = CompletionStatus.TOO_BIG
                    elif opcode == Opcode.COPY:
                        done = ctx.copy(src, dst, size)
                    elif opcode == Opcode.FILL:
                        done = ctx.fill(dst, size, pattern)
                    else:
                        done, different = ctx.compare(src, dst, size)
                        result = int(different)
                else:
                    status = CompletionStatus.INVALID
            except _JobFault as e:
                status, fault, done = CompletionStatus.FAULT, e.fault, e.done
        self._account(Job(opcode, ctx.x, int(status), size, done, fault))
        if flags & pd.DESC_FLAG_COMPLETION:
            rec = _CR.pack(
                int(status),
                int(fault.reason) & 0xFF if fault else 0,
                pd.FAULT_FLAG_WRITE if fault and fault.write else 0,
                result,
                done & 0xFFFFFFFF,
                fault.addr if fault else 0,
                (fault.pasid or 0) if fault else 0,
            )
            try:
                ctx.write(comp, rec)
            except _JobFault as e:
                f = e.fault
                self.faults.append(f)
                self.err_status |= pd.ERR_RECORD_WRITE
                self.err_pasid = f.pasid if f.pasid is not None else ctx.x
                self.err_addr = f.addr
                self.err_reason = (int(f.reason) & 0xFF) | (pd.ERR_REASON_WRITE if f.write else 0)
        if flags & pd.DESC_FLAG_INTERRUPT:
            self.intr_status |= pd.INTR_COMPLETION
            if self.ctrl & pd.CTRL_INTR_ENABLE:
                self.raise_msi(0)
        return int(status)

    def _batch(self, ctx: _Ctx, array_iova: int, count: int) -> tuple[CompletionStatus, int]:
        ok = 0
        failed = False
        for i in range(count):
            try:
                raw = ctx.read(array_iova + i * pd.DESCRIPTOR_SIZE, pd.DESCRIPTOR_SIZE)
            except _JobFault as e:
                raise _JobFault(e.fault, ok) from None
            st = self._run(ctx, _DESC.unpack(raw), top=False)
            if st == CompletionStatus.SUCCESS:
                ok += 1
            else:
                failed = True
        return (CompletionStatus.BATCH_FAILED if failed else CompletionStatus.SUCCESS), ok

    def _account(self, job: Job) -> None:
        if job.status == CompletionStatus.SUCCESS:
            self.jobs_ok += 1
            if job.opcode != Opcode.BATCH:
                self.bytes_moved += job.bytes_done
        else:
            self.jobs_failed += 1
        if job.fault is not None:
            self.faults.append(job.fault)
            del self.faults[: -self.max_jobs_kept]
        self.jobs.append(job)
        del self.jobs[: -self.max_jobs_kept]


class _Ctx:
    """One descriptor's address space: (function, vPASID, privilege), page by page: the device
    TLB, else the engine through the function's resolver; every access checks the permission
    it needs."""

    __slots__ = ("fn", "mem", "priv", "resolve", "tlb", "x")

    def __init__(self, fn: PasidDmaFunction, x: int, priv: bool) -> None:
        self.fn = fn
        self.x = x
        self.priv = priv
        self.tlb = fn.tlb
        self.mem = fn.host.vm(fn.vm).memory
        resolver = fn.resolvers[priv]

        def resolve(iova: int, write: bool) -> Resolved | Fault:
            return resolver.resolve_now(iova, write, x)

        self.resolve = resolve

    def _gpa(self, addr: int, write: bool, done: int) -> int:
        """The guest-physical address of ``addr`` for the access (its page is guest RAM)."""
        page = self.tlb.lookup(addr >> 12, write)
        if page is None:
            r = self.tlb.fill(addr, write, self.priv, self.resolve)
            if isinstance(r, Fault):
                raise _JobFault(r, done)
            page = r.gpa
            if not self.mem.contains(page, PAGE):
                raise _JobFault(self._outside(addr, page, write), done)
        if write and self.fn.dirty is not None:  # a live migration: QEMU won't see this write
            self.fn.dirty.add(page >> 12)
        return page | (addr & (PAGE - 1))

    def _outside(self, addr: int, gpa: int, write: bool) -> Fault:
        fn = self.fn
        return Fault(FaultReason.ADDR_BEYOND_MGAW, addr, fn.guest_rid, self.x, write,
                     f"GPA {gpa:#x} is outside guest RAM")  # fmt: skip

    def _view(self, addr: int, n: int, write: bool, done: int) -> memoryview:
        gpa = self._gpa(addr, write, done)
        try:
            return self.mem.view(gpa, n)
        except MemoryAccessError:
            raise _JobFault(self._outside(addr, gpa, write), done) from None

    @staticmethod
    def _chunk(addr: int, left: int) -> int:
        return min(left, PAGE - (addr & (PAGE - 1)))

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            c = self._chunk(addr + len(out), n - len(out))
            out += self._view(addr + len(out), c, False, len(out))
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            c = self._chunk(addr + done, len(data) - done)
            self._view(addr + done, c, True, done)[:] = data[done : done + c]
            done += c

    def copy(self, src: int, dst: int, n: int) -> int:
        """Chunk by chunk (each within one page of both sides), source translated before
        destination as before; chunks contiguous on both sides in guest RAM are moved as one
        run, a pending run before a fault is moved before the fault is reported."""
        gpa, chunk = self._gpa, self._chunk
        done = 0
        rs = rd = run = 0  # the pending run: source and destination GPA, length
        try:
            while done < n:
                c = min(chunk(src + done, n - done), chunk(dst + done, n - done))
                s = gpa(src + done, False, done)
                d = gpa(dst + done, True, done)
                if run and s == rs + run and d == rd + run:
                    run += c
                else:
                    if run:
                        self._move(rd, rs, run, src + done - run, dst + done - run)
                    rs, rd, run = s, d, c
                done += c
        except _JobFault:
            if run:
                self._move(rd, rs, run, src + done - run, dst + done - run)
            raise
        if run:
            self._move(rd, rs, run, src + n - run, dst + n - run)
        return done

    def _move(self, rd: int, rs: int, n: int, src: int, dst: int) -> None:
        mem = self.mem
        try:
            mem.view(rd, n)[:] = mem.view(rs, n)
        except MemoryAccessError:  # contiguous GPAs over a region boundary: chunk by chunk
            off = 0
            while off < n:
                c = min(self._chunk(src + off, n - off), self._chunk(dst + off, n - off))
                mem.view(rd + off, c)[:] = mem.view(rs + off, c)
                off += c

    def fill(self, dst: int, n: int, pattern: int) -> int:
        pat = _U64.pack(pattern) * (PAGE // 8 + 1)
        done = 0
        while done < n:
            c = self._chunk(dst + done, n - done)
            k = done % 8
            self._view(dst + done, c, True, done)[:] = pat[k : k + c]
            done += c
        return done

    def compare(self, a: int, b: int, n: int) -> tuple[int, bool]:
        done = 0
        while done < n:
            c = min(self._chunk(a + done, n - done), self._chunk(b + done, n - done))
            va = self._view(a + done, c, False, done)
            vb = self._view(b + done, c, False, done)
            if va != vb:
                for i in range(c):
                    if va[i] != vb[i]:
                        return done + i, True
            done += c
        return n, False
