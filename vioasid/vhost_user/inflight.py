"""Stopping a virtqueue for ``GET_VRING_BASE`` so no request is lost or completed twice.

QEMU stops a vhost-user device (VM stop, migration switch-over, cancel) with ``GET_VRING_BASE``
and carries the answer — the next available-ring slot the device will consume — in the
migration stream; the next device (the destination's back-end, or this one after a cancelled
migration) starts there with ``SET_VRING_BASE`` (vhost-user.rst "GET_VRING_BASE").

The queue task serves requests one at a time, in order: it pops a chain (``last_avail`` + 1),
serves it, and pushes it to the used ring (``used_idx`` + 1). When the stop arrives while the
task is suspended inside a request (a translation waiting on QEMU or on the VT-d registers), the
request is popped but not completed. :func:`settle` cancels the task there — after the stop the
device must not write guest memory any more — and rewinds ``last_avail`` to ``used_idx``: the
request stays in the available ring and is served once by the next device. A block write
repeated there writes the same bytes again; the guest sees exactly one completion.
"""

from __future__ import annotations

import asyncio
import logging

from vioasid.vhost_user.virtqueue import SplitQueue

log = logging.getLogger(__name__)


def settle(q: SplitQueue, task: asyncio.Task[None] | None) -> int:
    """Stop serving ``q`` now; the vring base to report (slots completed so far)."""
    if task is not None and not task.done():
        task.cancel()
    inflight = (q.last_avail - q.used_idx) & 0xFFFF
    if inflight:
        log.info(
            "vring %d stopped with %d request(s) in flight: handed back (base %d, not %d)",
            q.index,
            inflight,
            q.used_idx,
            q.last_avail,
        )
        q.last_avail = q.used_idx
    return q.used_idx


__all__ = ["settle"]
