"""vPASID tables of extra, virtual devices in a reserved range of a real guest's RAM.

No QEMU device exposes a PASID capability, so the non-zero vPASIDs a migration must carry belong
to virtual devices vioasid adds to the VM: the guest-driver model
(:class:`~vioasid.model.guest_driver.GuestIommuDriver`) lays out their scalable-mode root,
context, PASID directory / table entries and one first-stage page table exactly as Linux would,
but inside ``[base, base + size)`` of the guest's RAM, a range the guest kernel is told to leave
alone with ``memmap=SIZE$ADDR`` (:func:`memmap_param`; the ``$`` needs quoting only when the
command line passes through a shell or a boot loader — vioasid hands QEMU its argv directly).

The tables therefore live in guest RAM: QEMU's own RAM migration carries them, and the
destination daemon re-reads them from the destination's RAM on import (and re-binds every vPASID
with a pPASID of its own). :func:`register` tells a daemon about the VM (its RAM as one fd
region, the root table, the devices, one ``PASID_ENTRY`` per binding, as the guest's
invalidations would). :func:`digest` fingerprints the range, to show it arrived intact.

Write the tables after the guest kernel has booted (before, firmware or the boot loader may
still use that RAM) and before a migration starts: writes through this mapping bypass QEMU's
dirty tracking, so a write during a migration would not be carried.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vioasid.client import Client, MemoryRegion
from vioasid.formats.pasid import PASID_ENTRY, PGTT_FIRST_STAGE
from vioasid.model.faults import bdf_str, parse_bdf
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory

MIB = 1 << 20
# 4 MiB: below the kernel (loaded at 16 MiB), clear of firmware (< 1 MiB) and initrd (top of
# RAM). Low on purpose: QEMU's first RAM pass sends pages in address order, so the tables reach
# the destination early and the vPASID pre-copy has the rest of the pass to finish.
DEFAULT_BASE = 0x0040_0000
DEFAULT_SIZE = 8 * MIB
GUEST_DID = 7  # the domain id the guest driver gives its PASID entries
DATA_IOVA = 0x4000_0000  # where each vPASID's first-stage table maps the data pages
DATA_PAGES = 4


def memmap_param(base: int = DEFAULT_BASE, size: int = DEFAULT_SIZE) -> str:
    """``memmap=SIZE$ADDR`` for the guest kernel command line (reserve the range)."""
    if size % MIB or base % MIB:
        raise ValueError("reserve base and size must be MiB aligned")
    return f"memmap={size // MIB}M${base:#x}"


@dataclass(frozen=True)
class VirtualDevice:
    """One virtual device of the VM: guest RID, the host function backing it, its vPASIDs."""

    rid: int
    function: int
    assign: str = "vfio-pci"  # vfio-pci | mdev
    vpasids: tuple[int, ...] = ()

    @classmethod
    def parse(cls, rid: str, function: str, assign: str, vpasids: Iterable[int]) -> VirtualDevice:
        return cls(parse_bdf(rid), parse_bdf(function), assign, tuple(vpasids))

    def to_json(self) -> dict[str, object]:
        return {
            "rid": bdf_str(self.rid),
            "function": bdf_str(self.function),
            "assign": self.assign,
            "vpasids": len(self.vpasids),
        }


class VpasidTables:
    """The guest-driver model writing tables into ``[base, base + size)`` of ``memory``."""

    def __init__(
        self,
        memory: GuestMemory,
        base: int = DEFAULT_BASE,
        size: int = DEFAULT_SIZE,
        *,
        pasid_bits: int = 20,
    ) -> None:
        self.memory = memory
        self.base = base
        self.size = size
        self.pages = PageAllocator(memory, base, size)
        self.driver = GuestIommuDriver.for_pasid_bits(memory, self.pages, pasid_bits)
        self.first_stage = FirstStagePageTable(memory, self.pages)
        self.data = self.pages.alloc(DATA_PAGES)
        self.first_stage.map(DATA_IOVA, self.data, DATA_PAGES * 4096)
        self.devices: list[VirtualDevice] = []

    @property
    def rtaddr(self) -> int:
        """What the guest would program into RTADDR_REG for these tables."""
        return self.driver.rtaddr

    def add(self, dev: VirtualDevice) -> None:
        """Attach the device (context entry, PASID directory) and write one present
        first-stage PASID entry per vPASID (``intel_pasid_setup_first_level``)."""
        self.driver.attach_device(dev.rid)
        entry = PASID_ENTRY.build(
            {
                "P": 1,
                "PGTT": PGTT_FIRST_STAGE,
                "DID": GUEST_DID,
                "FLPTPTR": self.first_stage.root,
                "FLPM": 0,
                "AW": 2,
            }
        )
        mem = self.memory
        for x in dev.vpasids:
            gpa = self.driver.pasid_entry_gpa(dev.rid, x, create=True)
            mem.write(gpa + 8, entry[8:])
            mem.write(gpa, entry[:8])  # P last
        self.devices.append(dev)

    def digest(self) -> str:
        return digest(self.memory, self.base, self.size)


def digest(memory: GuestMemory, base: int = DEFAULT_BASE, size: int = DEFAULT_SIZE) -> str:
    """SHA-256 of the reserved range (source and destination must agree)."""
    return hashlib.sha256(memory.view(base, size)).hexdigest()


async def register(
    client: Client,
    name: str,
    regions: Sequence[MemoryRegion],
    tables: VpasidTables,
    *,
    window: int = 512,
) -> int:
    """Register the VM with a daemon and bind every vPASID of ``tables``' devices; the VM id.

    The connection owns the VM (it lives as long as ``client``). ``PASID_ENTRY`` requests are
    pipelined ``window`` at a time.
    """
    vm = await client.register_vm(name, regions)
    await client.set_root_table(vm, tables.rtaddr)
    for dev in tables.devices:
        await client.attach_device(vm, dev.rid, dev.function, dev.assign)
        xs = list(dev.vpasids)
        for i in range(0, len(xs), window):
            await asyncio.gather(*(client.pasid_entry(vm, dev.rid, x) for x in xs[i : i + window]))
    return vm


def ppasid_table(dump: dict[str, object], vm_name: str) -> dict[str, dict[int, int]]:
    """``{guest rid: {vPASID: pPASID}}`` of one VM from a daemon ``dump``."""
    vms = dump.get("vms")
    if not isinstance(vms, dict) or vm_name not in vms:
        return {}
    out: dict[str, dict[int, int]] = {}
    for rid, dev in vms[vm_name]["devices"].items():
        out[rid] = {int(x): int(pp) for x, pp in dev["bindings"].items()}
    return out


__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_SIZE",
    "VirtualDevice",
    "VpasidTables",
    "digest",
    "memmap_param",
    "ppasid_table",
    "register",
]
