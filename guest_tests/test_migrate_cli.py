"""``vioasid migrate`` end to end with real QEMU (TCG): the script-friendly command.

The guest runs its disk tests in loop mode on host A (daemon A knows its vPASIDs); a destination
QEMU waits with ``-incoming defer``. ``vioasid migrate --json`` (a subprocess, as a script would
run it) migrates it, prints one JSON object, and holds the imported VM on daemon B until the
destination QEMU exits. The guest keeps passing its tests on B; then it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import pytest

from images.build import GuestImage
from images.guest import patterns
from images.guest.markers import INIT, STOPPED, TEST
from qemu_glue.migration.demo import FUNCTIONS, guest_devices
from qemu_glue.migration.rig import (
    CLI_MAIN,
    BlkVm,
    Daemon,
    SerialChain,
    VmOptions,
    host_toml,
    workdir,
)
from qemu_glue.migration.vpasid_reserve import (
    DEFAULT_BASE,
    DEFAULT_SIZE,
    VpasidTables,
    memmap_param,
    ppasid_table,
    register,
)
from qemu_glue.qemu.vmspec import IommuMode, IommuSpec, kernel_cmdline

pytestmark = pytest.mark.guest
TIMEOUT = 300.0


@pytest.mark.asyncio
async def test_vioasid_migrate_cli(image: GuestImage) -> None:
    async with workdir() as wd, contextlib.AsyncExitStack() as stack:
        disk = patterns.make_disk(wd / "disk.raw")
        daemons = [Daemon(n, wd, host_toml(n, FUNCTIONS)) for n in ("cli-a", "cli-b")]
        for d in daemons:
            await d.start()
            stack.push_async_callback(d.close)
        a = await daemons[0].connect()
        stack.push_async_callback(a.close)
        b = await daemons[1].connect()
        stack.push_async_callback(b.close)
        mode = IommuMode.SCALABLE_FS
        opts = VmOptions(
            kernel=image.kernel,
            initrd=image.initrd,
            append=kernel_cmdline(mode, loop=True, extra=memmap_param()),
            disk=disk,
            iommu=IommuSpec(mode=mode),
        )
        src, dst = BlkVm(opts, "src", wd), BlkVm(opts, "dst", wd)
        stack.push_async_callback(src.close)
        stack.push_async_callback(dst.close)
        chain = SerialChain()
        await src.start()
        chain.add(src.serial_path)
        await chain.wait(INIT, TIMEOUT)
        tables = VpasidTables(src.ram(), DEFAULT_BASE, DEFAULT_SIZE)
        for dev in guest_devices(4):
            tables.add(dev)
        await register(a, "guest", [src.ram_region()], tables)
        before = ppasid_table(await a.dump(), "guest")
        await chain.wait(TEST, TIMEOUT)
        await dst.start(incoming=True)
        assert src.qemu is not None and dst.qemu is not None
        argv = [
            sys.executable, "-c", CLI_MAIN, "migrate", "--json",
            "--src-qmp", str(src.qmp2_socket), "--dst-qmp", str(dst.qmp2_socket),
            "--uri", f"unix:{wd}/cli-migrate.sock", "--vm", "guest",
            "--src-daemon", str(daemons[0].socket), "--dst-daemon", str(daemons[1].socket),
            "--src-ram", str(src.ram_path), "--dst-ram", str(dst.ram_path),
            "--reserve", f"{DEFAULT_BASE:#x}:{DEFAULT_SIZE:#x}",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(TIMEOUT):
                line = await proc.stdout.readline()
            assert line, (await proc.stderr.read()).decode() if proc.stderr else ""
            doc = json.loads(line)
            print(
                f"\nvioasid migrate: downtime {doc['downtime_ms']} ms, vPASID switch-over "
                f"{doc['vpasid_switchover_ms']} ms (pre-copied {doc['precopied']})"
            )
            assert doc["ok"] and doc["status"] == "completed", doc["error"]
            assert doc["vpasids_identical"] and doc["vpasids_carried"] == 12
            assert doc["ppasids_changed"] == 0  # no tenants here: same occupancy, same values
            assert doc["reserve_intact"] is True
            # the command holds the imported VM on host B while the destination runs
            after = ppasid_table(await b.dump(), "guest")
            assert {r: set(t) for r, t in after.items()} == {r: set(t) for r, t in before.items()}
            assert proc.returncode is None
            chain.add(dst.serial_path)
            seen = len(chain.report.results)
            await chain.wait(TEST, TIMEOUT)
            patterns.request_stop(disk)
            await chain.wait(STOPPED, TIMEOUT)
            # the guest powered off: the destination QEMU exits, and so does the command
            async with asyncio.timeout(60):
                rc = await proc.wait()
            assert rc == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert chain.report.failed == 0 and chain.report.errors == []
        assert len(chain.report.results) > seen
        # once the command exited, host B released the VM it held
        assert "guest" not in (await b.dump())["vms"]
