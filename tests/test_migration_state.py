"""Migration state: the stream format, refusals of bad streams, re-allocation on the
destination, all-or-nothing import, and what never travels (pPASIDs)."""

from __future__ import annotations

import struct
import zlib

import pytest
from engine_support import Lab

from vioasid.formats.migration import HEADER_SIZE, STREAM, VERSION
from vioasid.model.errors import MigrationFailed
from vioasid.model.migration import decode_stream, export_vm, import_vm


def _source(lab: Lab, occupy: int = 0) -> None:
    lab.host(
        "src",
        "per-device",
        (("3a:00.0", False, False), ("3b:00.0", True, False), ("3c:00.0", True, False)),
    )
    lab.tenant("noise", "src", "3c:00.0", occupy)
    lab.vm("vm", "src", (("00:03.0", "3a:00.0", "vfio-pci"), ("00:04.0", "3b:00.0", "mdev")))
    lab.map("vm", 5, 0x400000, 0x200000)
    lab.map("vm", 9, 0x400000, 0x300000, write=False)
    lab.bind("vm", "00:03.0", 5)
    lab.bind("vm", "00:04.0", 5)
    lab.bind("vm", "00:04.0", 9)
    lab.dma("vm", "00:04.0", 9, 0x400000, write=True)  # a queued fault
    lab.hosts["src"].page_request("vm", 0x20, 9, 0x400000)


def _dest(lab: Lab, policy: str = "per-device", occupy: int = 0) -> None:
    lab.host(
        "dst",
        policy,
        (("5e:00.0", False, False), ("5f:00.0", True, False), ("60:00.0", False, False)),
    )
    lab.tenant("resident", "dst", "5f:00.0", occupy)


FMAP = {"00:03.0": "5e:00.0", "00:04.0": "5f:00.0"}


def test_roundtrip_reallocates_ppasids() -> None:
    lab = Lab()
    _source(lab)
    _dest(lab, occupy=3)
    src = lab.hosts["src"]
    assert src.vm("vm").cpu_table == {5: 1, 9: 2}
    lab.migrate("vm", "dst", FMAP)
    dst = lab.hosts["dst"]
    vm = dst.vm("vm")
    assert vm.devices[0x18].ppasids == {5: 5}
    assert vm.devices[0x20].ppasids == {5: 4, 9: 5}
    assert vm.cpu_table == {5: 4, 9: 5}
    assert lab.enqcmd("vm", "00:04.0", 9) == 5
    r = lab.dma("vm", "00:04.0", 5, 0x400010, write=True)
    assert r.ok and r.tag == 4 and r.gpa == 0x200010 and r.hpa == vm.hpa + 0x200010
    assert len(vm.faults) == 1 and vm.faults[0].pasid == 9 and vm.faults[0].sid == 0x20
    assert len(vm.page_requests) == 1
    assert "vm" not in src.vms and src.check_invariants() == [] and dst.check_invariants() == []
    assert len(src.global_alloc) == 0


def test_stream_never_carries_ppasids() -> None:
    """The same guest state on hosts with different occupancy gives the same stream."""
    a, b = Lab(), Lab()
    _source(a)
    _source(b, occupy=7)
    sa, sb = export_vm(a.hosts["src"], "vm"), export_vm(b.hosts["src"], "vm")
    assert a.hosts["src"].vm("vm").cpu_table != b.hosts["src"].vm("vm").cpu_table
    assert sa == sb


def test_stream_layout_and_size() -> None:
    lab = Lab()
    _source(lab)
    s = export_vm(lab.hosts["src"], "vm")
    assert s[:8] == b"VIOASIDM" and struct.unpack_from("<HH", s, 8) == (VERSION, 0)
    assert struct.unpack_from("<I", s, len(s) - 4)[0] == zlib.crc32(s[HEADER_SIZE:-4])
    body = decode_stream(s)
    assert [list(d.vpasids) for d in body.devices] == [[5], [5, 9]]
    assert list(body.cpu_vpasids) == [5, 9]
    assert STREAM.parse(s).body.value.name == "vm"


def test_state_bytes_per_binding() -> None:
    lab = Lab()
    lab.host("src", "per-device", (("3b:00.0", False, False),))
    lab.vm("vm", "src", (("00:04.0", "3b:00.0", "mdev"),), memory=32 << 20)
    h = lab.hosts["src"]
    n = 2000
    for x in range(1, n + 1):
        lab.map("vm", x, 0x1000, 0x1000) if x == 1 else None
        g = lab.guests["vm"]
        g.driver.set_pasid_entry(0x20, x, pgtt=1, did=1, flptptr=g.table(1).root)
        h.bind("vm", 0x20, x)
    assert len(export_vm(h, "vm")) / n <= 32


class _Target:
    """A destination host with tenants, and the migrated guest RAM."""

    def __init__(self) -> None:
        lab = Lab()
        _dest(lab, occupy=2)
        self.dst = lab.hosts["dst"]
        src_lab = Lab()
        _source(src_lab)
        self.mem = src_lab.guests["vm"].memory
        self.before = self.dst.snapshot()

    def refuse(self, stream: bytes, match: str, *, check: bool = True) -> None:
        with pytest.raises(MigrationFailed, match=match) as info:
            import_vm(self.dst, stream, self.mem, {0x18: 0x5E00, 0x20: 0x5F00})
        assert info.value.kind == "migration-failed"
        assert set(self.dst.vms) == {"resident"}
        if check:
            assert self.dst.snapshot() == self.before


def _bad(stream: bytes, match: str) -> None:
    _Target().refuse(stream, match)


def _good() -> bytes:
    lab = Lab()
    _source(lab)
    return export_vm(lab.hosts["src"], "vm")


def test_corrupt_stream_refused() -> None:
    s = bytearray(_good())
    s[HEADER_SIZE + 10] ^= 0x40
    _bad(bytes(s), "checksum")


def test_every_truncation_refused() -> None:
    s = _good()
    target = _Target()
    for n in range(0, len(s)):
        target.refuse(s[:n], "truncated|not a vioasid", check=False)
    target.refuse(s + b"\0", "truncated|malformed")  # and the snapshot is still the same


def test_future_version_and_bad_magic_refused() -> None:
    s = bytearray(_good())
    struct.pack_into("<H", s, 8, VERSION + 1)
    _bad(bytes(s), "newer")
    s = bytearray(_good())
    s[0:8] = b"NOTVIOAS"
    _bad(bytes(s), "not a vioasid")
    s = bytearray(_good())
    struct.pack_into("<H", s, 8, VERSION - 1)  # an older layout is refused, not misread
    _bad(bytes(s), "not understood")


def test_a_long_vm_name_travels() -> None:
    """A VM name as long as the wire allows (u16 length) exports and imports unchanged."""
    lab = Lab()
    _source(lab)
    _dest(lab)
    long_name = "v" * 300 + "é" * 100
    vm = lab.hosts["src"].vms.pop("vm")
    vm.name = long_name
    lab.hosts["src"].vms[long_name] = vm
    stream = export_vm(lab.hosts["src"], long_name)
    assert decode_stream(stream).name == long_name


def test_import_failure_keeps_nothing_and_source_untouched() -> None:
    """The destination cannot re-create a binding: it keeps nothing, the source runs on."""
    lab = Lab()
    _source(lab)
    lab.host(
        "dst",
        "global",
        (("5e:00.0", False, False), ("5f:00.0", True, False), ("60:00.0", False, False)),
    )
    lab.vm("blocker", "dst", (("00:03.0", "60:00.0", "vfio-pci"),))
    lab.map("blocker", 5, 0x1000, 0x1000)
    lab.bind("blocker", "00:03.0", 5)  # global 5: vm's RID device would need it
    src, dst = lab.hosts["src"], lab.hosts["dst"]
    s_before, d_before = src.snapshot(), dst.snapshot()
    with pytest.raises(MigrationFailed, match="pPASID 5"):
        lab.migrate("vm", "dst", FMAP)
    assert src.snapshot() == s_before and dst.snapshot() == d_before
    assert lab.guests["vm"].host == "src"
    assert lab.dma("vm", "00:04.0", 5, 0x400000).ok


@pytest.mark.parametrize(
    ("fmap", "match"),
    [
        ({"00:03.0": "5e:00.0"}, "no destination function"),
        ({"00:03.0": "5e:00.0", "00:04.0": "77:00.0"}, "no function"),
        ({"00:03.0": "5e:00.0", "00:04.0": "60:00.0"}, "enqcmd"),
        ({"00:03.0": "5e:00.0", "00:04.0": "5f:00.0", "00:09.0": "60:00.0"}, "does not have"),
    ],
)
def test_bad_function_maps(fmap: dict[str, str], match: str) -> None:
    lab = Lab()
    _source(lab)
    _dest(lab)
    d_before = lab.hosts["dst"].snapshot()
    with pytest.raises(MigrationFailed, match=match):
        lab.migrate("vm", "dst", fmap)
    assert lab.hosts["dst"].snapshot() == d_before


def test_destination_memory_too_small_and_name_clash() -> None:
    lab = Lab()
    _source(lab)
    _dest(lab)
    lab.vm("vm", "dst")
    with pytest.raises(MigrationFailed, match="already has"):
        lab.migrate("vm", "dst", FMAP)
    from vioasid.model.memory import GuestMemory

    small = GuestMemory.from_bytes(1 << 20)
    with pytest.raises(MigrationFailed, match="memory"):
        import_vm(lab.hosts["dst"], export_vm(lab.hosts["src"], "vm"), small, {}, name="other")


def test_failure_after_some_bindings_gives_back_tables() -> None:
    """The import fails on a later binding (exhaustion): the leaf PASID tables, second stage
    and host range made for the earlier ones are given back too."""
    lab = Lab()
    _source(lab)
    lab.host(
        "dst", "per-device",
        (("5e:00.0", False, False), ("5f:00.0", True, False), ("61:00.0", True, False)),
        pasid_bits=3,
    )  # fmt: skip
    lab.vm("resident", "dst", (("00:03.0", "61:00.0", "mdev"),))
    for x in range(1, 7):
        lab.map("resident", x, 0x1000, 0x1000)
        lab.bind("resident", "00:03.0", x)  # global 1..6 of 1..7
    dst = lab.hosts["dst"]
    before = dst.snapshot()
    with pytest.raises(MigrationFailed, match="exhausted"):
        lab.migrate("vm", "dst", FMAP)
    assert dst.snapshot() == before
    assert lab.guests["vm"].host == "src"
