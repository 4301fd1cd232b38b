"""The ``vioasid`` command line: argument parsing and output only.

Each subcommand lives in its own module (``vioasid/commands/*.py`` or ``qemu_glue/commands/*.py``)
exposing ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
User mistakes print one line on stderr and exit 2; nothing prints a traceback at the user.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "vioasid.commands.walk",
    "vioasid.commands.dump",
    "vioasid.commands.example_image",
    "vioasid.commands.scenario",
    "vioasid.commands.serve",
    "vioasid.commands.status",
    "qemu_glue.commands.image",
    "qemu_glue.commands.boot",
    "qemu_glue.commands.demo",
    "qemu_glue.commands.migrate",
)


def emit(text: str = "", *, err: bool = False, end: str = "\n") -> None:
    """Write one piece of command output (stdout, or stderr with ``err``)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + end)
    if err:
        stream.flush()


class UsageError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vioasid",
        description=(
            "Virtual IOMMU PASID emulator: walks VT-d scalable-mode tables in guest memory, "
            "allocates host pPASIDs for guest vPASIDs, serves QEMU guests."
        ),
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that command is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc: int = args.func(args)
    except UsageError as exc:
        print(f"vioasid {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vioasid {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``vioasid dump --json | head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    # Run through the imported module so that command modules and this entry point share one
    # ``vioasid.cli`` (one UsageError class), not a second copy named ``__main__``.
    from vioasid import cli as _cli

    sys.exit(_cli.main())
