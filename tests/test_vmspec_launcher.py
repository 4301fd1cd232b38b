"""QemuProcess, Qmp and VtdRegisterReader against tests/fake_qemu.py (fast, no real QEMU)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import aclosing
from pathlib import Path

import pytest

from qemu_glue.qemu.process import QemuError, launch
from qemu_glue.qemu.qmp import QmpError, QmpTimeout
from qemu_glue.qemu.vmspec import VmSpec
from qemu_glue.qemu.vtd_regs import VtdRegisterReader

FAKE = str(Path(__file__).with_name("fake_qemu.py"))


def _spec(tmp_path: Path, *extra: str) -> VmSpec:
    return VmSpec(name="fake", qemu_binary=FAKE, ram_path=tmp_path / "ram", extra_args=tuple(extra))


@pytest.mark.asyncio
async def test_launch_console_qmp_and_clean_exit(tmp_path: Path) -> None:
    seen: list[str] = []
    async with launch(_spec(tmp_path)) as vm:
        vm.on_console(seen.append)
        m = await vm.wait_console(r"uptime=(\S+)", 5)
        assert m.group(1) == "0.50"
        qmp = vm.require_qmp()
        assert await qmp.query_status() == "running"
        dev = await qmp.find_pci("disk0")
        assert (dev.bdf, dev.rid) == ("00:03.0", 0x18)
        with pytest.raises(QmpError, match="not been found") as ei:
            await qmp.execute("nope")
        assert ei.value.error_class == "CommandNotFound"
        with pytest.raises(QmpTimeout):
            await qmp.execute("x-hang", timeout=0.2)
        async with qmp.events("STOP", "RESUME") as events:
            await qmp.execute("stop")
            await qmp.execute("cont")
            assert (await events.get(2))["event"] == "STOP"
            assert (await events.wait_for("RESUME", timeout=2))["event"] == "RESUME"
        qmp_sock = vm.spec.qmp_socket
        assert qmp_sock is not None and qmp_sock.exists()
        tmpdir = qmp_sock.parent
    assert vm.returncode == 0 and not tmpdir.exists()
    assert any("fake qemu: quit" in line.text for line in vm.console)


@pytest.mark.asyncio
async def test_vtd_registers_through_xp(tmp_path: Path) -> None:
    async with launch(_spec(tmp_path)) as vm:
        reader = VtdRegisterReader(vm.require_qmp())
        regs = await reader.snapshot()
        assert regs.rtaddr == 0x1A7A400 and regs.scalable
        assert regs.root_table == 0x1A7A000
        assert regs.translation_enabled and regs.root_table_set and regs.queued_invalidation
        assert regs.iq_base == 0x1200000 and regs.iq_entries == 256
        again, changed = await reader.refresh_if_changed()
        assert again == regs and not changed
        got = await reader.wait_until(lambda r: r.translation_enabled, timeout=2)
        assert got == regs
        async with aclosing(reader.watch(poll_s=0.01)) as watcher:
            assert await anext(watcher) == regs
            with pytest.raises(TimeoutError):  # nothing changes: nothing more is yielded
                async with asyncio.timeout(0.1):
                    await anext(watcher)
        with pytest.raises(QmpTimeout):
            await reader.wait_until(lambda r: not r.scalable, timeout=0.3, poll_s=0.05)


@pytest.mark.asyncio
async def test_hung_qemu_is_killed_and_cleaned(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with launch(_spec(tmp_path, "-fake-hang")) as vm:
            assert vm.running
            vm.shutdown_timeout = 0.3
            raise RuntimeError("boom")
    assert vm.returncode is not None and vm.returncode < 0  # SIGKILLed after quit/SIGTERM
    assert vm.spec.qmp_socket is not None and not vm.spec.qmp_socket.parent.exists()


@pytest.mark.asyncio
async def test_default_ram_file_is_removed(tmp_path: Path) -> None:
    spec = VmSpec(name="fake", qemu_binary=FAKE)
    async with launch(spec) as vm:
        ram = vm.spec.ram_path
        assert ram is not None and vm.spec.qmp_socket is not None
        ram.write_bytes(b"x")  # QEMU would create it
    assert not ram.exists()


@pytest.mark.asyncio
async def test_start_failures_are_clear(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="not found"):
        await launch(VmSpec(qemu_binary="no-such-qemu-binary")).__aenter__()
    exiting = tmp_path / "exit1"
    exiting.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stderr.write('bad option')\nsys.exit(1)\n"
    )
    exiting.chmod(0o755)
    with pytest.raises(QemuError, match="bad option"):
        async with launch(VmSpec(qemu_binary=str(exiting))):
            pass
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_qemu_last_words_are_never_lost(tmp_path: Path) -> None:
    """A QEMU that refuses its command line: its stderr is in the error, every time."""
    from qemu_glue.qemu.binary import QEMU_10_FEATURES

    refusing = tmp_path / "refuse"
    refusing.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -foo: invalid option' >&2\nexit 1\n")
    refusing.chmod(0o755)
    spec = VmSpec(qemu_binary=str(refusing), qemu_features=QEMU_10_FEATURES)
    for _ in range(20):
        with pytest.raises(QemuError) as exc:
            async with launch(spec):
                pass
        assert "-foo: invalid option" in str(exc.value) + " ".join(map(str, exc.value.args))
