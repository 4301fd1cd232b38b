"""Parse the marker lines the guest's /init and disk tests print on the serial console.

Lines (one per event, ``key=value`` words; ``detail`` is the rest of the line)::

    VIOASID-INIT uptime=<s>                       /init started (guest uptime in seconds)
    VIOASID-TEST name=<n> gen=<g> result=pass|fail detail=<text>
    VIOASID-TESTS-DONE gen=<g> passed=<N> failed=<M>
    VIOASID-LOOP-STOPPED gen=<g>                  loop mode saw the stop sector
    VIOASID-ERROR detail=<text>                   /init could not run the tests
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


@dataclass
class GuestReport:
    """What one guest run reported (every generation in loop mode)."""

    init_seen: bool = False
    init_uptime_s: float | None = None
    results: list[TestResult] = field(default_factory=list)
    done: list[tuple[int, int, int]] = field(default_factory=list)  # (gen, passed, failed)
    stopped: bool = False
    errors: list[str] = field(default_factory=list)

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
        return mk

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
