"""Wire protocol layouts: header, flags, request numbers, payload round-trips, fast structs."""

from __future__ import annotations

import construct as cs
import pytest

from vioasid.formats import wire
from vioasid.formats.wire import ErrorCode, Request


def test_header_is_vhost_user_framing() -> None:
    raw = wire.HEADER.build({"request": 1, "flags": 1 | wire.FLAG_REPLY, "size": 8})
    assert raw == bytes([1, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0])
    assert wire.HEADER_SIZE == len(raw) == wire.HEADER_S.size
    assert wire.HEADER_S.unpack(raw) == (1, 5, 8)
    assert wire.FLAG_NEED_REPLY == 8
    assert wire.FLAG_RESERVED & 0xF == 0 and wire.FLAG_RESERVED >> 4 == 0x0FFFFFFF


def test_request_numbers() -> None:
    assert (int(Request.GET_FEATURES), int(Request.SET_FEATURES)) == (1, 2)
    for r in Request:
        if r in (Request.GET_FEATURES, Request.SET_FEATURES):
            continue
        if r.name.endswith("_EVENT"):
            assert r in wire.VIOASID_EVENTS
        else:
            assert r in wire.VIOASID_REQUESTS
    assert set(wire.EVENT_LAYOUTS) == {r for r in Request if r.name.endswith("_EVENT")}
    assert set(wire.REQUEST_LAYOUTS) == {r for r in Request if not r.name.endswith("_EVENT")}


def test_features_reply_is_a_bare_u64() -> None:
    raw = wire.FEATURES.build({"features": int(wire.ALL_FEATURES)})
    assert len(raw) == 8
    assert wire.FEATURES.parse(raw).features == wire.ALL_FEATURES


def test_status_reply_ok_is_eight_zero_bytes_and_error_carries_utf8() -> None:
    assert wire.STATUS_REPLY.build({"status": 0, "body": {}}) == bytes(8)
    raw = wire.STATUS_REPLY.build({"status": 1, "body": "PASID 5 taken — by vm2"})
    parsed = wire.STATUS_REPLY.parse(raw)
    assert parsed.status == ErrorCode.PASID_CONFLICT
    assert parsed.body == "PASID 5 taken — by vm2"


def test_error_codes_are_the_contract_kinds() -> None:
    kinds = {c.kind for c in ErrorCode if c not in (ErrorCode.OK, ErrorCode.INTERNAL)}
    assert kinds == {
        "pasid-conflict", "invalid", "not-found", "exhausted", "migration-failed", "not-owner"
    }  # fmt: skip
    for c in ErrorCode:
        assert ErrorCode.from_kind(c.kind) is c


def test_every_reply_layout_accepts_an_error_body() -> None:
    for layout in wire.REPLY_LAYOUTS.values():
        if layout is wire.FEATURES:
            continue
        parsed = layout.parse((3).to_bytes(8, "little") + b"no such VM")
        assert parsed.status == 3 and parsed.body == "no such VM"


def test_register_vm_round_trip_and_fd_count() -> None:
    body = {
        "flags": 0,
        "nregions": 2,
        "name": "vm-ü",
        "regions": [
            {"guest_phys_addr": 0, "memory_size": 0xA0000, "userspace_addr": 0, "mmap_offset": 0},
            {
                "guest_phys_addr": 0xC0000,
                "memory_size": 0x1000,
                "userspace_addr": 7,
                "mmap_offset": 0xC0000,
            },
        ],
    }
    parsed = wire.REGISTER_VM.parse(wire.REGISTER_VM.build(body))
    assert parsed.name == "vm-ü" and parsed.regions[1].mmap_offset == 0xC0000
    assert wire.request_fds(Request.REGISTER_VM, parsed) == 2
    assert wire.request_fds(Request.DUMP, None) == 0


def test_trailing_bytes_are_refused() -> None:
    raw = wire.VM_REF.build({"vm": 3})
    with pytest.raises(cs.ConstructError):
        wire.VM_REF.parse(raw + b"x")


def test_fast_structs_match_the_construct_layouts() -> None:
    entry = {"rid": 0x18, "flags": 3, "pasid": 77, "addr": 0x400010}
    assert wire.DMA_ENTRY.build(entry) == wire.DMA_ENTRY_S.pack(0x18, 3, 77, 0x400010)
    result = {"status": 1, "reason": 0x71, "perm": 0, "tag": 5, "gpa": 9, "hpa": 10}
    assert wire.DMA_RESULT.build(result) == wire.DMA_RESULT_S.pack(1, 0x71, 0, 5, 9, 10)
    assert wire.DMA_HEAD.build({"vm": 1, "count": 2}) == wire.DMA_HEAD_S.pack(1, 2)
    fe = wire.struct_of(wire.FAULT_EVENT)
    assert fe.size == len(
        wire.FAULT_EVENT.build(
            {
                "vm": 1,
                "rid": 2,
                "reason": 3,
                "flags": 1,
                "vpasid": 4,
                "addr": 5,
                "record": bytes(16),
            }
        )
    )


def test_dma_reply_layout() -> None:
    res = [{"status": 0, "reason": 0, "perm": 3, "tag": 5, "gpa": 0x1000, "hpa": 0x1_0000_1000}]
    raw = wire.DMA_REPLY.build({"status": 0, "body": {"count": 1, "results": res}})
    assert len(raw) == 8 + 8 + wire.DMA_RESULT_S.size
    assert wire.DMA_RESULT_S.unpack_from(raw, 16) == (0, 0, 3, 5, 0x1000, 0x1_0000_1000)


def test_import_vm_layout() -> None:
    body = {
        "name": "vm1",
        "nregions": 0,
        "regions": [],
        "nmap": 1,
        "map": [{"rid": 0x18, "function": 0x3A00}],
        "stream": b"\x01\x02",
    }
    parsed = wire.IMPORT_VM.parse(wire.IMPORT_VM.build(body))
    assert parsed.stream == b"\x01\x02" and parsed.map[0].function == 0x3A00


def test_import_vm_reply_is_a_packed_binding_array() -> None:
    """``count`` 12-byte BINDING records back to back; BINDING_S is the same bytes."""
    rows = [(0x18, int(wire.Space.PER_RID), 5, 1), (0x20, int(wire.Space.GLOBAL), 7, 0x12345)]
    block = b"".join(wire.BINDING_S.pack(*r) for r in rows)
    assert wire.BINDING_S.size == wire.BINDING.sizeof() == 12
    assert block[:12] == wire.BINDING.build({"rid": 0x18, "space": 1, "vpasid": 5, "ppasid": 1})
    raw = wire.IMPORT_VM_REPLY.build(
        {"status": 0, "body": {"vm": 3, "count": 2, "bindings": block}}
    )
    assert (
        raw
        == (0).to_bytes(8, "little")
        + wire.struct_of(cs.Struct("vm" / cs.Int32ul, "count" / cs.Int32ul)).pack(3, 2)
        + block
    )
    parsed = wire.IMPORT_VM_REPLY.parse(raw).body
    assert parsed.vm == 3 and list(wire.BINDING_S.iter_unpack(parsed.bindings)) == rows
    assert wire.BINDING.parse(parsed.bindings[12:]).ppasid == 0x12345
    # the block must hold exactly ``count`` records
    for bad in (raw[:-1], raw + b"\0"):
        with pytest.raises(cs.ConstructError):
            wire.IMPORT_VM_REPLY.parse(bad)
    with pytest.raises(cs.ConstructError):
        wire.IMPORT_VM_REPLY.build({"status": 0, "body": {"vm": 3, "count": 3, "bindings": block}})
