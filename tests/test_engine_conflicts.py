"""Every conflict rule (README "Conflicts") in both policies; a refusal changes nothing.

Each case builds some occupancy, snapshots the whole host (dump, every allocator, every present
host PASID-table entry, CPU tables, host memory regions), attempts the bind, checks the error
kind and that it names VM, device, vPASID and the pPASID in the way, and compares snapshots.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from engine_support import Lab

from vioasid.model.errors import Exhausted, PasidConflict

Case = Callable[[Lab], tuple[str, str, int, int, int, str]]  # vm, dev, X, pPASID, rule, kind


def _other_holds_global(lab: Lab, policy: str, xs: tuple[int, ...]) -> None:
    """VM 'other' holds global pPASIDs == xs (RID devices under global, row 3 per-device)."""
    lab.vm("other", "h", (("00:03.0", "30:00.0", "vfio-pci"),))
    for x in xs:
        lab.map("other", x, 0x1000, 0x1000)
        lab.bind("other", "00:03.0", x)


FUNCS = (
    ("10:00.0", False, False),  # plain RID function
    ("11:00.0", True, False),  # ENQCMD, not translating
    ("12:00.0", True, False),  # ENQCMD mdev parent
    ("13:00.0", False, True),  # translating
    ("14:00.0", False, False),  # plain mdev parent
    ("30:00.0", True, False),  # the other VM's ENQCMD RID function (global X either way)
)
DEVS = (
    ("00:03.0", "10:00.0", "vfio-pci"),
    ("00:04.0", "11:00.0", "vfio-pci"),
    ("00:05.0", "12:00.0", "mdev"),
    ("00:06.0", "13:00.0", "vfio-pci"),
    ("00:07.0", "14:00.0", "mdev"),
    ("00:08.0", "12:00.0", "mdev"),  # a second mdev of the same ENQCMD parent
)


def rule1_global_x_taken_enqcmd(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    _other_holds_global(lab, policy, (5,))
    return "vm", "00:04.0", 5, 5, 1, "pasid-conflict"


def rule1_global_x_taken_rid(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    _other_holds_global(lab, policy, (5,))
    if policy == "per-device":  # a RID device has its own table: no conflict there
        return "", "00:03.0", 5, 5, 0, ""
    return "vm", "00:03.0", 5, 5, 1, "pasid-conflict"


def rule1_beyond_space(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    return "vm", "00:03.0", 40, 40, 1, "pasid-conflict"  # host has 5-bit PASIDs


def rule2_cpu_table(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    _other_holds_global(lab, policy, (1,))
    lab.map("vm", 5, 0x1000, 0x1000)
    assert lab.bind("vm", "00:05.0", 5).ppasid == 2  # CPU table: 5 -> 2
    return "vm", "00:04.0", 5, 2, 2, "pasid-conflict"


def rule2_global_value(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    _other_holds_global(lab, policy, (1,))
    lab.map("vm", 5, 0x1000, 0x1000)
    b = lab.bind("vm", "00:06.0", 5)  # translating: X under per-device, global 2 under global
    if policy == "per-device":
        assert b.ppasid == 5
        return "", "00:03.0", 5, 5, 0, ""
    assert b.ppasid == 2
    return "vm", "00:03.0", 5, 2, 2, "pasid-conflict"


def rule3_per_rid_exhausted(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    lab.vm("other", "h", (("00:03.0", "14:00.0", "mdev"),))
    for x in range(1, 32):
        lab.map("other", x, 0x1000, 0x1000)
        lab.bind("other", "00:03.0", x)  # fills the 5-bit space (per-RID or global)
    return "vm", "00:07.0", 3, -1, 3, "exhausted"


def rule3_global_exhausted(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    _other_holds_global(lab, policy, tuple(range(1, 32)))
    return "vm", "00:05.0", 3, -1, 3, "exhausted"


def rule4_same_parent_slot(lab: Lab, policy: str) -> tuple[str, str, int, int, int, str]:
    lab.map("vm", 5, 0x1000, 0x1000)
    assert lab.bind("vm", "00:05.0", 5).ppasid == 1
    return "vm", "00:08.0", 5, 1, 4, "pasid-conflict"


CASES = [
    rule1_global_x_taken_enqcmd,
    rule1_global_x_taken_rid,
    rule1_beyond_space,
    rule2_cpu_table,
    rule2_global_value,
    rule3_per_rid_exhausted,
    rule3_global_exhausted,
    rule4_same_parent_slot,
]


@pytest.mark.parametrize("policy", ["per-device", "global"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_conflict_rule(
    case: Callable[[Lab, str], tuple[str, str, int, int, int, str]], policy: str
) -> None:
    lab = Lab()
    h = lab.host("h", policy, FUNCS, pasid_bits=5)
    lab.vm("vm", "h", DEVS)
    vm, dev, x, pp, rule, kind = case(lab, policy)
    lab.map("vm", x, 0x1000, 0x1000)
    if not kind:  # the rule does not apply under this policy: the bind succeeds
        assert lab.bind("vm", dev, x).ppasid == pp
        assert h.check_invariants() == []
        return
    dma_before = lab.dma(vm, dev, x, 0x1000).to_json()
    before = h.snapshot()
    with pytest.raises(PasidConflict) as info:
        lab.bind(vm, dev, x)
    err = info.value
    assert err.kind == kind
    assert isinstance(err, Exhausted) == (kind == "exhausted")
    assert (err.vm, err.device, err.vpasid, err.rule) == (vm, dev, x, rule)
    assert f"VM {vm}" in err.message and dev in err.message and f"vPASID {x}" in err.message
    if pp >= 0:
        assert err.ppasid == pp and f"pPASID {pp}" in err.message
    assert h.snapshot() == before
    assert h.check_invariants() == []
    h.vm(vm).faults.clear()
    assert lab.dma(vm, dev, x, 0x1000).to_json() == dma_before


@pytest.mark.parametrize("policy", ["per-device", "global"])
def test_seed_trouble_case_order(policy: str) -> None:
    """Same vPASID to a RID device and an ENQCMD device: fine per-device in either order when
    the ENQCMD device translates; refused for a non-translating one once the CPU table says
    otherwise; fine in the other order."""
    lab = Lab()
    h = lab.host("h", policy, FUNCS, pasid_bits=5)
    lab.vm("vm", "h", DEVS)
    _other_holds_global(lab, policy, (1,))
    lab.map("vm", 4, 0x1000, 0x1000)
    lab.map("vm", 6, 0x1000, 0x1000)
    # Non-translating ENQCMD RID device first: global 6 == 6, then the mdev reuses it.
    assert lab.bind("vm", "00:04.0", 6).ppasid == 6
    assert lab.bind("vm", "00:05.0", 6).ppasid == 6
    assert lab.bind("vm", "00:03.0", 6).ppasid == 6
    # mdev first: global 2 != 4, then the non-translating function is refused.
    assert lab.bind("vm", "00:05.0", 4).ppasid == 2
    with pytest.raises(PasidConflict) as info:
        lab.bind("vm", "00:04.0", 4)
    assert info.value.rule == 2 and info.value.ppasid == 2
    assert h.check_invariants() == []


def test_assignment_rules() -> None:
    """A function is whole to one VM or split into mdevs, never both."""
    lab = Lab()
    h = lab.host("h", "per-device", FUNCS)
    lab.vm("a", "h", (("00:03.0", "10:00.0", "vfio-pci"), ("00:04.0", "14:00.0", "mdev")))
    lab.vm("b", "h")
    from vioasid.model.errors import InvalidRequest, NotFound

    for fn, assign in (("10:00.0", "vfio-pci"), ("10:00.0", "mdev"), ("14:00.0", "vfio-pci")):
        before = h.snapshot()
        with pytest.raises(InvalidRequest):
            h.attach_device("b", 0x18, int(fn[:2], 16) << 8, assign)  # type: ignore[arg-type]
        assert h.snapshot() == before
    h.attach_device("b", 0x18, 0x1400, "mdev")  # another slice of the mdev parent is fine
    with pytest.raises(NotFound):
        h.attach_device("b", 0x20, 0x7700, "mdev")
    with pytest.raises(InvalidRequest):
        h.attach_device("b", 0x18, 0x1200, "mdev")  # guest RID taken
    h.detach_device("a", 0x18)
    h.attach_device("b", 0x28, 0x1000, "vfio-pci")  # free again
    assert h.functions[0x1000].vfio_vm == "b"
