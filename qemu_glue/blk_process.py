"""The vioasid vhost-user-blk back-end as a process of its own (one per QEMU, one per host).

``python -c "from qemu_glue.blk_process import main; main()" --socket S --disk D --qmp Q --sid N``

Listens on ``S`` (QEMU connects as the ``vhost-user-blk-pci`` client), serves the backing file
``D``, and walks the guest's VT-d tables itself; the GSTS/RTADDR registers it needs are read
through QEMU's monitor ``Q`` (a QMP socket of that QEMU, connected on first use). Prints
``READY`` once listening; on SIGTERM/SIGINT it stops and prints one JSON line: the back-end's
summary plus ``dirty_pages_marked`` (pages it logged during migrations), ``dirty_logs_mapped``
and ``dirty_log_enables`` (how often QEMU handed it a log and turned logging on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from qemu_glue.qemu.qmp import Qmp
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.device.translator import VtdRegs
from vioasid.vhost_user.backend import VhostUserBlkBackend

log = logging.getLogger(__name__)

READY = "READY"


class _Regs:
    """VT-d register reads through a QMP socket connected on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.qmp: Qmp | None = None
        self.reader: VtdRegisterReader | None = None

    async def __call__(self) -> VtdRegs:
        if self.reader is None:
            self.qmp = await Qmp.connect(self.path, timeout=60.0)
            self.reader = VtdRegisterReader(self.qmp)
        return VtdRegs(gsts=await self.reader.gsts(), rtaddr=await self.reader.rtaddr())

    async def close(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    regs = _Regs(args.qmp)
    backend = VhostUserBlkBackend(args.disk, args.socket, translate="walk", regs=regs)
    backend.set_sid(args.sid)
    await backend.start()
    task = asyncio.create_task(backend.serve_forever())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        summary = backend.summary()
        summary["dirty_pages_marked"] = backend.dirty.marked
        summary["dirty_logs_mapped"] = backend.dirty.logs_mapped
        summary["dirty_log_enables"] = backend.dirty.enables
        await backend.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await regs.close()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vioasid-blk-backend", description=__doc__)
    p.add_argument("--socket", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--qmp", required=True, help="a QMP socket of the QEMU served")
    p.add_argument("--sid", type=lambda s: int(s, 0), required=True, help="device RID")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    summary = asyncio.run(serve(args))
    print(json.dumps(summary), flush=True)
    return 0


__all__ = ["READY", "main", "serve"]
