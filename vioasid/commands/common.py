"""What every ``vioasid`` subcommand shares: the user-mistake error, output, parsing, memory files.

Command modules (``vioasid/commands/*.py``, ``qemu_glue/commands/*.py``) import from here;
``vioasid.cli`` (the dispatcher) imports the command modules. Nothing here imports a command.
"""

from __future__ import annotations

import argparse
import os
import sys

from vioasid.model.faults import parse_bdf
from vioasid.model.memory import GuestMemory


class UsageError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


def emit(text: str = "", *, err: bool = False, end: str = "\n") -> None:
    """Write one piece of command output (stdout, or stderr with ``err``)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + end)
    if err:
        stream.flush()


def parse_number(text: str, what: str, limit: int = 1 << 64) -> int:
    """Hex (``0x…``) or decimal; UsageError naming ``what`` when it is not a number in range."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected a number (hex 0x… or decimal)") from None
    if not 0 <= value < limit:
        raise UsageError(f"bad {what} {text!r}: out of range (0 .. 0x{limit - 1:x})")
    return value


def parse_rid(text: str) -> int:
    """``BB:DD.F`` as a 16-bit requester id; UsageError on bad input."""
    try:
        return parse_bdf(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """``--memory FILE`` and ``--rtaddr VALUE``: a guest-memory file and the root table in it."""
    p.add_argument("--memory", required=True, metavar="FILE", help="guest memory (offset = GPA)")
    p.add_argument("--rtaddr", required=True, metavar="VALUE", help="raw RTADDR register value")
