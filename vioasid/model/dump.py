"""Enumerate every present root / context / PASID entry of a VT-d table tree (for dumps).

Reads with the ``vioasid.formats`` layouts; hostile trees are handled with bounded work: a total
entry budget (``max_entries``), shared tables decoded once, every unreadable table reported as
an error string instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vioasid.formats.bitfields import Layout
from vioasid.formats.context import (
    LEGACY_CONTEXT_ENTRY,
    SM_CONTEXT_ENTRY,
    pasid_dir_entries,
)
from vioasid.formats.pasid import (
    PASID_DIR_ENTRY,
    PASID_ENTRIES_PER_TABLE,
    PASID_ENTRY,
    PGTT_NAMES,
)
from vioasid.formats.registers import RTADDR, TTM_LEGACY, TTM_SCALABLE
from vioasid.formats.root import LEGACY_ROOT_ENTRY, ROOT_ENTRY_SIZE, SM_ROOT_ENTRY

from .faults import bdf_str
from .memory import GuestMemory, MemoryAccessError

_CTX_TT_NAMES = {0: "multi-level", 1: "device-iotlb", 2: "pass-through"}


@dataclass
class TableDump:
    """What :func:`dump_tables` found."""

    rtaddr: int
    mode: str
    contexts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False
    visited: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "rtaddr": hex(self.rtaddr),
            "mode": self.mode,
            "devices": self.contexts,
            "errors": self.errors,
            "truncated": self.truncated,
        }


class _Budget(Exception):
    pass


# words -> {field: value}, generated from the layouts (literal masks)
_DEC_LEGACY_CTX = LEGACY_CONTEXT_ENTRY.decoder()
_DEC_SM_CTX = SM_CONTEXT_ENTRY.decoder()
_DEC_PASID = PASID_ENTRY.decoder()
_P = {lay.name: lay.mask(name) for lay, name in  # each entry's present bit
      ((LEGACY_ROOT_ENTRY, "P"), (SM_ROOT_ENTRY, "LP"), (LEGACY_CONTEXT_ENTRY, "P"),
       (SM_CONTEXT_ENTRY, "P"), (PASID_DIR_ENTRY, "P"), (PASID_ENTRY, "P"))}  # fmt: skip


# The JSON view of each entry: key, layout field, how the value is shown.
_Show = Callable[[int], object]
_LEGACY_CTX_VIEW: tuple[tuple[str, str, _Show], ...] = (
    ("did", "DID", int), ("aw", "AW", int), ("ssptptr", "SSPTPTR", hex), ("fpd", "FPD", bool),
)  # fmt: skip
_SM_CTX_VIEW: tuple[tuple[str, str, _Show], ...] = (
    ("pasid_dir", "PASIDDIRPTR", hex), ("pdts", "PDTS", int), ("rid_pasid", "RID_PASID", int),
    ("paside", "PASIDE", bool), ("pre", "PRE", bool), ("dte", "DTE", bool), ("fpd", "FPD", bool),
)  # fmt: skip
_PASID_VIEW: tuple[tuple[str, str, _Show], ...] = (
    ("did", "DID", int), ("aw", "AW", int), ("ssptptr", "SSPTPTR", hex),
    ("flptptr", "FLPTPTR", hex), ("flpm", "FLPM", int), ("sre", "SRE", bool),
    ("wpe", "WPE", bool), ("fpd", "FPD", bool),
)  # fmt: skip


def _view(f: dict[str, int], spec: tuple[tuple[str, str, _Show], ...]) -> dict[str, object]:
    return {key: show(f[name]) for key, name, show in spec}


def dump_tables(mem: GuestMemory, rtaddr: int, *, max_entries: int = 200_000) -> TableDump:
    """Every present context entry (and, in scalable mode, PASID entry) under ``rtaddr``."""
    ttm = RTADDR.field("TTM").get(rtaddr)
    root = RTADDR.field("RTA").get(rtaddr)
    mode = {TTM_LEGACY: "legacy", TTM_SCALABLE: "scalable"}.get(ttm, f"ttm-{ttm}")
    out = TableDump(rtaddr, mode)
    if mode not in ("legacy", "scalable"):
        out.errors.append(f"RTADDR TTM={ttm} is not a supported translation-table mode")
        return out

    def words(gpa: int, count: int, what: str) -> tuple[int, ...] | None:
        out.visited += 1
        if out.visited > max_entries:
            raise _Budget
        try:
            return mem.words(gpa, count)
        except MemoryAccessError:
            out.errors.append(f"{what} at 0x{gpa:x} is outside guest memory")
            return None

    pasid_tables: dict[int, list[dict[str, Any]]] = {}
    try:
        for bus in range(256):
            re = words(root + bus * ROOT_ENTRY_SIZE, 2, f"root entry {bus:02x}")
            if re is None:
                break  # the root table itself is unreadable
            if mode == "legacy":
                if not re[0] & _P[LEGACY_ROOT_ENTRY.name]:
                    continue
                ctp = LEGACY_ROOT_ENTRY.field("CTP").get(re[0])
                for devfn, ce in _present(words, ctp, 256, LEGACY_CONTEXT_ENTRY, "context entry"):
                    sid = (bus << 8) | devfn
                    f = _DEC_LEGACY_CTX(ce)
                    tt = _CTX_TT_NAMES.get(f["TT"], f"reserved-{f['TT']}")
                    out.contexts.append(
                        {"bdf": bdf_str(sid), "sid": sid, "tt": tt, **_view(f, _LEGACY_CTX_VIEW)}
                    )
                continue
            for upper in (0, 1):
                half = re[upper]
                if not half & _P[SM_ROOT_ENTRY.name]:
                    continue
                ctp = SM_ROOT_ENTRY.field("LCTP").get(half)
                for low, ce in _present(words, ctp, 128, SM_CONTEXT_ENTRY, "context entry"):
                    sid = (bus << 8) | (upper * 128 + low)
                    f = _DEC_SM_CTX(ce)
                    dev: dict[str, Any] = {"bdf": bdf_str(sid), "sid": sid}
                    dev.update(_view(f, _SM_CTX_VIEW), pasids=[])
                    out.contexts.append(dev)
                    for didx, de in _present(
                        words, f["PASIDDIRPTR"], pasid_dir_entries(f["PDTS"]), PASID_DIR_ENTRY,
                        f"{bdf_str(sid)} PASID dir entry",
                    ):  # fmt: skip
                        ptp = PASID_DIR_ENTRY.field("PTP").get(de[0])
                        if ptp not in pasid_tables:
                            pasid_tables[ptp] = _pasid_table(ptp, words)
                        found = pasid_tables[ptp]
                        out.visited += len(found)  # the output counts against the budget too
                        if out.visited > max_entries:
                            raise _Budget
                        for e in found:
                            dev["pasids"].append(dict(e, pasid=didx * 64 + e["index"]))
    except _Budget:
        out.truncated = True
        out.errors.append(f"stopped after {max_entries} entries (budget)")
    for dev in out.contexts:
        for e in dev.get("pasids", []):
            e.pop("index", None)
    return out


def _present(
    words: Callable[[int, int, str], tuple[int, ...] | None],
    table: int,
    count: int,
    layout: Layout,
    what: str,
) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(index, words) of each present entry of a table of ``count`` ``layout`` entries at
    ``table``; stops at the first unreadable one (``words`` has reported it)."""
    present, n = _P[layout.name], layout.size // 8
    for i in range(count):
        e = words(table + i * layout.size, n, f"{what} {i}")
        if e is None:
            return
        if e[0] & present:
            yield i, e


def _pasid_table(ptp: int, words: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for idx, pe in _present(words, ptp, PASID_ENTRIES_PER_TABLE, PASID_ENTRY, "PASID entry"):
        f = _DEC_PASID(pe)
        pgtt = PGTT_NAMES.get(f["PGTT"], f"invalid-{f['PGTT']}")
        found.append({"index": idx, "pgtt": pgtt, **_view(f, _PASID_VIEW)})
    return found
