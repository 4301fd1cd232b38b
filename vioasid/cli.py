"""The ``vioasid`` command line: argument parsing and output only.

Each subcommand lives in its own module (``vioasid/commands/*.py`` or ``qemu_glue/commands/*.py``)
exposing ``configure(parser)`` and ``run(args) -> int``; the list below names them all.
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

# Every subcommand, in --help order: (name, module, one-line help). The module exposes
# ``configure(parser)`` (its options) and ``run(args) -> int`` (or sets ``func`` per action
# itself, for a command with actions); its docstring is the command's --help description.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    (
        "walk",
        "vioasid.commands.walk",
        "translate one DMA request through the VT-d tables in a guest-memory file",
    ),
    (
        "dump",
        "vioasid.commands.dump",
        "list the present root/context/PASID entries in a guest-memory file",
    ),
    (
        "example-image",
        "vioasid.commands.example_image",
        "write an example guest-memory file with VT-d tables",
    ),
    (
        "scenario",
        "vioasid.commands.scenario",
        "run a scenario file (hosts, VMs, steps) through the vPASID engine",
    ),
    ("serve", "vioasid.commands.serve", "run the vioasid daemon on a unix socket (foreground)"),
    (
        "status",
        "vioasid.commands.status",
        "show a running daemon's VMs, devices and vPASID/pPASID tables",
    ),
    ("qemu", "qemu_glue.commands.qemu", "which QEMU vioasid uses; install QEMU 11.1 privately"),
    (
        "image",
        "qemu_glue.commands.image",
        "build or locate the test guest (Debian 6.12 kernel + busybox initramfs)",
    ),
    (
        "boot",
        "qemu_glue.commands.boot",
        "boot your kernel/initramfs with the vioasid-served disk, console on the terminal",
    ),
    (
        "demo",
        "qemu_glue.commands.demo",
        "boot a guest whose disk vioasid serves, walking the guest's VT-d tables itself",
    ),
    (
        "migrate",
        "qemu_glue.commands.migrate",
        "live-migrate a QEMU VM and its vPASID state to another host (QMP)",
    ),
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
            p.set_defaults(func=_unavailable(name, exc), unavailable=True)
            continue
        p = sub.add_parser(
            name,
            help=summary,
            description=(module.__doc__ or "").replace("``", ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(p)
        if hasattr(module, "run"):
            p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: an unavailable command takes any options (REMAINDER does not catch a
    # leading "--option"), so that it can say why it cannot run instead of "unrecognized".
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
