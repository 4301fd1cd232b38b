"""The emulated VT-d unit's registers, read from the host through QMP (HMP ``xp``).

QEMU has no QMP command for the intel-iommu registers, but its MMIO window (DMAR base
0xfed90000 on q35) can be read with ``xp``: ~0.7 ms per register. Field meanings come from
:mod:`vioasid.formats.registers` (one source of truth).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from qemu_glue.qemu.qmp import Qmp, QmpTimeout
from vioasid.formats.registers import (
    DMAR_BASE_Q35,
    GSTS,
    IQA,
    REG_CAP,
    REG_ECAP,
    REG_GSTS,
    REG_IQA,
    REG_IQH,
    REG_IQT,
    REG_RTADDR,
    RTADDR,
    iq_entries,
    is_scalable,
)

_TES = GSTS.field("TES")
_RTPS = GSTS.field("RTPS")
_QIES = GSTS.field("QIES")
_RTA = RTADDR.field("RTA")
_IQ_BASE = IQA.field("IQA")


@dataclass(frozen=True)
class VtdRegisters:
    """One snapshot of the registers vioasid follows."""

    cap: int
    ecap: int
    gsts: int
    rtaddr: int
    iqa: int
    iqh: int
    iqt: int

    @property
    def scalable(self) -> bool:
        """RTADDR.TTM says scalable mode."""
        return is_scalable(self.rtaddr)

    @property
    def translation_enabled(self) -> bool:
        """GSTS.TES: DMA remapping on (off: addresses are guest-physical)."""
        return bool(_TES.get(self.gsts))

    @property
    def root_table_set(self) -> bool:
        return bool(_RTPS.get(self.gsts))

    @property
    def queued_invalidation(self) -> bool:
        return bool(_QIES.get(self.gsts))

    @property
    def root_table(self) -> int:
        """Guest-physical address of the root table."""
        return _RTA.get(self.rtaddr)

    @property
    def iq_base(self) -> int:
        return _IQ_BASE.get(self.iqa)

    @property
    def iq_entries(self) -> int:
        return iq_entries(self.iqa)

    def key(self) -> tuple[int, int]:
        """What a change of configuration is judged by (GSTS, RTADDR)."""
        return (self.gsts, self.rtaddr)


class VtdRegisterReader:
    """Reads the VT-d registers of a running QEMU; re-reads when GSTS/RTADDR change."""

    def __init__(self, qmp: Qmp, base: int = DMAR_BASE_Q35) -> None:
        self.qmp = qmp
        self.base = base
        self.last: VtdRegisters | None = None

    async def read_u64(self, offset: int) -> int:
        return await self.qmp.read_phys_u64(self.base + offset)

    async def read_u32(self, offset: int) -> int:
        return await self.qmp.read_phys_u32(self.base + offset)

    async def rtaddr(self) -> int:
        return await self.read_u64(REG_RTADDR)

    async def gsts(self) -> int:
        return await self.read_u32(REG_GSTS)

    async def snapshot(self) -> VtdRegisters:
        regs = VtdRegisters(
            cap=await self.read_u64(REG_CAP),
            ecap=await self.read_u64(REG_ECAP),
            gsts=await self.read_u32(REG_GSTS),
            rtaddr=await self.read_u64(REG_RTADDR),
            iqa=await self.read_u64(REG_IQA),
            iqh=await self.read_u64(REG_IQH),
            iqt=await self.read_u64(REG_IQT),
        )
        self.last = regs
        return regs

    async def refresh_if_changed(self) -> tuple[VtdRegisters, bool]:
        """Cheap check (GSTS + RTADDR); a full re-read only if they changed since last time."""
        if self.last is None:
            return await self.snapshot(), True
        key = (await self.gsts(), await self.rtaddr())
        if key == self.last.key():
            return self.last, False
        return await self.snapshot(), True

    async def wait_until(
        self,
        predicate: Callable[[VtdRegisters], bool],
        timeout: float,
        poll_s: float = 0.05,
    ) -> VtdRegisters:
        """Poll until ``predicate(regs)`` holds (e.g. ``lambda r: r.translation_enabled``)."""
        deadline = time.monotonic() + timeout
        while True:
            regs, _ = await self.refresh_if_changed()
            if predicate(regs):
                return regs
            if time.monotonic() >= deadline:
                raise QmpTimeout("vtd-regs", f"condition not met within {timeout:.1f}s: {regs}")
            await asyncio.sleep(poll_s)

    async def watch(self, poll_s: float = 0.05) -> AsyncGenerator[VtdRegisters, None]:
        """Yield the registers now and then every time GSTS or RTADDR change (polling).

        Polls until closed: ``async with contextlib.aclosing(reader.watch()) as regs:``.
        Cancelling a pending ``anext()`` stops it too (the QMP call in flight is abandoned).
        """
        regs, _ = await self.refresh_if_changed()
        yield regs
        while True:
            await asyncio.sleep(poll_s)
            regs, changed = await self.refresh_if_changed()
            if changed:
                yield regs
