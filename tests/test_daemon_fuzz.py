"""Fuzz the daemon's decoder through a real socket: random headers, payloads and fd counts on
one connection never raise out of the handler, never disturb another session, never stop the
daemon from accepting new connections."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket

from daemon_support import MemfdGuest, bind, daemon_fuzz_settings, running_daemon, setup_vm
from hypothesis import given
from hypothesis import strategies as st

from vioasid.client import Client, DmaRequest
from vioasid.formats import wire
from vioasid.formats.wire import Request
from vioasid.protocol.daemon_codec import encode_request


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_valid_prefixes = st.sampled_from(
    [
        b"",
        encode_request(Request.GET_FEATURES),
        encode_request(Request.DUMP, {"vm": wire.ALL_VMS, "offset": 0}),
        encode_request(Request.SET_FEATURES, {"features": 1}, need_reply=True),
    ]
)


@st.composite
def chunks(draw: st.DrawFn) -> tuple[bytes, int]:
    """One sendmsg: a valid message or not, random header fields, random fd count."""
    request = draw(
        st.one_of(
            st.sampled_from([int(r) for r in Request]),
            st.integers(min_value=0, max_value=0xFFFFFFFF),
        )
    )
    flags = draw(st.one_of(st.sampled_from([1, 9, 0, 2, 5]), st.integers(0, 0xFFFFFFFF)))
    payload = draw(st.binary(max_size=120))
    size = draw(st.one_of(st.just(len(payload)), st.integers(0, 1 << 25)))
    data = draw(_valid_prefixes) + wire.HEADER_S.pack(request, flags, size) + payload
    cut = draw(st.integers(min_value=0, max_value=len(data)))
    return data[:cut] if draw(st.booleans()) else data, draw(st.integers(0, 3))


async def _attack(path: str, plan: list[tuple[bytes, int]], fd: int) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().sock_connect(s, path)
        s.setblocking(True)
        s.settimeout(2)
        for data, nfds in plan:
            try:
                if data:
                    socket.send_fds(s, [data], [fd] * nfds) if nfds else s.sendall(data)
            except OSError:
                break  # the daemon already hung up on us
            await asyncio.sleep(0)
    finally:
        s.close()


async def _round(plan: list[tuple[bytes, int]]) -> None:
    errors = _Errors()
    logging.getLogger("vioasid").addHandler(errors)
    loop = asyncio.get_running_loop()
    escaped: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: escaped.append(ctx))
    g = MemfdGuest(size=4 << 20)
    try:
        async with running_daemon() as (_, path), await Client.connect(path) as victim:
            vm = await setup_vm(victim, g)
            g.map(5, 0x400000, 0x200000)
            await bind(victim, vm, g)
            before = await victim.dump()
            await _attack(path, plan, g.fd)
            # the victim session and its VM are untouched; new connections are served
            [r] = await victim.dma(vm, [DmaRequest("00:03.0", 5, 0x400008)])
            assert r.ok and r.gpa == 0x200008
            after = await victim.dump()
            assert after["vms"] == before["vms"]
            assert after["allocators"] == before["allocators"]
            async with await Client.connect(path) as fresh:
                assert await fresh.get_features() == wire.ALL_FEATURES
            assert victim.pending_events() == []
    finally:
        logging.getLogger("vioasid").removeHandler(errors)
        g.close()
    assert not escaped, escaped
    assert not errors.records, [r.getMessage() for r in errors.records]


@daemon_fuzz_settings(15)
@given(st.lists(chunks(), min_size=1, max_size=4))
def test_fuzz_one_connection_leaves_others_alone(plan: list[tuple[bytes, int]]) -> None:
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(_round(plan))
    gc.collect()  # mmaps (which hold a dup of their fd) die with their last view
    # every fd the daemon was sent was closed again (no leak per malformed connection)
    assert len(os.listdir("/proc/self/fd")) <= before
