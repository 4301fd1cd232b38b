"""``vioasid demo --seed``: the seed's systems on real guests, case by case.

Three runs of real QEMU 11.1 guests (TCG), each through the PASID DMA function
(docs/pasid-dma.md) and the guest's ``vioasid_dma.ko`` driven by ``images/guest/seed_tests.sh``:

1. **one guest, per-device policy** (:data:`ONE_GUEST`: dedicated, translating, mdev, enqcmd
   non-translating, enqcmd + translating, an enqcmd mdev, an mdev of a parent with 2 PASID bits):
   cases ``dedicated``, ``translating``, ``mdev``, ``enqcmd-portal``, ``trouble-case``,
   ``trouble-case-legal``, ``exhausted``, ``policy-per-device``;
2. **the same guest under ``allocation = "global"``** (same functions, the policy workload only):
   ``policy-global``;
3. **two guests (two QEMUs) on one engine**, each with an mdev slice of one host function:
   ``shared-parent`` (both bind vPASID 1, distinct pPASIDs in the parent's table, own memory only,
   a never-bound PASID faults, both run random-data jobs concurrently for >= 20 s, then one is
   SIGKILLed: its pPASIDs are freed and the other keeps running jobs).

Runs 1 and 2 boot side by side, then run 3. Each case's ``expected`` is what the design table
(shared/design/README.md) predicts, ``observed`` what the guest printed and the host's engine
recorded; after every bind command the host checked ``Host.check_invariants()`` and, for a
refused bind, that no table changed (:mod:`qemu_glue.seed_rig`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from images.guest.markers import parse_prefixed
from qemu_glue.qemu.binary import QemuChoice
from qemu_glue.seed_rig import CommandRecord, FnSpec, SeedEngine, SeedRig, SeedVm
from vioasid.client import Client
from vioasid.formats.pasid_dma import FunctionType
from vioasid.model.faults import bdf_str
from vioasid.model.policy import Policy

log = logging.getLogger(__name__)

PREFIX = "VIOASID-SEED-"
CASES = (
    "dedicated",
    "translating",
    "mdev",
    "enqcmd-portal",
    "trouble-case",
    "trouble-case-legal",
    "exhausted",
    "policy-per-device",
    "policy-global",
    "shared-parent",
)

# Host functions (RID -> enqcmd, translating, PASID bits)
_FUNCTIONS: dict[int, tuple[bool, bool, int | None]] = {
    0x3A00: (False, False, None),  # dedicated (vfio-pci)
    0x3B00: (False, True, None),  # translating (vfio-pci)
    0x3C00: (False, False, None),  # split into mdevs
    0x5E00: (True, False, None),  # ENQCMD, cannot translate (vfio-pci)
    0x5F00: (True, True, None),  # ENQCMD + translating (vfio-pci)
    0x6B00: (True, False, None),  # ENQCMD, split into mdevs
    0x6C00: (False, False, 2),  # few PASID bits: pPASIDs 1..3, split into mdevs
    0x6A00: (False, False, None),  # the parent two guests share
}
ONE_GUEST: tuple[FnSpec, ...] = (
    FnSpec(FunctionType.DEDICATED, 0x3A00, "vfio-pci"),
    FnSpec(FunctionType.TRANSLATING, 0x3B00, "vfio-pci"),
    FnSpec(FunctionType.MDEV, 0x3C00, "mdev"),
    FnSpec(FunctionType.ENQCMD, 0x5E00, "vfio-pci"),
    FnSpec(FunctionType.ENQCMD, 0x5F00, "vfio-pci"),
    FnSpec(FunctionType.ENQCMD, 0x6B00, "mdev"),
    FnSpec(FunctionType.MDEV, 0x6C00, "mdev", width=20),
)
TENANT: tuple[FnSpec, ...] = (FnSpec(FunctionType.MDEV, 0x6A00, "mdev"),)
ONE_GUEST_PARTS = "types,enqcmd,trouble,legal,exhausted,cleanup,policy"
CONCURRENT_S = 20.0  # both tenants run jobs together at least this long before the kill
TENANT_LOOP_S = 34  # each tenant's job loop (guest seconds)
AFTER_KILL_JOBS = 4  # survivor jobs seen after the kill before the case can pass


def engine(policy: Policy) -> SeedEngine:
    e = SeedEngine("host", allocation=policy)
    for rid, (enq, tr, bits) in _FUNCTIONS.items():
        e.add_function(rid, enqcmd=enq, translating=tr, pasid_bits=bits)
    return e


def parse_line(text: str) -> tuple[str, dict[str, str]] | None:
    """``VIOASID-SEED-KIND k=v ... detail=free text`` -> (KIND, fields), else None."""
    return parse_prefixed(text, PREFIX)


def errno_word(code: int) -> str:
    """How the guest script spells a failed write's errno (strerror, spaces as _)."""
    return os.strerror(code).replace(" ", "_")


@dataclass
class Case:
    name: str
    expected: str
    observed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    bindings: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)  # engine dump after the last bind

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.observed)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def to_json(self) -> dict[str, Any]:
        obs = "; ".join(self.observed) or "nothing"
        if self.problems:
            obs += " | PROBLEMS: " + "; ".join(self.problems)
        return {
            "name": self.name,
            "expected": self.expected,
            "observed": obs,
            "pass": self.passed,
            "bindings": self.bindings,
            "tables": self.tables,
        }


class GuestLog:
    """One guest's ``VIOASID-SEED-*`` lines and the host's bind records for it."""

    def __init__(self, svm: SeedVm, records: list[CommandRecord]) -> None:
        self.svm = svm
        self.steps: list[dict[str, str]] = []
        self.jobs: list[dict[str, str]] = []
        self.dmesg: list[dict[str, str]] = []
        self.loop: list[tuple[float, dict[str, str]]] = []
        self.done = False
        for line in svm.console:
            self.feed(line)
        self.records = [r for r in records if r.vm == svm.name]
        self._used: set[int] = set()

    def feed(self, text: str, t: float | None = None) -> None:
        got = parse_line(text)
        if got is None:
            return
        kind, f = got
        if kind == "STEP":
            self.steps.append(f)
        elif kind == "JOBS":
            self.jobs.append(f)
        elif kind == "DMESG":
            self.dmesg.append(f)
        elif kind == "LOOP":
            self.loop.append((t if t is not None else time.monotonic(), f))
        elif kind == "DONE":
            self.done = True

    def step(self, case: str, dev: str, op: str, pasid: int | None = None) -> dict[str, str]:
        for s in self.steps:
            if (
                s.get("case") == case
                and s.get("dev") == dev
                and s.get("op") == op
                and (pasid is None or s.get("pasid") == str(pasid))
            ):
                return s
        return {}

    def record(self, dev: str, vpasid: int, cmd: str = "bind") -> CommandRecord | None:
        for i, r in enumerate(self.records):
            if i not in self._used and r.dev == dev and r.vpasid == vpasid and r.cmd == cmd:
                self._used.add(i)
                return r
        return None

    def job_counts(self, case: str, dev: str | None = None) -> tuple[int, int]:
        ok = bad = 0
        for j in self.jobs:
            if j.get("case") == case and (dev is None or j.get("dev") == dev):
                ok += int(j.get("ok", 0))
                bad += int(j.get("bad", 0))
        return ok, bad


def _binding_json(svm: SeedVm, r: CommandRecord) -> dict[str, Any]:
    fn = svm.functions[int(r.dev[3:])]
    dev = fn.engine.vm(svm.name).devices[fn.guest_rid]
    return {
        "vm": svm.name,
        "device": r.dev,
        "guest_rid": bdf_str(r.guest_rid),
        "type": fn.ftype.word,
        "function": bdf_str(fn.function_rid),
        "assign": dev.assign,
        "row": dev.rule.row,
        "vpasid": r.vpasid,
        "status": r.status,
        "ppasid": r.ppasid,
        "tag": r.tag,
        "table": r.space,
        "in_the_way": r.in_the_way,
    }


def _bind(
    case: Case, g: GuestLog, name: str, dev: str, x: int, want: tuple[int, str] | str
) -> CommandRecord | None:
    """Check one guest bind step against the host record: ``want`` (pPASID, table) for a bind
    that must succeed, or the refusal word (``pasid-conflict``, ``exhausted``)."""
    s = g.step(name, dev, "bind", x)
    r = g.record(dev, x)
    if not case.check(bool(s) and r is not None, f"{dev} bind {x}: no guest step or host record"):
        return None
    assert r is not None
    case.bindings.append(_binding_json(g.svm, r))
    case.tables = r.tables
    case.check(not r.invariants, f"{dev} bind {x}: invariants {r.invariants}")
    if isinstance(want, tuple):
        pp, table = want
        case.check(
            s.get("rc") == "0" and s.get("detail") == f"ok pasid={x}",
            f"{dev} bind {x} in the guest: {s.get('detail')}",
        )
        case.check(
            r.status == "ok" and r.ppasid == pp and r.space == table and r.tag == pp,
            f"{dev} vPASID {x}: host {r.status} pPASID {r.ppasid} ({r.space}), "
            f"expected {pp} ({table})",
        )
        case.observed.append(f"{dev} vPASID {x} -> pPASID {r.ppasid} ({r.space}), tag {r.tag}")
    else:
        code = errno.EBUSY if want == "pasid-conflict" else errno.ENOSPC
        case.check(
            s.get("rc") == "1"
            and s.get("detail", "").startswith(f"error {want} ")
            and s.get("err") == errno_word(code),
            f"{dev} bind {x} in the guest: rc={s.get('rc')} err={s.get('err')} {s.get('detail')}",
        )
        case.check(
            r.status == want and r.unchanged is True,
            f"{dev} bind {x}: host {r.status}, tables unchanged={r.unchanged}",
        )
        extra = f", pPASID {r.in_the_way} in the way" if r.in_the_way else ""
        case.observed.append(
            f"{dev} bind {x} refused in the guest ({s.get('err')}: {s.get('detail')}); "
            f"host {r.status}{extra}, no table changed"
        )
    return r


def _jobs(case: Case, g: GuestLog, dev: str | None = None, least: int = 1) -> None:
    ok, bad = g.job_counts(case.name, dev)
    where = dev or "all"
    case.check(bad == 0 and ok >= least, f"jobs on {where}: {ok} ok, {bad} bad (>= {least} ok)")
    case.observed.append(f"{ok} random-data jobs ok on {where}")


def _case(out: list[Case], name: str, summary: str) -> Case:
    """A new case, listed in ``out``."""
    c = Case(name, summary)
    out.append(c)
    return c


def one_guest_cases(g: GuestLog, cpu_g: int = 1) -> list[Case]:
    """The cases of the one-guest per-device run."""
    out: list[Case] = []
    for name, dev, ppasid, summary in (
        (
            "dedicated",
            "dma0",
            5,
            "vfio-pci function, dedicated table: vPASID 5 -> pPASID 5 (per-rid), "
            "tag 5; random-data jobs ok",
        ),
        (
            "translating",
            "dma1",
            5,
            "translating vfio-pci function: vPASID 5 -> pPASID 5 in its "
            "dedicated table (nothing to translate), tag 5; jobs ok",
        ),
        (
            "mdev",
            "dma2",
            1,
            "mdev slice: vPASID 5 -> lowest free pPASID of the parent's own table "
            "(1, per-rid), tag 1 (the mediation converts); jobs ok",
        ),
    ):
        c = _case(out, name, summary)
        _bind(c, g, c.name, dev, 5, (ppasid, "per-rid"))
        _jobs(c, g, least=4)

    c = _case(
        out,
        "enqcmd-portal",
        f"vPASID 5 on the ENQCMD+translating function -> the VM's global "
        f"pPASID {cpu_g} (CPU PASID table 5 -> {cpu_g}), reused (no new value) by the ENQCMD "
        "mdev; portal jobs carry tag 1; vPASID 77 (not in the CPU table) refused at the "
        "portal on both",
    )
    r1 = _bind(c, g, c.name, "dma4", 5, (cpu_g, "global"))
    r2 = _bind(c, g, c.name, "dma5", 5, (cpu_g, "global"))
    if r1 is not None and r2 is not None:
        c.check(
            r1.cpu_table.get(5) == cpu_g and r2.cpu_table.get(5) == cpu_g,
            f"CPU PASID table {r1.cpu_table} / {r2.cpu_table}",
        )
        c.observed.append(f"CPU PASID table {r2.cpu_table}")
    for dev in ("dma4", "dma5"):
        s = g.step(c.name, dev, "copy", 77)
        c.check(
            s.get("rc") == "1"
            and s.get("detail", "").startswith("error refused")
            and s.get("err") == errno_word(errno.EACCES),
            f"{dev} portal with vPASID 77: {s}",
        )
    c.observed.append("vPASID 77 refused at both portals (error refused, EACCES)")
    _jobs(c, g, least=8)

    c = _case(
        out,
        "trouble-case",
        f"vPASID 5 on the dedicated function (pPASID 5) and in the CPU table "
        f"(5 -> {cpu_g}); binding 5 to the non-translating ENQCMD function needs global "
        f"pPASID 5 == CPU table value: refused with pasid-conflict (EBUSY), dmesg names "
        f"the device, vPASID 5 and pPASID {cpu_g}; no table changed; the first binding "
        "keeps working",
    )
    _bind(c, g, c.name, "dma3", 5, "pasid-conflict")
    refused = [r for r in g.records if r.dev == "dma3" and r.vpasid == 5]
    if refused:
        c.check(refused[0].in_the_way == cpu_g, f"pPASID in the way {refused[0].in_the_way}")
    dm = next((d for d in g.dmesg if d.get("case") == c.name), {}).get("detail", "")
    bdf = f"0000:{bdf_str(g.svm.functions[3].guest_rid)}"
    want = f"{bdf}: bind pasid 5 refused: pasid-conflict (pPASID {cpu_g} in the way)"
    c.check(want in dm, f"dmesg: {dm!r}, expected {want!r}")
    c.observed.append(f"dmesg: {dm.split('] ', 1)[-1]}")
    _jobs(c, g, "dma0", least=3)
    _jobs(c, g, "dma4", least=2)

    c = _case(
        out,
        "trouble-case-legal",
        f"legal variants: vPASID 6 on the dedicated function (6, "
        f"per-rid) and on the translating ENQCMD function (a new global value, "
        f"{cpu_g + 1}); vPASID 9 on the dedicated function (9) and on the non-translating "
        "ENQCMD function (global 9 is free: pPASID 9); jobs ok on all four",
    )
    _bind(c, g, c.name, "dma0", 6, (6, "per-rid"))
    _bind(c, g, c.name, "dma4", 6, (cpu_g + 1, "global"))
    _bind(c, g, c.name, "dma0", 9, (9, "per-rid"))
    _bind(c, g, c.name, "dma3", 9, (9, "global"))
    _jobs(c, g, least=8)

    c = _case(
        out,
        "exhausted",
        "mdev of a parent with 2 PASID bits: vPASIDs 11, 12, 13 -> pPASIDs "
        "1, 2, 3; the bind of 14 fails in the guest with exhausted (ENOSPC), no table "
        "changed; 11..13 keep working",
    )
    for x, pp in ((11, 1), (12, 2), (13, 3)):
        _bind(c, g, c.name, "dma6", x, (pp, "per-rid"))
    _bind(c, g, c.name, "dma6", 14, "exhausted")
    _jobs(c, g, least=3)

    out.append(policy_case(g, "per-device"))
    return out


_Want = tuple[int, str] | str  # (pPASID, table) or the error word
# the policy workload in order: (device, vPASID, outcome under "per-device", under "global")
_POLICY_WORKLOAD: tuple[tuple[str, int, _Want, _Want], ...] = (
    ("dma0", 5, (5, "per-rid"), (5, "global")),
    ("dma1", 5, (5, "per-rid"), (5, "global")),
    ("dma2", 5, (1, "per-rid"), (5, "global")),
    ("dma4", 5, (1, "global"), (5, "global")),
    ("dma2", 7, (2, "per-rid"), (1, "global")),
    ("dma0", 7, (7, "per-rid"), "pasid-conflict"),
)
_POLICY_PREDICTED: dict[str, list[tuple[str, int, _Want]]] = {
    "per-device": [(d, x, w) for d, x, w, _ in _POLICY_WORKLOAD],
    "global": [(d, x, w) for d, x, _, w in _POLICY_WORKLOAD],
}


def policy_case(g: GuestLog, policy: str) -> Case:
    """The same workload (5 on dedicated, translating, mdev, enqcmd; 7 on mdev then dedicated)."""
    pred = _POLICY_PREDICTED[policy]
    words = ", ".join(
        f"{d}/{x} -> {w[0]} ({w[1]})" if isinstance(w, tuple) else f"{d}/{x} {w}"
        for d, x, w in pred
    )
    c = Case(f"policy-{policy}", f'allocation = "{policy}", from empty tables: {words}')
    first = next(
        (
            r
            for r in reversed(g.records)
            if r.cmd == "bind" and r.vpasid == 5 and r.dev == "dma0" and r.bindings_before == 0
        ),
        None,
    )
    c.check(first is not None, "the policy workload did not start from empty tables")
    if first is not None:  # the records of the policy part come after the cleanup
        g._used.update(i for i, r in enumerate(g.records) if r.t < first.t)
    for dev, x, want in pred:
        _bind(c, g, "policy", dev, x, want)
    ok, bad = g.job_counts("policy")
    n_ok = sum(isinstance(w, tuple) for _, _, w in pred)
    c.check(ok == n_ok and bad == 0, f"policy jobs: {ok} ok, {bad} bad (want {n_ok})")
    c.observed.append(f"{ok} jobs ok")
    return c


@dataclass
class TenantRun:
    """What the two-guest run measured."""

    concurrent_s: float = 0.0
    killed: str = ""
    survivor: str = ""
    freed: bool = False
    survivor_after_kill: int = 0
    events: list[str] = field(default_factory=list)
    tables_after_kill: dict[str, Any] = field(default_factory=dict)
    status_socket: str = ""
    status_before_kill: dict[str, Any] = field(default_factory=dict)  # vioasid status's dump


def shared_parent_case(
    logs: dict[str, GuestLog], eng: SeedEngine, run: TenantRun, parent: int
) -> Case:
    c = Case(
        "shared-parent",
        "two guests, one mdev slice each of one parent: both bind vPASID 1 "
        "-> distinct pPASIDs {1, 2} in the parent's one table, every DMA lands in its own "
        "guest's RAM, a never-bound PASID (2) faults, both run random-data jobs "
        f"concurrently >= {CONCURRENT_S:.0f} s; SIGKILL of one frees its pPASIDs and the "
        "other keeps running jobs",
    )
    pps: list[int] = []
    for name, g in logs.items():
        r = g.record("dma0", 1)
        s = g.step("shared-parent", "dma0", "bind")
        if not c.check(
            r is not None and s.get("detail") == "ok pasid=1",
            f"{name}: bind of its first PASID: {s.get('detail')}",
        ):
            continue
        assert r is not None
        c.bindings.append(_binding_json(g.svm, r))
        if not c.tables or r.bindings_before > 0:
            c.tables = r.tables
        c.check(
            r.status == "ok" and r.space == "per-rid" and not r.invariants,
            f"{name}: host {r.status} {r.space} {r.invariants}",
        )
        if r.ppasid is not None:
            pps.append(r.ppasid)
        nb = g.step("shared-parent", "dma0", "copy", 2)
        d = nb.get("detail", "")
        c.check(
            nb.get("rc") == "1"
            and ((d.startswith("fault ") and "pasid=2" in d) or d.startswith("error not-bound")),
            f"{name}: job on never-bound PASID 2: {nb}",
        )
        ok, bad = g.job_counts("shared-parent")
        c.check(ok >= 3 and bad == 0, f"{name}: first jobs {ok} ok {bad} bad")
        c.check(eng.dmas.get(name, 0) > 0, f"{name}: no DMA reached the engine")
    c.check(sorted(pps) == [1, 2], f"pPASIDs of the two vPASID 1 bindings: {pps}")
    c.observed.append(f"vPASID 1 -> pPASIDs {sorted(pps)} in {bdf_str(parent)}'s table")
    c.check(not eng.cross_vm, f"DMA outside the requester's RAM: {eng.cross_vm[:3]}")
    c.observed.append(
        "every DMA in its own guest's RAM ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(eng.dmas.items()))
        + " translations), never-bound PASID 2 faulted in both"
    )
    c.check(run.concurrent_s >= CONCURRENT_S, f"concurrent jobs only {run.concurrent_s:.1f} s")
    c.check(
        bool(run.killed) and run.freed, f"SIGKILL of {run.killed or '?'}: pPASIDs freed={run.freed}"
    )
    sv = logs.get(run.survivor)
    end = [f for _, f in sv.loop if f.get("phase") == "end"] if sv else []
    c.check(bool(end) and end[0].get("bad") == "0", f"survivor loop end: {end}")
    c.check(
        run.survivor_after_kill >= AFTER_KILL_JOBS,
        f"survivor ran {run.survivor_after_kill} jobs after the kill",
    )
    c.observed.append(
        f"{run.concurrent_s:.1f} s of concurrent jobs; SIGKILL {run.killed}: its pPASID freed "
        f"({run.freed}); {run.survivor} ran {run.survivor_after_kill} more jobs after it, "
        f"{end[0].get('jobs') if end else '?'} in its loop, 0 bad"
        if end
        else f"{run.concurrent_s:.1f} s of concurrent jobs; survivor loop did not end"
    )
    parent_key = f"host/{bdf_str(parent)}"
    before = run.status_before_kill.get("functions", {}).get(parent_key, {}).get("table", {})
    after = run.tables_after_kill.get("functions", {}).get(parent_key, {}).get("table", {})
    c.check(
        sorted(o["vm"] for o in before.values()) == sorted(logs),
        f"vioasid status before the kill: {parent_key} table {before}",
    )
    c.check(
        [o["vm"] for o in after.values()] == [run.survivor],
        f"vioasid status after the kill: {parent_key} table {after}",
    )
    c.observed.append(
        f"vioasid status ({run.status_socket}): {parent_key} table "
        + " ".join(f"{pp}:{o['vm']}/{o['vpasid']}" for pp, o in before.items())
        + " before the kill, "
        + (" ".join(f"{pp}:{o['vm']}/{o['vpasid']}" for pp, o in after.items()) or "-")
        + " after"
    )
    inv = eng.check_invariants()
    c.check(not inv, f"invariants at the end: {inv}")
    return c


# -- running -----------------------------------------------------------------------------------


@dataclass
class SeedOptions:
    kernel: Path
    initrd: Path
    qemu: QemuChoice | None = None
    trace: TextIO | None = None
    echo: bool | TextIO = False
    timeout: float = 600.0
    progress: Any = None  # callable(str) or None
    tenant_loop_s: int = TENANT_LOOP_S
    status_socket: Path | None = None  # the tenants' engine on the daemon's server there


def _say(opts: SeedOptions, msg: str) -> None:
    if opts.progress is not None:
        opts.progress(msg)
    log.info("%s", msg)


async def _run_one_guest(opts: SeedOptions, policy: Policy, parts: str) -> tuple[GuestLog, str]:
    eng = engine(policy)
    async with SeedRig(eng, trace=opts.trace) as rig:
        svm = await rig.add_vm("guest" if policy == "per-device" else "guest-global", ONE_GUEST)
        _say(opts, f"{policy}: booting one guest with {len(ONE_GUEST)} PASID DMA functions")
        async with rig.guest(
            svm,
            kernel=opts.kernel,
            initrd=opts.initrd,
            qemu=opts.qemu,
            append_extra=f"vioasid.seed={parts}",
            echo=opts.echo,
        ) as vm:
            rc = await vm.wait(opts.timeout)
        _say(opts, f"{policy}: guest exited ({rc})")
        g = GuestLog(svm, rig.commands)
        left = sum(1 for _ in eng.bindings())
        inv = eng.check_invariants()
        tail = "" if g.done else " | console tail: " + " / ".join(svm.console[-6:])
        note = f"bindings left {left}, invariants {inv or 'hold'}{tail}"
        if left or inv or not g.done:
            g.steps.append({"case": "_host", "detail": note})
        return g, note


async def _run_tenants(opts: SeedOptions) -> tuple[dict[str, GuestLog], SeedEngine, TenantRun]:
    eng = engine("per-device")
    run = TenantRun()
    names = ("tenant-a", "tenant-b")
    with tempfile.TemporaryDirectory(prefix="vioasid-seed-status-") as tmp:
        sock = opts.status_socket or Path(tmp) / "vioasid.sock"
        run.status_socket = str(sock)
        return await _tenants_on(opts, eng, run, names, sock)


async def _status(path: Path) -> dict[str, Any]:
    """What ``vioasid status --socket PATH --json`` prints: the daemon's dump."""
    async with asyncio.timeout(10):
        c = await Client.connect(path, timeout=0)
        try:
            return await c.dump(None)
        finally:
            await c.close()


async def _tenants_on(
    opts: SeedOptions, eng: SeedEngine, run: TenantRun, names: tuple[str, str], sock: Path
) -> tuple[dict[str, GuestLog], SeedEngine, TenantRun]:
    async with SeedRig(eng, trace=opts.trace, status_socket=sock) as rig:
        svms = {n: await rig.add_vm(n, TENANT) for n in names}
        starts: dict[str, float] = {}
        jobs_seen: dict[str, int] = {}

        def watcher(name: str) -> Any:
            def feed(text: str) -> None:
                got = parse_line(text)
                if got and got[0] == "LOOP":
                    if got[1].get("phase") == "start":
                        starts.setdefault(name, time.monotonic())
                    jobs_seen[name] = int(got[1].get("jobs", "0") or 0)

            return feed

        extra = f"vioasid.seed=tenant vioasid.seed_s={opts.tenant_loop_s}"
        _say(opts, "two guests, one mdev slice each of one parent, on one engine")
        async with contextlib.AsyncExitStack() as stack:
            vms = {}
            for n in names:
                vms[n] = await stack.enter_async_context(
                    rig.guest(
                        svms[n],
                        kernel=opts.kernel,
                        initrd=opts.initrd,
                        qemu=opts.qemu,
                        append_extra=extra,
                        echo=opts.echo,
                    )
                )
                vms[n].on_console(watcher(n))
            deadline = time.monotonic() + opts.timeout
            while len(starts) < 2 and time.monotonic() < deadline:
                if any(not vm.running for vm in vms.values()):
                    break
                await asyncio.sleep(0.2)
            if len(starts) == 2:
                first = min(starts, key=lambda k: starts[k])
                other = names[1] if first == names[0] else names[0]
                both = max(starts.values())
                _say(opts, f"both guests run jobs; SIGKILL of {first} in {CONCURRENT_S:.0f} s")
                while time.monotonic() - both < CONCURRENT_S + 1 and vms[first].running:
                    await asyncio.sleep(0.2)
                run.concurrent_s = time.monotonic() - both
                run.killed, run.survivor = first, other
                run.status_before_kill = await _status(sock)
                at_kill = jobs_seen.get(other, 0)
                await vms[first].kill()
                gone = await rig.disconnected(svms[first])
                parent = eng.functions[TENANT[0].function]
                owners = set()
                for pp in parent.owner:
                    own = eng.tag_owner(parent.rid, pp)
                    if own is not None:
                        owners.add(own[0].name)
                run.freed = gone and first not in owners and other in owners
                run.tables_after_kill = await _status(sock)
                run.events.append(
                    f"after SIGKILL of {first}: parent table held by {sorted(owners)}"
                )
                _say(opts, f"SIGKILL {first}: the parent's table is now held by {sorted(owners)}")
                await vms[other].wait(opts.timeout)
                run.survivor_after_kill = jobs_seen.get(other, 0) - at_kill
        logs = {n: GuestLog(svms[n], rig.commands) for n in names}
        return logs, eng, run


async def run_seed(opts: SeedOptions) -> dict[str, Any]:
    """Every case; the ``--json`` object (``cases``: name, expected, observed, pass)."""
    t0 = time.monotonic()
    (g1, note1), (g2, note2) = await asyncio.gather(
        _run_one_guest(opts, "per-device", ONE_GUEST_PARTS),
        _run_one_guest(opts, "global", "policy"),
    )
    cases = one_guest_cases(g1)
    pg = policy_case(g2, "global")
    cases.append(pg)
    for c, note, g in ((cases[0], note1, g1), (pg, note2, g2)):
        if any(s.get("case") == "_host" for s in g.steps):
            c.problems.append(f"run end: {note}")
    logs, eng, run = await _run_tenants(opts)
    cases.append(shared_parent_case(logs, eng, run, TENANT[0].function))
    return {
        "ok": all(c.passed for c in cases),
        "cases": [c.to_json() for c in cases],
        "tenants": {
            "concurrent_s": round(run.concurrent_s, 1),
            "killed": run.killed,
            "survivor": run.survivor,
            "events": run.events,
            "status_socket": run.status_socket,
            "status_before_kill": run.status_before_kill,
            "tables_after_kill": run.tables_after_kill,
        },
        "served_by": "one in-process engine per run (vioasid.model.engine.Host) with in-process "
        "vfio-user servers; the tenants' engine also on the daemon's server (vioasid status "
        "socket), not a separate vioasid serve process",
        "wall_seconds": round(time.monotonic() - t0, 1),
    }
