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
from typing import Any

from vioasid.commands.common import UsageError, emit

__all__ = ["COMMANDS", "UsageError", "build_parser", "emit", "main"]

# Every subcommand, in --help order: (name, module exposing register(subparsers), one-line help
# used only when the module cannot be imported).
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("walk", "vioasid.commands.walk", "translate one request by walking tables in a memory file"),
    ("dump", "vioasid.commands.dump", "print every present root/context/PASID entry"),
    ("example-image", "vioasid.commands.example_image", "write an example guest-memory image"),
    ("scenario", "vioasid.commands.scenario", "run a scenario file through the engine"),
    ("serve", "vioasid.commands.serve", "run the vioasid daemon"),
    ("status", "vioasid.commands.status", "show a daemon's VMs, devices and bindings"),
    ("qemu", "qemu_glue.commands.qemu", "which QEMU vioasid uses; install QEMU 11.1"),
    ("image", "qemu_glue.commands.image", "build or locate the test guest image"),
    ("boot", "qemu_glue.commands.boot", "boot your kernel behind intel-iommu with vioasid devices"),
    ("demo", "qemu_glue.commands.demo", "boot the test guest and run its tests (the main job)"),
    ("migrate", "qemu_glue.commands.migrate", "live-migrate a VM with its vPASID state"),
)


def _unavailable(name: str, exc: ImportError) -> Any:
    """A command whose module cannot be imported still exists, and says why when run."""
    missing = getattr(exc, "name", None) or str(exc)

    def run(_args: argparse.Namespace) -> int:
        raise UsageError(
            f"cannot run: Python module {missing!r} is missing ({exc}); "
            "run ./scripts/setup-host.sh (or pip install -e .)"
        )

    return run


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
    for name, module_name, summary in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            p = sub.add_parser(name, help=f"{summary} (unavailable: {exc})")
            p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(func=_unavailable(name, exc))
            continue
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
