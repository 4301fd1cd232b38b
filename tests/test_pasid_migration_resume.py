"""A PASID migration whose destination dies after the source completed: noticed within seconds,
and the source (left in ``postmigrate``) resumed; a destination that completes is waited for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qemu_glue.migration.pasid import _resume_source, _wait_destination
from qemu_glue.qemu.qmp import MIGRATION, QmpError, QmpTimeout


class Events:
    """An event stream that delivers ``events`` (then times out, as a silent QEMU's does)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        await asyncio.sleep(timeout or 0)
        raise QmpTimeout("event", "none")


class Monitor:
    """A QMP monitor: ``alive`` answers query-status with ``status``; ``cont`` sets running."""

    def __init__(self, status: str, alive: bool = True) -> None:
        self.status, self.alive = status, alive
        self.commands: list[str] = []

    async def execute(self, command: str, args: Any = None, timeout: float = 5.0) -> Any:
        self.commands.append(command)
        if not self.alive:
            raise QmpError(command, "EOFError: the connection closed")
        if command == "cont":
            self.status = "running"
        return {"status": self.status}

    async def query_status(self) -> str:
        return str((await self.execute("query-status"))["status"])


def _migration(status: str) -> dict[str, Any]:
    return {"event": MIGRATION, "data": {"status": status}}


@pytest.mark.asyncio
async def test_a_dead_destination_is_noticed_within_seconds() -> None:
    dst = Monitor("inmigrate", alive=False)
    async with asyncio.timeout(120):  # a hang guard: the wait's own timeout is 600 s
        with pytest.raises(QmpError):
            await _wait_destination(Events([]), dst, 600.0)  # type: ignore[arg-type]
    assert dst.commands == ["query-status"]  # probed after the first quiet second, and gone


@pytest.mark.asyncio
async def test_a_destination_that_completes_is_waited_for() -> None:
    ev = Events([_migration("active"), _migration("completed")])
    dst = Monitor("inmigrate")
    await _wait_destination(ev, dst, 60.0)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="failed"):
        await _wait_destination(Events([_migration("failed")]), dst, 60.0)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_source_is_resumed_only_from_postmigrate() -> None:
    done = Monitor("postmigrate")
    assert await _resume_source(done) is True  # type: ignore[arg-type]
    assert done.status == "running" and "cont" in done.commands
    running = Monitor("running")
    assert await _resume_source(running) is False  # type: ignore[arg-type]
    assert "cont" not in running.commands
    gone = Monitor("postmigrate", alive=False)
    assert await _resume_source(gone) is False  # type: ignore[arg-type]  # no exception escapes
