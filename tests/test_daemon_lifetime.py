"""Session lifetime and the real process: a SIGKILLed client frees everything its VM held;
``vioasid serve`` as a subprocess, ``vioasid status`` against it, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    ENQCMD_TRANSLATING,
    PLAIN,
    TRANSLATING,
    MemfdGuest,
    bind,
    running_daemon,
    setup_vm,
)

from vioasid.client import Client, DmaRequest
from vioasid.commands.status import render

TESTS = str(Path(__file__).parent)
VIOASID = (sys.executable, "-c", "import sys; from vioasid.cli import main; sys.exit(main())")

CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from daemon_support import MemfdGuest, setup_vm, PLAIN, ENQCMD_TRANSLATING, TRANSLATING
from vioasid.client import Client

async def main(path):
    c = await Client.connect(path)
    g = MemfdGuest()
    devices = (("00:03.0", PLAIN, "vfio-pci"), ("00:04.0", ENQCMD_TRANSLATING, "mdev"),
               ("00:05.0", TRANSLATING, "mdev"))
    vm = await setup_vm(c, g, "doomed", devices=devices)
    for x in (5, 6, 7):
        g.map(x, 0x400000, 0x200000)
        for sid in (0x18, 0x20, 0x28):
            g.write_entry(sid, x)
            await c.pasid_entry(vm, sid, x)
    await c.subscribe(vm)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


async def wait_until_gone(c: Client, name: str) -> dict[str, Any]:
    for _ in range(1000):
        d = await c.dump()
        if name not in d["vms"]:
            return d
        await asyncio.sleep(0.01)
    raise AssertionError(f"VM {name} still registered")


@pytest.mark.asyncio
async def test_sigkilled_client_frees_every_ppasid_and_table_entry() -> None:
    g = MemfdGuest()
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        # a survivor VM on the same (shared, mdev) functions, which must keep all it has
        survivor = await setup_vm(
            c, g, "survivor", devices=(("00:04.0", ENQCMD_TRANSLATING, "mdev"),)
        )
        g.map(5, 0x400000, 0x200000)
        await bind(c, survivor, g, "00:04.0")
        baseline = await c.dump()

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, path, TESTS, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.strip() == b"ready"
            held = await c.dump()
            doomed = held["vms"]["doomed"]
            assert sum(len(d["bindings"]) for d in doomed["devices"].values()) == 9
            assert len(held["allocators"]["global"]) == 1 + 3  # survivor's 5 + doomed's 5,6,7
            assert held["allocators"]["functions"][PLAIN]["per_rid"] == [5, 6, 7]
            assert held["allocators"]["functions"][TRANSLATING]["host_entries"] == [1, 2, 3]
            assert held["allocators"]["cpu_tables"]["doomed"] == 3
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        after = await wait_until_gone(c, "doomed")
        assert after["allocators"] == baseline["allocators"]
        assert after["functions"] == baseline["functions"]
        assert after["global"] == baseline["global"]
        assert after["vms"]["survivor"] == baseline["vms"]["survivor"]
        [r] = await c.dma(survivor, [DmaRequest("00:04.0", 5, 0x400000)])
        assert r.ok and r.gpa == 0x200000
    g.close()


HOST_TOML = """
[[host]]
name = "h1"
allocation = "global"
pasid_bits = 16

  [[host.function]]
  rid = "3a:00.0"

  [[host.function]]
  rid = "5e:00.0"
  enqcmd = true
  translating = true
"""


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *VIOASID,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio
async def test_serve_subprocess_status_and_sigterm(tmp_path: Path) -> None:
    sock = str(tmp_path / "d.sock")
    host_file = tmp_path / "host.toml"
    host_file.write_text(HOST_TOML)
    proc = await asyncio.create_subprocess_exec(
        *VIOASID,
        "serve",
        "--socket",
        sock,
        "--host",
        str(host_file),
        "--log-level",
        "info",
        stderr=asyncio.subprocess.PIPE,
    )
    g = MemfdGuest()
    try:
        c = await Client.connect(sock, timeout=60)
        vm = await setup_vm(c, g, devices=(("00:03.0", "3a:00.0", "vfio-pci"),))
        g.map(9, 0x400000, 0x200000)
        b = await bind(c, vm, g, vpasid=9)
        assert (b.ppasid, b.space) == (9, "global")  # the host file's policy is in force

        rc, out, err = await run_cli("status", "--socket", sock, "--json", "--vm", "vm1")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["host"] == "h1" and doc["allocation"] == "global"
        assert doc["vms"]["vm1"]["devices"]["00:03.0"]["bindings"] == {"9": 9}
        text = render(doc)  # the human form of the same document
        assert "vm1" in text and "9→9" in text and "3a:00.0" in text and "global" in text

        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
        assert rc == 0
        assert not os.path.exists(sock)
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "released" in log  # the client's VM was released at shutdown
        await c.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        g.close()


@pytest.mark.asyncio
async def test_serve_and_status_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[host]]\nname = "h"\nallocation = "sometimes"\n')
    rc, _, err = await run_cli("serve", "--socket", str(tmp_path / "s"), "--host", str(bad))
    assert rc == 2 and "allocation" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = await run_cli("status", "--socket", str(tmp_path / "nothing.sock"))
    assert rc == 1 and "nothing.sock" in err and "Traceback" not in err


@pytest.mark.asyncio
async def test_serve_sigint_exits_zero_and_removes_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "d.sock")
    proc = await asyncio.create_subprocess_exec(*VIOASID, "serve", "--socket", sock)
    try:
        async with await Client.connect(sock, timeout=60) as c:
            assert await c.get_features()
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not os.path.exists(sock)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
