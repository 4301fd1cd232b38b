"""qemu_glue's PASID DMA wiring without QEMU: --dma-device parsing, the function plan, the
vfio-user-pci device argument, and a rig whose servers answer on their sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_glue.pasid_dma import (
    DmaDeviceArg,
    DmaDeviceError,
    PasidDmaRig,
    parse_dma_device,
    plan_functions,
)
from qemu_glue.qemu.vmspec import VfioUserPci
from vioasid.formats import vfio_user as vu
from vioasid.formats.pasid_dma import FunctionType
from vioasid.vfio_user.codec import decode_reply, encode_command, version_payload

ROOT = Path(__file__).resolve().parents[1]


def test_parse_dma_device() -> None:
    assert parse_dma_device("mdev") == DmaDeviceArg(FunctionType.MDEV)
    assert parse_dma_device("enqcmd,function=5f:00.1") == DmaDeviceArg(FunctionType.ENQCMD, 0x5F01)
    for bad in ("", "dsa", "mdev,fn=1", "mdev,function=zz"):
        with pytest.raises(DmaDeviceError):
            parse_dma_device(bad)


def test_default_plan_one_function_per_type() -> None:
    args = [parse_dma_device(t) for t in ("dedicated", "translating", "mdev", "enqcmd", "mdev")]
    host, placed = plan_functions(args, None)
    assert [(p.guest_rid, p.function, p.assign) for p in placed] == [
        (0x28, 0x3A00, "vfio-pci"),
        (0x30, 0x3B00, "vfio-pci"),
        (0x38, 0x3C00, "mdev"),
        (0x40, 0x5F00, "vfio-pci"),
        (0x48, 0x3C00, "mdev"),  # a second slice of the same parent
    ]
    assert host.functions[0x5F00].enqcmd and host.functions[0x3B00].translating
    _, placed = plan_functions([parse_dma_device("dedicated")] * 2, None)
    assert [p.function for p in placed] == [0x3A00, 0x3A01]


def test_host_file_functions(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text(
        '[[host]]\nname = "h"\n[[host.function]]\nrid = "01:00.0"\n'
        '[[host.function]]\nrid = "02:00.0"\nenqcmd = true\n'
    )
    rig = PasidDmaRig([parse_dma_device("dedicated"), parse_dma_device("enqcmd")],
                      host_file=str(f))  # fmt: skip
    assert [p.function for p in rig.placed] == [0x100, 0x200]
    with pytest.raises(DmaDeviceError, match="no free function"):
        PasidDmaRig([parse_dma_device("dedicated")] * 2, host_file=str(f))
    with pytest.raises(DmaDeviceError, match="no function"):
        PasidDmaRig([parse_dma_device("mdev,function=09:00.0")], host_file=str(f))


def test_vfio_user_pci_arg() -> None:
    args = VfioUserPci(socket=Path("/tmp/x.sock"), id="dma0", addr="05.0").args()
    assert args[0] == "-device"
    assert json.loads(args[1]) == {
        "driver": "vfio-user-pci", "id": "dma0", "bus": "pcie.0", "addr": "05.0",
        "socket": {"type": "unix", "path": "/tmp/x.sock"}, "x-no-posted-writes": True,
    }  # fmt: skip


@pytest.mark.asyncio
async def test_rig_servers_answer_and_clean_up() -> None:
    rig = PasidDmaRig([parse_dma_device("translating")], memory_mib=64)
    async with rig:
        assert rig.ram_path.stat().st_size == 64 << 20
        sock_path = rig.servers[0].path
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.sendall(encode_command(1, vu.Command.VERSION, version_payload({})))
        s.sendall(encode_command(2, vu.Command.REGION_READ, vu.REGION_RW.build(region=7, count=4)))
        loop = asyncio.get_running_loop()
        data = b""

        def complete(buf: bytes) -> bool:
            if len(buf) < 16:
                return False
            first = vu.HEADER.parse(buf)["size"]
            rest = buf[first:]
            return len(rest) >= 16 and len(rest) >= vu.HEADER.parse(rest)["size"]

        while not complete(data):
            chunk = await loop.run_in_executor(None, s.recv, 4096)
            assert chunk, "server closed the connection"
            data += chunk
        size = vu.HEADER.parse(data)["size"]
        hdr2, body = decode_reply(data[size:])
        assert hdr2["id"] == 2 and body[16:] == bytes.fromhex("507a0100")
        s.close()
        assert rig.summary()["functions"][0]["type"] == "translating"
        ram = rig.ram_path
    assert not ram.exists() and not sock_path.exists()


def test_boot_usage_errors_are_one_line(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"x")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra, want in (
        (["--dma-device", "dsa"], "TYPE must be one of"),
        (["--host", str(tmp_path / "none.toml")], "--host describes"),
        (["--status-socket", str(tmp_path / "s.sock")], "--status-socket serves"),
        (["--dma-device", "mdev", "--iommu", "legacy"], "scalable-mode"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "vioasid", "boot", "--kernel", str(k), *extra],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.asyncio
async def test_status_socket_lists_the_pasid_functions_and_their_bindings(tmp_path: Path) -> None:
    """The rig serves its in-process engine with the daemon's server: ``vioasid status`` (the
    command's own fetch and render) lists each function, its type and its live bindings."""
    from vioasid.commands.status import fetch, render
    from vioasid.formats.pasid import PGTT_FIRST_STAGE
    from vioasid.model.guest_driver import FirstStagePageTable, GuestIommuDriver, PageAllocator

    sock = tmp_path / "status.sock"
    rig = PasidDmaRig(
        [parse_dma_device("mdev"), parse_dma_device("dedicated")],
        memory_mib=64,
        status_socket=sock,
    )
    async with rig:
        mem = rig.host.vm("guest").memory
        pages = PageAllocator(mem, 32 << 20, 16 << 20)
        drv = GuestIommuDriver.for_pasid_bits(mem, pages, 20)
        rig.host.set_rtaddr("guest", drv.rtaddr)
        mdev, ded = rig.functions
        for f, x in ((mdev, 7), (ded, 3)):
            drv.attach_device(f.guest_rid)
            table = FirstStagePageTable(mem, pages)
            drv.set_pasid_entry(f.guest_rid, x, pgtt=PGTT_FIRST_STAGE, did=x, flptptr=table.root)
            assert f.bind_command(1, x) == 0
        doc = await fetch(str(sock), None)
        fns = {f["device"]: f for f in doc["pasid_functions"]}
        assert set(fns) == {"00:05.0", "00:06.0"}
        assert fns["00:05.0"]["type"] == "mdev" and fns["00:06.0"]["type"] == "dedicated"
        assert fns["00:05.0"]["bindings"] == [{"vpasid": 7, "ppasid": 1, "tag": 1}]
        assert fns["00:06.0"]["bindings"] == [{"vpasid": 3, "ppasid": 3, "tag": 3}]
        assert fns["00:05.0"]["socket"] == str(rig.servers[0].path)
        text = render(doc)
        assert "PASID DMA" in text and "7→1" in text and "3→3" in text
        assert "mdev" in text and "dedicated" in text
        for extra in ([], ["--json"]):  # the command itself, from another process
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vioasid", "status", "--socket", str(sock), *extra,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err
            if extra:
                listed = json.loads(out)["pasid_functions"]
                assert [f["bindings"] for f in listed] == [
                    [{"vpasid": 7, "ppasid": 1, "tag": 1}],
                    [{"vpasid": 3, "ppasid": 3, "tag": 3}],
                ]
            else:
                assert "PASID DMA" in out.decode() and "7→1" in out.decode()
        # unbound: gone from the next status
        assert ded.bind_command(2, 3) == 0
        doc = await fetch(str(sock), None)
        assert [f["bindings"] for f in doc["pasid_functions"]][1] == []
    assert not sock.exists()
