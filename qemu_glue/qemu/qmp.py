"""QMP helpers over ``qemu.qmp``: connect with retry, calls with timeouts, scoped event streams.

``qemu.qmp``'s async API has no timeouts and its default ``events`` listener keeps every event
forever; :class:`Qmp` bounds every call with ``asyncio.timeout``, mutes the default listener and
hands out scoped :class:`EventStream` listeners instead (``async with qmp.events(...)``).

Why ``asyncio.timeout`` and never ``asyncio.wait_for`` here: on Python 3.11 ``wait_for`` runs the
call in a task of its own and, if the caller is cancelled in the loop iteration in which that task
finishes, returns the result and drops the cancellation. A cancelled QMP call (say a poller under
``wait_for(..., 0.1)``) then keeps running forever, its caller never gets past the cancel, and the
``async with launch(...)`` around it never stops QEMU. ``asyncio.timeout`` awaits the call in the
caller's own task, so a cancellation always wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0

# The events vioasid cares about (QEMU's names).
SHUTDOWN = "SHUTDOWN"
STOP = "STOP"
RESUME = "RESUME"
DEVICE_DELETED = "DEVICE_DELETED"
MIGRATION = "MIGRATION"
MIGRATION_PASS = "MIGRATION_PASS"

Event = dict[str, Any]


class QmpError(Exception):
    """A QMP command failed (``error_class`` is QEMU's class, e.g. ``GenericError``)."""

    def __init__(self, command: str, message: str, error_class: str = "") -> None:
        super().__init__(f"QMP {command}: {message}")
        self.command = command
        self.error_class = error_class


class QmpTimeout(QmpError):
    """A QMP command or event wait did not finish in time."""


@dataclass(frozen=True)
class PciDevice:
    """One function from ``query-pci`` (guest view)."""

    bus: int
    slot: int
    function: int
    qdev_id: str
    vendor_id: int
    device_id: int
    class_code: int
    description: str

    @property
    def bdf(self) -> str:
        """``bb:dd.f`` as lspci / QEMU print it."""
        return f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def rid(self) -> int:
        """Requester ID (bus << 8 | devfn), what the VT-d tables are indexed by."""
        return (self.bus << 8) | (self.slot << 3) | self.function


def _walk_pci(devices: Iterable[Mapping[str, Any]], out: list[PciDevice]) -> None:
    for d in devices:
        cls = d.get("class_info", {})
        ids = d.get("id", {})
        out.append(
            PciDevice(
                bus=int(d.get("bus", 0)),
                slot=int(d["slot"]),
                function=int(d["function"]),
                qdev_id=str(d.get("qdev_id", "")),
                vendor_id=int(ids.get("vendor", 0)),
                device_id=int(ids.get("device", 0)),
                class_code=int(cls.get("class", 0)),
                description=str(cls.get("desc", "")),
            )
        )
        bridge = d.get("pci_bridge")
        if bridge:
            _walk_pci(bridge.get("devices", []), out)


def parse_query_pci(reply: Iterable[Mapping[str, Any]]) -> list[PciDevice]:
    """Flatten a ``query-pci`` reply (buses and bridges) into functions."""
    out: list[PciDevice] = []
    for bus in reply:
        _walk_pci(bus.get("devices", []), out)
    return out


class EventStream:
    """A scoped QMP event listener (from :meth:`Qmp.events`). Events arrive in order."""

    def __init__(self, listener: EventListener, timeout: float) -> None:
        self._listener = listener
        self._timeout = timeout

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; :class:`QmpTimeout` if none comes in time."""
        t = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(t):
                ev = await self._listener.get()
        except TimeoutError:
            raise QmpTimeout("event", f"no event within {t:.1f}s") from None
        return dict(ev)

    async def wait_for(
        self,
        name: str | Iterable[str],
        predicate: Callable[[Event], bool] | None = None,
        timeout: float | None = None,
    ) -> Event:
        """Skip events until one named ``name`` (and matching ``predicate``) arrives."""
        names = {name} if isinstance(name, str) else set(name)
        t = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout("event", f"no {'/'.join(sorted(names))} within {t:.1f}s")
            ev = await self.get(left)
            if ev.get("event") in names and (predicate is None or predicate(ev)):
                return ev

    def pending(self) -> list[Event]:
        """Events received and not yet read (drains them)."""
        return [dict(e) for e in self._listener.clear()]

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            yield dict(await self._listener.get())


class Qmp:
    """A connected QMP session. Every call is bounded by a timeout."""

    def __init__(self, client: QMPClient, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.client = client
        self.timeout = timeout
        # The default listener would keep every event forever: make it accept nothing.
        client.events.event_filter = lambda _ev: False

    @classmethod
    async def connect(
        cls,
        path: Path | str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        is_alive: Callable[[], bool] | None = None,
        name: str | None = None,
    ) -> Qmp:
        """Connect to a QMP unix socket, retrying until it appears (or ``timeout`` passes).

        ``is_alive`` (e.g. "the QEMU process is still running") stops the retries early.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if is_alive is not None and not is_alive():
                raise QmpError("connect", f"QEMU exited before QMP was up at {path}")
            if not os.path.exists(path):  # not up yet: don't let qemu.qmp log a failed connect
                if time.monotonic() >= deadline:
                    raise QmpTimeout("connect", f"no QMP socket at {path} after {timeout:.1f}s")
                await asyncio.sleep(0.02)
                continue
            client = QMPClient(name)
            try:
                left = max(0.05, deadline - time.monotonic())
                async with asyncio.timeout(left):
                    await client.connect(str(path))
                return cls(client, timeout)
            except (OSError, TimeoutError, Exception) as exc:  # ConnectError wraps OSError
                last = exc
                with contextlib.suppress(Exception):  # best effort on a half-open client
                    await client.disconnect()
            if time.monotonic() >= deadline:
                raise QmpTimeout("connect", f"no QMP at {path} after {timeout:.1f}s: {last}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self.client.disconnect()
        except Exception as exc:  # closing must not raise
            log.debug("QMP disconnect: %s", exc)

    async def execute(
        self, command: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command; its ``return`` value. Raises :class:`QmpError`/:class:`QmpTimeout`."""
        t = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(t):  # not wait_for: see the module docstring
                return await self.client.execute(command, args)
        except TimeoutError:
            raise QmpTimeout(command, f"no reply within {t:.1f}s") from None
        except ExecuteError as exc:
            raise QmpError(command, str(exc), exc.error_class) from exc
        except Exception as exc:
            if isinstance(exc, QmpError):
                raise
            raise QmpError(command, f"{type(exc).__name__}: {exc}") from exc

    async def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """A human monitor command (``human-monitor-command``); its text output."""
        out = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return str(out)

    async def read_phys_u64(self, addr: int) -> int:
        """Read one guest-physical qword (MMIO included) via HMP ``xp /1gx``."""
        return parse_xp(await self.hmp(f"xp /1gx {addr:#x}"))

    async def read_phys_u32(self, addr: int) -> int:
        """Read one guest-physical dword via HMP ``xp /1wx``."""
        return parse_xp(await self.hmp(f"xp /1wx {addr:#x}"))

    async def query_status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ``shutdown`` ...)."""
        return str((await self.execute("query-status"))["status"])

    async def query_pci(self) -> list[PciDevice]:
        return parse_query_pci(await self.execute("query-pci"))

    async def find_pci(self, qdev_id: str) -> PciDevice:
        """The guest BDF of the device created with ``id=qdev_id``."""
        for dev in await self.query_pci():
            if dev.qdev_id == qdev_id:
                return dev
        raise QmpError("query-pci", f"no PCI device with id {qdev_id!r}")

    @asynccontextmanager
    async def events(self, *names: str, timeout: float | None = None) -> AsyncIterator[EventStream]:
        """Listen for events named ``names`` (all if none) while the block runs.

        Enter the block *before* triggering what emits the event so none is missed.
        """
        listener = EventListener(names or None)
        with self.client.listen(listener):
            yield EventStream(listener, self.timeout if timeout is None else timeout)


_XP_RE = re.compile(r":\s*(0x[0-9a-fA-F]+)")


def parse_xp(text: str) -> int:
    """The value from HMP ``xp`` output (``00000000fed90020: 0x0000000012345400``)."""
    m = _XP_RE.search(text)
    if not m:
        raise QmpError("xp", f"unexpected output {text.strip()!r}")
    return int(m.group(1), 16)
