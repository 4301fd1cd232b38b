"""The plain-``migrate`` guard: a VM with vioasid PASID DMA functions must not migrate without
vioasid.

QEMU 11.1 migrates a vfio-user device silently and the destination's function is dead
(shared/design/qemu-notes.md, "Live migration with a vfio-user device"). So vioasid watches
each VM it serves on its QMP monitor: it turns the ``events`` migration capability on (QEMU
sends MIGRATION events only with it) and, when a migration it did not start reaches ``setup``
or ``active``, runs ``migrate_cancel`` (the source keeps running) and logs one line saying why
and what to use instead. :func:`qemu_glue.migration.pasid.migrate_pasid` marks its own
migration with :attr:`MigrationGuard.ours` for as long as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from qemu_glue.qemu.qmp import MIGRATION, Qmp, QmpError

log = logging.getLogger(__name__)

WATCH_STATES = frozenset({"setup", "active"})
DONE_STATES = frozenset({"cancelled", "completed", "failed", "none"})
REASON = (
    "cancelled a live migration vioasid did not start: QEMU does not migrate the VM's "
    "vfio-user PASID DMA functions (they would be dead on the destination); "
    "use 'vioasid migrate' / 'vioasid demo --migrate'"
)


class MigrationGuard:
    """Cancels migrations of ``qmp``'s VM that vioasid did not start (module docstring)."""

    def __init__(self, qmp: Qmp, name: str = "guest") -> None:
        self.qmp = qmp
        self.name = name
        self.ours = False  # set while vioasid's own migration runs
        self.cancelled = 0
        self.ready = asyncio.Event()  # events capability on, listening
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async with self.qmp.events(MIGRATION, timeout=1e9) as ev:
                with contextlib.suppress(QmpError):  # refused while a migration runs: fine
                    await self.qmp.execute(
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]},
                    )
                self.ready.set()
                cancelling = False  # one cancel (and one log line) per foreign migration
                async for e in ev:
                    status = str(e.get("data", {}).get("status", ""))
                    if status in DONE_STATES:
                        cancelling = False
                    elif status in WATCH_STATES and not self.ours and not cancelling:
                        cancelling = True
                        await self._cancel(status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # QEMU went away
            log.debug("migration guard of %s stopped: %r", self.name, exc)

    async def _cancel(self, status: str) -> None:
        try:
            await self.qmp.execute("migrate_cancel")
        except QmpError as exc:
            log.warning("VM %s: could not cancel a foreign migration (%s): %s",
                        self.name, status, exc)  # fmt: skip
            return
        self.cancelled += 1
        log.error("VM %s: %s", self.name, REASON)

    async def close(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


__all__ = ["REASON", "MigrationGuard"]
