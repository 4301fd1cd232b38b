"""Property tests: random bind/unbind/dma/enqcmd/migrate sequences over several VMs on a
per-device and a global host keep the engine's invariants.

After every operation, on every host: no two live bindings share a pPASID in one function's
table, each (VM, vPASID) has at most one global pPASID, the CPU tables match the bindings, every
allocator's used set is exactly the live bindings' values (nothing leaks), every binding has
its host entry. Every DMA that translates lands inside its own VM's host range; a refused
operation leaves the host's snapshot unchanged.
"""

from __future__ import annotations

import contextlib

from engine_support import Lab, bdf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vioasid.formats.fault import FaultReason
from vioasid.model.errors import MigrationFailed, VioasidError
from vioasid.model.faults import bdf_str

FUNCS = (
    ("10:00.0", False, False),
    ("10:00.1", False, False),
    ("10:00.2", False, False),
    ("11:00.0", False, True),
    ("12:00.0", True, False),
    ("12:00.1", True, False),
    ("13:00.0", True, True),
    ("14:00.0", True, False),  # ENQCMD mdev parent
    ("15:00.0", False, False),  # plain mdev parent
)
VMS = {
    "a": (("00:03.0", "10:00.0", "vfio-pci"), ("00:04.0", "12:00.0", "vfio-pci"),
          ("00:05.0", "14:00.0", "mdev"), ("00:06.0", "15:00.0", "mdev")),
    "b": (("00:03.0", "10:00.1", "vfio-pci"), ("00:04.0", "11:00.0", "vfio-pci"),
          ("00:05.0", "14:00.0", "mdev"), ("00:06.0", "13:00.0", "vfio-pci")),
    "c": (("00:03.0", "10:00.2", "vfio-pci"), ("00:04.0", "12:00.1", "vfio-pci"),
          ("00:05.0", "15:00.0", "mdev"), ("00:06.0", "14:00.0", "mdev")),
}  # fmt: skip
DEVS = ("00:03.0", "00:04.0", "00:05.0", "00:06.0")
MEM = 4 << 20
XS = (1, 2, 3, 4, 5, 6, 17)  # few values: collisions; 17 is beyond the 4-bit spaces

op = st.tuples(
    st.sampled_from(["bind", "bind", "unbind", "dma", "dma", "enqcmd", "migrate"]),
    st.sampled_from(sorted(VMS)),
    st.sampled_from(DEVS),
    st.sampled_from(XS),
    st.integers(0, 1 << 16),  # pick: which live binding, when the op reuses one
    st.sampled_from(
        [True, True, True, False]
    ),  # reuse a live binding (most unbind/dma/enqcmd should find one)
)


def _lab(placement: tuple[str, ...]) -> Lab:
    lab = Lab()
    lab.host("pd", "per-device", FUNCS, pasid_bits=4)
    lab.host("gl", "global", FUNCS, pasid_bits=4)
    for name, host in zip(sorted(VMS), placement, strict=True):
        lab.vm(name, host, VMS[name], memory=MEM)
        for x in XS:
            lab.map(name, x, 0x400000, 0x100000 + x * 0x1000)
    return lab


def _check(lab: Lab) -> None:
    for h in lab.hosts.values():
        assert h.check_invariants() == []
    # One host-wide allocator per host: a (VM, vPASID) has one global pPASID, on its host.
    for name, g in lab.guests.items():
        assert name in lab.hosts[g.host].vms


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.tuples(*(st.sampled_from(["pd", "gl"]) for _ in VMS)),
    st.lists(op, min_size=10, max_size=50),
)
def test_random_sequences_keep_invariants(
    placement: tuple[str, ...], ops: list[tuple[str, str, str, int, int, bool]]
) -> None:
    lab = _lab(placement)
    for kind, vm, dev, x, pick, reuse in ops:
        if reuse and kind in ("unbind", "dma", "enqcmd"):
            live = sorted(
                (b.vm, bdf_str(b.device), b.vpasid)
                for h in lab.hosts.values()
                for b in h.bindings()
            )
            if live:
                vm, dev, x = live[pick % len(live)]
        h = lab.where(vm)
        if kind == "migrate":
            to = "gl" if lab.guests[vm].host == "pd" else "pd"
            src, dst = h, lab.hosts[to]
            s_before, d_before = src.snapshot(), dst.snapshot()
            try:
                lab.migrate(vm, to, {d: f for d, f, _ in VMS[vm]})
                event("migrate: ok")
            except MigrationFailed:
                event("migrate: refused")
                assert src.snapshot() == s_before and dst.snapshot() == d_before
                assert lab.guests[vm].host == src.name
            _check(lab)
            continue
        if kind in ("bind", "unbind"):
            before = h.snapshot()
            try:
                getattr(lab, kind)(vm, dev, x)
                event(f"{kind}: ok")
            except VioasidError as exc:
                event(f"{kind}: {exc.kind}")
                assert h.snapshot() == before
        elif kind == "dma":
            r = lab.dma(vm, dev, x, 0x400008, write=True)
            v = h.vm(vm)
            event(f"dma: {'ok' if r.ok else 'fault'}")
            if r.ok:
                assert r.hpa is not None and v.hpa <= r.hpa < v.hpa + MEM
                assert r.gpa == 0x100008 + x * 0x1000
                assert v.devices[bdf(dev)].ppasids.get(x, x) == r.tag
            else:
                assert r.fault is not None and r.fault.pasid == x
        else:
            try:
                pp = lab.enqcmd(vm, dev, x)
            except VioasidError:
                pass
            else:
                assert h.vm(vm).cpu_table[x] == pp
                assert h.global_owner[pp] == (vm, x)
        _check(lab)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["root", "context", "dir", "entry"]),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 3),
    st.sampled_from([1, 5, 63, 64, 4095, 1 << 19]),
)
def test_hostile_guest_tables_never_raise_anything_else(
    where: str, value: int, word: int, x: int
) -> None:
    """Whatever the guest writes into its tables, bind/sync/dma refuse or fault cleanly."""
    lab = Lab()
    lab.host("h", "per-device", (("10:00.0", False, False), ("14:00.0", True, False)))
    g = lab.vm("vm", "h", (("00:03.0", "10:00.0", "vfio-pci"), ("00:04.0", "14:00.0", "mdev")))
    lab.map("vm", x, 0x400000, 0x100000)
    lab.guest_entry("vm", "00:03.0", x)
    lab.guest_entry("vm", "00:04.0", x)
    sid = 0x18
    gpa = {
        "root": g.driver.root,
        "context": g.driver.context_entry_gpa(sid),
        "dir": g.driver.pasid_dirs[sid] + (x >> 6) * 8,
        "entry": g.driver.pasid_entry_gpa(sid, x),
    }[where]
    g.memory.write_u64(gpa + 8 * (word if where in ("context", "entry") else 0), value)
    h = lab.hosts["h"]
    for rid in (0x18, 0x20):
        with contextlib.suppress(VioasidError):
            h.bind("vm", rid, x)
        with contextlib.suppress(VioasidError):
            h.sync_pasid("vm", rid, x)
        v = h.vm("vm")
        queued = len(v.faults)
        r = h.dma("vm", rid, x, 0x400000, write=True)
        if r.fault is not None:  # in the guest's terms, queued for the guest, no address
            assert isinstance(r.fault.reason, FaultReason)
            assert (r.fault.sid, r.fault.pasid, r.fault.addr) == (rid, x, 0x400000)
            assert r.gpa is None and r.hpa is None
            assert v.faults[queued:] == [r.fault]
        else:  # landed in this VM's RAM, at its own host range
            assert r.gpa is not None and r.hpa == v.hpa + r.gpa
            assert v.hpa <= r.hpa < v.hpa + MEM * 4
            assert len(v.faults) == queued
    assert h.check_invariants() == []
