"""The vPASID -> pPASID engine of one host: bind/unbind, device requests, ENQCMD, migration.

:class:`Host` is the sans-IO heart of vioasid (README "pPASID allocation", "Conflicts",
"Requests and faults", "Live migration"). It owns the host's functions, the host-wide pPASID
allocator and one per-RID allocator per function, the host IOMMU tables (one VT-d PASID table
per function, indexed by pPASID, in host memory) and the VMs placed on it.

* :meth:`Host.bind` is what happens after the guest wrote its PASID entry for vPASID X on a
  device and invalidated: the guest entry is read from guest memory, the pPASID is chosen by the
  policy table (:mod:`vioasid.model.policy`), the conflict rules are checked *before anything
  changes*, then the host entry (nested, PGTT=3) is installed, the device's or mediation's
  vPASID -> pPASID table and the VM's CPU PASID translation table are programmed.
* :meth:`Host.dma` / :meth:`Host.dma_tag` resolve a device request by walking the host table
  with the VT-d :class:`~vioasid.model.walker.Walker` (nested: guest first stage, then the VM's
  second stage); a fault is reported with the guest RID and the vPASID (reverse-mapped from the
  tag) and queued as a VT-d fault record.
* Live migration is :mod:`vioasid.model.migration` (``export_vm(host, name)``,
  ``import_vm(host, stream, ...)``), built on this class's public calls only.

Every refusal is a :class:`~vioasid.model.errors.VioasidError` and leaves all state unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from vioasid.formats.fault import FaultReason
from vioasid.formats.pasid import (
    PASID_DIR_SHIFT,
    PASID_ENTRY,
    PASID_TABLE_MASK,
    PGTT_FIRST_STAGE,
    PGTT_SECOND_STAGE,
)
from vioasid.formats.prq import PAGE_REQ_DESC

from . import views
from .allocator import PasidAllocator
from .cache import Caches, ContextInfo
from .errors import Exhausted, InvalidRequest, NotFound, PasidConflict, VioasidError
from .faults import Fault, Translation, bdf_str
from .host import OWNER_SHIFT, VM_HPA_BASE, HostFunction, HostIommu
from .memory import GuestMemory
from .policy import ASSIGNS, POLICIES, Assign, Policy, rule_for
from .views import guest_fault_json
from .vm import VM, Device
from .walker import Walker, WalkRequest

log = logging.getLogger(__name__)

MAX_PASID_BITS = 20
DID_BITS = 16
_OWNER_SHIFT = OWNER_SHIFT  # function.owner value: (DID << 20) | vPASID
_VPASID_LIMIT = 1 << MAX_PASID_BITS
_DIR_SHIFT = PASID_DIR_SHIFT
_TABLE_MASK = PASID_TABLE_MASK
_PE_WORDS = len(PASID_ENTRY.words)
_VPASID_MASK = (1 << _OWNER_SHIFT) - 1

_PGTT = PASID_ENTRY.field("PGTT")
_PGTT_FS, _PGTT_MASK = _PGTT.put(PGTT_FIRST_STAGE), _PGTT.mask
_PGTT_SS = _PGTT.put(PGTT_SECOND_STAGE)


class Binding(NamedTuple):
    """A live (device, vPASID) binding as the bind returns it."""

    vm: str
    device: int  # guest RID
    vpasid: int
    ppasid: int
    space: str  # "per-rid" | "global"
    function: int  # host RID
    row: int  # policy-table row

    def to_json(self) -> dict[str, Any]:
        return {"ppasid": self.ppasid, "space": self.space}


@dataclass(frozen=True, slots=True)
class DmaResult:
    """A device request's outcome: the host address reached, or the fault the guest sees.

    ``fault`` is in the guest's terms (guest RID, vPASID) and is also queued on the VM.
    ``gpa`` is the guest-physical address the request's first stage produced, ``hpa`` where it
    landed (the VM's second stage maps guest RAM at ``hpa = vm.hpa + gpa``).
    """

    tag: int | None  # the PASID on the wire (None when the device emitted nothing usable)
    gpa: int | None = None
    hpa: int | None = None
    fault: Fault | None = None

    @property
    def ok(self) -> bool:
        return self.fault is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tag is not None:
            out["ppasid"] = self.tag
            out["tag"] = hex(self.tag)
        if self.fault is not None:
            out["fault"] = guest_fault_json(self.fault)
        else:
            assert self.gpa is not None and self.hpa is not None
            out["gpa"] = hex(self.gpa)
            out["hpa"] = hex(self.hpa)
        return out


def _release(refs: dict[Any, int], key: Any) -> bool:
    """Drop one reference to ``key``; True when that was the last (the key is gone)."""
    left = refs[key] - 1
    if left:
        refs[key] = left
        return False
    del refs[key]
    return True


def _who(v: VM, dev: Device, x: int) -> str:
    return f"VM {v.name} device {dev.bdf} vPASID {x}"


class _Who:
    """``VM v device d vPASID x``, formatted only when an error message needs it."""

    __slots__ = ("dev", "v", "x")

    def __init__(self, v: VM, dev: Device, x: int) -> None:
        self.v, self.dev, self.x = v, dev, x

    def __str__(self) -> str:
        return _who(self.v, self.dev, self.x)


class Host:
    """One host: policy, functions, allocators, host IOMMU tables, VMs. Sans-IO.

    ``hpa_base``: where this host places its first VM's RAM in host-physical space (VMs get
    distinct 1 GiB-aligned ranges from there); ``caches=False`` walks without the IOTLB.
    """

    def __init__(
        self,
        name: str = "host",
        *,
        allocation: Policy = "per-device",
        pasid_bits: int = MAX_PASID_BITS,
        caches: bool = True,
        hpa_base: int = VM_HPA_BASE,
        guest_second_stage: bool = False,
    ) -> None:
        if allocation not in POLICIES:
            raise InvalidRequest(f"allocation must be one of {', '.join(POLICIES)}")
        if not 1 <= pasid_bits <= MAX_PASID_BITS:
            raise InvalidRequest(f"pasid_bits must be 1..{MAX_PASID_BITS}, not {pasid_bits}")
        self.name = name
        self.allocation: Policy = allocation
        self.pasid_bits = pasid_bits
        self.functions: dict[int, HostFunction] = {}
        self.vms: dict[str, VM] = {}
        self.global_alloc = PasidAllocator(pasid_bits, f"host {name} global space")
        self.global_owner: dict[int, tuple[str, int]] = {}  # global pPASID -> (VM, vPASID)
        self.did_alloc = PasidAllocator(DID_BITS, f"host {name} domain ids")
        self.devices_by_did: dict[int, tuple[VM, Device]] = {}
        self.iommu = HostIommu(pasid_bits, hpa_base=hpa_base)
        self.walker = Walker(self.iommu.mem, caches=Caches(enabled=caches))
        self.rtaddr = self.iommu.rtaddr
        # Guest second-stage (PGTT=2) entries: VT-d cannot nest a second stage on a second
        # stage, so with guest_second_stage=True such a binding is translated in software:
        # the guest's own tables are walked (uncached: always what the guest wrote now), then
        # the VM's second stage. (did, vPASID) of those bindings:
        self.guest_second_stage = guest_second_stage
        self._soft_ss: set[tuple[int, int]] = set()
        # Called with every request of dma()/dma_tag() that translated (a rig checking where
        # DMAs land, say); the daemon's dma_fast path does not call it.
        self.on_dma: Callable[[DmaResult], object] | None = None

    # -- configuration ----------------------------------------------------------------------
    def add_function(
        self,
        rid: int,
        *,
        enqcmd: bool = False,
        translating: bool = False,
        pasid_bits: int | None = None,
    ) -> HostFunction:
        """Declare a physical function (its PASID table is created in host memory).
        ``pasid_bits``: the function's own PASID width (default the host's; at most it)."""
        bits = self.pasid_bits if pasid_bits is None else pasid_bits
        if not 1 <= bits <= self.pasid_bits:
            raise InvalidRequest(f"function pasid_bits must be 1..{self.pasid_bits}, not {bits}")
        if not 0 <= rid <= 0xFFFF:
            raise InvalidRequest(f"function RID 0x{rid:x} is not a 16-bit BDF")
        if rid in self.functions:
            raise InvalidRequest(f"host {self.name} already has function {bdf_str(rid)}")
        fn = HostFunction(rid, enqcmd, translating, bits)
        self.iommu.add_function(rid)
        self.functions[rid] = fn
        return fn

    def add_vm(self, name: str, memory: GuestMemory, *, rtaddr: int = 0) -> VM:
        """Place a VM: its RAM gets a distinct host range and a second stage mapping it."""
        if not name:
            raise InvalidRequest("a VM needs a name")
        if name in self.vms:
            raise InvalidRequest(f"host {self.name} already has VM {name}")
        if not memory.regions:
            raise InvalidRequest(f"VM {name} has no guest memory")
        hpa, ss, regions = self.iommu.map_vm(name, memory)
        vm = VM(name, memory, hpa, ss, regions, rtaddr=rtaddr)
        self.vms[name] = vm
        return vm

    def set_rtaddr(self, vm: str, rtaddr: int) -> None:
        """The guest programmed its RTADDR register (its own root table in guest RAM)."""
        v = self._vm(vm)
        v.rtaddr = rtaddr
        v.context_cache.clear()

    def attach_device(self, vm: str, guest_rid: int, function: int, assign: Assign) -> Device:
        """Give a VM a device: the whole function (vfio-pci) or a slice of it (mdev)."""
        v = self._vm(vm)
        if assign not in ASSIGNS:
            raise InvalidRequest(f"assign must be one of {', '.join(ASSIGNS)}, not {assign!r}")
        if not 0 <= guest_rid <= 0xFFFF:
            raise InvalidRequest(f"guest RID 0x{guest_rid:x} is not a 16-bit BDF")
        if guest_rid in v.devices:
            raise InvalidRequest(f"VM {vm} already has device {bdf_str(guest_rid)}")
        fn = self._function(function)
        if fn.vfio_vm is not None:
            raise InvalidRequest(
                f"function {fn.bdf} is assigned whole (vfio-pci) to VM {fn.vfio_vm}"
            )
        if assign == "vfio-pci" and fn.mdev_users:
            users = ", ".join(sorted(fn.mdev_users))
            raise InvalidRequest(f"function {fn.bdf} is split into mdevs (used by {users})")
        did = self.did_alloc.alloc()
        if did is None:
            raise Exhausted(f"host {self.name} has no free domain id for another device")
        rule = rule_for(self.allocation, assign, fn.enqcmd, fn.translating)
        dev = Device(guest_rid, fn, assign, rule, did)
        if assign == "vfio-pci":
            fn.vfio_vm = vm
        else:
            fn.mdev_users[vm] = fn.mdev_users.get(vm, 0) + 1
        v.devices[guest_rid] = dev
        self.devices_by_did[did] = (v, dev)
        return dev

    def detach_device(self, vm: str, guest_rid: int) -> None:
        """Unbind every vPASID of the device, then give the function (slice) back."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        for vpasid in sorted(dev.ppasids, reverse=True):
            self._unbind(v, dev, vpasid)
        fn = dev.function
        if dev.assign == "vfio-pci":
            fn.vfio_vm = None
        else:
            _release(fn.mdev_users, vm)
        del v.devices[guest_rid]
        del self.devices_by_did[dev.did]
        self.did_alloc.free(dev.did)

    def remove_vm(self, vm: str) -> None:
        """The VM is gone: every pPASID, host entry and CPU-table entry of it is freed."""
        v = self._vm(vm)
        for rid in sorted(v.devices, reverse=True):
            self.detach_device(vm, rid)
        self.iommu.unmap_vm(v.second_stage, v.host_regions)
        del self.vms[vm]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Host memory taken inside the block (leaf PASID tables, VM host ranges) is given back
        if the block raises; the block undoes its own VMs and bindings first (``remove_vm``).
        All-or-nothing sequences such as a migration import run inside one."""
        saved = self.iommu.begin()
        try:
            yield
        except BaseException:
            self.iommu.rollback(saved)
            raise
        self.iommu.commit(saved)

    # -- lookups ----------------------------------------------------------------------------
    def _vm(self, name: str) -> VM:
        v = self.vms.get(name)
        if v is None:
            raise NotFound(f"host {self.name} has no VM {name!r}")
        return v

    def _device(self, vm: VM, guest_rid: int) -> Device:
        dev = vm.devices.get(guest_rid)
        if dev is None:
            raise NotFound(f"VM {vm.name} has no device {bdf_str(guest_rid)}")
        return dev

    def _function(self, rid: int) -> HostFunction:
        fn = self.functions.get(rid)
        if fn is None:
            raise NotFound(f"host {self.name} has no function {bdf_str(rid)}")
        return fn

    def vm(self, name: str) -> VM:
        return self._vm(name)

    # -- bind / unbind ------------------------------------------------------------------------
    def bind(self, vm: str, guest_rid: int, vpasid: int) -> Binding:
        """The guest wrote its PASID entry for ``vpasid`` on the device and invalidated.

        Re-binding a bound (device, vPASID) refreshes the host entry from the guest's entry and
        keeps the pPASID. Refusals (conflict rules, exhaustion, a missing or unusable guest
        entry) raise and change nothing.
        """
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        self._check_vpasid(vpasid)
        words = v.tables.pasid_entry(self._guest_context(v, guest_rid), guest_rid, vpasid)
        return self._bind(v, dev, vpasid, words)

    def _guest_context(self, v: VM, guest_rid: int) -> ContextInfo:
        """The guest device's context entry, through the VM's context cache (VT-d lets the
        IOMMU cache context entries until the guest invalidates them)."""
        hit = v.context_cache.get(guest_rid)
        if hit is None:
            hit = v.context_cache[guest_rid] = v.tables.context(v.rtaddr, guest_rid)
        return hit

    def invalidate_context(self, vm: str, guest_rid: int | None = None) -> None:
        """The guest invalidated its context cache (globally or for one device); used by the
        PASID DMA function, which sees no invalidation and re-reads at each bind/doorbell."""
        v = self._vm(vm)
        if guest_rid is None:
            v.context_cache.clear()
        else:
            v.context_cache.pop(guest_rid, None)

    def _bind(self, v: VM, dev: Device, x: int, words: tuple[int, ...]) -> Binding:
        """Bind (or refresh) ``x`` from the guest's checked entry words."""
        soft = self.guest_second_stage and words[0] & _PGTT_MASK == _PGTT_SS
        if words[0] & _PGTT_MASK != _PGTT_FS and not soft:
            raise InvalidRequest(
                f"VM {v.name} device {dev.bdf} vPASID {x}: the guest entry has PGTT="
                f"{_PGTT.get(words[0])}; vioasid nests guest first-stage (PGTT=1) entries only"
            )
        fn = dev.function
        pp = dev.ppasids.get(x)
        if pp is None:
            pp = self._commit(v, dev, x)
            self.iommu.write_nested(
                fn.rid, pp, did=dev.did, guest_qw2=words[2], ssptptr=v.second_stage.root
            )
        else:
            self.iommu.write_nested(
                fn.rid, pp, did=dev.did, guest_qw2=words[2], ssptptr=v.second_stage.root
            )
            # a fresh slot has nothing cached (no negative caching; unbind flushed it)
            self.walker.caches.invalidate_pasid_entry(fn.rid, pp, dev.did)
        if soft:  # the host entry is bookkeeping only; _request walks the guest's tables
            self._soft_ss.add((dev.did, x))
        elif self._soft_ss:
            self._soft_ss.discard((dev.did, x))
        rule = dev.rule
        return Binding(v.name, dev.guest_rid, x, pp, rule.space, fn.rid, rule.row)

    def _commit(self, v: VM, dev: Device, x: int) -> int:
        """Plan ``x``'s pPASID (refusals change nothing), then record it everywhere: the
        leaf host PASID table (made first; it may refuse), the allocator, the VM's global and
        CPU tables, the slot owner and the device's vPASID -> pPASID table. Returns the pPASID;
        the caller writes the host entry."""
        pp, new_global = self._plan(v, dev, x)
        fn, rule = dev.function, dev.rule
        iommu = self.iommu
        if (fn.rid, pp >> _DIR_SHIFT) not in iommu.leaves and (
            iommu.entry_gpa(fn.rid, pp, create=True) is None
        ):
            raise Exhausted(f"host {self.name}: no host memory left for PASID tables")
        if rule.space == "per-rid":
            fn.allocator.take(pp)
        else:
            if new_global:
                self.global_alloc.take(pp)
                v.global_ppasid[x] = pp
                self.global_owner[pp] = (v.name, x)
            v.global_refs[x] = v.global_refs.get(x, 0) + 1
        if rule.cpu_table:
            v.cpu_table[x] = pp
            v.cpu_refs[x] = v.cpu_refs.get(x, 0) + 1
        fn.owner[pp] = (dev.did << _OWNER_SHIFT) | x
        dev.ppasids[x] = pp
        return pp

    def bind_many(self, vm: str, guest_rid: int, vpasids: Iterable[int]) -> int:
        """Bind many vPASIDs of one device in order (migration import, benchmarks): the same
        rules and refusals as :meth:`bind`, each leaf of the guest's PASID table read once.
        Stops at the first refusal (the bindings before it stay). Returns how many bound."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        tables = v.tables
        ctx = self._guest_context(v, guest_rid)
        rid, did, ss = dev.function.rid, dev.did, v.second_stage.root
        ppasids, entry_ok = dev.ppasids, tables.entry_ok
        write, commit = self.iommu.write_nested, self._commit
        leaf_idx = -1
        leaf: tuple[int, ...] = ()
        n = 0
        for x in vpasids:
            if not 1 <= x < _VPASID_LIMIT:
                self._check_vpasid(x)  # raises
            if x >> _DIR_SHIFT != leaf_idx:
                leaf = tables.leaf(ctx, guest_rid, x)
                leaf_idx = x >> _DIR_SHIFT
            base = (x & _TABLE_MASK) * _PE_WORDS
            words = leaf[base : base + _PE_WORDS]
            if not entry_ok(words):
                tables.check(words, guest_rid, x)  # raises, unless it is another PGTT:
                return n + self._bind_one(v, dev, x, words)  # raises the PGTT refusal
            if x in ppasids:
                raise InvalidRequest(f"{_who(v, dev, x)}: bound twice")
            write(rid, commit(v, dev, x), did=did, guest_qw2=words[2], ssptptr=ss)
            n += 1
        return n

    def _bind_one(self, v: VM, dev: Device, x: int, words: tuple[int, ...]) -> int:
        self._bind(v, dev, x, words)
        return 1

    def _plan(self, v: VM, dev: Device, x: int) -> tuple[int, bool]:
        """(pPASID, draws a new global value) for binding ``x`` on ``dev``; raises on conflict.
        Changes nothing."""
        rule = dev.rule
        fn = dev.function
        who = _Who(v, dev, x)  # formatted only if a refusal needs it
        new_global = False
        if rule.space == "per-rid":
            pp = self._draw(fn.allocator, v, dev, x, who)
        else:
            g = v.global_ppasid.get(x)
            if g is not None:
                if rule.equal_x and g != x:
                    where = (
                        f"VM {v.name}'s CPU PASID translation table maps vPASID {x} to pPASID {g}"
                        if x in v.cpu_table
                        else f"VM {v.name}'s global pPASID for vPASID {x} is pPASID {g}"
                    )
                    raise PasidConflict(
                        f"{who}: the non-translating function {fn.bdf} would see {x} from its "
                        f"driver (needs pPASID {x}) but {where}",
                        vm=v.name, device=dev.bdf, vpasid=x, ppasid=g, rule=2,
                    )  # fmt: skip
                pp = g
            else:
                pp = self._draw(self.global_alloc, v, dev, x, who)
                new_global = True
        if pp in fn.owner:
            raise PasidConflict(
                f"{who}: pPASID {pp} in function {fn.bdf}'s table is held by "
                f"{self._slot_owner(fn, pp)}",
                vm=v.name, device=dev.bdf, vpasid=x, ppasid=pp, rule=4,
            )  # fmt: skip
        return pp, new_global

    def _draw(self, alloc: PasidAllocator, v: VM, dev: Device, x: int, who: _Who) -> int:
        """From ``alloc`` (the function's per-RID space or the host's global one): ``x`` itself
        for a row that needs pPASID == vPASID (conflict rule 1 when it is out of range or
        held), else the lowest free value (rule 3 when there is none)."""
        if not dev.rule.equal_x:
            pp = alloc.peek()
            if pp is None:
                raise Exhausted(
                    f"{who}: {self._space(alloc, dev)} is exhausted ({alloc.limit - 1} pPASIDs)",
                    vm=v.name, device=dev.bdf, vpasid=x, rule=3,
                )  # fmt: skip
            return pp
        if not alloc.in_range(x):
            raise PasidConflict(
                f"{who}: needs pPASID {x} but {self._space(alloc, dev)} ends at "
                f"{alloc.limit - 1}",
                vm=v.name, device=dev.bdf, vpasid=x, ppasid=x, rule=1,
            )  # fmt: skip
        if x in alloc:
            holder = (
                "VM {} vPASID {}".format(*self.global_owner[x])
                if alloc is self.global_alloc
                else self._slot_owner(dev.function, x)
            )
            raise PasidConflict(
                f"{who}: needs pPASID {x} from {self._space(alloc, dev)}, which is held by "
                f"{holder}",
                vm=v.name, device=dev.bdf, vpasid=x, ppasid=x, rule=1,
            )  # fmt: skip
        return x

    def _space(self, alloc: PasidAllocator, dev: Device) -> str:
        if alloc is self.global_alloc:
            return f"host {self.name}'s global pPASID space"
        return f"function {dev.function.bdf}'s per-RID space"

    def tag_owner(self, function: int, tag: int) -> tuple[VM, Device, int] | None:
        """Who owns slot ``tag`` of a function's PASID table: (VM, device, vPASID), or None."""
        fn = self._function(function)
        own = fn.owner.get(tag)
        if own is None:
            return None
        v, dev = self.devices_by_did[own >> _OWNER_SHIFT]
        return v, dev, own & _VPASID_MASK

    def tag_belongs_to(self, vm: str, function: int, tag: int) -> bool:
        """Whether slot ``tag`` of a function's PASID table is a binding of VM ``vm`` (or, for a
        whole function that puts vPASIDs on the wire untranslated, an unbound tag of that VM's).
        Raises ``NotFound`` for an unknown function."""
        fn = self._function(function)
        own = fn.owner.get(tag)
        if own is None:
            return fn.vfio_vm == vm
        v, _ = self.devices_by_did[own >> _OWNER_SHIFT]
        return v.name == vm

    @staticmethod
    def route(v: VM, guest_rid: int, vpasid: int) -> tuple[int, int] | None:
        """Where a guest device's request for ``vpasid`` goes: (host function RID, wire tag), or
        None when the device has no route (unknown device, or a converting device without a
        pPASID for it: :meth:`dma` then decides the fault)."""
        dev = v.devices.get(guest_rid)
        if dev is None:
            return None
        pp = dev.ppasids.get(vpasid)
        if pp is None and not dev.rule.equal_x:
            return None
        return dev.function.rid, vpasid if pp is None else pp

    def fault_to_page_request(self, vm: str, fault: Fault, *, write: bool = False) -> bytes:
        """The device asks for the page instead of taking ``fault`` (a not-present fault just
        queued by :meth:`dma`): the fault leaves the VM's queue and a page request (guest RID +
        vPASID) is queued instead. Returns the descriptor."""
        v = self._vm(vm)
        if fault.pasid is None:
            raise InvalidRequest("a page request needs a PASID")
        if v.faults and v.faults[-1] is fault:
            v.faults.pop()
        return self.page_request(vm, fault.sid, fault.pasid, fault.addr, write=write)

    def _slot_owner(self, fn: HostFunction, pp: int) -> str:
        own = fn.owner.get(pp)
        if own is None:
            return "nobody"
        ov, od = self.devices_by_did[own >> _OWNER_SHIFT]
        return f"VM {ov.name} device {od.bdf} vPASID {own & _VPASID_MASK}"

    def unbind(self, vm: str, guest_rid: int, vpasid: int) -> Binding:
        """The guest cleared its PASID entry and invalidated: undo everything bind did."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        if vpasid not in dev.ppasids:
            raise NotFound(f"VM {vm} device {dev.bdf} has no binding for vPASID {vpasid}")
        return self._unbind(v, dev, vpasid)

    def _unbind(self, v: VM, dev: Device, x: int) -> Binding:
        self._soft_ss.discard((dev.did, x))
        fn = dev.function
        rule = dev.rule
        pp = dev.ppasids.pop(x)
        self.iommu.clear(fn.rid, pp)
        del fn.owner[pp]
        if rule.space == "per-rid":
            fn.allocator.free(pp)
        else:
            if _release(v.global_refs, x):
                del v.global_ppasid[x]
                del self.global_owner[pp]
                self.global_alloc.free(pp)
        if rule.cpu_table and _release(v.cpu_refs, x):
            del v.cpu_table[x]
        self.walker.caches.invalidate_pasid_entry(fn.rid, pp, dev.did)
        return Binding(v.name, dev.guest_rid, x, pp, rule.space, fn.rid, rule.row)

    def sync_pasid(self, vm: str, guest_rid: int, vpasid: int) -> Binding | None:
        """PASID-cache invalidation for (device, vPASID): bind if the guest entry is present,
        unbind if it was cleared. Returns the binding, or None when nothing is bound now."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        self._check_vpasid(vpasid)
        v.context_cache.pop(guest_rid, None)  # re-read: the guest may have rewritten it too
        try:
            words = v.tables.pasid_entry(self._guest_context(v, guest_rid), guest_rid, vpasid)
        except NotFound:
            if vpasid in dev.ppasids:
                self._unbind(v, dev, vpasid)
            return None
        return self._bind(v, dev, vpasid, words)

    def invalidate(self, vm: str, vpasid: int | None = None, guest_rid: int | None = None) -> int:
        """The guest invalidated its IOTLB for ``vpasid`` (or everything) on ``guest_rid`` (or
        every device): drop the host's cached nested translations. Returns entries affected."""
        v = self._vm(vm)
        devs = [self._device(v, guest_rid)] if guest_rid is not None else list(v.devices.values())
        n = 0
        for dev in devs:
            items = (
                [(vpasid, dev.ppasids[vpasid])] if vpasid is not None and vpasid in dev.ppasids
                else [] if vpasid is not None
                else list(dev.ppasids.items())
            )  # fmt: skip
            for _, pp in items:
                self.walker.caches.invalidate_piotlb_pasid(dev.did, pp)
                n += 1
        return n

    @staticmethod
    def _check_vpasid(vpasid: int) -> None:
        if not 1 <= vpasid < 1 << MAX_PASID_BITS:
            raise InvalidRequest(f"vPASID {vpasid} is not in 1..{(1 << MAX_PASID_BITS) - 1}")

    # -- requests -----------------------------------------------------------------------------
    def dma(
        self,
        vm: str,
        guest_rid: int,
        vpasid: int,
        addr: int,
        *,
        write: bool = False,
        supervisor: bool = False,
    ) -> DmaResult:
        """The device issues a request for ``vpasid``, tagged as that device tags it.

        ``supervisor``: a privileged request (PASID TLP prefix PMR=1): the guest entry needs SRE
        and the first-stage pages supervisor access (VT-d 3.4 §3.6.2)."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        pp = dev.ppasids.get(vpasid)
        if pp is None and not dev.rule.equal_x:
            # The device (or its mediation) converts vPASIDs and has no pPASID for this one:
            # nothing reaches the IOMMU under any tag, the guest sees "PASID entry not present".
            f = Fault(
                FaultReason.PASID_ENTRY_P, addr, guest_rid, vpasid, write,
                f"device {dev.bdf} has no pPASID for vPASID {vpasid}",
            )  # fmt: skip
            v.queue_fault(f)
            return DmaResult(None, fault=f)
        return self._request(
            dev.function, vpasid if pp is None else pp, addr, write, v, dev, supervisor
        )

    def dma_tag(
        self, function: int, tag: int, addr: int, *, write: bool = False, supervisor: bool = False
    ) -> DmaResult:
        """A request as it arrives on the wire: (host function, PASID tag, address)."""
        fn = self._function(function)
        own = fn.owner.get(tag)
        if own is None:
            if fn.vfio_vm is not None:
                # A whole function's device puts vPASIDs on the wire untranslated (rows 1-3):
                # an unknown tag is still that VM's vPASID, and its fault goes to that guest.
                v = self.vms[fn.vfio_vm]
                dev = next(d for d in v.devices.values() if d.function is fn)
                if dev.rule.equal_x:
                    return self._request(fn, tag, addr, write, v, dev, supervisor)
            res = self.walker.translate(
                self.rtaddr, WalkRequest(fn.rid, addr, tag, write, supervisor=supervisor)
            )
            if isinstance(res, Translation):  # pragma: no cover - no owner means no entry
                raise AssertionError("host table has an entry nobody owns")
            return DmaResult(tag, fault=res)
        v, dev = self.devices_by_did[own >> _OWNER_SHIFT]
        return self._request(fn, tag, addr, write, v, dev, supervisor)

    def _request(
        self,
        fn: HostFunction,
        tag: int,
        addr: int,
        write: bool,
        v: VM,
        dev: Device,
        supervisor: bool = False,
    ) -> DmaResult:
        res: int | Fault
        if self._soft_ss:
            own = fn.owner.get(tag)
            if own is not None and (dev.did, own & _VPASID_MASK) in self._soft_ss:
                r = self._soft_request(v, dev, own & _VPASID_MASK, tag, addr, write, supervisor)
                if self.on_dma is not None and r.hpa is not None:
                    self.on_dma(r)
                return r
        if supervisor:
            t = self.walker.translate(
                self.rtaddr, WalkRequest(fn.rid, addr, tag, write, supervisor=True)
            )
            res = t if isinstance(t, Fault) else t.address
        else:
            res = self.walker.translate_fast(self.rtaddr, fn.rid, addr, tag, write)
        if not isinstance(res, Fault):
            r = DmaResult(tag, res - v.hpa, res)
            if self.on_dma is not None:
                self.on_dma(r)
            return r
        own = fn.owner.get(tag)
        vpasid = own & _VPASID_MASK if own is not None else tag
        f = Fault(res.reason, addr, dev.guest_rid, vpasid, write, res.detail)
        v.queue_fault(f)
        return DmaResult(tag, fault=f)

    def _soft_request(
        self, v: VM, dev: Device, x: int, tag: int, addr: int, write: bool, supervisor: bool
    ) -> DmaResult:
        """A guest second-stage binding: the guest's own walk (its root, context and PASID
        entries, its second-stage table) gives the GPA, the VM's second stage the HPA."""
        w = v.tables.reader  # the VM's one uncached reader of its own tables
        t = w.translate(v.rtaddr, WalkRequest(dev.guest_rid, addr, x, write, supervisor=supervisor))
        if isinstance(t, Fault):
            f = Fault(t.reason, addr, dev.guest_rid, x, write, t.detail)
            v.queue_fault(f)
            return DmaResult(tag, fault=f)
        return DmaResult(tag, t.address, v.hpa + t.address)

    def dma_fast(self, function: int, tag: int, addr: int, write: bool = False) -> int | Fault:
        """Hot path (daemon batches): the host address, or the walker's raw host-side fault."""
        return self.walker.translate_fast(self.rtaddr, function, addr, tag, write)

    def drain_faults(self, vm: str) -> list[Fault]:
        """Hand the VM's queued faults (guest RID + vPASID) to whoever delivers them."""
        v = self._vm(vm)
        out, v.faults = v.faults, []
        return out

    def drain_page_requests(self, vm: str) -> list[bytes]:
        """Hand the VM's queued page request descriptors to whoever delivers them."""
        v = self._vm(vm)
        out, v.page_requests = v.page_requests, []
        return out

    def enqcmd(self, vm: str, guest_rid: int, vpasid: int) -> int:
        """The guest CPU submits a descriptor with ENQCMD: the pPASID the CPU writes into it,
        from the VM's CPU PASID translation table."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        if not dev.function.enqcmd:
            raise InvalidRequest(
                f"VM {vm} device {dev.bdf}: function {dev.function.bdf} has no shared work queue "
                "(not enqcmd)"
            )
        self._check_vpasid(vpasid)
        pp = v.cpu_table.get(vpasid)
        if pp is None:
            raise NotFound(
                f"VM {vm}: vPASID {vpasid} is not in the CPU PASID translation table "
                "(ENQCMD would #GP)"
            )
        return pp

    def page_request(
        self,
        vm: str,
        guest_rid: int,
        vpasid: int,
        addr: int,
        *,
        write: bool = False,
        prgi: int = 0,
        last: bool = True,
    ) -> bytes:
        """Queue a page request for the guest (guest RID + vPASID) as a VT-d descriptor."""
        v = self._vm(vm)
        dev = self._device(v, guest_rid)
        desc = PAGE_REQ_DESC.build(
            {
                "TYPE": 1, "PP": 1, "RID": dev.guest_rid, "PASID": vpasid, "RD": int(not write),
                "WR": int(write), "LPIG": int(last), "PRGI": prgi, "ADDR": addr & ~0xFFF,
            }
        )  # fmt: skip
        v.queue_page_request(desc)
        return desc

    # -- views ------------------------------------------------------------------------------
    def bindings(self) -> Iterator[Binding]:
        for v in self.vms.values():
            for dev in v.devices.values():
                for x, pp in dev.ppasids.items():
                    yield Binding(
                        v.name, dev.guest_rid, x, pp, dev.rule.space, dev.function.rid,
                        dev.rule.row,
                    )  # fmt: skip

    def dump(self, vm: str | None = None) -> dict[str, Any]:
        """The vPASID/pPASID tables as they stand (JSON-ready; :func:`views.dump`)."""
        return views.dump(self, None if vm is None else self._vm(vm))

    def check_invariants(self) -> list[str]:
        """Every model invariant that can be checked from the outside; [] when sound."""
        return views.check_invariants(self)

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused operation must leave unchanged (tests compare before/after)."""
        return views.snapshot(self)


__all__ = [
    "Binding",
    "DmaResult",
    "Host",
    "VioasidError",
    "guest_fault_json",
]
