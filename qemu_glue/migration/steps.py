"""The QMP steps every vioasid migration shares: capabilities and parameters, following the
source's MIGRATION events, and the convergence hold of a vPASID pre-copy.

Both :func:`qemu_glue.migration.live.migrate` (daemon-held vPASID state) and
:func:`qemu_glue.migration.pasid.migrate_pasid` (PASID DMA functions) run QEMU's migration the
same way: ``pause-before-switchover`` + ``events`` on the source, ``events`` on the destination,
a bandwidth cap, and, while the vPASID state is pre-copied, a tiny downtime limit that keeps QEMU
iterating until the pre-copy is done (:class:`ConvergenceHold`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from qemu_glue.qemu.qmp import MIGRATION, EventStream, Qmp, QmpError, QmpTimeout

log = logging.getLogger(__name__)

QEMU_DOWNTIME_LIMIT_MS = 300  # QEMU's default downtime-limit
HOLD_DOWNTIME_LIMIT_MS = 0  # while the pre-copy runs: keep iterating (1 ms may still fit MiBs)
DEFAULT_MAX_BANDWIDTH = 8 << 30  # bytes/s: QEMU's default 128 MiB/s makes TCG runs slow


async def set_up(
    src: Qmp,
    dst: Qmp,
    *,
    max_bandwidth: int | None,
    downtime_limit_ms: int | None = None,
    hold: bool = False,
) -> int | None:
    """Capabilities on both sides and the source's parameters. ``hold``: hold convergence (QEMU
    completes once the rest fits the downtime limit) until the vPASID state is pre-copied;
    returns the downtime limit :meth:`ConvergenceHold.release_convergence` restores (None: no
    hold)."""
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": True},
        {"capability": "events", "state": True}]})  # fmt: skip
    await dst.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
    )
    params: dict[str, Any] = {}
    held: int | None = None
    if max_bandwidth is not None:
        params["max-bandwidth"] = max_bandwidth
    if downtime_limit_ms is not None:
        params["downtime-limit"] = downtime_limit_ms
    if hold:
        held = downtime_limit_ms if downtime_limit_ms is not None else QEMU_DOWNTIME_LIMIT_MS
        params["downtime-limit"] = HOLD_DOWNTIME_LIMIT_MS
    if params:
        await src.execute("migrate-set-parameters", params)
    return held


class ConvergenceHold:
    """A migration whose pre-copy may hold convergence: ``held`` is the downtime limit to
    restore once the pre-copy is done (None: nothing held)."""

    src: Qmp
    held: int | None

    async def release_convergence(self) -> None:
        """Let the migration converge (the pre-copy held it back with a tiny downtime limit)."""
        if self.held is None:
            return
        limit, self.held = self.held, None
        with contextlib.suppress(QmpError):
            await self.src.execute("migrate-set-parameters", {"downtime-limit": limit})


async def wait_status(
    ev: EventStream,
    want: set[str],
    timeout: float,
    on_event: Callable[[dict[str, Any]], None],
    error: type[Exception],
) -> str:
    """Follow MIGRATION events until one of ``want`` (or failed/cancelled) arrives; the status.
    ``error(message)`` is raised when none comes within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    stop = want | {"failed", "cancelled"}
    late = f"migration did not reach {'/'.join(sorted(want))} in time"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise error(late)
        try:
            e = await ev.get(left)
        except QmpTimeout:
            raise error(late) from None
        on_event(e)
        if e.get("event") == MIGRATION:
            status = str(e.get("data", {}).get("status", ""))
            log.debug("source migration status %s", status)
            if status in stop:
                return status


async def final_figures(src: Qmp) -> tuple[dict[str, Any], str | None]:
    """At the end: the source's ``query-migrate`` (empty if it failed) and its run state (None:
    unknown)."""
    info: dict[str, Any] = {}
    status: str | None = None
    with contextlib.suppress(QmpError):
        info = await src.execute("query-migrate")
    with contextlib.suppress(QmpError):
        status = await src.query_status()
    return info, status


__all__ = [
    "DEFAULT_MAX_BANDWIDTH",
    "HOLD_DOWNTIME_LIMIT_MS",
    "QEMU_DOWNTIME_LIMIT_MS",
    "ConvergenceHold",
    "final_figures",
    "set_up",
    "wait_status",
]
