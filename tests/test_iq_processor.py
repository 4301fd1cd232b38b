"""The invalidation-queue processor: decoding, dispatch to the caches, wait status, IQE."""

from __future__ import annotations

import struct

import pytest

from vioasid.formats.invalidation import (
    CC_DESC,
    DEV_PIOTLB_DESC,
    DEVICE_TLB_DESC,
    IEC_DESC,
    IOTLB_DESC,
    PC_DESC,
    PGRESP_DESC,
    PIOTLB_DESC,
    WAIT_DESC,
    build_desc,
)
from vioasid.formats.pasid import PGTT_FIRST_STAGE
from vioasid.model.cache import Caches
from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator
from vioasid.model.iq import InvalidationQueue
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest

QUEUE = 0x10000  # IQA base; QS=0: one 4 KiB page
STATUS = 0x20000
IQA_256 = QUEUE | (1 << 11)
IQA_128 = QUEUE


def put(mem: GuestMemory, descs: list[bytes], start: int = 0) -> int:
    off = start
    for d in descs:
        mem.write(QUEUE + off, d)
        off = (off + len(d)) % 4096
    return off


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.from_bytes(1 << 20)


def test_wait_writes_status(mem: GuestMemory) -> None:
    iq = InvalidationQueue(mem, Caches())
    tail = put(
        mem, [build_desc(WAIT_DESC, {"SW": 1, "IF": 1, "STATUS_DATA": 0xAB, "STATUS_ADDR": STATUS})]
    )
    head, descs, errors = iq.process(IQA_256, 0, tail)
    assert (head, errors) == (32, [])
    assert descs[0]["type"] == "wait" and descs[0]["STATUS_DATA"] == 0xAB
    assert struct.unpack_from("<I", mem.read(STATUS, 4))[0] == 0xAB
    assert iq.interrupts == 1 and iq.waits == 1


def test_every_type_dispatches(mem: GuestMemory) -> None:
    c = Caches()
    iq = InvalidationQueue(mem, c)
    descs = [
        build_desc(CC_DESC, {"G": 1}),
        build_desc(CC_DESC, {"G": 2, "DID": 3}),
        build_desc(CC_DESC, {"G": 3, "SID": 0x18, "FM": 1}),
        build_desc(IOTLB_DESC, {"G": 1}),
        build_desc(IOTLB_DESC, {"G": 2, "DID": 3}),
        build_desc(IOTLB_DESC, {"G": 3, "DID": 3, "ADDR": 0x5000, "AM": 1}),
        build_desc(PIOTLB_DESC, {"G": 2, "DID": 3, "PASID": 4}),
        build_desc(PIOTLB_DESC, {"G": 3, "DID": 3, "PASID": 4, "ADDR": 0x5000}),
        build_desc(PC_DESC, {"G": 0, "DID": 3}),
        build_desc(PC_DESC, {"G": 1, "DID": 3, "PASID": 4}),
        build_desc(PC_DESC, {"G": 3}),
        build_desc(DEVICE_TLB_DESC, {"SID": 0x18, "S": 1, "ADDR": 0x7FFFF000}),
        build_desc(DEV_PIOTLB_DESC, {"SID": 0x18, "PASID": 4, "S": 1}),
        build_desc(IEC_DESC, {"G": 1}),
        build_desc(PGRESP_DESC, {"PP": 1, "RID": 0x18, "PASID": 4, "LPIG": 1, "PRGI": 3}),
    ]
    tail = put(mem, descs)
    head, decoded, errors = iq.process(IQA_256, 0, tail)
    assert errors == [] and head == tail and len(decoded) == len(descs)
    for key in (
        "cc_global",
        "cc_domain",
        "cc_device",
        "iotlb_global",
        "iotlb_domain",
        "iotlb_page",
        "piotlb_pasid",
        "piotlb_page",
        "pc_dsi",
        "pc_pasid_si",
        "pc_global",
        "devtlb",
        "pasid_devtlb",
        "iec",
        "page_group_response",
    ):
        assert c.stats[key] == 1, key
    assert decoded[-1]["type"] == "page-group-response" and decoded[-1]["PRGI"] == 3


def test_128_bit_queue_and_wrap(mem: GuestMemory) -> None:
    iq = InvalidationQueue(mem, Caches())
    start = 4096 - 16
    tail = put(
        mem,
        [
            build_desc(IOTLB_DESC, {"G": 1}, wide=False),
            build_desc(WAIT_DESC, {"SW": 1, "STATUS_DATA": 7, "STATUS_ADDR": STATUS}, wide=False),
        ],
        start,
    )
    assert tail == 16
    head, decoded, errors = iq.process(IQA_128, start, tail)
    assert (head, errors, [d["index"] for d in decoded]) == (16, [], [255, 0])
    assert mem.read(STATUS, 4) == b"\x07\x00\x00\x00"


def test_invalid_descriptors_give_iqe(mem: GuestMemory) -> None:
    iq = InvalidationQueue(mem, Caches())
    good = build_desc(IOTLB_DESC, {"G": 1})
    bad_rsvd = bytearray(build_desc(IOTLB_DESC, {"G": 1}))
    bad_rsvd[1] |= 0x01  # bit 8: reserved
    tail = put(mem, [good, bytes(bad_rsvd), good])
    head, decoded, errors = iq.process(IQA_256, 0, tail)
    assert len(decoded) == 2 and decoded[1]["index"] == 1
    assert head == 32 and len(errors) == 1 and errors[0].startswith("IQE")
    # unknown type 0xf
    put(mem, [struct.pack("<4Q", 0xF, 0, 0, 0)])
    head, _, errors = iq.process(IQA_256, 0, 32)
    assert head == 0 and "unknown descriptor type" in errors[0]
    # non-zero qw2 in 256-bit mode
    put(mem, [build_desc(IOTLB_DESC, {"G": 1})[:16] + struct.pack("<2Q", 1, 0)])
    head, _, errors = iq.process(IQA_256, 0, 32)
    assert head == 0 and "qw2/qw3" in errors[0]
    # misaligned tail with DW=1
    _, _, errors = iq.process(IQA_256, 0, 16)
    assert errors and errors[0].startswith("IQE")
    # tail beyond the queue
    _, _, errors = iq.process(IQA_256, 0, 8192)
    assert errors and errors[0].startswith("IQE")


def test_wait_status_outside_memory(mem: GuestMemory) -> None:
    iq = InvalidationQueue(mem, Caches())
    put(mem, [build_desc(WAIT_DESC, {"SW": 1, "STATUS_ADDR": 0x1000_0000})])
    head, _, errors = iq.process(IQA_256, 0, 32)
    assert head == 0 and errors and errors[0].startswith("IQE")


def test_queue_outside_memory() -> None:
    mem = GuestMemory.from_bytes(0x8000)
    iq = InvalidationQueue(mem, Caches())
    _, _, errors = iq.process(0x100000 | (1 << 11), 0, 32)
    assert errors and "outside guest memory" in errors[0]


def test_guest_invalidation_takes_effect(mem: GuestMemory) -> None:
    """A Linux-style unmap: change the PTE, P_IOTLB PSI + wait; the walker sees the change."""
    alloc = PageAllocator(mem, 0x40000, 0x40000)
    drv = GuestIommuDriver(mem, alloc)
    drv.attach_device(0x18)
    fs = FirstStagePageTable(mem, alloc)
    fs.map(0x1000, 0x5000, 0x1000)
    drv.set_pasid_entry(0x18, 0, pgtt=PGTT_FIRST_STAGE, did=2, flptptr=fs.root)
    w = Walker(mem)
    iq = InvalidationQueue(mem, w)
    assert w.translate_fast(drv.rtaddr, 0x18, 0x1000) == 0x5000
    fs.unmap(0x1000, 0x1000)
    fs.map(0x1000, 0x6000, 0x1000)
    assert w.translate_fast(drv.rtaddr, 0x18, 0x1000) == 0x5000  # cached
    tail = put(
        mem,
        [
            build_desc(PIOTLB_DESC, {"G": 3, "DID": 2, "PASID": 0, "ADDR": 0x1000}),
            build_desc(WAIT_DESC, {"SW": 1, "STATUS_DATA": 1, "STATUS_ADDR": STATUS}),
        ],
    )
    head, _, errors = iq.process(IQA_256, 0, tail)
    assert (head, errors) == (tail, [])
    assert w.translate_fast(drv.rtaddr, 0x18, 0x1000) == 0x6000
    assert w.translate(drv.rtaddr, WalkRequest(0x18, 0x1000)).address == 0x6000  # type: ignore[union-attr]
