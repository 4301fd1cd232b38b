"""The indirect table's fast walk (the whole table unpacked at once, ``virtqueue._walk_indirect``)
against the general descriptor loop reading one descriptor at a time.

Random indirect tables, hostile ones included (random flags, next indices inside and outside
the table, loops, nested indirect descriptors, tables longer than the queue, lengths that are
not a multiple of 16 or zero): both walks must give the same buffers or the same
``ChainError``."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.device.translator import DeviceTranslator, IdentityResolver
from vioasid.formats.virtio import (
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vioasid.model.memory import GuestMemory
from vioasid.vhost_user import virtqueue
from vioasid.vhost_user.virtqueue import Buffer, ChainError, Dma, SplitQueue

DESC, AVAIL, USED, TABLE = 0x1000, 0x2000, 0x3000, 0x10000


def guest(rng: random.Random, qsize: int) -> tuple[GuestMemory, int]:
    """A ring whose head descriptor is indirect, and the indirect table it points to."""
    mem = GuestMemory.from_bytes(1 << 20)
    entries = rng.choice((1, 2, 3, rng.randrange(1, 300)))
    length = entries * 16
    r = rng.random()
    if r < 0.05:
        length += rng.randrange(1, 16)  # not a multiple of 16
    elif r < 0.08:
        length = 0
    head_flags = VRING_DESC_F_INDIRECT | (VRING_DESC_F_NEXT if rng.random() < 0.03 else 0)
    mem.write(DESC, VRING_DESC.build(addr=TABLE, len=length, flags=head_flags, next=1))
    sequential = rng.random() < 0.6
    nested = rng.randrange(0, entries) if rng.random() < 0.15 else -1  # one INDIRECT inside
    for i in range(entries):
        flags = VRING_DESC_F_NEXT if i < entries - 1 else 0
        nxt = i + 1
        if not sequential:
            flags = rng.choice((0, VRING_DESC_F_NEXT, VRING_DESC_F_NEXT, VRING_DESC_F_NEXT))
            nxt = rng.choice((i + 1, rng.randrange(0, entries + 2), rng.randrange(0, 1 << 16)))
            if rng.random() < 0.02:
                flags |= VRING_DESC_F_INDIRECT
        if rng.random() < 0.5:
            flags |= VRING_DESC_F_WRITE
        if i == nested:
            flags |= VRING_DESC_F_INDIRECT
        addr = rng.randrange(0, 1 << 64) if rng.random() < 0.1 else 0x40000 + i * 0x1000
        mem.write(TABLE + 16 * i, VRING_DESC.build(addr=addr, len=rng.randrange(0, 1 << 32),
                                                    flags=flags, next=nxt))  # fmt: skip
    mem.write(AVAIL + 4, (0).to_bytes(2, "little"))
    mem.write(AVAIL + 2, (1).to_bytes(2, "little"))
    return mem, qsize


async def pop(mem: GuestMemory, qsize: int) -> list[Buffer] | str:
    tr = DeviceTranslator(IdentityResolver(lambda: mem))
    q = SplitQueue(0, num=qsize, desc=DESC, avail=AVAIL, used=USED)
    q.enabled = q.started = True
    try:
        chain = await q.pop(Dma(lambda: mem, tr))
    except ChainError as exc:
        return f"ChainError: {exc}"
    assert chain is not None
    return chain.buffers


def slow_pop(mem: GuestMemory, qsize: int, monkeypatch: pytest.MonkeyPatch) -> list[Buffer] | str:
    """The same pop with the indirect table read one descriptor at a time."""
    real = virtqueue._table_copy

    async def ring_only(dma: Dma, table: int, entries: int) -> bytes | None:
        return await real(dma, table, entries) if table == DESC else None

    with monkeypatch.context() as m:
        m.setattr(virtqueue, "_table_copy", ring_only)
        return asyncio.run(pop(mem, qsize))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from((8, 128, 256)))
def test_fast_indirect_walk_equals_the_descriptor_loop(seed: int, qsize: int) -> None:
    mem, qsize = guest(random.Random(seed), qsize)
    with pytest.MonkeyPatch.context() as mp:
        want = slow_pop(mem, qsize, mp)
    got = asyncio.run(pop(mem, qsize))
    assert got == want


def test_a_linux_indirect_chain_and_a_loop_in_one() -> None:
    mem = GuestMemory.from_bytes(1 << 20)
    n = 128
    mem.write(DESC, VRING_DESC.build(addr=TABLE, len=16 * n, flags=VRING_DESC_F_INDIRECT))
    for i in range(n):
        flags = (VRING_DESC_F_NEXT if i < n - 1 else 0) | (VRING_DESC_F_WRITE if i else 0)
        addr = 0x1_0000_0000 - (i + 1) * 0x1000
        mem.write(TABLE + 16 * i, VRING_DESC.build(addr=addr, len=0x1000, flags=flags, next=i + 1))
    mem.write(AVAIL + 2, (1).to_bytes(2, "little"))
    got = asyncio.run(pop(mem, 256))
    assert got == [Buffer(0x1_0000_0000 - (i + 1) * 0x1000, 0x1000, i > 0) for i in range(n)]
    mem.write(TABLE + 16 * 5, VRING_DESC.build(addr=0, len=1, flags=VRING_DESC_F_NEXT, next=2))
    assert asyncio.run(pop(mem, 256)) == (
        "ChainError: descriptor chain loops or is longer than the queue"
    )


@pytest.mark.parametrize("entries", [7, 8, 9])
def test_an_indirect_chain_is_at_most_the_queue_size(entries: int) -> None:
    mem = GuestMemory.from_bytes(1 << 20)
    mem.write(DESC, VRING_DESC.build(addr=TABLE, len=16 * entries, flags=VRING_DESC_F_INDIRECT))
    for i in range(entries):
        flags = VRING_DESC_F_NEXT if i < entries - 1 else 0
        mem.write(TABLE + 16 * i, VRING_DESC.build(addr=i << 12, len=1, flags=flags, next=i + 1))
    mem.write(AVAIL + 2, (1).to_bytes(2, "little"))
    got = asyncio.run(pop(mem, 8))
    if entries <= 8:
        assert got == [Buffer(i << 12, 1, False) for i in range(entries)]
    else:
        assert got == "ChainError: descriptor chain loops or is longer than the queue"
