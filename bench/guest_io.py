"""Guest disk throughput and boot: the vioasid vhost-user-blk disk vs QEMU's own (JSON lines).

In one invocation, one guest at a time (TCG, intel-iommu scalable mode), in strict
(``iommu.strict=1``) and lazy (``iommu.strict=0``, Linux's default flush queue) mode:

* sequential O_DIRECT write then read of ``--mib`` MiB in 1 MiB requests, timed inside the guest
  (``/proc/timer_list``, ns), through QEMU's built-in ``virtio-blk-pci`` behind the same intel-iommu
  (``builtin``), with vioasid walking the guest's VT-d tables itself (``own_walk``) and (strict
  only) with vioasid asking QEMU for every translation over the IOTLB-miss path (``qemu_iotlb``);
  ``guest_seq_{write,read}_own_walk_vs_builtin`` is vioasid ÷ built-in (suffix ``_lazy`` for lazy);
* boot → guest disk tests done (``boot_to_tests_s``) for the vioasid disk and for QEMU's built-in
  ``virtio-blk-pci`` on the same image (strict).

``--pin`` (default ``auto``; ``qemu_glue.qemu.placement``) places the vioasid guests' vCPU
thread and IOTLB reader thread on one CPU and everything else on the others, as
``vioasid boot --pin`` does. The built-in device is then measured twice, as QEMU starts it
(``builtin``) and with its vCPU thread placed the same way (``builtin_pinned``), and the
``_vs_builtin`` ratios divide by the faster of the two. ``--pin off``: no placement anywhere.

Each line carries ``load`` (the 1-minute load average when it was measured): the machine is shared.
The throughput guest is the test image plus a small overlay initramfs whose /init runs ``dd``
(the kernel unpacks concatenated archives; later files win). ``--profile FILE`` writes a
cProfile of the back-end side (this process) of the own-walk runs. Usage:
``python3 bench/guest_io.py [--mib 32] [--runs 1] [--iommu scalable-fs] [--modes strict,lazy]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from images import cpio
from images.build import GuestImage, ensure_image
from images.guest import patterns
from qemu_glue.guest_runner import watch_guest
from qemu_glue.qemu.placement import check_pin, pin_vm, plan
from qemu_glue.qemu.process import QemuError, launch
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, VirtioBlk, VmSpec, kernel_cmdline
from qemu_glue.vhost_user.guest import GuestOptions, run_guest_tests, vhost_blk_guest

BENCH_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /bin
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
while read mod; do insmod "/lib/modules/$mod.ko"; done < /etc/vioasid/modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
# nanoseconds from /proc/timer_list ("now at N nsecs", read with shell builtins only);
# the cost of one reading (c, the least of three) is taken off each interval
ns() {
  while read -r a b n rest; do
    if [ "$a $b" = "now at" ]; then echo "$n"; return; fi
  done < /proc/timer_list
  echo 0
}
c=999999999
for k in 1 2 3; do
  a=$(ns)
  b=$(ns)
  if [ $((b - a)) -lt $c ]; then c=$((b - a)); fi
done
fail() { echo "VIOASID-BENCH-ERROR $1"; }
t0=$(ns)
dd if=/dev/zero of=/dev/vda bs=1M count=@MIB@ oflag=direct 2>/dev/null || fail write
t1=$(ns)
dd if=/dev/vda of=/dev/null bs=1M count=@MIB@ iflag=direct 2>/dev/null || fail read
t2=$(ns)
echo "VIOASID-BENCH t0=$t0 t1=$t1 t2=$t2 c=$c mib=@MIB@"
poweroff -f
"""
T = TypeVar("T")
BENCH_RX = r"VIOASID-BENCH t0=(\d+) t1=(\d+) t2=(\d+) c=(-?\d+) mib=(\d+)"


def emit(name: str, value: float, unit: str, **extra: object) -> None:
    rec: dict[str, object] = {"name": name, "value": round(value, 3), "unit": unit}
    rec.update(extra)
    rec["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(rec), flush=True)


def progress(msg: str) -> None:
    print(f"guest_io: {msg}", file=sys.stderr, flush=True)


def bench_initrd(img: GuestImage, mib: int, out: Path) -> Path:
    overlay = cpio.newc_gz(
        [cpio.file("init", BENCH_INIT.replace("@MIB@", str(mib)).encode(), 0o755)]
    )
    out.write_bytes(img.initrd.read_bytes() + overlay)
    return out


def _rates(text: str, m: re.Match[str], what: str) -> tuple[float, float]:
    if "VIOASID-BENCH-ERROR" in text:
        raise SystemExit(f"guest dd failed ({what})")
    t0, t1, t2, c, n = (int(m.group(i)) for i in range(1, 6))
    if not (0 < t0 < t1 < t2):
        raise SystemExit(f"guest clock readings unusable ({what}): {m.group(0)}")
    c = max(c, 0)
    if c * 4 > min(t1 - t0, t2 - t1):
        c = 0  # a reading preempted so long it is no estimate of the overhead: keep it all
    return n / (1e-9 * (t1 - t0 - c)), n / (1e-9 * (t2 - t1 - c))


async def throughput(
    img: GuestImage,
    initrd: Path,
    disk: Path,
    mode: IommuMode,
    translate: str,
    strict: bool,
    prof: cProfile.Profile | None = None,
    pin: str = "off",
) -> tuple[float, float, dict[str, object]]:
    opts = GuestOptions(
        kernel=img.kernel,
        initrd=initrd,
        append=kernel_cmdline(mode, strict=strict),
        disk=disk,
        iommu=IommuSpec(mode=mode),
        translate=translate,
        follow_iq=False,
        name="bench-io",
        pin=pin,
    )
    async with vhost_blk_guest(opts) as g:
        if prof is not None:
            prof.enable()
        try:
            m = await g.vm.wait_console(BENCH_RX, 300)
        finally:
            if prof is not None:
                prof.disable()
        await g.vm.wait(30)
        summary = g.backend.summary()
        summary["placement"] = g.pinned.to_json() if g.pinned is not None else None
        summary["backend"] = {
            "kicks": g.backend.stats.kicks,
            "calls": g.backend.stats.calls,
            "messages": dict(g.backend.stats.messages),
        }
    w, r = _rates("\n".join(line.text for line in g.vm.console), m, translate)
    return w, r, summary


async def builtin_throughput(
    img: GuestImage, initrd: Path, disk: Path, mode: IommuMode, strict: bool, pin: str = "off"
) -> tuple[float, float]:
    spec = VmSpec(
        name="bench-io-builtin",
        iommu=IommuSpec(mode=mode),
        devices=(VirtioBlk(disk),),
        kernel=img.kernel,
        initrd=initrd,
        append=kernel_cmdline(mode, strict=strict),
    )
    placement = plan(pin, os.sched_getaffinity(0))
    async with launch(spec) as vm:
        if placement is not None:  # QEMU's threads only: this process does no I/O here
            await pin_vm(vm.require_qmp(), vm.pid, placement)
        m = await vm.wait_console(BENCH_RX, 300)
        await vm.wait(30)
    return _rates("\n".join(line.text for line in vm.console), m, "builtin")


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


async def vioasid_boot(img: GuestImage, disk: Path, mode: IommuMode) -> float:
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
    return res.tests_done_s


async def boot_figures(img: GuestImage, t: Path, mode: IommuMode, runs: int) -> None:
    vu, bi = [], []
    for _ in range(runs):
        progress("boot to tests done, vioasid disk")
        disk = patterns.make_disk(t / "disk.raw")
        vu.append(await retried("vioasid disk boot", partial(vioasid_boot, img, disk, mode)))
        progress("boot to tests done, built-in virtio-blk")
        bi.append(
            await retried(
                "built-in boot",
                partial(builtin_boot, img, patterns.make_disk(t / "disk.raw"), mode),
            )
        )
    emit("boot_to_tests_s_vioasid_disk", statistics.median(vu), "s")
    emit("boot_to_tests_s_builtin_virtio_blk", statistics.median(bi), "s")
    emit("boot_to_tests_vioasid_vs_builtin", statistics.median(vu) / statistics.median(bi), "x")


async def retried(what: str, make: Callable[[], Awaitable[T]], tries: int = 3) -> T:
    """``make()`` again when a guest run died under it (QEMU gone before the guest finished:
    seen on the shared machine, for the built-in device as well as for vioasid's)."""
    for attempt in range(1, tries + 1):
        try:
            return await make()
        except (QemuError, SystemExit) as exc:
            if attempt == tries:
                raise
            progress(f"{what}: run {attempt} failed ({exc}); again")
    raise AssertionError("unreachable")


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("strict", "lazy")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are strict and/or lazy, not {text!r}")
    return modes


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=32, help="MiB written then read (default 32)")
    ap.add_argument("--runs", type=int, default=1, help="runs per configuration (median)")
    ap.add_argument("--iommu", default="scalable-fs", choices=[m.value for m in IommuMode])
    ap.add_argument(
        "--modes", type=_modes, default=["strict", "lazy"], help="strict,lazy (default both)"
    )
    ap.add_argument("--no-qemu-iotlb", action="store_true", help="skip the QEMU IOTLB-miss runs")
    ap.add_argument("--no-boot", action="store_true", help="skip the boot-to-tests figures")
    ap.add_argument("--no-throughput", action="store_true", help="only the boot-to-tests figures")
    ap.add_argument("--profile", type=Path, help="cProfile of the own-walk runs to this file")
    ap.add_argument(
        "--pin",
        type=check_pin,
        default="auto",
        help="CPU placement of the throughput guests (off | auto | CPU list; default auto)",
    )
    args = ap.parse_args()
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    mode = IommuMode(args.iommu)
    img = ensure_image(progress)
    prof = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="vioasid-bench-") as tmp:
        t = Path(tmp)
        initrd = bench_initrd(img, args.mib, t / "bench-initrd.cpio.gz")
        for iommu_mode in [] if args.no_throughput else args.modes:
            strict = iommu_mode == "strict"
            sfx = "" if strict else "_lazy"
            pinned = plan(args.pin, os.sched_getaffinity(0)) is not None
            refs = ["builtin", "builtin_pinned"] if pinned else ["builtin"]
            labels = [*refs, "own_walk"]
            if strict and not args.no_qemu_iotlb:
                labels.append("qemu_iotlb")
            rates: dict[str, tuple[float, float]] = {}
            for label in labels:
                ws, rs = [], []
                for _ in range(args.runs):
                    progress(f"throughput, {label}, {iommu_mode}")
                    disk = patterns.make_disk(t / "disk.raw", max(64, 2 * args.mib) << 20)
                    if label in refs:
                        bpin = args.pin if label == "builtin_pinned" else "off"
                        w, r = await retried(
                            label,
                            partial(builtin_throughput, img, initrd, disk, mode, strict, bpin),
                        )
                        summary: dict[str, object] = {}
                    else:
                        translate = "walk" if label == "own_walk" else "qemu"
                        p = prof if label == "own_walk" else None
                        w, r, summary = await retried(
                            label,
                            partial(
                                throughput, img, initrd, disk, mode, translate, strict, p, args.pin
                            ),
                        )
                    ws.append(w)
                    rs.append(r)
                    rate = f"write {w:.1f} read {r:.1f} MiB/s"
                    progress(f"{label} {iommu_mode}: {rate}; {json.dumps(summary)}")
                rates[label] = (statistics.median(ws), statistics.median(rs))
                lpin = "off" if label == "builtin" else args.pin
                for i, what in enumerate(("write", "read")):
                    emit(
                        f"guest_seq_{what}_{label}{sfx}",
                        rates[label][i],
                        "MiB/s",
                        mode=iommu_mode,
                        pin=lpin,
                    )
            for i, what in enumerate(("write", "read")):
                best = max(rates[ref][i] for ref in refs)  # the built-in device at its best
                ratio = rates["own_walk"][i] / max(best, 1e-9)
                emit(
                    f"guest_seq_{what}_own_walk_vs_builtin{sfx}",
                    ratio,
                    "x",
                    mode=iommu_mode,
                    pin=args.pin,
                    builtin="pinned" if best != rates["builtin"][i] else "as started",
                )
                if "qemu_iotlb" in rates:
                    ratio = rates["own_walk"][i] / max(rates["qemu_iotlb"][i], 1e-9)
                    name = f"guest_seq_{what}_own_walk_vs_qemu_iotlb{sfx}"
                    emit(name, ratio, "x", mode=iommu_mode)
        if not args.no_boot:
            await boot_figures(img, t, mode, args.runs)
    if prof is not None:
        prof.dump_stats(args.profile)
        progress(f"profile written to {args.profile}")


if __name__ == "__main__":
    asyncio.run(main())
