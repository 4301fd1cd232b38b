#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 in the fast launcher/QMP tests (no guest, no QEMU).

Understands ``-qmp unix:PATH,...`` and ``-fake-hang`` (ignore quit and SIGTERM). Prints a few
console lines on stdout, then serves a small QMP subset: qmp_capabilities, query-status,
query-pci, stop/cont (STOP/RESUME events), quit (SHUTDOWN event, exit 0), human-monitor-command
``xp`` on the VT-d registers (values from REGS), and ``x-hang`` (never answers).

Like QEMU, ``quit`` closes every QMP connection before exiting: the server must not wait for
the client to hang up (``Server.wait_closed`` waits for open connections on Python >= 3.12).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

DMAR = 0xFED90000
REGS = {
    0x08: 0x00D2008C40660462,
    0x10: 0x00000000F0050F5E,
    0x1C: 0xC7000000,
    0x20: 0x0000000001A7A400,
    0x80: 0x4C0,
    0x88: 0x4C0,
    0x90: 0x0000000001200801,
}


# What ``-device intel-iommu,help`` and ``-device help`` print, in QEMU 10.0's names
# (FAKE_QEMU_VERSION=11.1 switches to 11.1's): the launcher probes every binary before use.
PROPS_10 = ("aw-bits", "caching-mode", "device-iotlb", "intremap", "x-flts", "x-scalable-mode")
PROPS_11 = ("aw-bits", "caching-mode", "device-iotlb", "fsts", "intremap", "pasid-bits",
            "scalable-mode")  # fmt: skip


def probe_answer(argv: list[str]) -> bool:
    """Answer the launcher's probes like QEMU does; False when argv is not a probe."""
    version = os.environ.get("FAKE_QEMU_VERSION", "10.0.2")
    if argv == ["--version"]:
        print(f"QEMU emulator version {version} (fake)")
        return True
    if argv[-2:] == ["-device", "intel-iommu,help"]:
        print("intel-iommu options:")
        for p in PROPS_11 if version.startswith("11") else PROPS_10:
            print(f"  {p}=<bool>        - on/off (default: off)")
        return True
    if argv == ["-device", "help"]:
        print('name "vhost-user-blk-pci", bus PCI')
        if version.startswith("11"):
            print('name "vfio-user-pci", bus PCI, desc "VFIO over socket PCI device assignment"')
        return True
    return False


def main() -> None:
    argv = sys.argv[1:]
    if probe_answer(argv):
        return
    qmp = next(a for i, a in enumerate(argv) if i and argv[i - 1] == "-qmp")
    path = qmp.removeprefix("unix:").split(",")[0]
    hang = "-fake-hang" in argv
    if hang:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("SeaBIOS (fake)", flush=True)
    print("VIOASID-INIT uptime=0.50 kernel=fake", flush=True)
    asyncio.run(serve(path, hang))


async def messages(r: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as the client sends them (qemu.qmp sends no newline after a message)."""
    buf, dec, utf8 = "", json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    while chunk := await r.read(4096):
        buf += utf8.decode(chunk)
        while buf.strip():
            try:
                obj, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield obj


async def serve(path: str, hang: bool) -> None:
    done = asyncio.Event()
    writers: set[asyncio.StreamWriter] = set()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        try:
            await session(r, w)
        except ConnectionError:
            pass
        finally:
            writers.discard(w)
            w.close()

    async def session(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        def send(obj: object) -> None:
            w.write(json.dumps(obj).encode() + b"\r\n")

        def event(name: str) -> None:
            t = time.time()
            ts = {"seconds": int(t), "microseconds": int(t % 1 * 1e6)}
            send({"event": name, "data": {}, "timestamp": ts})

        send(
            {
                "QMP": {
                    "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}},
                    "capabilities": [],
                }
            }
        )
        await w.drain()
        async for msg in messages(r):
            cmd, mid, args = msg["execute"], msg.get("id"), msg.get("arguments", {})
            ret: object = {}
            if cmd == "x-hang":
                continue
            if cmd == "query-status":
                ret = {"status": "running", "running": True}
            elif cmd == "query-pci":
                dev = {"bus": 0, "slot": 3, "function": 0, "qdev_id": "disk0"}
                dev |= {"id": {"vendor": 0x1AF4, "device": 0x1042}, "class_info": {"class": 256}}
                ret = [{"bus": 0, "devices": [dev]}]
            elif cmd == "human-monitor-command":
                m = re.match(r"xp /1[gw]x (0x[0-9a-f]+)", args["command-line"])
                if m:
                    addr = int(m.group(1), 16)
                    ret = f"{addr:016x}: {REGS.get(addr - DMAR, 0):#018x}\r\n"
                else:
                    ret = ""
            elif cmd == "nope":
                send(
                    {
                        "error": {
                            "class": "CommandNotFound",
                            "desc": "The command nope has not been found",
                        },
                        "id": mid,
                    }
                )
                await w.drain()
                continue
            reply: dict[str, object] = {"return": ret}
            if "id" in msg:
                reply["id"] = mid
            send(reply)
            if cmd == "stop":
                event("STOP")
            elif cmd == "cont":
                event("RESUME")
            elif cmd == "quit" and not hang:
                event("SHUTDOWN")
                await w.drain()
                done.set()
            await w.drain()

    await asyncio.sleep(0.3)  # the socket appears late: the client must retry
    server = await asyncio.start_unix_server(client, path)
    async with server:
        await done.wait()
        for w in list(writers):
            w.close()
    with contextlib.suppress(FileNotFoundError):  # Python 3.13's server removes it itself
        os.unlink(path)
    print("fake qemu: quit", flush=True)


if __name__ == "__main__":
    main()
