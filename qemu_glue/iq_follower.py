"""Follow the guest's VT-d invalidation queue from the host, read-only, for the device's IOTLB.

QEMU consumes the guest's invalidation descriptors itself (it owns the IQ registers); what reaches
a vhost-user back-end is only ``IOTLB_MSG`` invalidations, without DID or PASID. To see the
guest's own descriptors, :class:`IqFollower` reads IQA/IQT through QMP (``xp``) after each
forwarded invalidation (coalesced: one catch-up at a time; ``min_interval`` > 0 batches them
further, but a strict-mode burst then laps the 256-entry queue between two catch-ups and those
descriptors are not seen, so the default is 0) and decodes the 128/256-bit descriptors
between the last position it saw and IQT straight from guest memory. It never writes guest
memory (QEMU already did the wait-descriptor status writes). The ring is read and each
descriptor decoded by the model's one reader and decoder (:mod:`vioasid.model.iq`); each
:class:`Descriptor` goes to ``on_descriptor`` (the device translator dispatches it with
``vioasid.model.iq.dispatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from vioasid.model.iq import Descriptor, Ring, decode
from vioasid.model.memory import GuestMemory, MemoryAccessError

log = logging.getLogger(__name__)

U64Reader = Callable[[], Awaitable[int]]


class IqFollower:
    """Decodes the guest's invalidation descriptors shortly after QEMU processed them."""

    def __init__(
        self,
        read_iqa: U64Reader,
        read_iqt: U64Reader,
        memory: Callable[[], GuestMemory | None],
        on_descriptor: Callable[[Descriptor], None],
        min_interval: float = 0.0,
    ) -> None:
        self._read_iqa = read_iqa
        self._read_iqt = read_iqt
        self._memory = memory
        self._on_descriptor = on_descriptor
        self.min_interval = min_interval  # QMP reads slow the guest: batch catch-ups
        self._iqa: int | None = None
        self._head: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.decoded = 0
        self.catch_ups = 0
        self.errors = 0

    def poke(self) -> None:
        """Something was invalidated: catch up with the queue soon (coalesced)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def reset(self) -> None:
        """The guest may have re-programmed the queue (device restart): re-read IQA."""
        self._iqa = None
        self._head = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            try:
                await self.catch_up()
                await asyncio.sleep(self.min_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # QMP gone (QEMU exiting), queue moved ...
                self.errors += 1
                log.debug("IQ catch-up failed: %s", exc)
                return

    async def catch_up(self) -> int:
        """Decode descriptors from the last seen position up to IQT; returns how many."""
        self.catch_ups += 1
        if self._iqa is None:
            self._iqa = await self._read_iqa()
        iqa = self._iqa
        ring = Ring.of(iqa)
        tail = ring.offset(await self._read_iqt())
        if self._head is None:
            self._head = tail  # start following from now
            return 0
        mem = self._memory()
        if mem is None or not ring.base:
            return 0
        head = self._head
        if ring.check(head, tail):
            self.reset()
            return 0
        n = 0
        try:
            for at, words in ring.read(mem, head, tail):
                self._on_descriptor(decode(words, ring.wide, at // ring.dsize))
                n += 1
        except MemoryAccessError:
            self.errors += 1
        self._head = tail
        self.decoded += n
        return n
