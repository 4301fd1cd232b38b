"""``vioasid qemu path [--json]`` and ``vioasid qemu install [--json] [--force]``.

``path`` says which QEMU vioasid will start and why (``--qemu`` flag, ``$VIOASID_QEMU``, the
private 11.1 in the cache, or the system binary), its version and the features probed from it.
``install`` fetches Debian 13's ``qemu-system-x86`` 11.1 with its libraries through a private apt
configuration into the cache (never the host's dpkg database); a second run is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from qemu_glue.commands.options import add_qemu_option
from qemu_glue.qemu.binary import QemuNotFound, choose
from qemu_glue.qemu.install import InstallError, install
from vioasid.commands.common import UsageError, emit


def _progress(msg: str) -> None:
    print(f"vioasid qemu install: {msg}", file=sys.stderr, flush=True)


def _path(args: argparse.Namespace) -> int:
    try:
        c = choose(args.qemu)
    except QemuNotFound as exc:
        raise UsageError(str(exc)) from None
    feats = c.features.summary()
    if args.json:
        emit(json.dumps({**c.to_json(), "features": feats}))
        return 0
    reason = {
        "flag": "given with --qemu",
        "env": "from $VIOASID_QEMU",
        "cache": "the private QEMU of 'vioasid qemu install'",
        "system": "qemu-system-x86_64 on PATH",
    }[c.source]
    emit(f"path     {c.path}")
    emit(f"version  {c.version}")
    emit(f"source   {c.source} ({reason})")
    have = ", ".join(f"{k}={v}" if isinstance(v, str) else k for k, v in feats.items() if v)
    emit(f"features {have or '-'}")
    return 0


def _install(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        inst = install(force=args.force, progress=None if args.json else _progress)
    except InstallError as exc:
        emit(f"vioasid qemu install: {exc}", err=True)
        return 1
    out: dict[str, Any] = {**inst.to_json(), "seconds": round(time.monotonic() - t0, 3)}
    if args.json:
        emit(json.dumps(out))
    else:
        emit(f"QEMU {inst.version} ({inst.debian_version}): {inst.wrapper}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    """The options of ``vioasid qemu`` (the parser ``vioasid.cli`` made)."""
    sub = p.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)
    pp = sub.add_parser("path", help="the QEMU vioasid will start, why, and what it offers")
    add_qemu_option(pp)
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.set_defaults(func=_path)
    pi = sub.add_parser(
        "install", help="fetch Debian 13's QEMU 11.1 into the cache (private; instant when there)"
    )
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.add_argument("--force", action="store_true", help="download and unpack again")
    pi.set_defaults(func=_install)
