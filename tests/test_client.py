"""The client library: typed errors, values, pipelining, connection loss, events ending."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from daemon_support import running_daemon

from vioasid.client import (
    Client,
    ConnectionLost,
    DaemonProtocolError,
    DmaRequest,
    DmaResult,
    Exhausted,
    ImportResult,
    InternalError,
    Invalid,
    MigrationFailed,
    NotFound,
    PasidConflict,
    RequestError,
    error_for,
)
from vioasid.formats import wire
from vioasid.formats.wire import DmaStatus, ErrorCode, Request
from vioasid.protocol.daemon_codec import frame


def test_error_classes_carry_their_kind() -> None:
    for code, cls in [
        (ErrorCode.PASID_CONFLICT, PasidConflict),
        (ErrorCode.INVALID, Invalid),
        (ErrorCode.NOT_FOUND, NotFound),
        (ErrorCode.EXHAUSTED, Exhausted),
        (ErrorCode.MIGRATION_FAILED, MigrationFailed),
        (ErrorCode.INTERNAL, InternalError),
    ]:
        err = error_for(Request.DMA, code, "why")
        assert type(err) is cls and isinstance(err, RequestError)
        assert err.kind == code.kind and err.message == "why" and err.request == Request.DMA
        assert str(err) == f"{code.kind}: why"
    odd = error_for(Request.DUMP, 77, "strange")
    assert isinstance(odd, InternalError) and "77" in odd.message


def test_dma_request_packing_and_results() -> None:
    raw = DmaRequest("00:03.0", 7, 0x1234, write=True, by_tag=True, page_request=True).pack()
    assert wire.DMA_ENTRY_S.unpack(raw) == (0x18, 0b111, 7, 0x1234)
    assert wire.DMA_ENTRY_S.unpack(DmaRequest(0x18, 7, 1).pack())[1] == 0
    with pytest.raises(ValueError):
        DmaRequest("not-a-bdf", 1, 0).pack()
    with pytest.raises(ValueError):
        DmaRequest(0x10000, 1, 0).pack()
    ok = DmaResult(DmaStatus.OK, 5, 0x1000, 0x1_0000_1000, 0, 3)
    assert ok.ok and ok.fault is None and ok.error is None
    assert ok.to_json() == {"ok": True, "ppasid": 5, "gpa": "0x1000", "hpa": "0x100001000"}
    fault = DmaResult(DmaStatus.FAULT, 5, 0x9000, 0, 0x71)
    assert not fault.ok and fault.fault is not None and fault.fault.label.endswith("-p")
    err = DmaResult(DmaStatus.ERROR, 0, 0, 0, ErrorCode.NOT_FOUND)
    assert err.error == "not-found"


@pytest.mark.asyncio
async def test_connect_missing_socket_fails_fast() -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(FileNotFoundError):
        await Client.connect(os.path.join(tmp, "none.sock"), timeout=0)


@pytest.mark.asyncio
async def test_pipelined_requests_answered_in_order() -> None:
    async with running_daemon() as (_, path), await Client.connect(path) as c:
        futs = [c.open_vm(f"vm{i}") for i in range(20)] + [c.get_features()]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, NotFound) for r in results[:20])
        assert [str(r).split("'")[1] for r in results[:20]] == [f"vm{i}" for i in range(20)]
        assert results[20] == wire.ALL_FEATURES


@pytest.mark.asyncio
async def test_connection_lost_fails_pending_and_later_calls() -> None:
    async with running_daemon() as (server, path):
        c = await Client.connect(path)
        await c.get_features()
        for conn in list(server.connections.values()):
            conn.close("test closes it")
        with pytest.raises(ConnectionLost):
            await c.next_event(timeout=5)
        with pytest.raises(ConnectionLost):
            await c.get_features()
        assert [ev async for ev in c.events()] == []
        await c.close()


@contextlib.asynccontextmanager
async def fake_daemon(
    answer: Callable[[socket.socket], Awaitable[None]], linger: float
) -> AsyncIterator[str]:
    """A fake daemon on a fresh socket path (yielded) for one connection: ``answer`` talks on
    it, then it stays open ``linger`` seconds and is closed; the exit waits for all that."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fake.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)

        async def serve() -> None:
            conn, _ = await loop.sock_accept(listener)
            await answer(conn)
            await asyncio.sleep(linger)
            conn.close()

        task = asyncio.create_task(serve())
        try:
            yield path
            await task
        finally:
            task.cancel()
            listener.close()


@pytest.mark.asyncio
async def test_garbage_from_the_daemon_is_a_protocol_error() -> None:
    """A fake daemon that answers with an unknown event: the client hangs up, typed error."""
    loop = asyncio.get_running_loop()

    async def unknown_event(conn: socket.socket) -> None:
        await loop.sock_recv(conn, 100)
        await loop.sock_sendall(conn, frame(4000, wire.VERSION, b""))

    async with fake_daemon(unknown_event, linger=0.5) as path:
        c = await Client.connect(path)
        with pytest.raises(DaemonProtocolError, match="unknown event"):
            await c.get_features()


async def _fake_import_reply(payloads: list[bytes]) -> list[object]:
    """A fake daemon answering each ``IMPORT_VM`` with the next raw reply payload; the
    client's result (or the exception it raised) for each."""
    out: list[object] = []
    loop = asyncio.get_running_loop()

    async def replies(conn: socket.socket) -> None:
        for payload in payloads:
            await loop.sock_recv(conn, 1 << 16)
            reply = frame(Request.IMPORT_VM, wire.VERSION | wire.FLAG_REPLY, payload)
            await loop.sock_sendall(conn, reply)

    async with fake_daemon(replies, linger=0.2) as path:
        c = await Client.connect(path)
        for _ in payloads:
            try:
                out.append(await c.import_vm("vm", b"stream"))
            except Exception as exc:  # the test looks at which
                out.append(exc)
        await c.close()
    return out


@pytest.mark.asyncio
async def test_import_result_from_the_packed_binding_array() -> None:
    rows = [
        (0x18, int(wire.Space.PER_RID), 5, 1),
        (0x18, int(wire.Space.PER_RID), 9, 2),
        (0x20, int(wire.Space.GLOBAL), 5, 0x12345),
        (0x20, 7, 6, 3),  # a space this client does not know: reported as "none"
    ]
    block = b"".join(wire.BINDING_S.pack(*r) for r in rows)
    ok = wire.IMPORT_VM_REPLY.build({"status": 0, "body": {"vm": 4, "count": 4, "bindings": block}})
    [res, bad] = await _fake_import_reply([ok, ok[:-1]])
    assert isinstance(res, ImportResult) and res.vm == 4
    assert [(b.rid, b.vpasid, b.ppasid, b.space) for b in res.bindings] == [
        ("00:03.0", 5, 1, "per-rid"),
        ("00:03.0", 9, 2, "per-rid"),
        ("00:04.0", 5, 0x12345, "global"),
        ("00:04.0", 6, 3, "none"),
    ]
    assert res.ppasids() == {"00:03.0": {5: 1, 9: 2}, "00:04.0": {5: 0x12345, 6: 3}}
    # a block that is not exactly ``count`` records is the daemon's bug, not a short list
    assert isinstance(bad, DaemonProtocolError)
