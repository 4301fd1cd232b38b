"""VM migration state: export to and import from the stream of :mod:`vioasid.formats.migration`.

:func:`export_vm` writes what the guest can see that is not in its RAM — devices, bound
vPASIDs per device, the CPU table's vPASIDs, queued faults and page requests, the vIOMMU
registers — and never a pPASID. :func:`import_vm` refuses a corrupt, truncated or
future-version stream, then re-creates the VM on the destination host: devices attached to the
functions the caller maps them to, every binding re-bound from the guest's own PASID entries
(in the migrated guest RAM) under the destination's policy and occupancy, re-allocating pPASIDs
and reprogramming devices and the CPU table. Any failure undoes everything on the destination
(it keeps nothing) and raises :class:`~vioasid.model.errors.MigrationFailed`; the source is only
ever read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import construct as cs

from vioasid.formats.fault import FAULT_RECORD, FaultReason
from vioasid.formats.migration import (
    ASSIGN_CODES,
    BODY,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    STREAM,
    VERSION,
)
from vioasid.formats.prq import PAGE_REQ_DESC
from vioasid.formats.registers import REG_RTADDR

from .engine import Host
from .errors import MigrationFailed, VioasidError
from .faults import Fault, bdf_str
from .memory import GuestMemory
from .policy import Assign
from .vm import VM

_ASSIGNS: dict[int, Assign] = {ASSIGN_CODES["vfio-pci"]: "vfio-pci", ASSIGN_CODES["mdev"]: "mdev"}
_REASONS = frozenset(int(r) for r in FaultReason)


def export_vm(host: Host, name: str) -> bytes:
    """VM ``name``'s migration stream (never pPASIDs); the source is left untouched."""
    vm = host.vm(name)
    devices = [
        {
            "guest_rid": dev.guest_rid,
            "assign": ASSIGN_CODES[dev.assign],
            "caps": {"enqcmd": dev.function.enqcmd, "translating": dev.function.translating},
            "function": dev.function.rid,
            "vpasids": sorted(dev.ppasids),
        }
        for dev in sorted(vm.devices.values(), key=lambda d: d.guest_rid)
    ]
    body = {
        "name": vm.name,
        "memory_size": vm.memory_size,
        "registers": [{"offset": REG_RTADDR, "value": vm.rtaddr}],
        "devices": devices,
        "cpu_vpasids": sorted(vm.cpu_table),
        "faults": [FAULT_RECORD.parse(f.record()) for f in vm.faults],
        "fault_overflow": vm.fault_overflow,
        "page_requests": [PAGE_REQ_DESC.parse(d) for d in vm.page_requests],
        "prq_overflow": vm.prq_overflow,
    }
    data: bytes = STREAM.build(
        {"header": {"version": VERSION, "flags": 0}, "body": {"value": body}, "crc32": None}
    )
    return data


def parse_stream_header(
    stream: bytes, header: cs.Construct, size: int, magic: bytes, what: str
) -> Any:
    """The parsed ``header`` (``size`` bytes, starting with ``magic``) of a stream; MigrationFailed
    naming ``what`` for a stream shorter than it or one that is not such a stream."""
    if len(stream) < size:
        raise MigrationFailed(f"{what} truncated: {len(stream)} bytes, the header alone is {size}")
    try:
        return header.parse(stream[:size])
    except cs.ConstructError:
        raise MigrationFailed(
            f"not a {what} (magic {bytes(stream[: len(magic)])!r}, expected {magic!r})"
        ) from None


def decode_stream(stream: bytes) -> Any:
    """The parsed body of a stream; MigrationFailed for anything that is not a whole,
    intact stream of a version this build reads."""
    header = parse_stream_header(stream, HEADER, HEADER_SIZE, MAGIC, "vioasid migration stream")
    if header.version > VERSION:
        raise MigrationFailed(
            f"migration stream version {header.version} is newer than this vioasid "
            f"(reads version {VERSION})"
        )
    if header.version < VERSION or header.flags:
        raise MigrationFailed(
            f"migration stream version {header.version} flags 0x{header.flags:x} not understood"
        )
    try:
        parsed = STREAM.parse(stream)
    except cs.ChecksumError:
        raise MigrationFailed("migration stream checksum mismatch (corrupt stream)") from None
    except cs.ConstructError as exc:
        size = len(stream)
        raise MigrationFailed(
            f"migration stream truncated or malformed ({size} bytes): {_first_line(exc)}"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MigrationFailed(f"migration stream malformed: {exc}") from None
    return parsed.body.value


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def import_vm(
    host: Host,
    stream: bytes,
    memory: GuestMemory,
    functions: Mapping[int, int],
    *,
    name: str | None = None,
) -> VM:
    """Re-create the VM of ``stream`` on ``host``; all-or-nothing (raises MigrationFailed)."""
    body = decode_stream(stream)
    vm_name = name if name is not None else body.name
    if vm_name in host.vms:
        raise MigrationFailed(f"host {host.name} already has a VM named {vm_name}")
    top = max((r.end for r in memory.regions), default=0)
    if top < body.memory_size:
        raise MigrationFailed(
            f"VM {vm_name}: destination guest memory ends at 0x{top:x}, the source's at "
            f"0x{body.memory_size:x}"
        )
    regs = {r.offset: r.value for r in body.registers}
    # Check the device map before touching anything.
    seen: set[int] = set()
    for d in body.devices:
        rid = d.guest_rid
        if rid in seen:
            raise MigrationFailed(f"VM {vm_name}: device {bdf_str(rid)} appears twice in stream")
        seen.add(rid)
        if d.assign not in _ASSIGNS:
            raise MigrationFailed(f"VM {vm_name}: device {bdf_str(rid)} has unknown assign code")
        if rid not in functions:
            raise MigrationFailed(
                f"VM {vm_name}: no destination function given for device {bdf_str(rid)}"
            )
        fn = host.functions.get(functions[rid])
        if fn is None:
            raise MigrationFailed(
                f"VM {vm_name}: destination host {host.name} has no function "
                f"{bdf_str(functions[rid])} for device {bdf_str(rid)}"
            )
        if fn.enqcmd != bool(d.caps.enqcmd):
            want = "an enqcmd" if d.caps.enqcmd else "a non-enqcmd"
            raise MigrationFailed(
                f"VM {vm_name}: device {bdf_str(rid)} needs {want} function; "
                f"{host.name}/{fn.bdf} is not"
            )
    for rec in body.faults:
        if rec.qw1.FR not in _REASONS:
            raise MigrationFailed(f"VM {vm_name}: queued fault has unknown reason 0x{rec.qw1.FR:x}")
    extra = set(functions) - seen
    if extra:
        raise MigrationFailed(
            f"VM {vm_name}: function map names devices the VM does not have: "
            + ", ".join(bdf_str(r) for r in sorted(extra))
        )
    try:
        with host.transaction():
            return _recreate(host, vm_name, body, memory, functions, regs.get(REG_RTADDR, 0))
    except MigrationFailed:
        raise
    except VioasidError as exc:
        raise MigrationFailed(f"VM {vm_name} cannot be re-created on {host.name}: {exc}") from exc


def _recreate(
    host: Host, vm_name: str, body: Any, memory: GuestMemory, functions: Mapping[int, int],
    rtaddr: int,
) -> VM:  # fmt: skip
    """Place the VM, attach and bind its devices, restore its queues; on any failure the VM
    is removed again (the caller's :meth:`Host.transaction` gives back the host memory)."""
    vm = host.add_vm(vm_name, memory, rtaddr=rtaddr)
    try:
        devs = [
            (host.attach_device(vm_name, d.guest_rid, functions[d.guest_rid], _ASSIGNS[d.assign]),
             d.vpasids)
            for d in body.devices
        ]  # fmt: skip
        # Devices that need pPASID == vPASID first: they cannot take what is left over.
        devs.sort(key=lambda item: (not item[0].rule.equal_x, item[0].guest_rid))
        for dev, vpasids in devs:
            host.bind_many(vm_name, dev.guest_rid, vpasids)
        if set(vm.cpu_table) != set(body.cpu_vpasids):
            raise MigrationFailed(
                f"VM {vm_name}: CPU PASID table vPASIDs {sorted(vm.cpu_table)} differ from the "
                f"source's {list(body.cpu_vpasids)}"
            )
        for rec in body.faults:
            qw1 = rec.qw1
            vm.queue_fault(
                Fault(FaultReason(qw1.FR), rec.qw0.FI, qw1.SID, qw1.PV if qw1.PP else None,
                      not qw1.T)
            )  # fmt: skip
        vm.fault_overflow = body.fault_overflow
        for desc in body.page_requests:
            vm.queue_page_request(PAGE_REQ_DESC.struct.build(desc))
        vm.prq_overflow = body.prq_overflow
    except BaseException:
        host.remove_vm(vm_name)
        raise
    return vm


__all__ = ["BODY", "decode_stream", "export_vm", "import_vm"]
