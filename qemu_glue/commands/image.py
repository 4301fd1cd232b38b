"""``vioasid image build [--json] [--force] [--kernel-version VER]`` and ``vioasid image path
[--json] [--kernel-version VER]``: the test guest (kernel, initramfs, the vioasid_dma driver).

Progress goes to stderr; the result (paths, versions) to stdout, as text or one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from images.build import GuestImage, ensure_image
from images.errors import ImageError


def _progress(msg: str) -> None:
    print(f"vioasid image: {msg}", file=sys.stderr, flush=True)


def _print(img: GuestImage, as_json: bool, seconds: float | None = None) -> None:
    if as_json:
        d: dict[str, Any] = img.to_json()
        if seconds is not None:
            d["build_seconds"] = round(seconds, 3)
        print(json.dumps(d))
        return
    print(f"kernel   {img.kernel}{'  (PVH vmlinux)' if img.pvh else '  (bzImage)'}")
    print(f"initrd   {img.initrd}")
    print(f"version  {img.kernel_version}  ({img.kernel_package})")
    print(f"busybox  {img.busybox_version}   modules: {', '.join(img.modules)}")


def _build(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        img = ensure_image(progress=_progress, force=args.force, kernel_version=args.kernel_version)
    except ImageError as exc:
        print(f"vioasid image build: {exc}", file=sys.stderr)
        return 1
    _print(img, args.json, time.monotonic() - t0)
    return 0


def _path(args: argparse.Namespace) -> int:
    try:
        img = ensure_image(progress=_progress, kernel_version=args.kernel_version)
    except ImageError as exc:
        print(f"vioasid image path: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd)}))
    else:
        print(img.kernel)
        print(img.initrd)
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """The options of ``vioasid image`` (the parser ``vioasid.cli`` made)."""
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build the guest image (cached; instant when up to date)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=_build)
    p = sub.add_parser("path", help="print the kernel and initrd paths (building if needed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_path)
    for sp in (b, p):
        sp.add_argument(
            "--kernel-version",
            metavar="VER",
            help="a Debian kernel other than the newest 6.12, e.g. 6.12.117+deb12 (its headers "
            "are fetched to build vioasid_dma.ko)",
        )
