"""Parse the marker lines the guest's /init, disk tests and PASID checks print on the console.

Lines (one per event, ``key=value`` words; ``detail`` is the rest of the line)::

    VIOASID-INIT uptime=<s>                       /init started (guest uptime in seconds)
    VIOASID-MODULES loaded=<m1,m2|none>           the modules /init loaded (vioasid_dma last)
    VIOASID-TEST name=<n> gen=<g> result=pass|fail detail=<text>
    VIOASID-TESTS-DONE gen=<g> passed=<N> failed=<M>
    VIOASID-LOOP-STOPPED gen=<g>                  loop mode saw the stop sector
    VIOASID-ERROR detail=<text>                   /init could not run the tests

PASID DMA checks (images/guest/pasid_tests.sh, ``vioasid.tests=pasid``; docs/pasid-dma.md)::

    VIOASID-PASID-DEVICES count=<N> types=<dma0:dedicated,dma1:mdev|none>
    VIOASID-PASID-BIND dev=<dmaN> pasid=<P>       a check bound vPASID P on function dmaN
    VIOASID-PASID-TEST name=<check> result=pass|fail|skip dev=<dmaN> pasid=<P>
        [fault_reason=0xNN fault_addr=0x... fault_pasid=<P> fault_write=0|1] detail=<text>
    VIOASID-PASID-DONE passed=<N> failed=<M> skipped=<K>
    VIOASID-PASID-BENCH name=<figure> value=<v> unit=<MiB/s|jobs/s> ops=<n> seconds=<s>
    VIOASID-PASID-BENCH-DONE ok=1|0 [detail=<why not>]      (images/guest/pasid_bench.sh)

The ``fault_*`` fields are the fault the driver reported for a check that expects one (the
device's completion record or error registers: VT-d reason, IOVA, the guest's vPASID, write).
:data:`PASID_CHECKS` names the checks in the order the script runs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

INIT = "VIOASID-INIT"
TEST = "VIOASID-TEST"
DONE = "VIOASID-TESTS-DONE"
STOPPED = "VIOASID-LOOP-STOPPED"
ERROR = "VIOASID-ERROR"
MODULES = "VIOASID-MODULES"
PASID_DEVICES = "VIOASID-PASID-DEVICES"
PASID_BIND = "VIOASID-PASID-BIND"
PASID_TEST = "VIOASID-PASID-TEST"
PASID_DONE = "VIOASID-PASID-DONE"
PASID_BENCH = "VIOASID-PASID-BENCH"
PASID_BENCH_DONE = "VIOASID-PASID-BENCH-DONE"

PASID_CHECKS = (
    "devices",
    "syntax",
    "bind-unbind",
    "copy",
    "fill",
    "compare",
    "isolation",
    "ro-write-fault",
    "unmapped-fault",
    "unbind-fault",
    "remap",
    "shared-pasid",
    "many-pasids",
    "batch",
    "every-function",
    "reload",
)

_KIND_RE = re.compile(r"VIOASID-[A-Z]+(?:-[A-Z]+)*")
_KV_RE = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class Marker:
    kind: str
    fields: dict[str, str]

    def int(self, key: str, default: int = 0) -> int:
        try:
            return int(self.fields.get(key, default))
        except ValueError:
            return default


def parse_prefixed(text: str, prefix: str) -> tuple[str, dict[str, str]] | None:
    """``<prefix>KIND k=v ... detail=free text`` -> (KIND, fields), else None.

    The PASID (``VIOASID-PASID-``) and seed (``VIOASID-SEED-``) lines: everything after
    ``detail=`` is one free-text field; console junk before the prefix is allowed.
    """
    i = text.find(prefix)
    if i < 0:
        return None
    rest = text[i + len(prefix) :].rstrip()
    kind, _, tail = rest.partition(" ")
    fields: dict[str, str] = {}
    at = tail.find("detail=")
    if at >= 0:
        fields["detail"] = tail[at + len("detail=") :]
        tail = tail[:at]
    for word in tail.split():
        k, eq, v = word.partition("=")
        if eq:
            fields[k] = v
    return kind, fields


def parse_marker(line: str) -> Marker | None:
    """The marker on ``line`` (kernel timestamps and junk before it allowed), else None."""
    i = line.find("VIOASID-")
    if i < 0:
        return None
    text = line[i:].rstrip("\r\n")
    m = _KIND_RE.match(text)
    if not m:
        return None
    rest = text[m.end() :]
    if rest and not rest[0].isspace():
        return None
    head, sep, detail = rest.partition(" detail=")
    fields = dict(_KV_RE.findall(head))
    if sep:
        fields["detail"] = detail.strip()
    return Marker(m.group(0), fields)


@dataclass(frozen=True)
class TestResult:
    name: str
    passed: bool
    detail: str
    gen: int


@dataclass(frozen=True)
class Fault:
    """A fault as the driver reports it: ``fault reason=0xNN addr=0x... pasid=P write=0|1``."""

    reason: int
    addr: int
    pasid: int
    write: bool


@dataclass(frozen=True)
class DriverResult:
    """One result line of ``/sys/class/vioasid-dma/dmaN/cmd``: ``ok ...``, ``error <kind>
    <message>`` or a fault."""

    kind: str  # "ok", "error", "fault"
    fields: dict[str, str]  # ok/fault: key=value words
    error: str = ""  # error: the kind word (invalid, pasid-conflict, not-bound, ...)
    message: str = ""
    fault: Fault | None = None


def parse_driver_result(line: str) -> DriverResult | None:
    """The driver's result line, or None when ``line`` is not one."""
    text = line.strip()
    word, _, rest = text.partition(" ")
    if word == "ok":
        return DriverResult("ok", dict(_KV_RE.findall(rest)))
    if word == "error":
        kind, _, message = rest.partition(" ")
        return DriverResult("error", {}, kind, message) if kind else None
    if word == "fault":
        f = dict(_KV_RE.findall(rest))
        try:
            fault = Fault(
                int(f["reason"], 16), int(f["addr"], 16), int(f["pasid"]), f["write"] == "1"
            )
        except (KeyError, ValueError):
            return None
        return DriverResult("fault", f, fault=fault)
    return None


@dataclass(frozen=True)
class PasidResult:
    """One ``VIOASID-PASID-TEST`` line."""

    name: str
    result: str  # pass, fail, skip
    dev: str
    pasid: int
    detail: str
    fault: Fault | None = None

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def _marker_fault(mk: Marker) -> Fault | None:
    f = mk.fields
    try:
        return Fault(
            int(f["fault_reason"], 16),
            int(f["fault_addr"], 16),
            int(f["fault_pasid"]),
            f["fault_write"] == "1",
        )
    except (KeyError, ValueError):
        return None


@dataclass
class GuestReport:
    """What one guest run reported (every generation in loop mode)."""

    init_seen: bool = False
    init_uptime_s: float | None = None
    results: list[TestResult] = field(default_factory=list)
    done: list[tuple[int, int, int]] = field(default_factory=list)  # (gen, passed, failed)
    stopped: bool = False
    errors: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    pasid_devices: dict[str, str] = field(default_factory=dict)  # dmaN -> type
    pasid_binds: list[tuple[str, int]] = field(default_factory=list)  # (dmaN, vPASID)
    pasid_results: list[PasidResult] = field(default_factory=list)
    pasid_done: tuple[int, int, int] | None = None  # (passed, failed, skipped)
    pasid_bench: dict[str, float] = field(default_factory=dict)  # figure -> value
    pasid_bench_done: bool | None = None  # None: the bench did not finish

    def feed(self, line: str) -> Marker | None:
        """Account for one console line; the marker it held, if any."""
        mk = parse_marker(line)
        if mk is None:
            return None
        if mk.kind == INIT:
            self.init_seen = True
            try:
                self.init_uptime_s = float(mk.fields.get("uptime", ""))
            except ValueError:
                self.init_uptime_s = None
        elif mk.kind == TEST:
            self.results.append(
                TestResult(
                    mk.fields.get("name", "?"),
                    mk.fields.get("result") == "pass",
                    mk.fields.get("detail", ""),
                    mk.int("gen"),
                )
            )
        elif mk.kind == DONE:
            self.done.append((mk.int("gen"), mk.int("passed"), mk.int("failed")))
        elif mk.kind == STOPPED:
            self.stopped = True
        elif mk.kind == ERROR:
            self.errors.append(mk.fields.get("detail", ""))
        elif mk.kind == MODULES:
            loaded = mk.fields.get("loaded", "none")
            self.modules = [] if loaded == "none" else loaded.split(",")
        elif mk.kind.startswith("VIOASID-PASID-"):
            self._feed_pasid(mk)
        return mk

    def _feed_pasid(self, mk: Marker) -> None:
        if mk.kind == PASID_DEVICES:
            types = mk.fields.get("types", "none")
            pairs = [t.partition(":") for t in types.split(",") if t != "none"]
            self.pasid_devices = {dev: kind for dev, _, kind in pairs}
        elif mk.kind == PASID_BIND:
            self.pasid_binds.append((mk.fields.get("dev", "?"), mk.int("pasid")))
        elif mk.kind == PASID_TEST:
            self.pasid_results.append(
                PasidResult(
                    mk.fields.get("name", "?"),
                    mk.fields.get("result", "fail"),
                    mk.fields.get("dev", "?"),
                    mk.int("pasid"),
                    mk.fields.get("detail", ""),
                    _marker_fault(mk),
                )
            )
        elif mk.kind == PASID_DONE:
            self.pasid_done = (mk.int("passed"), mk.int("failed"), mk.int("skipped"))
        elif mk.kind == PASID_BENCH:
            try:
                self.pasid_bench[mk.fields["name"]] = float(mk.fields["value"])
            except (KeyError, ValueError):
                self.errors.append(f"bad bench line: {mk.fields}")
        elif mk.kind == PASID_BENCH_DONE:
            self.pasid_bench_done = mk.fields.get("ok") == "1"
            if not self.pasid_bench_done:
                self.errors.append("pasid bench: " + mk.fields.get("detail", "failed"))

    @property
    def pasid_ok(self) -> bool:
        """The PASID checks ran to the end, none failed, at least one passed."""
        return (
            self.pasid_done is not None
            and self.pasid_done[1] == 0
            and any(r.passed for r in self.pasid_results)
            and not any(r.result == "fail" for r in self.pasid_results)
        )

    def pasid_result(self, name: str) -> PasidResult | None:
        """The (last) result of check ``name``."""
        found = [r for r in self.pasid_results if r.name == name]
        return found[-1] if found else None

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)

    @property
    def ok(self) -> bool:
        """At least one complete pass, nothing failed, no /init error."""
        return bool(self.done) and self.failed == 0 and not self.errors

    @property
    def last_gen(self) -> int | None:
        return self.done[-1][0] if self.done else None

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> GuestReport:
        rep = cls()
        for line in lines:
            rep.feed(line)
        return rep
