"""Guest disk throughput and boot figures through the vioasid vhost-user-blk disk (JSON lines).

In one invocation, one guest at a time (TCG, intel-iommu scalable mode, iommu.strict=1):

* sequential O_DIRECT write then read of ``--mib`` MiB in 1 MiB requests, timed inside the guest
  (``/proc/uptime``), with vioasid walking the guest's VT-d tables itself (``own_walk``) and with
  vioasid asking QEMU for every translation over the IOTLB-miss path (``qemu_iotlb``);
* boot → guest disk tests done (``boot_to_tests_s``) for the vioasid disk and for QEMU's built-in
  ``virtio-blk-pci`` on the same image.

The throughput guest is the test image plus a small overlay initramfs whose /init runs ``dd``
(the kernel unpacks concatenated archives; later files win). Usage:
``python3 bench/guest_io.py [--mib 32] [--runs 1] [--iommu scalable-fs]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

from guest_tests import patterns
from guest_tests.runner import watch_guest
from images import cpio
from images.build import GuestImage, ensure_image
from qemu_glue.process import launch
from qemu_glue.vhost_user.guest import GuestOptions, run_guest_tests, vhost_blk_guest
from qemu_glue.vmspec import IommuMode, IommuSpec, VirtioBlk, VmSpec, kernel_cmdline

BENCH_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /bin
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
while read mod; do insmod "/lib/modules/$mod.ko"; done < /etc/vioasid/modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
up() { cut -d' ' -f1 /proc/uptime; }
t0=$(up)
fail() { echo "VIOASID-BENCH-ERROR $1"; }
dd if=/dev/zero of=/dev/vda bs=1M count=@MIB@ oflag=direct 2>/dev/null || fail write
t1=$(up)
dd if=/dev/vda of=/dev/null bs=1M count=@MIB@ iflag=direct 2>/dev/null || fail read
t2=$(up)
echo "VIOASID-BENCH t0=$t0 t1=$t1 t2=$t2 mib=@MIB@"
poweroff -f
"""
BENCH_RX = r"VIOASID-BENCH t0=([\d.]+) t1=([\d.]+) t2=([\d.]+) mib=(\d+)"


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit}), flush=True)


def progress(msg: str) -> None:
    print(f"guest_io: {msg}", file=sys.stderr, flush=True)


def bench_initrd(img: GuestImage, mib: int, out: Path) -> Path:
    overlay = cpio.newc_gz(
        [cpio.file("init", BENCH_INIT.replace("@MIB@", str(mib)).encode(), 0o755)]
    )
    out.write_bytes(img.initrd.read_bytes() + overlay)
    return out


async def throughput(
    img: GuestImage, initrd: Path, disk: Path, mode: IommuMode, translate: str
) -> tuple[float, float, dict[str, object]]:
    opts = GuestOptions(
        kernel=img.kernel,
        initrd=initrd,
        append=kernel_cmdline(mode, strict=True),
        disk=disk,
        iommu=IommuSpec(mode=mode),
        translate=translate,
        follow_iq=False,
        name="bench-io",
    )
    async with vhost_blk_guest(opts) as g:
        m = await g.vm.wait_console(BENCH_RX, 300)
        await g.vm.wait(30)
        summary = g.backend.summary()
    t0, t1, t2, n = float(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4))
    if "VIOASID-BENCH-ERROR" in "\n".join(line.text for line in g.vm.console):
        raise SystemExit(f"guest dd failed ({translate})")
    return n / max(t1 - t0, 1e-3), n / max(t2 - t1, 1e-3), summary


async def builtin_boot(img: GuestImage, disk: Path, mode: IommuMode) -> float:
    spec = VmSpec(
        name="bench-builtin",
        iommu=IommuSpec(mode=mode),
        devices=(VirtioBlk(disk),),
        kernel=img.kernel,
        initrd=img.initrd,
        append=kernel_cmdline(mode, strict=True),
    )
    async with launch(spec) as vm:
        run = await watch_guest(vm, 300)
    if not run.ok or run.tests_done_s is None:
        raise SystemExit(f"built-in virtio-blk guest run failed: {run.to_json()}")
    return run.tests_done_s


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=32, help="MiB written then read (default 32)")
    ap.add_argument("--runs", type=int, default=1, help="runs per configuration (median)")
    ap.add_argument("--iommu", default="scalable-fs", choices=[m.value for m in IommuMode])
    args = ap.parse_args()
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    mode = IommuMode(args.iommu)
    img = ensure_image(progress)
    with tempfile.TemporaryDirectory(prefix="vioasid-bench-") as tmp:
        t = Path(tmp)
        initrd = bench_initrd(img, args.mib, t / "bench-initrd.cpio.gz")
        rates: dict[str, tuple[float, float]] = {}
        for translate, label in (("walk", "own_walk"), ("qemu", "qemu_iotlb")):
            ws, rs = [], []
            for _ in range(args.runs):
                progress(f"throughput, {label}")
                disk = patterns.make_disk(t / "disk.raw", max(64, 2 * args.mib) << 20)
                w, r, summary = await throughput(img, initrd, disk, mode, translate)
                ws.append(w)
                rs.append(r)
                progress(f"{label}: write {w:.1f} MiB/s read {r:.1f} MiB/s; {summary}")
            rates[label] = (statistics.median(ws), statistics.median(rs))
            emit(f"guest_seq_write_{label}", rates[label][0], "MiB/s")
            emit(f"guest_seq_read_{label}", rates[label][1], "MiB/s")
        for i, what in enumerate(("write", "read")):
            ratio = rates["own_walk"][i] / max(rates["qemu_iotlb"][i], 1e-9)
            emit(f"guest_seq_{what}_own_walk_vs_qemu_iotlb", ratio, "x")
        vu, bi = [], []
        for _ in range(args.runs):
            progress("boot to tests done, vioasid disk")
            disk = patterns.make_disk(t / "disk.raw")
            res = await run_guest_tests(
                GuestOptions(
                    kernel=img.kernel,
                    initrd=img.initrd,
                    append=kernel_cmdline(mode, strict=True),
                    disk=disk,
                    iommu=IommuSpec(mode=mode),
                    name="bench-boot-vu",
                )
            )
            if not res.ok or res.tests_done_s is None:
                raise SystemExit(f"vioasid disk guest run failed: {res.to_json()}")
            vu.append(res.tests_done_s)
            progress("boot to tests done, built-in virtio-blk")
            bi.append(await builtin_boot(img, patterns.make_disk(t / "disk.raw"), mode))
        emit("boot_to_tests_s_vioasid_disk", statistics.median(vu), "s")
        emit("boot_to_tests_s_builtin_virtio_blk", statistics.median(bi), "s")
        emit("boot_to_tests_vioasid_vs_builtin", statistics.median(vu) / statistics.median(bi), "x")


if __name__ == "__main__":
    asyncio.run(main())
