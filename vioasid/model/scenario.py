"""Scenario files (shared/design/scenario-format.md): validation and a sans-IO runner.

:func:`parse_scenario` takes the dict ``tomllib`` made of a scenario file and returns a
:class:`Scenario`, or raises :class:`ScenarioError` naming the offending field
(``step[3].vpasid: ...``). :class:`ScenarioRunner` builds the hosts and VMs (a setup refusal is
also a :class:`ScenarioError`: no step runs) and :meth:`ScenarioRunner.run` yields one result
dict per step, in order, with each step's ``expect`` checked.

The guest side is modelled the way Linux's intel-iommu driver would do it: every VM has a
:class:`~vioasid.model.guest_driver.GuestIommuDriver` laying out its scalable-mode tables in the
top half of its RAM (the guest page-table pool), one first-stage table per vPASID (``map`` /
``unmap`` edit it, ``bind`` points the device's PASID entry at it). The host side is
:class:`~vioasid.model.engine.Host`, exactly as the daemon drives it.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats.pasid import PGTT_FIRST_STAGE

from .engine import Host
from .errors import InvalidRequest, NotFound, VioasidError
from .faults import bdf_str, parse_bdf
from .guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator, PagesExhausted
from .memory import GuestMemory
from .migration import export_vm, import_vm
from .policy import ASSIGNS, POLICIES

PAGE = 4096
MAX_VPASID = (1 << 20) - 1
MIN_MEMORY = 2 << 20
MAX_MEMORY = 64 << 30
HOST_HPA_STRIDE = 1 << 40  # host i places its VMs from (i + 1) TiB: hpas are scenario-unique
GUEST_DID = 1  # the guest's own domain id for its PASID entries

OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # op: (required fields, optional fields) besides "op", "expect", "note"
    "map": (("vm", "vpasid", "va", "gpa", "size"), ("perm",)),
    "unmap": (("vm", "vpasid", "va", "size"), ()),
    "bind": (("vm", "device", "vpasid"), ()),
    "unbind": (("vm", "device", "vpasid"), ()),
    "dma": (("vm", "device", "vpasid", "addr"), ("write",)),
    "enqcmd": (("vm", "device", "vpasid"), ("addr", "write")),
    "migrate": (("vm", "to", "functions"), ()),
    "dump": ((), ("vm",)),
}


class ScenarioError(Exception):
    """The scenario file itself is invalid; the message names the field."""


# -- the validated scenario ---------------------------------------------------------------
@dataclass(frozen=True)
class FunctionSpec:
    rid: int
    enqcmd: bool
    translating: bool


@dataclass(frozen=True)
class HostSpec:
    name: str
    allocation: str
    pasid_bits: int
    functions: tuple[FunctionSpec, ...]


@dataclass(frozen=True)
class DeviceSpec:
    rid: int
    function: int
    assign: str


@dataclass(frozen=True)
class ScenarioVm:
    name: str
    host: str
    memory: int
    devices: tuple[DeviceSpec, ...]


@dataclass(frozen=True)
class Step:
    index: int
    op: str
    args: Mapping[str, Any]
    expect: Mapping[str, Any] | None


@dataclass(frozen=True)
class Scenario:
    hosts: tuple[HostSpec, ...]
    vms: tuple[ScenarioVm, ...]
    steps: tuple[Step, ...]


# -- validation helpers -------------------------------------------------------------------
def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _tables(doc: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ScenarioError(f"{where}{key}: expected an array of tables ([[{key}]])")
    return [_table(v, f"{where}{key}[{i}]") for i, v in enumerate(value)]


def _keys(tbl: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in tbl:
        if key not in allowed:
            raise ScenarioError(
                f"{where}.{key}: unknown field (expected one of {', '.join(sorted(allowed))})"
            )


def _str(tbl: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in tbl:
        if default is None:
            raise ScenarioError(f"{where}.{key}: missing (required)")
        return default
    value = tbl[key]
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _int(
    tbl: dict[str, Any],
    key: str,
    where: str,
    lo: int,
    hi: int,
    default: int | None = None,
) -> int:
    if key not in tbl:
        if default is None:
            raise ScenarioError(f"{where}.{key}: missing (required)")
        return default
    value = tbl[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}.{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{where}.{key}: {value:#x} is out of range {lo:#x}..{hi:#x}")
    return value


def _bool(tbl: dict[str, Any], key: str, where: str) -> bool:
    value = tbl.get(key, False)
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _bdf(tbl: dict[str, Any], key: str, where: str) -> int:
    text = _str(tbl, key, where)
    try:
        return parse_bdf(text)
    except ValueError as exc:
        raise ScenarioError(f"{where}.{key}: {exc}") from None


def _choice(
    tbl: dict[str, Any], key: str, where: str, choices: tuple[str, ...], default: str
) -> str:
    value = _str(tbl, key, where, default)
    if value not in choices:
        raise ScenarioError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: Any, where: str) -> int:
    """``"64M"`` / ``"1G"`` / ``65536`` -> bytes."""
    if isinstance(value, bool):
        raise ScenarioError(f'{where}: expected a size like "64M", got {value!r}')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    else:
        raise ScenarioError(f'{where}: expected a size like "64M" (K/M/G suffix), got {value!r}')
    if size % PAGE or not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ScenarioError(
            f"{where}: {size:#x} bytes must be a multiple of 4 KiB between 2M and 64G"
        )
    return size


def parse_scenario(doc: Mapping[str, Any]) -> Scenario:
    """Validate a scenario document (as ``tomllib`` parsed it)."""
    top = dict(doc)
    _keys(top, "file", {"host", "vm", "step", "title", "description"})
    hosts: list[HostSpec] = []
    host_fns: dict[str, dict[int, FunctionSpec]] = {}
    for i, h in enumerate(_tables(top, "host", "")):
        where = f"host[{i}]"
        _keys(h, where, {"name", "allocation", "pasid_bits", "function"})
        name = _str(h, "name", where)
        if name in host_fns:
            raise ScenarioError(f"{where}.name: host {name!r} is defined twice")
        allocation = _choice(h, "allocation", where, POLICIES, "per-device")
        bits = _int(h, "pasid_bits", where, 1, 20, 20)
        fns: dict[int, FunctionSpec] = {}
        for j, f in enumerate(_tables(h, "function", f"{where}.")):
            fw = f"{where}.function[{j}]"
            _keys(f, fw, {"rid", "enqcmd", "translating"})
            rid = _bdf(f, "rid", fw)
            if rid in fns:
                raise ScenarioError(f"{fw}.rid: function {bdf_str(rid)} is defined twice")
            fns[rid] = FunctionSpec(rid, _bool(f, "enqcmd", fw), _bool(f, "translating", fw))
        hosts.append(HostSpec(name, allocation, bits, tuple(fns.values())))
        host_fns[name] = fns
    if not hosts:
        raise ScenarioError("host: a scenario needs at least one [[host]]")

    vms: list[ScenarioVm] = []
    vm_devs: dict[str, dict[int, DeviceSpec]] = {}
    for i, v in enumerate(_tables(top, "vm", "")):
        where = f"vm[{i}]"
        _keys(v, where, {"name", "host", "memory", "device"})
        name = _str(v, "name", where)
        if name in vm_devs:
            raise ScenarioError(f"{where}.name: VM {name!r} is defined twice")
        host = _str(v, "host", where)
        if host not in host_fns:
            raise ScenarioError(f"{where}.host: no [[host]] named {host!r}")
        memory = parse_size(v.get("memory", "64M"), f"{where}.memory")
        devs: dict[int, DeviceSpec] = {}
        for j, d in enumerate(_tables(v, "device", f"{where}.")):
            dw = f"{where}.device[{j}]"
            _keys(d, dw, {"rid", "function", "assign"})
            rid = _bdf(d, "rid", dw)
            if rid in devs:
                raise ScenarioError(f"{dw}.rid: device {bdf_str(rid)} is defined twice")
            fn = _bdf(d, "function", dw)
            if fn not in host_fns[host]:
                raise ScenarioError(f"{dw}.function: host {host!r} has no function {bdf_str(fn)}")
            assign = _choice(d, "assign", dw, ASSIGNS, "vfio-pci")
            devs[rid] = DeviceSpec(rid, fn, assign)
        vms.append(ScenarioVm(name, host, memory, tuple(devs.values())))
        vm_devs[name] = devs

    steps: list[Step] = []
    for i, s in enumerate(_tables(top, "step", "")):
        where = f"step[{i}]"
        op = _str(s, "op", where)
        if op not in OPS:
            raise ScenarioError(f"{where}.op: unknown op {op!r} (one of {', '.join(OPS)})")
        required, optional = OPS[op]
        _keys(s, where, {"op", "expect", "note", *required, *optional})
        for key in required:
            if key not in s:
                raise ScenarioError(f"{where}.{key}: missing (op {op!r} needs it)")
        args: dict[str, Any] = {}
        if "vm" in s:
            args["vm"] = _str(s, "vm", where)
            if args["vm"] not in vm_devs:
                raise ScenarioError(f"{where}.vm: no [[vm]] named {args['vm']!r}")
        if "device" in s:
            args["device"] = _bdf(s, "device", where)
            if args["device"] not in vm_devs[args["vm"]]:
                raise ScenarioError(
                    f"{where}.device: VM {args['vm']!r} has no device {bdf_str(args['device'])}"
                )
        if "vpasid" in s:
            args["vpasid"] = _int(s, "vpasid", where, 1, MAX_VPASID)
        for key in ("va", "gpa", "addr"):
            if key in s:
                args[key] = _int(s, key, where, 0, (1 << 64) - 1)
        if "size" in s:
            args["size"] = _int(s, "size", where, PAGE, 1 << 48)
        if op in ("map", "unmap"):
            for key in ("va", "gpa", "size"):
                if key in args and args[key] % PAGE:
                    raise ScenarioError(f"{where}.{key}: {args[key]:#x} is not 4 KiB aligned")
        if op == "map":
            args["perm"] = _choice(s, "perm", where, ("r", "rw"), "rw")
        if "write" in s:
            args["write"] = _bool(s, "write", where)
        if op == "migrate":
            to = _str(s, "to", where)
            if to not in host_fns:
                raise ScenarioError(f"{where}.to: no [[host]] named {to!r}")
            args["to"] = to
            fmap = _table(s["functions"], f"{where}.functions")
            mapping: dict[int, int] = {}
            for key, val in fmap.items():
                fw = f"{where}.functions.{key!r}"
                try:
                    grid = parse_bdf(key)
                except ValueError as exc:
                    raise ScenarioError(f"{fw}: {exc}") from None
                if grid not in vm_devs[args["vm"]]:
                    raise ScenarioError(f"{fw}: VM {args['vm']!r} has no device {key}")
                if not isinstance(val, str):
                    raise ScenarioError(f"{fw}: expected a function BDF string, got {val!r}")
                try:
                    frid = parse_bdf(val)
                except ValueError as exc:
                    raise ScenarioError(f"{fw}: {exc}") from None
                if frid not in host_fns[to]:
                    raise ScenarioError(f"{fw}: host {to!r} has no function {val}")
                mapping[grid] = frid
            args["functions"] = mapping
        expect = None
        if "expect" in s:
            expect = _table(s["expect"], f"{where}.expect")
        if "note" in s and not isinstance(s["note"], str):
            raise ScenarioError(f"{where}.note: expected a string")
        steps.append(Step(i, op, args, expect))
    return Scenario(tuple(hosts), tuple(vms), tuple(steps))


# -- expectations -------------------------------------------------------------------------
def _match(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        return all(_match(val, actual.get(str(key), _MISSING)) for key, val in expected.items())
    if actual is _MISSING:
        return expected is False
    if isinstance(expected, bool) or isinstance(actual, bool):
        if isinstance(actual, dict):
            return expected is True  # "fault = true": there is one
        return expected is actual
    if isinstance(expected, str) and isinstance(actual, dict):
        return expected in (actual.get("kind"), actual.get("name"))
    if isinstance(expected, int) and isinstance(actual, str) and actual.startswith("0x"):
        return int(actual, 16) == expected
    if isinstance(expected, str) and isinstance(actual, str):
        if expected.startswith("0x") and actual.startswith("0x"):
            try:
                return int(expected, 16) == int(actual, 16)
            except ValueError:
                return False
        return expected == actual
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(_match, expected, actual))
    return bool(expected == actual)


_MISSING: Any = object()


def check_expect(expected: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``expected`` that ``result`` does not match: {field: {expected, got}}."""
    bad: dict[str, Any] = {}
    for key, val in expected.items():
        got = result.get(key, _MISSING)
        if not _match(val, got):
            bad[key] = {"expected": val, "got": None if got is _MISSING else got}
    return bad


# -- running ------------------------------------------------------------------------------
@dataclass
class GuestSide:
    """The guest kernel's side of one VM: its RAM, its IOMMU driver, a table per vPASID."""

    memory: GuestMemory
    driver: GuestIommuDriver
    pages: PageAllocator
    host: str
    tables: dict[int, FirstStagePageTable] = field(default_factory=dict)

    def table(self, vpasid: int) -> FirstStagePageTable:
        t = self.tables.get(vpasid)
        if t is None:
            t = self.tables[vpasid] = FirstStagePageTable(self.memory, self.pages)
        return t


class ScenarioRunner:
    """Builds the scenario's hosts and VMs; :meth:`run` yields the step results."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.hosts: dict[str, Host] = {}
        self.guests: dict[str, GuestSide] = {}
        self.met = 0
        self.failed = 0
        for i, hs in enumerate(scenario.hosts):
            try:
                host = Host(
                    hs.name,
                    allocation=hs.allocation,  # type: ignore[arg-type]
                    pasid_bits=hs.pasid_bits,
                    hpa_base=HOST_HPA_STRIDE * (i + 1),  # distinct ranges across the scenario
                )
                for fs in hs.functions:
                    host.add_function(fs.rid, enqcmd=fs.enqcmd, translating=fs.translating)
            except VioasidError as exc:
                raise ScenarioError(f"host[{i}]: {exc.message}") from None
            self.hosts[hs.name] = host
        for i, vs in enumerate(scenario.vms):
            host = self.hosts[vs.host]
            memory = GuestMemory()
            memory.add(0, mmap.mmap(-1, vs.memory), name="ram")
            pool = vs.memory // 2
            pages = PageAllocator(memory, vs.memory - pool, pool)
            driver = GuestIommuDriver.for_pasid_bits(memory, pages, 20)
            try:
                host.add_vm(vs.name, memory, rtaddr=driver.rtaddr)
            except VioasidError as exc:
                raise ScenarioError(f"vm[{i}]: {exc.message}") from None
            for j, ds in enumerate(vs.devices):
                try:
                    host.attach_device(vs.name, ds.rid, ds.function, ds.assign)  # type: ignore[arg-type]
                except VioasidError as exc:
                    raise ScenarioError(f"vm[{i}].device[{j}]: {exc.message}") from None
                driver.attach_device(ds.rid)
            self.guests[vs.name] = GuestSide(memory, driver, pages, vs.host)

    def run(self) -> Iterator[dict[str, Any]]:
        """One result per step, in order (``expect`` checked and counted)."""
        for step in self.scenario.steps:
            result: dict[str, Any] = {"step": step.index, "op": step.op, "ok": True}
            try:
                result.update(getattr(self, f"_op_{step.op}")(step.args))
            except VioasidError as exc:
                result["ok"] = False
                result["error"] = exc.to_json()
            if "fault" in result:
                result["ok"] = False
            if step.expect is not None:
                bad = check_expect(step.expect, result)
                if bad:
                    self.failed += 1
                    result["expect"] = "failed"
                    result["mismatch"] = bad
                else:
                    self.met += 1
                    result["expect"] = "met"
            yield result

    def summary(self) -> str:
        n = len(self.scenario.steps)
        return f"scenario: {n} steps, {self.met} expectations met, {self.failed} failed"

    # -- ops ----------------------------------------------------------------------------------
    def _where(self, vm: str) -> tuple[Host, GuestSide]:
        g = self.guests[vm]
        return self.hosts[g.host], g

    def _op_map(self, a: Mapping[str, Any]) -> dict[str, Any]:
        _, g = self._where(a["vm"])
        try:
            g.table(a["vpasid"]).map(a["va"], a["gpa"], a["size"], write=a["perm"] == "rw")
        except PagesExhausted:  # the scenario's fault, not a result: the run stops (exit 2)
            raise ScenarioError(
                f"VM {a['vm']}: the guest's page-table pool is exhausted (give it more memory)"
            ) from None
        except ValueError as exc:
            raise InvalidRequest(f"guest map of vPASID {a['vpasid']}: {exc}") from None
        return {}

    def _op_unmap(self, a: Mapping[str, Any]) -> dict[str, Any]:
        host, g = self._where(a["vm"])
        table = g.tables.get(a["vpasid"])
        if table is None:
            raise NotFound(f"VM {a['vm']}: the guest has no table for vPASID {a['vpasid']}")
        try:
            table.unmap(a["va"], a["size"])
        except ValueError as exc:
            raise InvalidRequest(f"guest unmap of vPASID {a['vpasid']}: {exc}") from None
        host.invalidate(a["vm"], a["vpasid"])  # PASID-based IOTLB invalidation
        return {}

    def _op_bind(self, a: Mapping[str, Any]) -> dict[str, Any]:
        host, g = self._where(a["vm"])
        sid, x = a["device"], a["vpasid"]
        gpa = g.driver.pasid_entry_gpa(sid, x, create=True)
        before = g.memory.read(gpa, 64)
        g.driver.set_pasid_entry(
            sid, x, pgtt=PGTT_FIRST_STAGE, did=GUEST_DID, flptptr=g.table(x).root
        )
        try:
            b = host.bind(a["vm"], sid, x)
        except VioasidError:
            g.memory.write(gpa, before)  # the guest driver's bind failed: it restores its entry
            raise
        return {"ppasid": b.ppasid, "space": b.space, "row": b.row}

    def _op_unbind(self, a: Mapping[str, Any]) -> dict[str, Any]:
        host, g = self._where(a["vm"])
        b = host.unbind(a["vm"], a["device"], a["vpasid"])
        g.driver.clear_pasid_entry(a["device"], a["vpasid"])
        return {"ppasid": b.ppasid, "space": b.space}

    def _op_dma(self, a: Mapping[str, Any]) -> dict[str, Any]:
        host, _ = self._where(a["vm"])
        res = host.dma(a["vm"], a["device"], a["vpasid"], a["addr"], write=a.get("write", False))
        return res.to_json()

    def _op_enqcmd(self, a: Mapping[str, Any]) -> dict[str, Any]:
        host, _ = self._where(a["vm"])
        pp = host.enqcmd(a["vm"], a["device"], a["vpasid"])
        out: dict[str, Any] = {"ppasid": pp}
        if "addr" in a:  # the device then works on the descriptor with that tag
            fn = host.vm(a["vm"]).devices[a["device"]].function.rid
            res = host.dma_tag(fn, pp, a["addr"], write=a.get("write", False)).to_json()
            res.pop("ppasid", None)
            out.update(res)
        return out

    def _op_migrate(self, a: Mapping[str, Any]) -> dict[str, Any]:
        src, g = self._where(a["vm"])
        if a["to"] == g.host:
            raise InvalidRequest(f"VM {a['vm']} already runs on host {a['to']}")
        dst = self.hosts[a["to"]]
        stream = export_vm(src, a["vm"])
        vm = import_vm(dst, stream, g.memory, a["functions"], name=a["vm"])
        src.remove_vm(a["vm"])
        g.host = a["to"]
        ppasids = {
            dev.bdf: {str(x): pp for x, pp in sorted(dev.ppasids.items())}
            for dev in sorted(vm.devices.values(), key=lambda d: d.guest_rid)
        }
        return {"ppasids": ppasids, "stream_bytes": len(stream)}

    def _op_dump(self, a: Mapping[str, Any]) -> dict[str, Any]:
        vms: dict[str, Any] = {}
        functions: dict[str, Any] = {}
        if "vm" in a:
            host, _ = self._where(a["vm"])
            d = host.dump(a["vm"])
            return {"vms": d["vms"], "functions": d["functions"]}
        for host in self.hosts.values():
            d = host.dump()
            vms.update(d["vms"])
            functions.update(d["functions"])
        return {"vms": vms, "functions": functions}


def run_scenario(doc: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str, int]:
    """Validate and run a whole scenario: (results, summary line, exit status 0/1).
    Raises ScenarioError for an invalid file."""
    runner = ScenarioRunner(parse_scenario(doc))
    results = list(runner.run())
    return results, runner.summary(), 1 if runner.failed else 0
