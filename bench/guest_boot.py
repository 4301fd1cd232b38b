"""Boot figures of the test guest with QEMU's built-in virtio-blk (TCG), as JSON lines.

For each run: QEMU start → /init marker (``boot_to_init_s``), → guest tests done
(``boot_to_tests_s``), → QEMU exit; PVH vmlinux vs bzImage, scalable second-stage mode,
iommu.strict=1. One guest at a time. Usage: ``python3 bench/guest_boot.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from images.build import ensure_image
from images.guest import patterns
from qemu_glue.guest_runner import watch_guest
from qemu_glue.qemu.process import launch
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, VirtioBlk, VmSpec, kernel_cmdline


def emit(name: str, value: float, unit: str = "s") -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit}), flush=True)


async def one(kernel: Path, initrd: Path, disk: Path) -> tuple[float, float, float]:
    mode = IommuMode.SCALABLE_SS
    spec = VmSpec(
        name="bench-boot",
        iommu=IommuSpec(mode=mode),
        devices=(VirtioBlk(disk),),
        kernel=kernel,
        initrd=initrd,
        append=kernel_cmdline(mode, strict=True),
    )
    async with launch(spec) as vm:
        run = await watch_guest(vm, 300)
    if not run.ok or run.init_s is None or run.tests_done_s is None or run.exit_s is None:
        raise SystemExit(f"guest run failed: {run.to_json()}")
    return run.init_s, run.tests_done_s, run.exit_s


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    img = ensure_image()
    kernels = {"pvh": img.kernel, "bzimage": img.bzimage} if img.pvh else {"bzimage": img.kernel}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kernel in kernels.items():
            res = []
            for _ in range(args.runs):
                disk = patterns.make_disk(Path(tmp) / "disk.raw")
                res.append(await one(kernel, img.initrd, disk))
            for i, what in enumerate(("boot_to_init_s", "boot_to_tests_s", "boot_to_exit_s")):
                emit(f"builtin_blk_{label}_{what}", statistics.median(r[i] for r in res))


if __name__ == "__main__":
    asyncio.run(main())
