"""QEMU never outlives ``launch()``: cancelled QMP calls, cancelled close(), a dead parent.

Regression tests for a leak/hang seen with tests/fake_qemu.py on a loaded machine: on Python 3.11
``asyncio.wait_for`` swallows a cancellation that lands as the wrapped call completes, so a
cancelled QMP call (``wait_for(anext(reader.watch()), ...)``) kept polling forever and the
``async with launch(...)`` block never ended (its QEMU ran on after the test process was killed).
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from contextlib import aclosing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from qemu.qmp import QMPClient

from qemu_glue.qemu.process import launch
from qemu_glue.qemu.qmp import Qmp, QmpError
from qemu_glue.qemu.vmspec import VmSpec
from qemu_glue.qemu.vtd_regs import VtdRegisterReader

FAKE = str(Path(__file__).with_name("fake_qemu.py"))


def _spec(tmp_path: Path, *extra: str) -> VmSpec:
    return VmSpec(name="fake", qemu_binary=FAKE, ram_path=tmp_path / "ram", extra_args=tuple(extra))


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class _StubClient:
    """Just enough of QMPClient: ``execute`` answers when the test sets ``reply``."""

    def __init__(self, reply: asyncio.Future[object]) -> None:
        self.events = SimpleNamespace(event_filter=None)
        self.reply = reply

    async def execute(self, cmd: str, args: Any = None) -> object:
        return await self.reply

    async def disconnect(self) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("spins", [0, 1, 2, 3])
async def test_cancel_as_the_reply_lands_is_not_swallowed(spins: int) -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[object] = loop.create_future()
    qmp = Qmp(cast(QMPClient, _StubClient(reply)))
    task = asyncio.create_task(qmp.execute("query-status", timeout=5))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()
    reply.set_result({"status": "running"})
    for _ in range(spins):
        await asyncio.sleep(0)
    if task.cancel():  # still running: the cancellation must win over the late reply
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        assert await task == {"status": "running"}


@pytest.mark.asyncio
async def test_cancelled_watch_stops_and_qemu_is_gone(tmp_path: Path) -> None:
    async with launch(_spec(tmp_path)) as vm:
        pid, qmp = vm.pid, vm.require_qmp()
        reader = VtdRegisterReader(qmp)
        for i in range(40):  # cancel the watcher at many points of its QMP round trips
            async with aclosing(reader.watch(poll_s=0)) as watcher:
                assert (await anext(watcher)).scalable
                nxt = asyncio.ensure_future(anext(watcher))
                for _ in range(i % 8):
                    await asyncio.sleep(0)
                await asyncio.sleep(0.001 * (i // 8))
                nxt.cancel()
                # a swallowed cancellation shows as a watcher that never stops
                done, _ = await asyncio.wait({nxt}, timeout=10)
                assert done and nxt.cancelled()
        with pytest.raises(QmpError):  # a call cancelled with no reply ever coming
            await qmp.execute("x-hang", timeout=0.05)
        hung = asyncio.ensure_future(qmp.execute("x-hang"))
        await asyncio.sleep(0.05)
        hung.cancel()
        assert await qmp.query_status() == "running"  # the session still works
    assert vm.returncode == 0  # quit was delivered and answered despite the cancellations
    assert not _alive(pid)


@pytest.mark.asyncio
async def test_cancelled_close_still_kills_and_reaps(tmp_path: Path) -> None:
    async with launch(_spec(tmp_path, "-fake-hang")) as vm:
        pid = vm.pid
        closing = asyncio.ensure_future(vm.close())
        await asyncio.sleep(0.1)  # inside shutdown(): quit sent, QEMU ignores it
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert vm.returncode is not None  # reaped before close() returned
    assert not _alive(pid)
    assert vm.spec.qmp_socket is not None and not vm.spec.qmp_socket.parent.exists()


@pytest.mark.asyncio
async def test_qemu_dies_with_its_parent(tmp_path: Path) -> None:
    ram = str(tmp_path / "ram")
    code = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from qemu_glue.qemu.process import launch
        from qemu_glue.qemu.vmspec import VmSpec

        async def main() -> None:
            spec = VmSpec(name="fake", qemu_binary={FAKE!r}, ram_path=Path({ram!r}))
            async with launch(spec) as vm:
                print(vm.pid, flush=True)
                await asyncio.sleep(120)

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        pid = int(line)
        assert _alive(pid)
    finally:
        parent.kill()  # no cleanup code of the parent runs
        await parent.wait()
    for _ in range(500):  # the kernel delivers the parent-death signal at once; bounded anyway
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    else:
        os.kill(pid, 9)
        pytest.fail(f"QEMU (pid {pid}) outlived its killed parent")
