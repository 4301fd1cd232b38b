"""``vioasid walk``: translate one DMA request by walking VT-d tables in a guest-memory file.

Prints exactly one JSON object on stdout and exits 0 (translated or faulted); user mistakes exit
2 with one line on stderr. The output contract: docs/architecture.md ("The walk JSON").
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vioasid.commands.common import UsageError, emit, parse_number
from vioasid.formats.registers import is_scalable
from vioasid.model.faults import Fault, parse_bdf
from vioasid.model.memory import GuestMemory
from vioasid.model.walker import Walker, WalkRequest


def open_memory(path: str) -> GuestMemory:
    """The guest-memory file (offset == GPA); UsageError when it cannot be opened."""
    if not os.path.isfile(path):
        raise UsageError(f"memory file {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise UsageError(f"memory file {path!r} is empty")
    try:
        return GuestMemory.from_file(path)
    except OSError as exc:
        raise UsageError(f"cannot open memory file {path!r}: {exc.strerror}") from None


def run(args: argparse.Namespace) -> int:
    rtaddr = parse_number(args.rtaddr, "--rtaddr")
    try:
        sid = parse_bdf(args.bdf)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    addr = parse_number(args.addr, "--addr")
    pasid = None if args.pasid is None else parse_number(args.pasid, "--pasid", 1 << 20)
    if not 32 <= args.haw <= 52:
        raise UsageError("--haw must be 32..52")
    mem = open_memory(args.memory)  # mapped read-only; released when the process exits
    walker = Walker(mem, haw=args.haw)
    req = WalkRequest(sid, addr, pasid, args.write, args.supervisor, args.exec)
    res = walker.translate(rtaddr, req)
    out: dict[str, Any]
    if isinstance(res, Fault):
        out = {"translated": False, "fault": res.to_json()}
    else:
        out = res.to_json()
        out["execute"] = res.execute
    out["mode"] = "scalable" if is_scalable(rtaddr) else "legacy"
    emit(json.dumps(out))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "walk",
        help="translate one DMA request through the VT-d tables in a guest-memory file",
        description="Walk root → context → PASID → page tables in FILE (offset == GPA) and "
        "print one JSON object: the translation or the VT-d fault.",
    )
    p.add_argument("--memory", required=True, metavar="FILE", help="guest memory (offset = GPA)")
    p.add_argument("--rtaddr", required=True, metavar="VALUE", help="raw RTADDR register value")
    p.add_argument("--bdf", required=True, metavar="BB:DD.F", help="requester (bus:dev.fn)")
    p.add_argument("--addr", required=True, metavar="IOVA", help="input address")
    p.add_argument("--pasid", metavar="N", help="request with PASID N (default: without PASID)")
    p.add_argument("--write", action="store_true", help="write request (default read)")
    p.add_argument("--supervisor", action="store_true", help="supervisor-privilege request")
    p.add_argument("--exec", action="store_true", help="execute request")
    p.add_argument("--haw", type=int, default=48, help="host address width (default 48)")
    p.set_defaults(func=run)
