"""Live migration of a QEMU VM and its vPASID state between two hosts, driven through QMP.

:func:`migrate` runs one migration from a running source QEMU to a destination QEMU started with
``-incoming defer``, and hands the VM's vPASID state from the source host's vioasid daemon to the
destination's (:class:`VpasidHandover`)::

    result = await migrate(src_qmp, dst_qmp, "unix:/run/mig.sock", vpasid=handover)

1. Both sides' vIOMMU configuration is compared first (``qom-get`` of every intel-iommu property):
   QEMU itself accepts e.g. ``x-flts=on`` → ``off`` and the guest then hangs on I/O.
2. Capabilities ``pause-before-switchover`` and ``events`` (source), ``events`` (destination);
   ``migrate-incoming`` on the destination, ``migrate`` on the source; MIGRATION events followed.
3. While RAM is copied (the VM still runs), the vPASID state is *pre-copied*: once the
   destination's RAM holds the reserved range intact (the guest's PASID tables, compared by
   digest) the source daemon exports the stream and the destination daemon imports it —
   re-allocating every pPASID under its own occupancy, reprogramming devices and CPU tables.
4. At ``pre-switchover`` (the VM is stopped; everything here is downtime) the source exports the
   final stream. Byte-identical to the pre-copied one: nothing moves. Otherwise (new bindings,
   queued faults) the pre-copied VM is dropped and the final stream imported now.
5. Import refused → ``migrate_cancel``: the source VM resumes unchanged, the destination daemon
   keeps nothing (imports are all-or-nothing; a pre-copied VM is unregistered) and the
   destination QEMU, whose load cannot finish, is told to ``quit``. Accepted →
   ``migrate-continue``, wait for ``completed``, and the source's VM is released on its daemon.

The result (:class:`MigrationResult`) has QEMU's downtime, the observed one (source STOP →
destination RESUME), the vPASID hand-over's share of the downtime, and the vPASID → pPASID
tables before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qemu_glue.migration.steps import (
    DEFAULT_MAX_BANDWIDTH,
    ConvergenceHold,
    final_figures,
    set_up,
    wait_status,
)
from qemu_glue.migration.vpasid_reserve import digest, ppasid_table
from qemu_glue.qemu.qmp import (
    MIGRATION,
    MIGRATION_PASS,
    RESUME,
    STOP,
    EventStream,
    Qmp,
    QmpError,
)
from vioasid.client import Client, ImportResult, MemoryRegion, RequestError
from vioasid.model.memory import GuestMemory

log = logging.getLogger(__name__)

Rid = str | int
IOMMU_TYPES = ("intel-iommu",)
_SKIP_PROPS = {"type", "parent_bus", "realized", "hotplugged", "hotpluggable"}
PRECOPY_WAIT_S = 30.0  # longest the pre-copy waits for the tables (holding convergence)
RESERVE_WAIT_S = 20.0  # at switch-over: how long the destination may take to load the tables


class MigrationError(Exception):
    """The migration could not be started or did not finish (QMP failure, timeout,
    mismatched vIOMMU); for a refused vPASID import see :attr:`MigrationResult.error`."""


# -- vIOMMU configuration ------------------------------------------------------------------------


async def iommu_config(qmp: Qmp) -> dict[str, Any]:
    """``{qom path: {property: value}}`` of every vIOMMU device of the VM (empty: none)."""
    out: dict[str, Any] = {}
    for parent in ("/machine/peripheral-anon", "/machine/peripheral"):
        try:
            children = await qmp.execute("qom-list", {"path": parent})
        except QmpError:
            continue
        for c in children:
            kind = str(c.get("type", ""))
            if not kind.startswith("child<") or kind[6:-1] not in IOMMU_TYPES:
                continue
            path = f"{parent}/{c['name']}"
            props: dict[str, Any] = {"type": kind[6:-1]}
            for p in await qmp.execute("qom-list", {"path": path}):
                name, ptype = str(p["name"]), str(p.get("type", ""))
                if name in _SKIP_PROPS or ptype.startswith(("child<", "link<")):
                    continue
                with contextlib.suppress(QmpError):
                    props[name] = await qmp.execute("qom-get", {"path": path, "property": name})
            out[kind[6:-1]] = props
    return out


def iommu_differences(src: Mapping[str, Any], dst: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`iommu_config` results."""
    diffs: list[str] = []
    for dev in sorted(set(src) | set(dst)):
        a, b = src.get(dev), dst.get(dev)
        if a is None or b is None:
            diffs.append(f"{dev}: only on the {'destination' if a is None else 'source'}")
            continue
        for prop in sorted(set(a) | set(b)):
            if a.get(prop) != b.get(prop):
                diffs.append(f"{dev}.{prop}: source {a.get(prop)!r}, destination {b.get(prop)!r}")
    return diffs


# -- the vPASID hand-over --------------------------------------------------------------------------


@dataclass
class Reserve:
    """The reserved RAM range holding the guest's vPASID tables, mapped on both sides."""

    src: GuestMemory
    dst: GuestMemory
    base: int
    size: int


@dataclass
class VpasidHandover:
    """Where the VM's vPASID state comes from and goes to.

    ``src``/``dst`` are connections to the two hosts' daemons; ``dst`` will own the imported VM
    (it lives as long as that connection). ``dst_regions`` is the destination QEMU's RAM.
    ``reserve`` (optional) lets the pre-copy wait until the destination holds the tables.
    ``tamper`` (tests) rewrites every stream on its way to the destination.
    """

    src: Client
    src_vm: int
    name: str
    dst: Client
    dst_regions: Sequence[MemoryRegion]
    functions: Mapping[Rid, Rid] | None = None
    reserve: Reserve | None = None
    precopy: bool = True
    release_source: bool = True
    tamper: Callable[[bytes], bytes] | None = None


@dataclass
class _Imported:
    stream: bytes
    result: ImportResult
    ms: float


@dataclass
class MigrationResult:
    """One migration's outcome and figures."""

    ok: bool
    status: str  # completed | cancelled | failed
    error: str | None = None
    downtime_ms: float | None = None  # QEMU's (query-migrate "downtime")
    observed_downtime_ms: float | None = None  # source STOP -> destination RESUME (event times)
    total_ms: float | None = None
    setup_ms: float | None = None
    vpasid_switchover_ms: float | None = None  # export + compare (+ import) while stopped
    vpasid_precopy_ms: float | None = None  # export + transfer + import while running
    precopied: bool = False
    stream_bytes: int = 0
    ppasids_before: dict[str, dict[int, int]] = field(default_factory=dict)
    ppasids_after: dict[str, dict[int, int]] = field(default_factory=dict)
    dst_vm: int | None = None
    reserve_intact: bool | None = None
    reserve_wait_ms: float | None = None  # switch-over waited for the destination's RAM load
    source_status: str | None = None  # the source's run state at the end
    iommu: dict[str, Any] = field(default_factory=dict)
    ram: dict[str, Any] = field(default_factory=dict)

    @property
    def vpasids_carried(self) -> int:
        return sum(len(v) for v in self.ppasids_after.values())

    @property
    def vpasids_identical(self) -> bool:
        before = {(r, x) for r, t in self.ppasids_before.items() for x in t}
        after = {(r, x) for r, t in self.ppasids_after.items() for x in t}
        return before == after

    @property
    def ppasids_changed(self) -> int:
        return sum(
            1
            for r, t in self.ppasids_after.items()
            for x, pp in t.items()
            if self.ppasids_before.get(r, {}).get(x) != pp
        )

    def to_json(self) -> dict[str, Any]:
        def table(t: dict[str, dict[int, int]]) -> dict[str, dict[str, int]]:
            return {r: {str(x): pp for x, pp in sorted(v.items())} for r, v in sorted(t.items())}

        return {
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "downtime_ms": self.downtime_ms,
            "observed_downtime_ms": _round(self.observed_downtime_ms),
            "total_ms": self.total_ms,
            "setup_ms": self.setup_ms,
            "vpasid_switchover_ms": _round(self.vpasid_switchover_ms),
            "vpasid_precopy_ms": _round(self.vpasid_precopy_ms),
            "precopied": self.precopied,
            "stream_bytes": self.stream_bytes,
            "vpasids_carried": self.vpasids_carried,
            "vpasids_identical": self.vpasids_identical,
            "ppasids_changed": self.ppasids_changed,
            "ppasids_before": table(self.ppasids_before),
            "ppasids_after": table(self.ppasids_after),
            "reserve_intact": self.reserve_intact,
            "reserve_wait_ms": _round(self.reserve_wait_ms),
            "source_status": self.source_status,
            "iommu": self.iommu,
            "ram": self.ram,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _event_time(ev: Mapping[str, Any]) -> float:
    ts = ev.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


class _Migration(ConvergenceHold):
    """State of one :func:`migrate` run."""

    def __init__(self, src: Qmp, dst: Qmp, handover: VpasidHandover | None) -> None:
        self.src = src
        self.dst = dst
        self.h = handover
        self.pre: _Imported | None = None
        self.pre_task: asyncio.Task[None] | None = None
        self.importing = False
        self.pass_seen = asyncio.Event()
        self.held: int | None = None  # downtime limit to restore once the pre-copy is done

    # -- vPASID state ---------------------------------------------------------------------
    async def _import(self, stream: bytes) -> ImportResult:
        h = self.h
        assert h is not None
        sent = h.tamper(stream) if h.tamper is not None else stream
        return await h.dst.import_vm(h.name, sent, h.dst_regions, h.functions)

    async def precopy(self) -> None:
        """Wait until the destination's RAM holds the reserved range, then export + import."""
        h = self.h
        assert h is not None
        try:
            if h.reserve is not None:
                await _wait_reserve(h.reserve, PRECOPY_WAIT_S)
            else:
                async with asyncio.timeout(PRECOPY_WAIT_S):
                    await self.pass_seen.wait()
            # From here until self.pre is set the switch-over waits for this task instead of
            # cancelling it: a cancelled import would leave the destination holding the VM.
            self.importing = True
            try:
                t0 = time.perf_counter()
                stream = await h.src.export_vm(h.src_vm)
                try:
                    result = await self._import(stream)
                except RequestError as exc:
                    log.info("vPASID pre-copy refused (the final import will retry): %s", exc)
                    return
                self.pre = _Imported(stream, result, (time.perf_counter() - t0) * 1e3)
                log.info(
                    "vPASID state pre-copied: %d bindings, %d bytes, %.1f ms",
                    len(result.bindings),
                    len(stream),
                    self.pre.ms,
                )
            finally:
                self.importing = False
        finally:
            await self.release_convergence()

    async def switchover(self, res: MigrationResult) -> ImportResult:
        """The VM is stopped: final export, compare, (re-)import. Raises RequestError."""
        h = self.h
        assert h is not None
        await self.settle_precopy()
        t0 = time.perf_counter()
        stream = await h.src.export_vm(h.src_vm)
        res.stream_bytes = len(stream)
        pre = self.pre
        if pre is not None and pre.stream == stream:
            res.precopied = True
            res.vpasid_precopy_ms = pre.ms
            result = pre.result
        else:
            if pre is not None:
                log.info("vPASID state changed since the pre-copy: importing again")
                self.pre = None
                await h.dst.unregister_vm(pre.result.vm)
            if h.reserve is not None:
                # The source has sent every page, but the destination may still be loading
                # what is buffered: wait (bounded) until it holds the tables.
                res.reserve_wait_ms = await _wait_reserve(h.reserve, RESERVE_WAIT_S)
            result = await self._import(stream)
        res.vpasid_switchover_ms = (time.perf_counter() - t0) * 1e3
        return result

    async def settle_precopy(self) -> None:
        """Stop the pre-copy task: wait for it if an import is under way (it must end with
        ``self.pre`` set or nothing imported), cancel it while it only waits."""
        task = self.pre_task
        if task is not None and not task.done():
            if self.importing:
                with contextlib.suppress(Exception):
                    await task  # a request in flight: let it finish, do not desync the client
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.held = None

    async def drop_precopy(self) -> None:
        """Undo the pre-copy on the destination (the migration will not complete)."""
        await self.settle_precopy()
        h = self.h
        pre = self.pre
        self.pre = None
        if h is not None and pre is not None:
            with contextlib.suppress(Exception):
                await h.dst.unregister_vm(pre.result.vm)


async def _wait_reserve(r: Reserve, timeout: float | None, period: float = 0.02) -> float:
    """Wait until the destination's reserved range equals the source's; ms waited."""
    t0 = time.perf_counter()
    want = digest(r.src, r.base, r.size)
    while digest(r.dst, r.base, r.size) != want:
        if timeout is not None and time.perf_counter() - t0 > timeout:
            log.warning("the destination's reserved range still differs after %.1f s", timeout)
            break
        await asyncio.sleep(period)
    return (time.perf_counter() - t0) * 1e3


async def _wait_status(
    ev: EventStream, want: set[str], timeout: float, on_event: Callable[[dict[str, Any]], None]
) -> str:
    """Follow MIGRATION events until one of ``want`` (or failed/cancelled) arrives."""
    return await wait_status(ev, want, timeout, on_event, MigrationError)


async def migrate(
    src: Qmp,
    dst: Qmp,
    uri: str,
    *,
    vpasid: VpasidHandover | None = None,
    timeout: float = 300.0,
    max_bandwidth: int | None = DEFAULT_MAX_BANDWIDTH,
    downtime_limit_ms: int | None = None,
    check_iommu: bool = True,
) -> MigrationResult:
    """Migrate the VM of ``src`` to ``dst`` (started with ``-incoming defer``) over ``uri``
    (``unix:/path`` or ``tcp:host:port``); see the module docstring for the steps."""
    res = MigrationResult(ok=False, status="failed")
    m = _Migration(src, dst, vpasid)
    if check_iommu:
        a, b = await iommu_config(src), await iommu_config(dst)
        res.iommu = a
        diffs = iommu_differences(a, b)
        if diffs:
            raise MigrationError("vIOMMU configurations differ: " + "; ".join(diffs))
    if vpasid is not None:
        dump = await vpasid.src.dump(vpasid.src_vm)
        res.ppasids_before = ppasid_table(dump, vpasid.name)
    m.held = await set_up(
        src,
        dst,
        max_bandwidth=max_bandwidth,
        downtime_limit_ms=downtime_limit_ms,
        hold=vpasid is not None and vpasid.precopy,
    )

    stop_t: float | None = None
    resume_t: float | None = None

    def on_src(e: dict[str, Any]) -> None:
        nonlocal stop_t
        if e.get("event") == STOP and stop_t is None:
            stop_t = _event_time(e)
        elif e.get("event") == MIGRATION_PASS and int(e.get("data", {}).get("pass", 0)) >= 2:
            m.pass_seen.set()

    async with (
        src.events(MIGRATION, MIGRATION_PASS, STOP) as sev,
        dst.events(MIGRATION, RESUME) as dev,
    ):
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        if vpasid is not None and vpasid.precopy:
            m.pre_task = asyncio.create_task(m.precopy())
        try:
            status = await _wait_status(sev, {"pre-switchover", "completed"}, timeout, on_src)
            if status != "pre-switchover":
                await m.drop_precopy()
                res.status = status
                res.error = f"migration {status} before switch-over"
                return await _finish(res, src)
            if vpasid is not None:
                try:
                    imported = await m.switchover(res)
                except RequestError as exc:
                    res.error = f"vPASID import refused by the destination: {exc}"
                    log.warning("%s; cancelling the migration", res.error)
                    await src.execute("migrate_cancel")
                    await m.drop_precopy()
                    status = await _wait_status(sev, {"cancelled"}, 30.0, on_src)
                    res.status = "cancelled" if status == "cancelled" else status
                    # its load failed (or would wait forever): the destination QEMU goes too
                    with contextlib.suppress(QmpError):
                        await dst.execute("quit", timeout=5.0)
                    return await _finish(res, src)
                res.dst_vm = imported.vm
                res.ppasids_after = imported.ppasids()
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            status = await _wait_status(sev, {"completed"}, timeout, on_src)
            res.status = status
            if status != "completed":
                res.error = f"migration {status} after switch-over"
                if res.dst_vm is not None and vpasid is not None:
                    with contextlib.suppress(Exception):
                        await vpasid.dst.unregister_vm(res.dst_vm)
                    res.dst_vm = None
                return await _finish(res, src)
            with contextlib.suppress(Exception):
                e = await dev.wait_for(RESUME, timeout=30.0)
                resume_t = _event_time(e)
        except BaseException:
            # A timeout or a QMP failure mid-way: stop the migration (the source resumes) and
            # leave nothing behind on the destination daemon.
            with contextlib.suppress(Exception):
                await src.execute("migrate_cancel", timeout=5.0)
            with contextlib.suppress(Exception):
                await m.drop_precopy()
            if res.dst_vm is not None and vpasid is not None:
                with contextlib.suppress(Exception):
                    await vpasid.dst.unregister_vm(res.dst_vm)
            raise
    res.ok = True
    if stop_t is not None and resume_t is not None:
        res.observed_downtime_ms = (resume_t - stop_t) * 1e3
    if vpasid is not None:
        if vpasid.reserve is not None:
            r = vpasid.reserve
            res.reserve_intact = digest(r.src, r.base, r.size) == digest(r.dst, r.base, r.size)
        if vpasid.release_source:
            try:
                await vpasid.src.unregister_vm(vpasid.src_vm)
            except RequestError as exc:
                log.warning("source VM not released on its daemon: %s", exc)
    return await _finish(res, src)


async def _finish(res: MigrationResult, src: Qmp) -> MigrationResult:
    info, res.source_status = await final_figures(src)
    res.downtime_ms = info.get("downtime")
    res.total_ms = info.get("total-time")
    res.setup_ms = info.get("setup-time")
    ram = info.get("ram", {})
    res.ram = {k: ram[k] for k in ("transferred", "duplicate", "normal", "dirty-sync-count")
               if k in ram}  # fmt: skip
    return res


__all__ = [
    "MigrationError",
    "MigrationResult",
    "Reserve",
    "VpasidHandover",
    "iommu_config",
    "iommu_differences",
    "migrate",
]
