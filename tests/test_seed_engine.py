"""The seed demo's host side without QEMU: invariants that must be able to fail, the design
table's predictions (what ``vioasid demo --seed`` expects) against the engine, and the seed
rig's per-command checks (a refused bind changes no table)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_support import Lab

from qemu_glue import seed_demo
from qemu_glue.seed_rig import FIRST_SLOT, CommandRecord, SeedEngine, SeedFunction
from vioasid.formats.pasid_dma import BindCmd, BindStatus, FunctionType
from vioasid.model.engine import Host
from vioasid.model.errors import Exhausted, InvalidRequest, PasidConflict
from vioasid.model.faults import bdf_str

# -- check_invariants can fail -------------------------------------------------------------------


def _bound_lab() -> tuple[Lab, Host]:
    lab = Lab()
    h = lab.host("h", functions=(("3a:00.0", False, False), ("3c:00.0", False, False),
                                 ("5f:00.0", True, True)))  # fmt: skip
    lab.vm("vm", "h", (("00:03.0", "3a:00.0", "vfio-pci"), ("00:04.0", "3c:00.0", "mdev"),
                       ("00:05.0", "5f:00.0", "vfio-pci")))  # fmt: skip
    lab.vm("vm2", "h", (("00:04.0", "3c:00.0", "mdev"),))
    for vm, dev in (("vm", "00:03.0"), ("vm", "00:04.0"), ("vm", "00:05.0"), ("vm2", "00:04.0")):
        lab.map(vm, 5, 0x400000, 0x100000)
        lab.bind(vm, dev, 5)
    assert h.check_invariants() == []
    return lab, h


def _share_ppasid(h: Host) -> None:  # vm2's mdev takes vm's pPASID in the parent's table
    h.vms["vm2"].devices[0x20].ppasids[5] = h.vms["vm"].devices[0x20].ppasids[5]


def _x_not_equal(h: Host) -> None:  # the dedicated device no longer has pPASID == vPASID
    h.vms["vm"].devices[0x18].ppasids[5] = 6


def _global_leak(h: Host) -> None:  # a global pPASID nobody holds
    h.global_alloc.take(99)


def _cpu_table_drift(h: Host) -> None:  # the CPU table says something the bindings do not
    h.vms["vm"].cpu_table[5] = 42


def _per_rid_freed(h: Host) -> None:  # a live binding's per-RID value back in the free pool
    h.functions[0x3C00].allocator.free(h.vms["vm"].devices[0x20].ppasids[5])


def _host_entry_gone(h: Host) -> None:  # the host PASID-table entry of a live binding cleared
    h.iommu.clear(0x3A00, 5)


def _owner_drift(h: Host) -> None:  # the slot-owner map forgets a binding
    h.functions[0x5F00].owner.clear()


BREAKS: dict[str, tuple[Callable[[Host], None], str]] = {
    "share": (_share_ppasid, "shared by two bindings"),
    "equal-x": (_x_not_equal, "needs pPASID == 5"),
    "global-leak": (_global_leak, "global allocator"),
    "cpu-table": (_cpu_table_drift, "CPU table"),
    "per-rid-freed": (_per_rid_freed, "per-RID allocator"),
    "host-entry": (_host_entry_gone, "no host entry"),
    "owners": (_owner_drift, "table owners"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_check_invariants_reports_a_broken_invariant(name: str) -> None:
    _, h = _bound_lab()
    breaker, words = BREAKS[name]
    breaker(h)
    errs = h.check_invariants()
    assert errs, f"{name}: the broken invariant went unreported"
    assert any(words in e for e in errs), errs


# -- the design table's predictions (the demo's "expected") against the engine -----------------


def _seed_lab(policy: str) -> Lab:
    lab = Lab()
    lab.hosts["h"] = seed_demo.engine(policy)  # type: ignore[arg-type]
    devs = tuple(
        (bdf_str((FIRST_SLOT + i) << 3), bdf_str(s.function), s.assign)
        for i, s in enumerate(seed_demo.ONE_GUEST)
    )
    lab.vm("guest", "h", devs, memory=64 << 20)
    return lab


def _dev_rid(name: str) -> str:
    return bdf_str((FIRST_SLOT + int(name[3:])) << 3)


@pytest.mark.parametrize("policy", ["per-device", "global"])
def test_policy_predictions_are_what_the_engine_does(policy: str) -> None:
    lab = _seed_lab(policy)
    h = lab.where("guest")
    for dev, x, want in seed_demo._POLICY_PREDICTED[policy]:
        lab.map("guest", x, 0x400000, 0x100000)
        if isinstance(want, tuple):
            b = lab.bind("guest", _dev_rid(dev), x)
            assert (b.ppasid, b.space) == want, (dev, x)
        else:
            before = h.snapshot()
            with pytest.raises(PasidConflict):
                lab.bind("guest", _dev_rid(dev), x)
            assert h.snapshot() == before
        assert h.check_invariants() == []


def test_one_guest_sequence_predictions() -> None:
    """The one-guest run's binds in order: the values the demo's cases expect."""
    lab = _seed_lab("per-device")
    h = lab.where("guest")
    seq: list[tuple[str, int, tuple[int, str] | type[Exception]]] = [
        ("dma0", 5, (5, "per-rid")), ("dma1", 5, (5, "per-rid")), ("dma2", 5, (1, "per-rid")),
        ("dma4", 5, (1, "global")), ("dma5", 5, (1, "global")), ("dma3", 5, PasidConflict),
        ("dma0", 6, (6, "per-rid")), ("dma4", 6, (2, "global")), ("dma0", 9, (9, "per-rid")),
        ("dma3", 9, (9, "global")), ("dma6", 11, (1, "per-rid")), ("dma6", 12, (2, "per-rid")),
        ("dma6", 13, (3, "per-rid")), ("dma6", 14, Exhausted),
    ]  # fmt: skip
    for dev, x, want in seq:
        lab.map("guest", x, 0x400000, 0x100000)
        if isinstance(want, tuple):
            b = lab.bind("guest", _dev_rid(dev), x)
            assert (b.ppasid, b.space) == want, (dev, x)
        else:
            with pytest.raises(want):
                lab.bind("guest", _dev_rid(dev), x)
    assert h.vm("guest").cpu_table == {5: 1, 6: 2, 9: 9}
    assert lab.enqcmd("guest", _dev_rid("dma5"), 5) == 1
    assert h.check_invariants() == []


def test_function_pasid_bits() -> None:
    h = Host("h", pasid_bits=8)
    fn = h.add_function(0x100, pasid_bits=2)
    assert fn.pasid_bits == 2 and fn.allocator.limit == 4
    assert h.add_function(0x200).pasid_bits == 8
    with pytest.raises(InvalidRequest, match="pasid_bits"):
        h.add_function(0x300, pasid_bits=9)
    with pytest.raises(InvalidRequest, match="pasid_bits"):
        h.add_function(0x400, pasid_bits=0)


# -- the seed rig's host-side checks of every bind command --------------------------------------


def _rig_function(ftype: FunctionType, fn_rid: int, assign: str) -> tuple[Lab, SeedFunction]:
    lab = Lab()
    eng = SeedEngine("h")
    lab.hosts["h"] = eng
    for rid, (enq, tr, bits) in seed_demo._FUNCTIONS.items():
        eng.add_function(rid, enqcmd=enq, translating=tr, pasid_bits=bits)
    lab.vm("vm", "h", (("00:05.0", bdf_str(fn_rid), assign), ("00:06.0", "5f:00.0", "vfio-pci")))
    log: list[CommandRecord] = []
    f = SeedFunction(eng, "vm", 0x28, ftype, index=0, log_to=log, width=20)
    return lab, f


def test_rig_records_a_refused_bind_as_unchanged() -> None:
    lab, f = _rig_function(FunctionType.ENQCMD, 0x5E00, "vfio-pci")  # ENQCMD, not translating
    lab.map("vm", 5, 0x400000, 0x100000)
    lab.bind("vm", "00:06.0", 5)  # translating ENQCMD: CPU table 5 -> 1
    lab.guest_entry("vm", "00:05.0", 5)
    assert f.bind_command(BindCmd.BIND, 5) is BindStatus.PASID_CONFLICT
    rec = f.log_to[-1]
    assert rec.status == "pasid-conflict" and rec.in_the_way == 1
    assert rec.unchanged is True and rec.invariants == [] and rec.cpu_table == {5: 1}
    lab.map("vm", 9, 0x400000, 0x100000)
    lab.guest_entry("vm", "00:05.0", 9)
    assert f.bind_command(BindCmd.BIND, 9) is BindStatus.OK
    rec = f.log_to[-1]
    assert (rec.ppasid, rec.space, rec.unchanged) == (9, "global", None)
    assert rec.bindings_before == 1


def test_rig_exhaustion_and_guest_width() -> None:
    lab, f = _rig_function(FunctionType.MDEV, 0x6C00, "mdev")  # 2 PASID bits, guest sees 20
    assert f.width == 20
    got = []
    for x in (11, 12, 13, 14):
        lab.map("vm", x, 0x400000, 0x100000)
        lab.guest_entry("vm", "00:05.0", x)
        got.append(f.bind_command(BindCmd.BIND, x))
    assert got[:3] == [BindStatus.OK] * 3 and got[3] is BindStatus.EXHAUSTED
    assert [r.ppasid for r in f.log_to[:3]] == [1, 2, 3] and f.log_to[3].unchanged is True


def test_engine_flags_a_dma_outside_the_requesters_ram() -> None:
    lab, f = _rig_function(FunctionType.MDEV, 0x3C00, "mdev")
    eng = f.engine
    lab.map("vm", 5, 0x400000, 0x100000)
    lab.guest_entry("vm", "00:05.0", 5)
    assert f.bind_command(BindCmd.BIND, 5) is BindStatus.OK
    eng.requester = "vm"
    assert eng.dma("vm", 0x28, 5, 0x400010).ok and not eng.cross_vm
    lab.vm("other", "h", ())
    eng.requester = "other"  # the same translation, claimed by another VM: outside its RAM
    assert eng.dma("vm", 0x28, 5, 0x400010).ok
    assert eng.cross_vm and "other" in eng.cross_vm[0]


def test_parse_line() -> None:
    got = seed_demo.parse_line(
        "[ 1.0] VIOASID-SEED-STEP case=mdev dev=dma2 op=bind pasid=5 rc=0 err=none "
        "detail=ok pasid=5"
    )
    assert got == ("STEP", {"case": "mdev", "dev": "dma2", "op": "bind", "pasid": "5",
                            "rc": "0", "err": "none", "detail": "ok pasid=5"})  # fmt: skip
    assert seed_demo.parse_line("VIOASID-PASID-TEST name=x") is None
    assert seed_demo.errno_word(16) == "Device_or_resource_busy"


def test_every_example_points_at_a_real_guest_case() -> None:
    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert examples
    for p in examples:
        text = p.read_text()
        assert "Real guests: `vioasid demo --" in text, p.name
        if "--seed" in text:
            assert any(f" {c} " in text.replace(",", " ").replace("\n#", " ") for c in
                       seed_demo.CASES), p.name  # fmt: skip


@pytest.mark.asyncio
async def test_rig_serves_its_engine_to_vioasid_status(tmp_path: Path) -> None:
    """The tenants' engine on the daemon's server: the daemon client reads its tables."""
    from qemu_glue.seed_rig import SeedRig

    lab, f = _rig_function(FunctionType.MDEV, 0x6A00, "mdev")
    lab.map("vm", 1, 0x400000, 0x100000)
    lab.guest_entry("vm", "00:05.0", 1)
    assert f.bind_command(BindCmd.BIND, 1) is BindStatus.OK
    sock = tmp_path / "vioasid.sock"
    async with SeedRig(f.engine, status_socket=sock):
        doc = await seed_demo._status(sock)
    assert doc["functions"]["h/6a:00.0"]["table"] == {
        "1": {"vm": "vm", "device": "00:05.0", "vpasid": 1}
    }
    assert doc["allocators"]["functions"]["6a:00.0"]["per_rid"] == [1]
    assert not sock.exists()
