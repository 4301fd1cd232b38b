"""``vioasid example-image OUT``: write a small guest-memory file with example VT-d tables.

The tables are laid out by :mod:`vioasid.model.guest_driver` as a Linux guest would; the command
prints the matching RTADDR and ready-to-run ``vioasid walk`` lines (used in the README).
"""

from __future__ import annotations

import argparse
import json

from vioasid.commands.common import UsageError, emit
from vioasid.model.example import EXAMPLES, build_example


def run(args: argparse.Namespace) -> int:
    mem, rtaddr = build_example()
    region = mem.regions[0]
    try:
        with open(args.out, "wb") as f:
            f.write(region.buf)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out!r}: {exc.strerror}") from None
    if args.json:
        emit(
            json.dumps(
                {
                    "memory": args.out,
                    "size": region.size,
                    "rtaddr": hex(rtaddr),
                    "requests": [
                        {
                            "bdf": e.bdf,
                            "addr": hex(e.addr),
                            "pasid": e.pasid,
                            "write": e.write,
                            "note": e.note,
                        }
                        for e in EXAMPLES
                    ],
                }
            )
        )
        return 0
    emit(f"wrote {args.out}: {region.size >> 20} MiB guest memory, scalable-mode tables")
    emit(f"rtaddr {rtaddr:#x}")
    emit("try:")
    for e in EXAMPLES:
        extra = (f" --pasid {e.pasid}" if e.pasid is not None else "") + (
            " --write" if e.write else ""
        )
        emit(
            f"  vioasid walk --memory {args.out} --rtaddr {rtaddr:#x} --bdf {e.bdf} "
            f"--addr {e.addr:#x}{extra}    # {e.note}"
        )
    emit(f"  vioasid dump --memory {args.out} --rtaddr {rtaddr:#x}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid example-image`` (the parser ``vioasid.cli`` made)."""
    p.add_argument("out", metavar="OUT", help="file to write")
    p.add_argument("--json", action="store_true", help="print the RTADDR and requests as JSON")
