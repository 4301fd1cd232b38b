"""A small example guest memory with VT-d scalable-mode tables built by the guest driver.

Used by ``vioasid example-image`` (README walkthrough), the CLI tests and the benchmarks: every
translation mode appears once, with the requests that exercise it listed in :data:`EXAMPLES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vioasid.formats.pasid import (
    PGTT_FIRST_STAGE,
    PGTT_NESTED,
    PGTT_PASS_THROUGH,
    PGTT_SECOND_STAGE,
)

from .guest_driver import (
    FirstStagePageTable,
    GuestIommuDriver,
    PageAllocator,
    SecondStagePageTable,
)
from .memory import GuestMemory

EXAMPLE_SIZE = 8 << 20  # 8 MiB of guest RAM
TABLE_POOL = (0x100000, 0x100000)  # page-table pages come from [1 MiB, 2 MiB)


@dataclass(frozen=True)
class ExampleRequest:
    bdf: str
    addr: int
    pasid: int | None
    note: str
    write: bool = False


EXAMPLES = (
    ExampleRequest("00:03.0", 0x1234, None, "first-stage 4 KiB page (RID_PASID 0)"),
    ExampleRequest("00:03.0", 0x40001234, None, "first-stage 2 MiB read-only page"),
    ExampleRequest("00:03.0", 0x40001234, None, "write to a read-only page: fault 0x85", True),
    ExampleRequest("00:03.0", 0x100040, 5, "second-stage (PASID 5)"),
    ExampleRequest("00:03.0", 0x345678, 9, "pass-through (PASID 9)"),
    ExampleRequest("00:03.0", 0x2000, 12, "nested (PASID 12)"),
    ExampleRequest("00:03.0", 0x9000, None, "unmapped: fault 0x71"),
    ExampleRequest("00:04.0", 0x00FF_0000_1000, None, "first-stage 5-level"),
    ExampleRequest("00:10.0", 0x1000, None, "device in the upper context table"),
    ExampleRequest("00:05.0", 0x1000, None, "no context entry: fault 0x02"),
)


def build_example(mem: GuestMemory | None = None) -> tuple[GuestMemory, int]:
    """Fill (or create) an 8 MiB guest memory with example tables; returns (memory, RTADDR)."""
    if mem is None:
        mem = GuestMemory.from_bytes(EXAMPLE_SIZE)
    alloc = PageAllocator(mem, *TABLE_POOL)
    drv = GuestIommuDriver(mem, alloc, pdts=2)

    # 00:03.0: first stage for RID_PASID 0, second stage PASID 5, pass-through 9, nested 12.
    sid = 0x18
    drv.attach_device(sid)
    fs = FirstStagePageTable(mem, alloc)
    fs.map(0x0, 0x200000, 0x8000)
    fs.map(0x40000000, 0x400000, 0x200000, write=False)
    drv.set_pasid_entry(sid, 0, pgtt=PGTT_FIRST_STAGE, did=1, flptptr=fs.root)

    ss = SecondStagePageTable(mem, alloc, levels=4)
    ss.map(0x100000, 0x300000, 0x10000)
    drv.set_pasid_entry(sid, 5, pgtt=PGTT_SECOND_STAGE, did=2, ssptptr=ss.root, aw=ss.aw)

    drv.set_pasid_entry(sid, 9, pgtt=PGTT_PASS_THROUGH, did=3)

    # Nested: the second stage maps the table pool 1:1 and shifts data by 4 MiB.
    nss = SecondStagePageTable(mem, alloc, levels=4)
    nfs = FirstStagePageTable(mem, alloc)
    nfs.map(0x0, 0x200000, 0x8000)
    nss.map_identity(*TABLE_POOL)
    nss.map(0x200000, 0x600000, 0x200000)
    drv.set_pasid_entry(
        sid, 12, pgtt=PGTT_NESTED, did=4, flptptr=nfs.root, ssptptr=nss.root, aw=nss.aw
    )

    # 00:04.0: 5-level first stage.
    drv.attach_device(0x20)
    fs5 = FirstStagePageTable(mem, alloc, levels=5)
    fs5.map(0x00FF_0000_0000, 0x500000, 0x4000)
    drv.set_pasid_entry(0x20, 0, pgtt=PGTT_FIRST_STAGE, did=5, flptptr=fs5.root, flpm=1)

    # 00:10.0 (devfn 0x80): upper half of the root entry.
    drv.attach_device(0x80)
    drv.set_pasid_entry(0x80, 0, pgtt=PGTT_FIRST_STAGE, did=6, flptptr=fs.root)
    return mem, drv.rtaddr
