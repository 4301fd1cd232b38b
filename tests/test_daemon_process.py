"""In-process checks of ``vioasid serve`` / ``vioasid status`` and the host file, plus the
transport's back-pressure path (a client that reads late gets every reply, in order)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
from daemon_support import running_daemon

from vioasid.cli import UsageError
from vioasid.client import Client, MemoryRegion, MigrationFailed
from vioasid.commands import serve as serve_cmd
from vioasid.commands import status as status_cmd
from vioasid.daemon.hostconfig import (
    DEFAULT_FUNCTIONS,
    HostConfigError,
    default_host,
    load_host,
)
from vioasid.formats import wire
from vioasid.formats.wire import Request
from vioasid.protocol.daemon_codec import encode_request


@pytest.mark.asyncio
async def test_serve_coroutine_stops_on_sigterm(tmp_path: Path) -> None:
    sock = str(tmp_path / "d.sock")
    task = asyncio.create_task(serve_cmd.serve(sock, default_host()))
    async with await Client.connect(sock, timeout=30) as c:
        doc = await status_cmd.fetch(sock, None)
        assert doc["host"] == "host" and len(doc["functions"]) == len(DEFAULT_FUNCTIONS)
        assert "FUNCTION" in status_cmd.render(doc)
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 30) == 0
        with pytest.raises(Exception):  # noqa: B017 - any connection error
            await c.get_features()
    assert not os.path.exists(sock)


@pytest.mark.asyncio
async def test_serve_refuses_an_unusable_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot listen"):
        await serve_cmd.serve(str(tmp_path / "missing-dir" / "d.sock"), default_host())


def test_serve_run_reports_host_file_errors(tmp_path: Path) -> None:
    args = argparse.Namespace(
        socket=str(tmp_path / "s"), host=str(tmp_path / "none.toml"), host_name=None,
        serve_log_level="info", group=None, max_connections=16,
    )  # fmt: skip
    with pytest.raises(UsageError, match="cannot read host file"):
        serve_cmd.run(args)


def test_status_run_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(socket=str(tmp_path / "none.sock"), json=True, vm=None, timeout=5.0)
    assert status_cmd.run(args) == 1
    assert "none.sock" in capsys.readouterr().err


def test_host_files(tmp_path: Path) -> None:
    two = tmp_path / "two.toml"
    two.write_text(
        '[[host]]\nname = "a"\n[[host.function]]\nrid = "3a:00.0"\n'
        '[[host]]\nname = "b"\nallocation = "global"\npasid_bits = 8\n'
        '[[vm]]\nname = "ignored"\nhost = "a"\n'
    )
    with pytest.raises(HostConfigError, match="pick one with --host-name"):
        load_host(str(two))
    b = load_host(str(two), "b")
    assert (b.name, b.allocation, b.pasid_bits, b.functions) == ("b", "global", 8, {})
    assert load_host(str(two), "a").functions.keys() == {0x3A00}
    with pytest.raises(HostConfigError, match="no \\[\\[host\\]\\] named 'c'"):
        load_host(str(two), "c")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[host]\n")
    with pytest.raises(HostConfigError, match=r"bad\.toml"):
        load_host(str(bad))
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n")
    with pytest.raises(HostConfigError, match="no \\[\\[host\\]\\] table"):
        load_host(str(empty))
    dup = tmp_path / "dup.toml"
    dup.write_text('[[host]]\nname = "a"\npasid_bits = 0\n')
    with pytest.raises(HostConfigError, match="pasid_bits"):
        load_host(str(dup))


@pytest.mark.asyncio
async def test_late_reader_gets_every_reply_in_order() -> None:
    """15,000 pipelined GET_FEATURES not read at first: the daemon queues what the socket will
    not take and writes it out as the client reads."""
    async with running_daemon() as (server, path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(s, path)
        n = 15000
        await loop.sock_sendall(s, encode_request(Request.GET_FEATURES) * n)
        for _ in range(500):  # wait until the daemon has had to queue output
            if any(c.transport.backlogged for c in server.connections.values()):
                break
            await asyncio.sleep(0.01)
        assert any(c.transport.backlogged for c in server.connections.values())
        buf = b""
        replies = 0
        reply = wire.HEADER_S.pack(Request.GET_FEATURES, 5, 8) + int(wire.ALL_FEATURES).to_bytes(
            8, "little"
        )
        while replies < n:
            buf += await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 10)
            whole = len(buf) // len(reply)
            assert buf[: whole * len(reply)] == reply * whole  # every reply, nothing else
            replies += whole
            buf = buf[whole * len(reply) :]
        assert buf == b""
        s.close()


@pytest.mark.asyncio
async def test_large_request_is_queued_by_the_client() -> None:
    """A 4 MiB import stream does not fit the socket at once: the client queues the rest."""
    fd = os.memfd_create("import-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        with pytest.raises(MigrationFailed, match="not a vioasid migration stream"):
            await c.import_vm("big", b"\xab" * (4 << 20), [MemoryRegion(fd, 0, 1 << 20)])
        assert (await c.dump())["vms"] == {}
    os.close(fd)
