"""``vioasid dump``: list every present root/context/PASID entry of a guest's VT-d tables.

A readable table by default, one JSON object with ``--json``. Work is bounded on hostile tables
(``--max-entries``).
"""

from __future__ import annotations

import argparse
import json

from vioasid.commands.common import UsageError, emit
from vioasid.model.dump import dump_tables

from .common import add_memory_options, open_memory, parse_number


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    rtaddr = parse_number(args.rtaddr, "--rtaddr")
    if args.max_entries <= 0:
        raise UsageError("--max-entries must be positive")
    mem = open_memory(args.memory)  # mapped read-only; released when the process exits
    d = dump_tables(mem, rtaddr, max_entries=args.max_entries)
    if args.json:
        emit(json.dumps(d.to_json()))
        return 0
    emit(f"RTADDR {rtaddr:#x}: {d.mode} mode, {len(d.contexts)} present context entries")
    if d.mode == "legacy":
        rows = [["BDF", "TT", "DID", "AW", "SSPTPTR", "FPD"]]
        for c in d.contexts:
            rows.append(
                [c["bdf"], c["tt"], str(c["did"]), str(c["aw"]), c["ssptptr"], str(c["fpd"])]
            )
    else:
        rows = [["BDF", "PASID", "PGTT", "DID", "TABLES", "FLAGS"]]
        for c in d.contexts:
            flags = [f"pdts={c['pdts']}", f"rid_pasid={c['rid_pasid']}"]
            flags += [k for k in ("paside", "pre", "dte", "fpd") if c[k]]
            rows.append([c["bdf"], "-", "context", "-", f"dir={c['pasid_dir']}", " ".join(flags)])
            for p in c["pasids"]:
                pf = [f"aw={p['aw']}", f"flpm={p['flpm']}"]
                pf += [k for k in ("sre", "wpe", "fpd") if p[k]]
                tables = {
                    "first-stage": f"fl={p['flptptr']}",
                    "second-stage": f"ss={p['ssptptr']}",
                    "nested": f"fl={p['flptptr']} ss={p['ssptptr']}",
                }.get(p["pgtt"], "-")
                rows.append(
                    [c["bdf"], str(p["pasid"]), p["pgtt"], str(p["did"]), tables, " ".join(pf)]
                )
    if len(rows) > 1:
        emit(_table(rows))
    for e in d.errors:
        emit(f"warning: {e}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid dump`` (the parser ``vioasid.cli`` made)."""
    add_memory_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument(
        "--max-entries", type=int, default=200_000, help="entry budget for hostile tables"
    )
