"""Live migration of a guest with PASID DMA functions (vfio-user, QEMU 11.1) between two hosts.

QEMU 11.1 migrates nothing of a vfio-user device: no blocker, no message to the server, and on
the destination the function's BARs are unprogrammed (shared/design/qemu-notes.md, "Live
migration with a vfio-user device"). :func:`migrate_pasid` carries what QEMU drops, from the
source's :class:`~qemu_glue.pasid_dma.PasidDmaRig` (its own engine, one host) to the
destination's (another engine, with its own occupancy and policy):

1. Refusals first: both QEMUs must have ``vfio-user-pci``, both vIOMMU configurations must be
   equal (``qom-get`` of every intel-iommu property), and the functions must match by guest
   RID, type and PASID width.
2. Pre-copy, while the VM runs: the source's PCI configuration of every function (COMMAND,
   BAR0, MSI) is read through HMP port I/O (``i /w 0xcfc`` after ``o /w 0xcf8``) and written
   the same way into the destination QEMU (started with ``-S -incoming defer``: nothing loads
   the config of a vfio-user device, so it stays). Once RAM has been sent once (pass 2) the
   engine's VM stream (bindings, CPU PASID table, queued faults) is imported on the
   destination's engine as a trial: every pPASID re-allocated under its policy, translating
   functions re-programmed. Meanwhile the migration is held from converging.
3. ``pre-switchover`` (the VM is stopped, this is downtime): the final engine stream is taken.
   An unchanged stream keeps the trial import (the delta is empty); otherwise it is imported
   now. First the source's servers drain (every message QEMU sent handled, posted BAR writes
   included): then no job is in flight — a descriptor runs to completion when its doorbell
   write is handled — so each job ran on the source exactly once, and its completion record
   and data reach the destination (in QEMU's RAM or vioasid's DMA-written pages, step 5).
   Right after ``migrate-continue``, while QEMU sends its last RAM
   and device state, the functions' stream (:mod:`vioasid.formats.pasid_migration`:
   registers, portal, config space, bound vPASIDs) is taken from the frozen source functions
   and loaded into the destination's.
4. Any refusal (exhausted, conflict, mismatch, a destination that died, an import that threw)
   → ``migrate_cancel``: the source resumes unchanged with its functions working, the
   destination's engine drops the VM (every pPASID freed) and its QEMU is told to quit.
5. When the destination has loaded, the guest pages the functions wrote by DMA during the
   migration (QEMU's dirty log never saw them) are written there from the stopped source, a
   function whose config changed since the pre-copy is re-written, the destination's RTADDR
   follower and plain-``migrate`` guard start, and ``cont`` runs the guest there.

:class:`PasidMigrationResult` has QEMU's downtime, the observed one (source STOP → ``cont``
returned), vioasid's share of it, and every binding's pPASID before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from qemu_glue.migration import steps
from qemu_glue.migration.live import iommu_config, iommu_differences
from qemu_glue.pasid_dma import VM_NAME, PasidDmaRig
from qemu_glue.qemu.qmp import (
    MIGRATION,
    MIGRATION_PASS,
    STOP,
    EventStream,
    Qmp,
    QmpError,
    QmpTimeout,
)
from qemu_glue.qemu.vtd_regs import VtdRegisterReader
from vioasid.device.pasid_dma_state import (
    apply_pages,
    decode_functions,
    encode_functions,
    encode_pages,
)
from vioasid.formats import pci
from vioasid.model.errors import MigrationFailed, NotFound
from vioasid.model.faults import bdf_str
from vioasid.model.migration import export_vm, import_vm

log = logging.getLogger(__name__)

CONFIG_ADDRESS = 0xCF8  # PCI configuration mechanism #1 (PCI 3.0 §3.2.2.3.2)
CONFIG_DATA = 0xCFC
MSI = 0x40  # vioasid.vfio_user.function.MSI_CAP_OFFSET
# (offset, bytes) restored in this order: BAR0 (64-bit) and MSI before MSI control, COMMAND last
CONFIG_FIELDS: tuple[tuple[int, int], ...] = (
    (pci.PCI_BASE_ADDRESS_0, 4),
    (pci.PCI_BASE_ADDRESS_0 + 4, 4),
    (MSI + 4, 4),  # message address (low)
    (MSI + 8, 4),  # message address (high), 64-bit MSI
    (MSI + 12, 4),  # message data
    (MSI, 4),  # capability header + message control (enable)
    (pci.PCI_COMMAND, 2),
)
PRECOPY_WAIT_S = 30.0
PRECOPY_RETRY_S = 0.2
DRAIN_TIMEOUT_S = 2.0
_PORT_VALUE = re.compile(r"=\s*0x([0-9a-fA-F]+)")
Hook = Callable[[str], Awaitable[None]]


class PasidMigrationError(Exception):
    """A PASID migration that cannot even start (one line for the user)."""


# -- PCI config through HMP port I/O ----------------------------------------------------------


def config_address(rid: int, offset: int) -> int:
    """The CONFIG_ADDRESS dword for (bus/dev/fn ``rid``, dword of ``offset``)."""
    return 0x8000_0000 | (rid & 0xFFFF) << 8 | (offset & 0xFC)


def _port_value(text: str) -> int:
    m = _PORT_VALUE.search(text)
    if m is None:
        raise QmpError("i", f"unexpected port read output {text!r}")
    return int(m.group(1), 16)


async def read_config(qmp: Qmp, rid: int) -> dict[int, int]:
    """The :data:`CONFIG_FIELDS` of function ``rid`` as the QEMU behind ``qmp`` has them."""
    out: dict[int, int] = {}
    for off, size in CONFIG_FIELDS:
        await qmp.hmp(f"o /w {CONFIG_ADDRESS:#x} {config_address(rid, off):#x}")
        fmt = "/w" if size == 4 else "/h"
        out[off] = _port_value(await qmp.hmp(f"i {fmt} {CONFIG_DATA + (off & 3):#x}"))
    return out


async def write_config(qmp: Qmp, rid: int, values: dict[int, int]) -> None:
    """Write :data:`CONFIG_FIELDS` values (those given) into function ``rid``, in order."""
    for off, size in CONFIG_FIELDS:
        if off not in values:
            continue
        await qmp.hmp(f"o /w {CONFIG_ADDRESS:#x} {config_address(rid, off):#x}")
        fmt = "/w" if size == 4 else "/h"
        await qmp.hmp(f"o {fmt} {CONFIG_DATA + (off & 3):#x} {values[off]:#x}")


def config_fields(raw: bytes) -> dict[int, int]:
    """:data:`CONFIG_FIELDS` out of a server's config-space bytes."""
    return {off: int.from_bytes(raw[off : off + size], "little") for off, size in CONFIG_FIELDS}


# -- results ----------------------------------------------------------------------------------


@dataclass
class BindingMove:
    """One (function, vPASID) and its pPASID on either side."""

    device: str
    type: str
    vpasid: int
    ppasid_before: int
    ppasid_after: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PasidMigrationResult:
    """One migration's outcome and figures."""

    ok: bool = False
    status: str = "failed"  # completed | refused | cancelled | failed
    error: str | None = None
    refused_at: str | None = None  # start | precopy | switchover (before switch-over)
    downtime_ms: float | None = None  # QEMU's (query-migrate "downtime")
    observed_downtime_ms: float | None = None  # source STOP -> the destination's cont returned
    vioasid_switchover_ms: float | None = None  # stopped: export, compare, (import), load
    vioasid_resume_ms: float | None = None  # destination loaded -> cont sent (pages, config)
    cont_ms: float | None = None  # the destination's ``cont`` (QMP round trip + vm_start)
    function_state_ms: float | None = None  # function records, while QEMU completes (overlap)
    precopy_ms: float | None = None  # trial import while the VM ran
    precopied: bool = False  # the trial import was kept (nothing changed)
    config_rewritten: int = 0  # functions whose config changed after the pre-copy
    dma_pages: int = 0  # guest pages the functions wrote during the migration, sent by vioasid
    dma_pages_bytes: int = 0
    engine_stream_bytes: int = 0
    function_stream_bytes: int = 0
    total_ms: float | None = None
    bindings: list[BindingMove] = field(default_factory=list)
    source_status: str | None = None
    dst_status: str | None = None

    @property
    def vioasid_downtime_ms(self) -> float | None:
        if self.vioasid_switchover_ms is None:
            return None
        return self.vioasid_switchover_ms + (self.vioasid_resume_ms or 0.0)

    @property
    def vpasids_identical(self) -> bool:
        return all(b.ppasid_after is not None for b in self.bindings)

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "refused_at": self.refused_at,
            "downtime_ms": self.downtime_ms,
            "observed_downtime_ms": r(self.observed_downtime_ms),
            "vioasid_downtime_ms": r(self.vioasid_downtime_ms),
            "vioasid_switchover_ms": r(self.vioasid_switchover_ms),
            "vioasid_resume_ms": r(self.vioasid_resume_ms),
            "cont_ms": r(self.cont_ms),
            "function_state_ms": r(self.function_state_ms),
            "precopy_ms": r(self.precopy_ms),
            "precopied": self.precopied,
            "config_rewritten": self.config_rewritten,
            "dma_pages": self.dma_pages,
            "dma_pages_bytes": self.dma_pages_bytes,
            "engine_stream_bytes": self.engine_stream_bytes,
            "function_stream_bytes": self.function_stream_bytes,
            "total_ms": self.total_ms,
            "vpasids_identical": self.vpasids_identical,
            "bindings": [b.to_json() for b in self.bindings],
            "source_status": self.source_status,
            "dst_status": self.dst_status,
        }


class _Refused(Exception):
    """The destination cannot take the VM: cancel before switch-over."""


# -- the migration ----------------------------------------------------------------------------


class _PasidMigration(steps.ConvergenceHold):
    def __init__(
        self, src: Qmp, dst: Qmp, src_rig: PasidDmaRig, dst_rig: PasidDmaRig, hook: Hook | None
    ) -> None:
        self.src, self.dst = src, dst
        self.src_rig, self.dst_rig = src_rig, dst_rig
        self.hook = hook
        self.fmap = {p.guest_rid: p.function for p in dst_rig.placed}
        self.pre_stream: bytes | None = None
        self.pre_error: str | None = None
        self.pass_seen = asyncio.Event()
        self.held: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.config: dict[int, dict[int, int]] = {}

    async def _hook(self, phase: str) -> None:
        if self.hook is not None:
            await self.hook(phase)

    def drop_destination(self) -> None:
        """The destination's engine keeps nothing of the VM (every pPASID freed)."""
        h = self.dst_rig.host
        if VM_NAME in h.vms:
            h.remove_vm(VM_NAME)
        for f in self.dst_rig.functions:
            f.bound.clear()

    def import_now(self, stream: bytes) -> None:
        """Engine import on the destination (all-or-nothing); raises MigrationFailed."""
        self.drop_destination()  # the rig's placeholder VM (no bindings) or a stale trial
        try:
            import_vm(self.dst_rig.host, stream, self.dst_rig.memory, self.fmap, name=VM_NAME)
        except MigrationFailed:
            raise
        except Exception as exc:  # an import that broke midway: nothing may stay
            self.drop_destination()
            raise MigrationFailed(f"import aborted: {type(exc).__name__}: {exc}") from exc

    async def precopy(self) -> None:
        """After RAM went once: a trial import (retried while the destination's RAM still
        lacks a guest PASID entry); a refusal for any other reason is final."""
        try:
            async with asyncio.timeout(PRECOPY_WAIT_S):
                await self.pass_seen.wait()
                await self._hook("precopy")
                while True:
                    t0 = time.perf_counter()
                    stream = export_vm(self.src_rig.host, VM_NAME)
                    try:
                        self.import_now(stream)
                    except MigrationFailed as exc:
                        if isinstance(exc.__cause__, NotFound):
                            log.debug("trial import: %s (RAM still loading); retrying", exc)
                            await asyncio.sleep(PRECOPY_RETRY_S)
                            continue
                        self.pre_error = str(exc)
                        log.info("trial import refused on the destination: %s", exc)
                        return
                    self.pre_stream = stream
                    self.pre_ms = (time.perf_counter() - t0) * 1e3
                    return
        except TimeoutError:
            log.info("no trial import within %.0f s: importing at switch-over", PRECOPY_WAIT_S)
        finally:
            await self.release_convergence()

    async def settle(self) -> None:
        t = self.task
        if t is not None and not t.done():
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.held = None

    async def switchover(self, res: PasidMigrationResult) -> None:
        """VM stopped, before switch-over: the final engine stream; keep the trial import if
        nothing changed, import now otherwise. Raises _Refused (nothing kept)."""
        await self.settle()
        if self.pre_error is not None:
            raise _Refused(self.pre_error)
        t0 = time.perf_counter()
        await self._hook("switchover")
        await self.drain()
        stream = export_vm(self.src_rig.host, VM_NAME)
        res.engine_stream_bytes = len(stream)
        try:
            if self.pre_stream is not None and self.pre_stream == stream:
                res.precopied = True
            else:
                self.import_now(stream)
            await self._hook("loaded")
        except MigrationFailed as exc:
            self.drop_destination()
            raise _Refused(str(exc)) from exc
        res.vioasid_switchover_ms = (time.perf_counter() - t0) * 1e3

    async def drain(self) -> None:
        """The VM is stopped: wait until the source's servers handled every message QEMU
        sent (posted BAR writes may still be queued: a doorbell's job then runs now, on the
        source, before its state is taken)."""
        servers = self.src_rig.servers
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not all(s.drained() for s in servers):
            if time.monotonic() > deadline:
                raise _Refused("the source's functions did not go idle with the VM stopped")
            await asyncio.sleep(0)

    def load_functions(self, res: PasidMigrationResult) -> None:
        """After switch-over, while QEMU sends its last RAM and device state (the source VM
        stays stopped, so its functions are frozen; the destination's run only after
        ``cont``): every function's registers, portal and config space. Type, width and
        bindings were checked before the switch-over (start and engine import)."""
        t0 = time.perf_counter()
        fstream = encode_functions(self.src_rig.functions)
        res.function_stream_bytes = len(fstream)
        records = decode_functions(fstream)
        for f in self.dst_rig.functions:
            f.load_migration_state(records[f.guest_rid])
        res.function_state_ms = (time.perf_counter() - t0) * 1e3

    def changed_config(self) -> dict[int, dict[int, int]]:
        """Functions whose (source) config differs from what the pre-copy wrote."""
        out: dict[int, dict[int, int]] = {}
        for f in self.src_rig.functions:
            now = config_fields(bytes(f.config.data))
            if now != self.config.get(f.guest_rid):
                out[f.guest_rid] = now
        return out


async def _wait(ev: EventStream, want: set[str], timeout: float, on: Callable[[Any], None]) -> str:
    return await steps.wait_status(ev, want, timeout, on, TimeoutError)


async def _wait_destination(ev: EventStream, dst: Qmp, timeout: float) -> None:
    """Until the destination's own MIGRATION says completed. A destination that died (its QMP
    gone, e.g. killed after the source sent everything) raises within seconds, not at
    ``timeout``: then the source, which thinks it is done, is resumed by the caller."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            status = await _wait(ev, {"completed"}, min(1.0, max(left, 0.0)), lambda _e: None)
        except (TimeoutError, QmpTimeout):
            if left <= 1.0:
                raise TimeoutError("the destination did not complete in time") from None
            await dst.execute("query-status", timeout=5.0)  # QmpError: the destination is gone
            continue
        if status != "completed":
            raise PasidMigrationError(f"the destination's migration {status}")
        return


async def _resume_source(src: Qmp) -> bool:
    """After a failure once the source completed (``postmigrate``: it sent everything and
    stopped, but no destination runs): run it again, its functions untouched. True if it did."""
    with contextlib.suppress(QmpError):
        if await src.query_status() == "postmigrate":
            log.warning("the destination did not take over: resuming the source")
            await src.execute("cont")
            return True
    return False


async def migrate_pasid(
    src: Qmp,
    dst: Qmp,
    src_rig: PasidDmaRig,
    dst_rig: PasidDmaRig,
    uri: str,
    *,
    vfio_user: bool = True,
    timeout: float = 300.0,
    precopy: bool = True,
    max_bandwidth: int | None = steps.DEFAULT_MAX_BANDWIDTH,
    hook: Hook | None = None,
) -> PasidMigrationResult:
    """Migrate the guest of ``src`` (served by ``src_rig``) to ``dst`` (``-S -incoming
    defer``, served by ``dst_rig``) over ``uri``; see the module docstring. ``vfio_user``:
    whether the QEMU has vfio-user-pci (False: refused, QEMU 10.0). ``hook(phase)`` (tests)
    runs at "precopy", "switchover" and "loaded" (after the engine import)."""
    guard = src_rig.guard
    if guard is not None:
        guard.ours = True  # this migration is vioasid's own
    try:
        return await _migrate_pasid(
            src, dst, src_rig, dst_rig, uri, vfio_user=vfio_user, timeout=timeout,
            precopy=precopy, max_bandwidth=max_bandwidth, hook=hook,
        )  # fmt: skip
    finally:
        for f in src_rig.functions:
            f.dirty = None
        if guard is not None:
            guard.ours = False


async def _migrate_pasid(
    src: Qmp,
    dst: Qmp,
    src_rig: PasidDmaRig,
    dst_rig: PasidDmaRig,
    uri: str,
    *,
    vfio_user: bool,
    timeout: float,
    precopy: bool,
    max_bandwidth: int | None,
    hook: Hook | None,
) -> PasidMigrationResult:
    res = PasidMigrationResult()
    m = _PasidMigration(src, dst, src_rig, dst_rig, hook)
    res.bindings = [
        BindingMove(bdf_str(f.guest_rid), f.ftype.word, x, pp, None)
        for f in src_rig.functions
        for x, pp in sorted(f.bound.items())
    ]
    why = _start_refusal(src_rig, dst_rig, vfio_user)
    if why is None:
        diffs = iommu_differences(await iommu_config(src), await iommu_config(dst))
        why = "vIOMMU configurations differ: " + "; ".join(diffs) if diffs else None
    if why is not None:
        res.status, res.error, res.refused_at = "refused", why, "start"
        log.warning("PASID migration refused: %s", why)
        m.drop_destination()
        return await _finish(res, src, dst)

    # pre-copy the PCI config of every function (the VM runs; the destination has not started)
    for f in src_rig.functions:
        m.config[f.guest_rid] = await read_config(src, f.guest_rid)
        await write_config(dst, f.guest_rid, m.config[f.guest_rid])
    m.held = await steps.set_up(src, dst, max_bandwidth=max_bandwidth, hold=precopy)

    stop_t: float | None = None

    def on_src(e: Any) -> None:
        nonlocal stop_t
        if e.get("event") == STOP and stop_t is None:
            stop_t = time.perf_counter()
        elif e.get("event") == MIGRATION_PASS and int(e.get("data", {}).get("pass", 0)) >= 2:
            m.pass_seen.set()

    dst_runs = False
    async with src.events(MIGRATION, MIGRATION_PASS, STOP) as sev, dst.events(MIGRATION) as dev:
        try:
            for f in src_rig.functions:
                f.dirty = set()  # DMA writes QEMU's dirty log will not see
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            if precopy:
                m.task = asyncio.create_task(m.precopy())
            status = await _wait(sev, {"pre-switchover", "completed"}, timeout, on_src)
            if status != "pre-switchover":
                await m.settle()
                m.drop_destination()
                res.status, res.error = status, f"migration {status} before switch-over"
                return await _finish(res, src, dst)
            try:
                await m.switchover(res)
            except _Refused as exc:
                res.status, res.refused_at = "refused", "switchover"
                res.error = f"the destination cannot re-create the bindings: {exc}"
                log.warning("%s; cancelling the migration (the source keeps running)", res.error)
                await src.execute("migrate_cancel")
                with contextlib.suppress(TimeoutError, QmpError):
                    await _wait(sev, {"cancelled"}, 30.0, on_src)
                with contextlib.suppress(QmpError):
                    await dst.execute("quit", timeout=5.0)
                return await _finish(res, src, None)
            res.precopy_ms = getattr(m, "pre_ms", None)
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            m.load_functions(res)  # overlaps QEMU's completion
            status = await _wait(sev, {"completed"}, timeout, on_src)
            if status != "completed":
                m.drop_destination()
                res.status, res.error = status, f"migration {status} after switch-over"
                return await _finish(res, src, None)
            # the destination has loaded everything once its own MIGRATION says completed
            try:
                await m._hook("completed")
                await _wait_destination(dev, dst, timeout)
            except (QmpError, TimeoutError, PasidMigrationError) as exc:
                # the source sent everything and stopped, but nothing runs the guest: the
                # destination keeps nothing and the source runs on, its functions untouched
                await m.settle()
                m.drop_destination()
                await _resume_source(src)
                res.status = "failed"
                res.error = f"the destination did not take over after the source completed: {exc}"
                log.warning("%s; the source keeps running", res.error)
                return await _finish(res, src, None)
            t0 = time.perf_counter()
            # the pages the functions wrote during the migration, final (the VM is stopped),
            # after everything QEMU loaded
            frames = set().union(*(f.dirty or set() for f in src_rig.functions))
            pages = encode_pages(src_rig.memory, frames)
            res.dma_pages = apply_pages(dst_rig.memory, pages)
            res.dma_pages_bytes = len(pages)
            changed = m.changed_config()
            for rid, vals in changed.items():
                await write_config(dst, rid, vals)
            res.config_rewritten = len(changed)
            dst_rig.set_registers(VtdRegisterReader(dst))
            t1 = time.perf_counter()
            await dst.execute("cont")
            dst_runs = True
            t2 = time.perf_counter()
            res.vioasid_resume_ms = (t1 - t0) * 1e3
            res.cont_ms = (t2 - t1) * 1e3
            if stop_t is not None:
                res.observed_downtime_ms = (t2 - stop_t) * 1e3
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await src.execute("migrate_cancel", timeout=5.0)
            resumed = False
            if not dst_runs:  # never two running copies of the guest
                resumed = await _resume_source(src)
            await m.settle()
            m.drop_destination()
            if not (resumed and isinstance(exc, Exception)):
                raise
            # after the source completed: a failed attempt, the source running on
            res.status = "failed"
            res.error = f"the destination did not take over after the source completed: {exc}"
            log.warning("%s; the source keeps running", res.error)
            return await _finish(res, src, None)
    after = {(f.guest_rid, x): pp for f in dst_rig.functions for x, pp in f.bound.items()}
    rid_of = {bdf_str(f.guest_rid): f.guest_rid for f in dst_rig.functions}
    for b in res.bindings:
        b.ppasid_after = after.get((rid_of.get(b.device, -1), b.vpasid))
    res.ok, res.status = True, "completed"
    return await _finish(res, src, dst)


def _start_refusal(src: PasidDmaRig, dst: PasidDmaRig, vfio_user: bool) -> str | None:
    if not vfio_user:
        return "PASID DMA functions need QEMU 11.1 (vfio-user-pci); this QEMU cannot migrate them"
    a = {f.guest_rid: (f.ftype, f.width) for f in src.functions}
    b = {f.guest_rid: (f.ftype, f.width) for f in dst.functions}
    if a != b:
        return (
            "the destination's PASID DMA functions differ: source "
            + ", ".join(f"{bdf_str(r)} {t.word}/{w}" for r, (t, w) in sorted(a.items()))
            + "; destination "
            + ", ".join(f"{bdf_str(r)} {t.word}/{w}" for r, (t, w) in sorted(b.items()))
        )
    return None


async def _finish(res: PasidMigrationResult, src: Qmp, dst: Qmp | None) -> PasidMigrationResult:
    info, res.source_status = await steps.final_figures(src)
    res.downtime_ms = info.get("downtime")
    res.total_ms = info.get("total-time")
    if dst is not None:
        with contextlib.suppress(QmpError):
            res.dst_status = await dst.query_status()
    return res


__all__ = [
    "CONFIG_FIELDS",
    "BindingMove",
    "PasidMigrationError",
    "PasidMigrationResult",
    "config_address",
    "config_fields",
    "migrate_pasid",
    "read_config",
    "write_config",
]
