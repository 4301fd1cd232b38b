"""``vioasid walk``: translate one DMA request by walking VT-d tables in a guest-memory file.

Prints exactly one JSON object on stdout and exits 0 (translated or faulted); user mistakes exit
2 with one line on stderr. The output contract: docs/architecture.md ("The walk JSON").
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vioasid.commands.common import (
    UsageError,
    add_memory_options,
    emit,
    open_memory,
    parse_number,
    parse_rid,
)
from vioasid.formats.registers import is_scalable
from vioasid.model.faults import Fault
from vioasid.model.walker import Walker, WalkRequest


def run(args: argparse.Namespace) -> int:
    rtaddr = parse_number(args.rtaddr, "--rtaddr")
    sid = parse_rid(args.bdf)
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


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid walk`` (the parser ``vioasid.cli`` made)."""
    add_memory_options(p)
    p.add_argument("--bdf", required=True, metavar="BB:DD.F", help="requester (bus:dev.fn)")
    p.add_argument("--addr", required=True, metavar="IOVA", help="input address")
    p.add_argument("--pasid", metavar="N", help="request with PASID N (default: without PASID)")
    p.add_argument("--write", action="store_true", help="write request (default read)")
    p.add_argument("--supervisor", action="store_true", help="supervisor-privilege request")
    p.add_argument("--exec", action="store_true", help="execute request")
    p.add_argument("--haw", type=int, default=48, help="host address width (default 48)")
