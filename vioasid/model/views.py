"""Views of a host's state: the JSON dump, the invariant check, the before/after snapshot.

Read-only functions over the engine's state (:class:`HostState` names what they read, so this
module does not import the engine; :class:`~vioasid.model.engine.Host` calls them from its
``dump`` / ``check_invariants`` / ``snapshot``), and the guest-terms JSON of a fault.
"""

from __future__ import annotations

from typing import Any, Protocol

from .allocator import PasidAllocator
from .faults import Fault, bdf_str
from .host import OWNER_SHIFT, VPASID_MASK, HostFunction, HostIommu
from .policy import Policy
from .vm import VM, Device


class HostState(Protocol):
    """What the views read of a host (:class:`~vioasid.model.engine.Host` has it)."""

    name: str
    allocation: Policy
    functions: dict[int, HostFunction]
    vms: dict[str, VM]
    global_alloc: PasidAllocator
    global_owner: dict[int, tuple[str, int]]
    did_alloc: PasidAllocator
    devices_by_did: dict[int, tuple[VM, Device]]
    iommu: HostIommu


def guest_fault_json(f: Fault) -> dict[str, Any]:
    """A fault as the scenario contract prints it (guest RID, vPASID)."""
    out: dict[str, Any] = {
        "reason": int(f.reason),
        "name": f.name,
        "device": bdf_str(f.sid),
        "vpasid": f.pasid,
        "addr": hex(f.addr),
        "write": f.write,
    }
    if f.detail:
        out["detail"] = f.detail
    return out


def dump(host: HostState, only: VM | None = None) -> dict[str, Any]:
    """The vPASID/pPASID tables as they stand (JSON-ready): every VM, or ``only``."""
    vms = [only] if only is not None else list(host.vms.values())
    vm = None if only is None else only.name
    out_vms: dict[str, Any] = {}
    for v in vms:
        out_vms[v.name] = {
            "host": host.name,
            "hpa": hex(v.hpa),
            "rtaddr": hex(v.rtaddr),
            "devices": {
                dev.bdf: {
                    "function": dev.function.bdf,
                    "assign": dev.assign,
                    "row": dev.rule.row,
                    "space": dev.rule.space,
                    "tag": dev.rule.tag,
                    "did": dev.did,
                    "bindings": {str(x): pp for x, pp in sorted(dev.ppasids.items())},
                }
                for dev in sorted(v.devices.values(), key=lambda d: d.guest_rid)
            },
            "cpu_table": {str(x): pp for x, pp in sorted(v.cpu_table.items())},
            "faults": len(v.faults),
            "page_requests": len(v.page_requests),
        }
    names = {v.name for v in vms}
    out_fns: dict[str, Any] = {}
    for fn in sorted(host.functions.values(), key=lambda f: f.rid):
        table = {}
        for pp, own in sorted(fn.owner.items()):
            ov, od = host.devices_by_did[own >> OWNER_SHIFT]
            if vm is None or ov.name in names:
                table[str(pp)] = {
                    "vm": ov.name,
                    "device": od.bdf,
                    "vpasid": own & VPASID_MASK,
                }
        if vm is not None and not table and fn.vfio_vm != vm and vm not in fn.mdev_users:
            continue
        out_fns[f"{host.name}/{fn.bdf}"] = {
            "enqcmd": fn.enqcmd,
            "translating": fn.translating,
            "assigned": fn.assigned,
            "vms": [fn.vfio_vm] if fn.vfio_vm else sorted(fn.mdev_users),
            "table": table,
        }
    return {
        "host": host.name,
        "allocation": host.allocation,
        "vms": out_vms,
        "functions": out_fns,
        "global": {str(pp): {"vm": o[0], "vpasid": o[1]} for pp, o in
                   sorted(host.global_owner.items()) if vm is None or o[0] in names},
    }  # fmt: skip


def check_invariants(host: HostState) -> list[str]:
    """Every model invariant that can be checked from the outside (tests); [] when sound."""
    errs: list[str] = []
    per_rid: dict[int, set[int]] = {rid: set() for rid in host.functions}
    owners: dict[int, dict[int, int]] = {rid: {} for rid in host.functions}
    global_used: dict[int, tuple[str, int]] = {}
    for v in host.vms.values():
        refs: dict[int, int] = {}
        cpu: dict[int, int] = {}
        for dev in v.devices.values():
            fn = dev.function
            for x, pp in dev.ppasids.items():
                slot = owners[fn.rid]
                if pp in slot:
                    errs.append(f"{fn.bdf}: pPASID {pp} shared by two bindings")
                slot[pp] = (dev.did << OWNER_SHIFT) | x
                if dev.rule.equal_x and pp != x:
                    errs.append(f"{v.name} {dev.bdf}: needs pPASID == {x}, has {pp}")
                if host.iommu.entry_words(fn.rid, pp) is None:
                    errs.append(f"{fn.bdf}: no host entry for pPASID {pp}")
                if dev.rule.space == "per-rid":
                    per_rid[fn.rid].add(pp)
                else:
                    if v.global_ppasid.get(x) != pp:
                        errs.append(f"{v.name}: vPASID {x} has two global pPASIDs")
                    refs[x] = refs.get(x, 0) + 1
                if dev.rule.cpu_table:
                    cpu[x] = cpu.get(x, 0) + 1
        if refs != v.global_refs or set(refs) != set(v.global_ppasid):
            errs.append(f"{v.name}: global refcounts {v.global_refs} != {refs}")
        if cpu != v.cpu_refs or {x: v.global_ppasid.get(x) for x in cpu} != v.cpu_table:
            errs.append(f"{v.name}: CPU table {v.cpu_table} does not match its bindings")
        for x, g in v.global_ppasid.items():
            if g in global_used:
                errs.append(f"global pPASID {g} held by {global_used[g]} and {v.name}")
            global_used[g] = (v.name, x)
    if host.global_alloc.used() != frozenset(global_used):
        errs.append("global allocator's used set != live global pPASIDs")
    if host.global_owner != global_used:
        errs.append("global owner map != live global pPASIDs")
    for rid, fn in host.functions.items():
        if fn.allocator.used() != frozenset(per_rid[rid]):
            errs.append(f"{fn.bdf}: per-RID allocator used set != live per-RID bindings")
        if fn.owner != owners[rid]:
            errs.append(f"{fn.bdf}: table owners != live bindings")
    return errs


def snapshot(host: HostState) -> dict[str, Any]:
    """Everything a refused operation must leave unchanged (tests compare before/after)."""
    tables = {rid: host.iommu.present_entries(rid) for rid in host.functions}
    return {
        "dump": dump(host),
        "global": host.global_alloc.snapshot(),
        "per_rid": {rid: fn.allocator.snapshot() for rid, fn in host.functions.items()},
        "dids": host.did_alloc.snapshot(),
        "tables": tables,
        "cpu": {n: dict(v.cpu_table) for n, v in host.vms.items()},
        "regions": [(r.gpa, r.size) for r in host.iommu.mem.regions],
        "leaves": sorted(host.iommu.leaves.items()),
        "pages_used": host.iommu.pages.used,
    }
