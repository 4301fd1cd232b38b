"""Every row of the policy table (README "pPASID allocation"), in both policies.

Each case binds vPASID X on a fresh host after another VM took the first global pPASIDs, so
"X", "lowest free in the function's space" and "lowest free global" give different values, then
checks the pPASID, its space, the tag a DMA carries, the CPU table and ENQCMD.
"""

from __future__ import annotations

import pytest
from engine_support import Lab

from vioasid.model.errors import InvalidRequest, NotFound
from vioasid.model.policy import rule_for

X = 9
# (policy, assign, enqcmd, translating) -> (row, space, pPASID for X, in CPU table)
# Occupancy before the bind: another VM holds global pPASIDs 1 and 2; when the function under
# test is an mdev parent, the other VM's mdev of it also bound vPASID 7 (per-RID 1 when it draws
# from its own space, else global 3).
CASES = {
    ("per-device", "vfio-pci", False, False): (1, "per-rid", X, False),
    ("per-device", "vfio-pci", False, True): (2, "per-rid", X, False),
    ("per-device", "vfio-pci", True, False): (3, "global", X, True),
    ("per-device", "vfio-pci", True, True): (4, "global", 3, True),
    ("per-device", "mdev", False, False): (5, "per-rid", 2, False),
    ("per-device", "mdev", False, True): (5, "per-rid", 2, False),
    ("per-device", "mdev", True, False): (6, "global", 4, True),
    ("per-device", "mdev", True, True): (6, "global", 4, True),
    ("global", "vfio-pci", False, False): (1, "global", X, False),
    ("global", "vfio-pci", False, True): (2, "global", 3, False),
    ("global", "vfio-pci", True, False): (3, "global", X, True),
    ("global", "vfio-pci", True, True): (4, "global", 3, True),
    ("global", "mdev", False, False): (5, "global", 4, False),
    ("global", "mdev", False, True): (5, "global", 4, False),
    ("global", "mdev", True, False): (6, "global", 4, True),
    ("global", "mdev", True, True): (6, "global", 4, True),
}


def _setup(policy: str, assign: str, enqcmd: bool, translating: bool) -> Lab:
    lab = Lab()
    lab.host(
        "h",
        policy,
        (
            ("10:00.0", True, False),  # the other VM's ENQCMD mdev parent
            ("20:00.0", enqcmd, translating),  # the function under test
        ),
    )
    other: tuple[tuple[str, str, str], ...] = (("00:03.0", "10:00.0", "mdev"),)
    if assign == "mdev":
        other += (("00:04.0", "20:00.0", "mdev"),)
    lab.vm("other", "h", other)
    for x in (1, 2):
        lab.map("other", x, 0x1000, 0x1000)
        lab.bind("other", "00:03.0", x)  # global 1, 2
    if assign == "mdev":
        lab.map("other", 7, 0x1000, 0x1000)
        lab.bind("other", "00:04.0", 7)  # per-RID 1 (per-device) / global 3 (global)
    lab.vm("vm", "h", (("00:05.0", "20:00.0", assign),))
    lab.map("vm", X, 0x400000, 0x300000)
    return lab


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: "-".join(map(str, c)))
def test_policy_row(case: tuple[str, str, bool, bool]) -> None:
    policy, assign, enqcmd, translating = case
    row, space, want, cpu = CASES[case]
    lab = _setup(policy, assign, enqcmd, translating)
    h = lab.hosts["h"]
    rule = rule_for(policy, assign, enqcmd, translating)  # type: ignore[arg-type]
    assert (rule.row, rule.space) == (row, space)
    b = lab.bind("vm", "00:05.0", X)
    assert (b.ppasid, b.space, b.row) == (want, space, row)
    # The device's tag on the wire is the pPASID (== X exactly for rows saying "X").
    r = lab.dma("vm", "00:05.0", X, 0x400010, write=True)
    assert r.ok and r.tag == want and r.gpa == 0x300010
    assert r.hpa == h.vm("vm").hpa + 0x300010
    assert rule.tag == ("X" if want == X and rule.equal_x else "pPASID")
    vm = h.vm("vm")
    assert (X in vm.cpu_table) == cpu
    if enqcmd:
        assert lab.enqcmd("vm", "00:05.0", X) == want
    else:
        with pytest.raises(InvalidRequest):
            lab.enqcmd("vm", "00:05.0", X)
    if space == "global":
        assert vm.global_ppasid[X] == want
        assert h.global_owner[want] == ("vm", X)
    else:
        assert want in h.functions[0x2000].allocator
    assert h.check_invariants() == []
    # Unbind gives everything back.
    lab.unbind("vm", "00:05.0", X)
    assert X not in vm.cpu_table and X not in vm.global_ppasid
    assert h.check_invariants() == []
    assert not lab.dma("vm", "00:05.0", X, 0x400010).ok


@pytest.mark.parametrize("policy", ["per-device", "global"])
def test_vm_global_ppasid_is_shared_by_every_enqcmd_bind(policy: str) -> None:
    """One value per (VM, X), taken at the first enqcmd bind, reused by every later one."""
    lab = Lab()
    lab.host(
        "h", policy, (("10:00.0", True, False), ("11:00.0", True, True), ("12:00.0", True, False))
    )
    lab.vm("a", "h", (("00:03.0", "10:00.0", "mdev"),))
    lab.map("a", 3, 0x1000, 0x1000)
    lab.bind("a", "00:03.0", 3)  # global 1 for a
    lab.vm("vm", "h", (("00:03.0", "10:00.0", "mdev"), ("00:04.0", "11:00.0", "vfio-pci"),
                       ("00:05.0", "12:00.0", "mdev")))  # fmt: skip
    lab.map("vm", 6, 0x1000, 0x1000)
    assert lab.bind("vm", "00:03.0", 6).ppasid == 2
    assert lab.bind("vm", "00:04.0", 6).ppasid == 2
    assert lab.bind("vm", "00:05.0", 6).ppasid == 2
    h = lab.hosts["h"]
    assert h.vm("vm").cpu_table == {6: 2} and h.vm("vm").cpu_refs == {6: 3}
    lab.unbind("vm", "00:03.0", 6)
    lab.unbind("vm", "00:04.0", 6)
    assert lab.enqcmd("vm", "00:05.0", 6) == 2  # still one user
    lab.unbind("vm", "00:05.0", 6)
    with pytest.raises(NotFound):
        lab.enqcmd("vm", "00:05.0", 6)
    assert h.global_alloc.snapshot() == (1,)
    assert h.check_invariants() == []


def test_per_device_rid_devices_of_two_vms_both_keep_x() -> None:
    """Dedicated tables: two VMs' RID devices both get pPASID == vPASID."""
    lab = Lab()
    lab.host("h", "per-device", (("10:00.0", False, False), ("10:00.1", False, False)))
    for name, fn in (("a", "10:00.0"), ("b", "10:00.1")):
        lab.vm(name, "h", (("00:03.0", fn, "vfio-pci"),))
        lab.map(name, 5, 0x1000, 0x2000)
        assert lab.bind(name, "00:03.0", 5).ppasid == 5
    ra, rb = lab.dma("a", "00:03.0", 5, 0x1000), lab.dma("b", "00:03.0", 5, 0x1000)
    assert ra.tag == rb.tag == 5
    assert ra.hpa != rb.hpa and ra.gpa == rb.gpa == 0x2000
