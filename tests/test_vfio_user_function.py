"""The reusable vfio-user PCIe function: config space, regions, IRQs, DMA windows, and the
asyncio server over a real unix socket (hostile clients included)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from pathlib import Path

import pytest
from engine_support import Lab

from vioasid.device.pasid_dma import PasidDmaFunction
from vioasid.formats import pci
from vioasid.formats import vfio_user as vu
from vioasid.formats.pasid_dma import FunctionType
from vioasid.formats.vfio_user import Command, PciRegion
from vioasid.vfio_user.codec import Message, decode_reply, encode_command, version_payload
from vioasid.vfio_user.function import MSI_CAP_OFFSET, PCIE_CAP_OFFSET, PciFunction
from vioasid.vfio_user.server import FunctionServer


def dma_function(ftype: FunctionType = FunctionType.DEDICATED) -> PasidDmaFunction:
    lab = Lab()
    h = lab.host("h", "per-device", (("01:00.0", False, False),))
    lab.vm("vm", "h", (("00:05.0", "01:00.0", "vfio-pci"),))
    return PasidDmaFunction(h, "vm", 0x28, ftype)


def call(fn: PciFunction, cmd: int, payload: bytes = b"", fds: list[int] | None = None,
         flags: int = 0) -> tuple[dict[str, int], bytes]:  # fmt: skip
    out = fn.handle(Message(1, cmd, flags, payload, list(fds or [])))
    assert out is not None
    return decode_reply(out)


def negotiated() -> PasidDmaFunction:
    fn = dma_function()
    hdr, body = call(fn, Command.VERSION, version_payload({"max_msg_fds": 8}))
    assert hdr["flags"] == vu.TYPE_REPLY and body[:4] == bytes(4)
    return fn


def cfg_read(fn: PciFunction, off: int, n: int) -> int:
    hdr, body = call(fn, Command.REGION_READ, vu.REGION_RW.build(offset=off, region=7, count=n))
    assert hdr["flags"] == vu.TYPE_REPLY, hdr
    return int.from_bytes(body[vu.REGION_RW.size :], "little")


def cfg_write(fn: PciFunction, off: int, value: int, n: int) -> None:
    payload = vu.REGION_RW.build(offset=off, region=7, count=n) + value.to_bytes(n, "little")
    hdr, _ = call(fn, Command.REGION_WRITE, payload)
    assert hdr["flags"] == vu.TYPE_REPLY


def test_commands_before_version_are_refused() -> None:
    fn = dma_function()
    hdr, _ = call(fn, Command.DEVICE_GET_INFO, vu.DEVICE_INFO.build(argsz=16))
    assert hdr["flags"] & vu.FLAG_ERROR and hdr["error"] == errno.EINVAL
    hdr, _ = call(fn, Command.VERSION, struct.pack("<HH", 1, 0) + b"{}\0")
    assert hdr["error"] == errno.EINVAL  # major 1 is not ours


def test_device_region_and_irq_info() -> None:
    fn = negotiated()
    _, body = call(fn, Command.DEVICE_GET_INFO, vu.DEVICE_INFO.build(argsz=16))
    assert vu.DEVICE_INFO.parse(body) == {
        "argsz": 16, "flags": 3, "num_regions": 9, "num_irqs": 5,
    }  # fmt: skip
    sizes = {}
    for i in range(9):
        _, body = call(fn, Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.build(argsz=32, index=i))
        sizes[i] = vu.REGION_INFO.parse(body)["size"]
    assert sizes == {0: 0x10000, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
    _, body = call(fn, Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.build(argsz=16, index=1))
    assert vu.IRQ_INFO.parse(body)["count"] == 1
    _, body = call(fn, Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.build(argsz=16, index=0))
    assert vu.IRQ_INFO.parse(body)["count"] == 0  # no INTx
    hdr, _ = call(fn, Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.build(argsz=32, index=9))
    assert hdr["error"] == errno.EINVAL


def test_config_space_contents() -> None:
    fn = negotiated()
    assert cfg_read(fn, 0, 4) == 0x0001_7A50
    assert cfg_read(fn, 8, 4) == 0x0880_0001  # class 088000, revision 1
    assert cfg_read(fn, 0x2C, 4) == 0x0001_7A50  # subsystem: type 1 (dedicated)
    assert cfg_read(fn, 6, 2) & pci.PCI_STATUS_CAP_LIST
    assert cfg_read(fn, pci.PCI_CAPABILITY_LIST, 1) == MSI_CAP_OFFSET
    assert cfg_read(fn, MSI_CAP_OFFSET, 2) == PCIE_CAP_OFFSET << 8 | 0x05
    assert cfg_read(fn, MSI_CAP_OFFSET + 2, 2) & pci.PCI_MSI_FLAGS_64BIT
    assert cfg_read(fn, PCIE_CAP_OFFSET, 2) == 0x10  # PCIe, end of list
    assert cfg_read(fn, PCIE_CAP_OFFSET + 2, 2) == 0x92  # v2, RC integrated endpoint
    assert cfg_read(fn, PCIE_CAP_OFFSET + 0x24, 4) & 1 << 21  # End-End TLP Prefix
    hdr = cfg_read(fn, 0x100, 4)
    assert hdr & 0xFFFF == 0x1B and hdr >> 20 == 0  # PASID, last
    cap = cfg_read(fn, 0x104, 2)
    assert cap >> 8 & 0x1F == 20 and cap & pci.PCI_PASID_CAP_EXEC and cap & pci.PCI_PASID_CAP_PRIV
    assert cfg_read(fn, 0x3D, 1) == 0  # no INTx pin


def test_read_only_fields_ignore_writes_and_bars_size() -> None:
    fn = negotiated()
    cfg_write(fn, 0, 0xFFFFFFFF, 4)
    assert cfg_read(fn, 0, 4) == 0x0001_7A50
    cfg_write(fn, 0x104, 0, 2)  # PASID capability register is RO
    assert cfg_read(fn, 0x104, 2) >> 8 & 0x1F == 20
    cfg_write(fn, 0x106, 0xFFFF, 2)  # PASID control: enable/exec/priv only
    assert cfg_read(fn, 0x106, 2) == 0x7 and fn.pasid_enabled
    cfg_write(fn, 0x10, 0xFFFFFFFF, 4)
    cfg_write(fn, 0x14, 0xFFFFFFFF, 4)
    assert cfg_read(fn, 0x10, 4) == 0xFFFF0004  # 64 KiB, 64-bit, memory
    assert cfg_read(fn, 0x14, 4) == 0xFFFFFFFF
    cfg_write(fn, 0x18, 0xFFFFFFFF, 4)  # BAR2 does not exist
    assert cfg_read(fn, 0x18, 4) == 0
    cfg_write(fn, 4, 0xFFFF, 2)
    assert cfg_read(fn, 4, 2) == pci.PCI_COMMAND_WRITABLE
    call(fn, Command.DEVICE_RESET)
    assert cfg_read(fn, 4, 2) == 0 and cfg_read(fn, 0x10, 4) == 4


def test_msi_through_set_irqs_eventfd() -> None:
    fn = negotiated()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    dup = os.dup(efd)
    flags = vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER
    irq = vu.IRQ_SET.build(argsz=20, flags=flags, index=1, start=0, count=1)
    hdr, _ = call(fn, Command.DEVICE_SET_IRQS, irq, [dup])
    assert hdr["flags"] == vu.TYPE_REPLY
    assert not fn.raise_msi(0)  # MSI not enabled in config space yet
    cfg_write(fn, MSI_CAP_OFFSET + 4, 0xFEE00000, 4)
    cfg_write(fn, MSI_CAP_OFFSET + 12, 0x4021, 2)
    cfg_write(fn, MSI_CAP_OFFSET + 2, 1, 2)
    assert fn.msi_enabled and fn.raise_msi(0)
    assert os.eventfd_read(efd) == 1
    state = fn.get_state()
    fn2 = dma_function()
    fn2.set_state(state)
    assert fn2.msi_enabled and fn2.config.u32(MSI_CAP_OFFSET + 4) == 0xFEE00000
    # wrong fd count / no vectors on INTx
    hdr, _ = call(fn, Command.DEVICE_SET_IRQS,
                  vu.IRQ_SET.build(argsz=20, flags=flags, index=1, start=0, count=2))  # fmt: skip
    assert hdr["error"] == errno.EINVAL
    hdr, _ = call(fn, Command.DEVICE_SET_IRQS,
                  vu.IRQ_SET.build(argsz=20, flags=flags, index=0, start=0, count=1))  # fmt: skip
    assert hdr["error"] == errno.EINVAL
    fn.close()
    os.close(efd)


def test_dma_map_keeps_guest_ram_and_checks_windows() -> None:
    fn = negotiated()
    mfd = os.memfd_create("ram")
    os.ftruncate(mfd, 0x10000)
    os.pwrite(mfd, b"hello", 0x2000)
    m = vu.DMA_MAP.build(argsz=32, flags=3, offset=0x1000, address=0x100000, size=0x4000)
    hdr, _ = call(fn, Command.DMA_MAP, m, [os.dup(mfd)])
    assert hdr["flags"] == vu.TYPE_REPLY
    assert fn.ram.read(0x101000, 5) == b"hello"
    hdr, _ = call(fn, Command.DMA_MAP, m, [os.dup(mfd)])
    assert hdr["error"] == errno.EEXIST
    bad = vu.DMA_MAP.build(argsz=32, flags=3, offset=0, address=0x123, size=0x1000)
    assert call(fn, Command.DMA_MAP, bad)[0]["error"] == errno.EINVAL
    um = vu.DMA_UNMAP.build(argsz=24, flags=0, address=0x100000, size=0x4000)
    hdr, body = call(fn, Command.DMA_UNMAP, um)
    assert hdr["flags"] == vu.TYPE_REPLY and body == um and fn.windows == {}
    assert call(fn, Command.DMA_UNMAP, um)[0]["flags"] == vu.TYPE_REPLY  # nothing there: fine
    call(fn, Command.DMA_MAP, m, [os.dup(mfd)])
    half = vu.DMA_UNMAP.build(argsz=24, flags=0, address=0x100000, size=0x2000)
    assert call(fn, Command.DMA_UNMAP, half)[0]["error"] == errno.EINVAL  # no bisecting
    call(fn, Command.DMA_UNMAP, um)
    # RAM stays mapped after QEMU unmaps its window; later windows are IOVAs, not RAM
    assert fn.ram.read(0x101000, 5) == b"hello"
    m2 = vu.DMA_MAP.build(argsz=32, flags=3, offset=0, address=0xFFFFF000, size=0x1000)
    call(fn, Command.DMA_MAP, m2, [os.dup(mfd)])
    assert not fn.windows[0xFFFFF000].ram and not fn.ram.contains(0xFFFFF000)
    os.close(mfd)


def test_region_bounds_and_stray_fds() -> None:
    fn = negotiated()
    rd = vu.REGION_RW.build(offset=0xFFFC, region=0, count=8)
    assert call(fn, Command.REGION_READ, rd)[0]["error"] == errno.EINVAL
    rd = vu.REGION_RW.build(offset=0, region=3, count=4)
    assert call(fn, Command.REGION_READ, rd)[0]["error"] == errno.EINVAL
    r, w = os.pipe()
    rd = vu.REGION_RW.build(offset=0, region=0, count=4)
    assert call(fn, Command.REGION_READ, rd, [r])[0]["error"] == errno.EINVAL
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the function
    os.close(w)
    _, body = call(fn, Command.REGION_READ, rd)
    assert body[16:] == b"VDMA"
    # a posted write gets no reply
    wr = vu.REGION_RW.build(offset=0x18, region=0, count=4) + b"\1\0\0\0"
    assert fn.handle(Message(2, Command.REGION_WRITE, vu.FLAG_NO_REPLY, wr)) is None
    assert fn.ctrl == 1


def test_a_device_model_exception_is_an_eio_reply() -> None:
    class Broken(PciFunction):
        def bar_read(self, index: int, offset: int, count: int) -> bytes:
            raise RuntimeError("model bug")

    from vioasid.vfio_user.function import Bar, Identity

    fn = Broken(Identity(1, 2, 3), (Bar(0, 4096),))
    call(fn, Command.VERSION, version_payload({}))
    hdr, _ = call(fn, Command.REGION_READ, vu.REGION_RW.build(offset=0, region=0, count=4))
    assert hdr["error"] == errno.EIO


# -- the asyncio server over a real socket ---------------------------------------------------


def _recv_reply(s: socket.socket) -> tuple[dict[str, int], bytes]:
    data = b""
    while len(data) < 16:
        data += s.recv(65536)
    size = vu.HEADER.parse(data)["size"]
    while len(data) < size:
        data += s.recv(65536)
    return decode_reply(data)


async def _ask(
    s: socket.socket, raw: bytes, fds: list[int] | None = None
) -> tuple[dict[str, int], bytes]:
    loop = asyncio.get_running_loop()
    if fds:
        s.sendmsg(
            [raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        )
    else:
        s.sendall(raw)
    return await loop.run_in_executor(None, _recv_reply, s)


@pytest.mark.asyncio
async def test_server_in_order_and_a_hostile_client_only_loses_its_connection(
    tmp_path: Path,
) -> None:
    fa, fb = dma_function(), dma_function()
    sa = FunctionServer(fa, tmp_path / "a.sock")
    sb = FunctionServer(fb, tmp_path / "b.sock")
    await sa.start()
    await sb.start()
    try:
        ca = socket.socket(socket.AF_UNIX)
        ca.connect(str(tmp_path / "a.sock"))
        cb = socket.socket(socket.AF_UNIX)
        cb.connect(str(tmp_path / "b.sock"))
        for c in (ca, cb):
            hdr, _ = await _ask(c, encode_command(1, Command.VERSION, version_payload({})))
            assert hdr["flags"] == vu.TYPE_REPLY
        # many posted writes then a read: the read sees the last write (strictly in order)
        batch = b"".join(
            encode_command(i, Command.REGION_WRITE,
                           vu.REGION_RW.build(offset=0x30, region=0, count=4)
                           + i.to_bytes(4, "little"), vu.FLAG_NO_REPLY)
            for i in range(2, 202)
        )  # fmt: skip
        hdr, body = await _ask(
            ca, batch + encode_command(300, Command.REGION_READ,
                                       vu.REGION_RW.build(offset=0x30, region=0, count=4))
        )  # fmt: skip
        assert hdr["id"] == 300 and int.from_bytes(body[16:], "little") == 201
        # a DMA_MAP with its fd over SCM_RIGHTS
        mfd = os.memfd_create("ram")
        os.ftruncate(mfd, 0x2000)
        hdr, _ = await _ask(
            ca,
            encode_command(
                301, Command.DMA_MAP,
                vu.DMA_MAP.build(argsz=32, flags=3, offset=0, address=0, size=0x2000),
            ),
            [mfd],
        )  # fmt: skip
        os.close(mfd)
        assert hdr["flags"] == vu.TYPE_REPLY and fa.ram.size == 0x2000
        # a garbage header: that connection is closed, nothing else happens
        ca.sendall(b"\xff" * 16)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, ca.recv, 100) == b""
        for _ in range(100):
            if not sa.connected.is_set():
                break
            await asyncio.sleep(0.01)
        assert sa.violations and not sa.connected.is_set()
        # the other function's connection still works; the first server takes a new client
        hdr, body = await _ask(
            cb, encode_command(2, Command.REGION_READ, vu.REGION_RW.build(region=0, count=4))
        )
        assert body[16:] == b"VDMA"
        ca2 = socket.socket(socket.AF_UNIX)
        ca2.connect(str(tmp_path / "a.sock"))
        hdr, _ = await _ask(ca2, encode_command(1, Command.VERSION, version_payload({})))
        assert hdr["flags"] == vu.TYPE_REPLY
        # a client that disappears mid-message
        ca2.sendall(encode_command(5, Command.REGION_READ, vu.REGION_RW.build(count=4))[:20])
        ca2.close()
        for _ in range(100):
            if not sa.connected.is_set():
                break
            await asyncio.sleep(0.01)
        assert not sa.connected.is_set() and sa.connections == 2
        cb.close()
    finally:
        await sa.close()
        await sb.close()
    assert PciRegion.CONFIG.value == 7
