"""Test support for the vPASID engine: hosts, VMs and a Linux-like guest driver in one object.

``Lab`` keeps, per VM, the guest side (RAM, GuestIommuDriver, one first-stage table per vPASID)
next to the :class:`~vioasid.model.engine.Host` it runs on, so tests read like the scenario
steps: ``lab.map(...)``, ``lab.bind(...)``, ``lab.dma(...)``.
"""

from __future__ import annotations

import mmap

from vioasid.formats.pasid import PGTT_FIRST_STAGE
from vioasid.model.engine import Binding, DmaResult, Host
from vioasid.model.faults import parse_bdf
from vioasid.model.guest_driver import GuestIommuDriver, PageAllocator
from vioasid.model.memory import GuestMemory
from vioasid.model.migration import export_vm, import_vm
from vioasid.model.scenario import GuestSide

MB = 1 << 20


def bdf(text: str | int) -> int:
    return text if isinstance(text, int) else parse_bdf(text)


class Lab:
    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.guests: dict[str, GuestSide] = {}

    def host(
        self,
        name: str,
        allocation: str = "per-device",
        functions: tuple[tuple[str, bool, bool], ...] = (),
        pasid_bits: int = 20,
    ) -> Host:
        h = Host(
            name,
            allocation=allocation,  # type: ignore[arg-type]
            pasid_bits=pasid_bits,
            hpa_base=(len(self.hosts) + 1) << 40,
        )
        for rid, enqcmd, translating in functions:
            h.add_function(bdf(rid), enqcmd=enqcmd, translating=translating)
        self.hosts[name] = h
        return h

    def vm(
        self,
        name: str,
        host: str,
        devices: tuple[tuple[str, str, str], ...] = (),
        memory: int = 16 * MB,
    ) -> GuestSide:
        mem = GuestMemory()
        mem.add(0, mmap.mmap(-1, memory), name="ram")
        pages = PageAllocator(mem, memory // 2, memory // 2)
        driver = GuestIommuDriver.for_pasid_bits(mem, pages, 20)
        h = self.hosts[host]
        h.add_vm(name, mem, rtaddr=driver.rtaddr)
        for rid, fn, assign in devices:
            h.attach_device(name, bdf(rid), bdf(fn), assign)  # type: ignore[arg-type]
            driver.attach_device(bdf(rid))
        g = GuestSide(mem, driver, pages, host)
        self.guests[name] = g
        return g

    def tenant(self, name: str, host: str, function: str, count: int) -> None:
        """VM ``name`` on ``host`` whose mdev of ``function`` binds vPASIDs 1..``count`` (the
        occupancy a VM under test then meets); nothing when ``count`` is 0."""
        if not count:
            return
        self.vm(name, host, (("00:03.0", function, "mdev"),))
        for x in range(1, count + 1):
            self.map(name, x, 0x1000, 0x1000)
            self.bind(name, "00:03.0", x)

    def where(self, vm: str) -> Host:
        return self.hosts[self.guests[vm].host]

    def map(
        self, vm: str, x: int, va: int, gpa: int, size: int = 0x1000, write: bool = True
    ) -> None:
        self.guests[vm].table(x).map(va, gpa, size, write=write)

    def guest_entry(self, vm: str, dev: str | int, x: int) -> None:
        g = self.guests[vm]
        g.driver.set_pasid_entry(bdf(dev), x, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=g.table(x).root)

    def bind(self, vm: str, dev: str | int, x: int) -> Binding:
        self.guest_entry(vm, dev, x)
        return self.where(vm).bind(vm, bdf(dev), x)

    def unbind(self, vm: str, dev: str | int, x: int) -> Binding:
        g = self.guests[vm]
        b = self.where(vm).unbind(vm, bdf(dev), x)
        g.driver.clear_pasid_entry(bdf(dev), x)
        return b

    def dma(self, vm: str, dev: str | int, x: int, addr: int, write: bool = False) -> DmaResult:
        return self.where(vm).dma(vm, bdf(dev), x, addr, write=write)

    def enqcmd(self, vm: str, dev: str | int, x: int) -> int:
        return self.where(vm).enqcmd(vm, bdf(dev), x)

    def migrate(self, vm: str, to: str, functions: dict[str, str]) -> None:
        g = self.guests[vm]
        src, dst = self.where(vm), self.hosts[to]
        stream = export_vm(src, vm)
        import_vm(dst, stream, g.memory, {bdf(k): bdf(v) for k, v in functions.items()})
        src.remove_vm(vm)
        g.host = to
