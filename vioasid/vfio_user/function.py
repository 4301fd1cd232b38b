"""A reusable vfio-user PCI Express function: config space, BARs, MSI, reset, DMA bookkeeping.

:class:`PciFunction` answers every vfio-user command QEMU 11.1's ``vfio-user-pci`` sends
(VERSION, DMA_MAP/UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO, DEVICE_GET_IRQ_INFO,
DEVICE_SET_IRQS, REGION_READ/WRITE, DEVICE_RESET) from :class:`~vioasid.vfio_user.codec.Message`
in to reply bytes out. It is not asyncio code: :mod:`vioasid.vfio_user.server` feeds it one
connection's messages strictly in order. A device model is one subclass overriding
:meth:`PciFunction.bar_read`, :meth:`PciFunction.bar_write` and :meth:`PciFunction.reset_device`
(docs/vfio-user-device.md; :class:`vioasid.device.pasid_dma.PasidDmaFunction` is the example).

What it keeps:

* **Config space** (:class:`~vioasid.vfio_user.config.ConfigSpace`): type-0 header, MSI (one
  vector, 64-bit, at 0x40), PCI Express (at 0x60, DEVCAP2 End-End TLP Prefix), PASID at 0x100,
  ATS and PRI when configured. RO fields ignore writes. MSI state (enable, address, data) lives
  there, so restoring config space restores it.
* **MSI**: DEVICE_SET_IRQS hands one eventfd per vector; :meth:`PciFunction.raise_msi` writes it
  when the guest enabled MSI in config space.
* **DMA_MAP/UNMAP**: every window QEMU maps (IOVA, size, prot, fd offset). Windows with an fd
  that arrive before the first DMA_UNMAP are guest RAM at IOVA == GPA (QEMU maps RAM while the
  guest's DMA translation is off; shared/design/qemu-notes.md "vfio-user-pci"): they stay mapped
  in :attr:`PciFunction.ram` for the life of the connection, as the VM's GPA -> memory map.
* :meth:`PciFunction.get_state` / :meth:`PciFunction.set_state`: config space + the device's
  own state, JSON-ready, for migration.

Hostile input: every length and offset is checked; a command that cannot run gets an error
reply with an errno; an exception from a device model is logged and answered with EIO.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from vioasid.formats import pci
from vioasid.formats import vfio_user as vu
from vioasid.formats.vfio_user import Command, PciIrq, PciRegion
from vioasid.model.memory import GuestMemory

from .codec import BadCommand, Message, encode_error, encode_reply, parse_payload, version_payload
from .config import ConfigSpace

log = logging.getLogger(__name__)

MSI_CAP_OFFSET = 0x40
PCIE_CAP_OFFSET = 0x60
PASID_CAP_OFFSET = 0x100
MAX_DMA_MAPS = 4096
_EVENTFD_ONE = struct.pack("<Q", 1)


@dataclass(frozen=True)
class Bar:
    """One memory BAR (PCI 3.0 §6.2.5.1): index, size (power of two ≥ 16), 64-bit or not."""

    index: int
    size: int
    is64: bool = True
    prefetchable: bool = False


@dataclass
class DmaWindow:
    """One DMA_MAP: the client's IOVA window and where it lives in the passed fd."""

    iova: int
    size: int
    readable: bool
    writable: bool
    fd_offset: int | None  # None: no fd (the server must use DMA_READ/WRITE)
    ram: bool = False  # kept in PciFunction.ram as guest RAM (IOVA == GPA)


@dataclass(frozen=True)
class Identity:
    """What the type-0 header says about the function."""

    vendor_id: int
    device_id: int
    class_code: int
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


class PciFunction:
    """One PCIe function presented over vfio-user. Subclass it for a device model."""

    def __init__(
        self,
        identity: Identity,
        bars: tuple[Bar, ...],
        *,
        name: str = "function",
        msi_vectors: int = 1,
        pasid_width: int | None = None,
        pasid_exec: bool = True,
        pasid_priv: bool = True,
        ats: bool = False,
        pri: bool = False,
    ) -> None:
        self.name = name
        self.identity = identity
        self.bars = {b.index: b for b in bars}
        for b in bars:
            if not 0 <= b.index <= 5 or b.size < 16 or b.size & (b.size - 1):
                raise ValueError(f"BAR{b.index}: size {b.size} is not a power of two >= 16")
        if not 1 <= msi_vectors <= 32 or msi_vectors & (msi_vectors - 1):
            raise ValueError("MSI vectors must be a power of two 1..32")
        if pasid_width is not None and not 1 <= pasid_width <= 20:
            raise ValueError("PASID width must be 1..20")
        self.msi_vectors = msi_vectors
        self.pasid_width = pasid_width
        self.config = ConfigSpace()
        self._build_config(pasid_exec, pasid_priv, ats, pri)
        self._config_reset = (bytes(self.config.data),)
        self.msi_eventfds: list[int | None] = [None] * msi_vectors
        self.msi_masked = [False] * msi_vectors
        self.windows: dict[int, DmaWindow] = {}
        self.ram = GuestMemory()
        self._unmapped_once = False
        self.negotiated = False
        self.client_caps: dict[str, Any] = {}
        self.interrupts_sent = 0

    # -- config space ------------------------------------------------------------------
    def _build_config(self, pasid_exec: bool, pasid_priv: bool, ats: bool, pri: bool) -> None:
        c = self.config
        ident = self.identity
        c.put(
            0,
            pci.TYPE0_HEADER.build(
                vendor_id=ident.vendor_id,
                device_id=ident.device_id,
                revision=ident.revision,
                prog_if=ident.class_code & 0xFF,
                subclass=ident.class_code >> 8 & 0xFF,
                class_code=ident.class_code >> 16 & 0xFF,
                header_type=pci.PCI_HEADER_TYPE_NORMAL,
                subsystem_vendor_id=ident.subsystem_vendor_id,
                subsystem_id=ident.subsystem_id,
            ),
        )
        c.set_wmask(pci.PCI_COMMAND, pci.PCI_COMMAND_WRITABLE, 2)
        c.set_w1c(pci.PCI_STATUS, 0xF900, 2)  # error bits 15:11 and 8 are RW1C
        c.set_wmask(pci.PCI_INTERRUPT_LINE, 0xFF, 1)
        c.set_wmask(0x0C, 0xFF, 1)  # cache line size
        skip = False
        for i in range(6):
            off = pci.PCI_BASE_ADDRESS_0 + 4 * i
            if skip:  # upper half of a 64-bit BAR
                skip = False
                continue
            b = self.bars.get(i)
            if b is None:
                continue
            low = pci.PCI_BASE_ADDRESS_SPACE_MEMORY
            if b.is64:
                low |= pci.PCI_BASE_ADDRESS_MEM_TYPE_64
            if b.prefetchable:
                low |= pci.PCI_BASE_ADDRESS_MEM_PREFETCH
            c.set_u32(off, low)
            c.set_wmask(off, ~(b.size - 1) & 0xFFFFFFF0, 4)
            if b.is64:
                if i == 5:
                    raise ValueError("a 64-bit BAR cannot start at BAR5")
                c.set_wmask(off + 4, 0xFFFFFFFF, 4)
                skip = True
        # MSI, 64-bit address, msi_vectors (Multiple Message Capable), no per-vector masking.
        qmask = (self.msi_vectors.bit_length() - 1) << 1
        c.add_cap(
            MSI_CAP_OFFSET,
            pci.MSI_CAP64.build(cap_id=pci.CapId.MSI, flags=pci.PCI_MSI_FLAGS_64BIT | qmask),
        )
        m = MSI_CAP_OFFSET
        c.set_wmask(m + pci.PCI_MSI_FLAGS, pci.PCI_MSI_FLAGS_ENABLE | pci.PCI_MSI_FLAGS_QSIZE, 2)
        c.set_wmask(m + pci.PCI_MSI_ADDRESS_LO, 0xFFFFFFFC, 4)
        c.set_wmask(m + pci.PCI_MSI_ADDRESS_HI, 0xFFFFFFFF, 4)
        c.set_wmask(m + pci.PCI_MSI_DATA_64, 0xFFFF, 2)
        # PCI Express capability v2, root-complex integrated endpoint (on q35's root bus).
        c.add_cap(
            PCIE_CAP_OFFSET,
            pci.PCIE_CAP.build(
                cap_id=pci.CapId.EXP,
                flags=2 | pci.PCI_EXP_TYPE_RC_END << pci.PCI_EXP_FLAGS_TYPE_SHIFT,
                devcap2=pci.PCI_EXP_DEVCAP2_EE_PREFIX,
            ),
        )
        c.set_wmask(PCIE_CAP_OFFSET + pci.PCI_EXP_DEVCTL, 0x7FFF, 2)
        c.set_wmask(PCIE_CAP_OFFSET + pci.PCI_EXP_DEVCTL2, 0xFFFF, 2)
        off = PASID_CAP_OFFSET
        if self.pasid_width is not None:
            cap = self.pasid_width << pci.PCI_PASID_CAP_WIDTH_SHIFT
            ctrl_w = pci.PCI_PASID_CTRL_ENABLE
            if pasid_exec:
                cap |= pci.PCI_PASID_CAP_EXEC
                ctrl_w |= pci.PCI_PASID_CTRL_EXEC
            if pasid_priv:
                cap |= pci.PCI_PASID_CAP_PRIV
                ctrl_w |= pci.PCI_PASID_CTRL_PRIV
            c.add_ext_cap(off, pci.ExtCapId.PASID, 1, struct.pack("<HH", cap, 0))
            c.set_wmask(off + pci.PCI_PASID_CTRL, ctrl_w, 2)
            off += pci.PASID_CAP.size
        if ats:
            c.add_ext_cap(off, pci.ExtCapId.ATS, 1, struct.pack("<HH", 0, 0))
            c.set_wmask(off + pci.PCI_ATS_CTRL, pci.PCI_ATS_CTRL_ENABLE | 0x1F, 2)
            off += pci.ATS_CAP.size
        if pri:
            c.add_ext_cap(off, pci.ExtCapId.PRI, 1, struct.pack("<HHII", 0, 0, 32, 0))
            c.set_wmask(off + pci.PCI_PRI_CTRL, pci.PCI_PRI_CTRL_ENABLE | pci.PCI_PRI_CTRL_RESET, 2)
            c.set_wmask(off + pci.PCI_PRI_ALLOC_REQ, 0xFFFFFFFF, 4)

    @property
    def msi_enabled(self) -> bool:
        return bool(self.config.u16(MSI_CAP_OFFSET + pci.PCI_MSI_FLAGS) & pci.PCI_MSI_FLAGS_ENABLE)

    @property
    def pasid_enabled(self) -> bool:
        off = self.config.find_ext_cap(pci.ExtCapId.PASID)
        return off is not None and bool(
            self.config.u16(off + pci.PCI_PASID_CTRL) & pci.PCI_PASID_CTRL_ENABLE
        )

    @property
    def bus_master(self) -> bool:
        return bool(self.config.u16(pci.PCI_COMMAND) & pci.PCI_COMMAND_MASTER)

    # -- device-model hooks (override) --------------------------------------------------------
    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """Bytes of a BAR read (bounds already checked). Default: zeros."""
        return bytes(count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """A BAR write (bounds already checked). Default: ignored."""

    def before_write(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """Called before :meth:`bar_write`; an awaitable returned here is awaited by the server
        first. Never wait on QEMU itself here (QMP): with non-posted writes the vCPU waits for
        this write's reply holding QEMU's big lock, so QMP would not answer (deadlock until
        QEMU's x-msg-timeout). Default: nothing."""
        return None

    def config_written(self, offset: int, data: bytes) -> None:
        """After a config-space write took effect. Default: nothing."""

    def reset_device(self) -> None:
        """DEVICE_RESET (function-level reset): the model's own state back to defaults."""

    def device_state(self) -> dict[str, Any]:
        """The model's own state for migration (JSON-ready)."""
        return {}

    def load_device_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`device_state` returned."""

    # -- interrupts --------------------------------------------------------------------------
    def raise_msi(self, vector: int = 0) -> bool:
        """Signal MSI ``vector`` if the guest enabled MSI and QEMU gave an eventfd for it."""
        if not 0 <= vector < self.msi_vectors or not self.msi_enabled:
            return False
        fd = self.msi_eventfds[vector]
        if fd is None or self.msi_masked[vector]:
            return False
        try:
            os.write(fd, _EVENTFD_ONE)
        except OSError as e:
            log.warning("%s: MSI eventfd write failed: %s", self.name, e)
            return False
        self.interrupts_sent += 1
        return True

    # -- dispatch ----------------------------------------------------------------------------
    def pending(self, msg: Message) -> Awaitable[None] | None:
        """What the server must await before :meth:`handle` (the model's ``before_write``)."""
        if msg.cmd != Command.REGION_WRITE or len(msg.payload) < vu.REGION_RW.size:
            return None
        offset, region, count = vu.REGION_RW.packer.unpack_from(msg.payload, 0)
        if region not in self.bars or count != len(msg.payload) - vu.REGION_RW.size:
            return None
        if offset + count > self.bars[region].size:
            return None
        return self.before_write(region, offset, msg.payload[vu.REGION_RW.size :])

    def handle(self, msg: Message) -> bytes | None:
        """Execute one command; the reply bytes (None when the client asked for none).
        Never raises: an unusable command becomes an error reply. Fds not kept are closed."""
        try:
            payload = self._dispatch(msg)
            out: bytes | None = encode_reply(msg.id, msg.cmd, payload)
        except BadCommand as e:
            log.info("%s: %s", self.name, e)
            out = encode_error(msg.id, msg.cmd, e.errno)
        except Exception:  # a device-model bug must not take down the loop or other VMs
            log.exception("%s: command %d failed", self.name, msg.cmd)
            out = encode_error(msg.id, msg.cmd, errno.EIO)
        finally:
            msg.close_fds()
        return None if msg.no_reply else out

    def _dispatch(self, msg: Message) -> bytes:
        p = parse_payload(msg)
        cmd = Command(msg.cmd)
        if cmd is not Command.VERSION and not self.negotiated:
            raise BadCommand(errno.EINVAL, f"{cmd.name} before VERSION")
        if cmd is not Command.DMA_MAP and cmd is not Command.DEVICE_SET_IRQS and msg.fds:
            raise BadCommand(errno.EINVAL, f"{cmd.name} carries {len(msg.fds)} unexpected fds")
        handler = getattr(self, "_cmd_" + cmd.name.lower(), None)
        if handler is None:
            raise BadCommand(errno.ENOSYS, f"{cmd.name} is not supported")
        result: bytes = handler(msg, p)
        return result

    def _cmd_version(self, msg: Message, p: dict[str, Any]) -> bytes:
        if p["major"] != vu.VERSION_MAJOR:
            raise BadCommand(errno.EINVAL, f"client speaks vfio-user {p['major']}.{p['minor']}")
        self.client_caps = p["caps"]
        self.negotiated = True
        caps = {
            vu.CAP_MAX_FDS: vu.DEF_MAX_FDS,
            vu.CAP_MAX_XFER: vu.DEF_MAX_XFER,
            vu.CAP_PGSIZES: vu.DEF_PGSIZE,
            vu.CAP_MAP_MAX: MAX_DMA_MAPS,
        }
        return version_payload(caps, vu.VERSION_MAJOR, vu.VERSION_MINOR)

    def _cmd_device_get_info(self, msg: Message, p: dict[str, Any]) -> bytes:
        if p["argsz"] < vu.DEVICE_INFO.size:
            raise BadCommand(errno.EINVAL, "DEVICE_GET_INFO: argsz too small")
        return vu.DEVICE_INFO.packer.pack(
            vu.DEVICE_INFO.size,
            vu.DEVICE_FLAGS_RESET | vu.DEVICE_FLAGS_PCI,
            vu.PCI_NUM_REGIONS,
            vu.PCI_NUM_IRQS,
        )

    def _region_size(self, index: int) -> int:
        if index == PciRegion.CONFIG:
            return self.config.size
        b = self.bars.get(index)
        return b.size if b is not None else 0

    def _cmd_device_get_region_info(self, msg: Message, p: dict[str, Any]) -> bytes:
        index = p["index"]
        if p["argsz"] < vu.REGION_INFO.size or index >= vu.PCI_NUM_REGIONS:
            raise BadCommand(errno.EINVAL, f"DEVICE_GET_REGION_INFO: region {index}")
        size = self._region_size(index)
        flags = vu.REGION_INFO_FLAG_READ | vu.REGION_INFO_FLAG_WRITE if size else 0
        return vu.REGION_INFO.packer.pack(vu.REGION_INFO.size, flags, index, 0, size, 0)

    def _cmd_device_get_irq_info(self, msg: Message, p: dict[str, Any]) -> bytes:
        index = p["index"]
        if p["argsz"] < vu.IRQ_INFO.size or index >= vu.PCI_NUM_IRQS:
            raise BadCommand(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: index {index}")
        count = self.msi_vectors if index == PciIrq.MSI else 0
        flags = vu.IRQ_INFO_EVENTFD | vu.IRQ_INFO_NORESIZE if count else 0
        return vu.IRQ_INFO.packer.pack(vu.IRQ_INFO.size, flags, index, count)

    def _cmd_device_set_irqs(self, msg: Message, p: dict[str, Any]) -> bytes:
        index, start, count, flags = p["index"], p["start"], p["count"], p["flags"]
        data_t = flags & vu.IRQ_SET_DATA_MASK
        action = flags & vu.IRQ_SET_ACTION_MASK_ALL
        if (
            flags & ~(vu.IRQ_SET_DATA_MASK | vu.IRQ_SET_ACTION_MASK_ALL)
            or bin(data_t).count("1") != 1
            or bin(action).count("1") != 1
        ):
            raise BadCommand(errno.EINVAL, f"DEVICE_SET_IRQS: flags {flags:#x}")
        if index != PciIrq.MSI:
            if count == 0 and data_t == vu.IRQ_SET_DATA_NONE:
                return b""  # "disable all" of an index we do not have: nothing to do
            raise BadCommand(errno.EINVAL, f"DEVICE_SET_IRQS: IRQ index {index} has no vectors")
        if count == 0 and data_t == vu.IRQ_SET_DATA_NONE and action == vu.IRQ_SET_ACTION_TRIGGER:
            self._release_msi(0, self.msi_vectors)
            return b""
        if start >= self.msi_vectors or count > self.msi_vectors - start:
            raise BadCommand(errno.EINVAL, f"DEVICE_SET_IRQS: vectors {start}+{count}")
        if action != vu.IRQ_SET_ACTION_TRIGGER:
            masked = action == vu.IRQ_SET_ACTION_MASK
            for v in range(start, start + count):
                self.msi_masked[v] = masked
            return b""
        if data_t == vu.IRQ_SET_DATA_EVENTFD:
            if not msg.fds:  # QEMU sends no fds to tear the vectors down
                self._release_msi(start, count)
                return b""
            if len(msg.fds) != count:
                raise BadCommand(errno.EINVAL, f"SET_IRQS: {count} vectors, {len(msg.fds)} fds")
            self._release_msi(start, count)
            for i, fd in enumerate(msg.fds):
                self.msi_eventfds[start + i] = fd
            msg.fds.clear()  # kept
            return b""
        for v in range(start, start + count):  # DATA_NONE / DATA_BOOL: loopback trigger
            self.raise_msi(v)
        return b""

    def _release_msi(self, start: int, count: int) -> None:
        for v in range(start, start + count):
            fd = self.msi_eventfds[v]
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.msi_eventfds[v] = None

    def _cmd_region_read(self, msg: Message, p: dict[str, Any]) -> bytes:
        offset, region, count = p["offset"], p["region"], p["count"]
        size = self._region_size(region)
        if count == 0 or offset >= size or count > size - offset:
            raise BadCommand(errno.EINVAL, f"REGION_READ region {region} {offset:#x}+{count}")
        if region == PciRegion.CONFIG:
            data = self.config.read(offset, count)
        else:
            data = self.bar_read(region, offset, count)
            if len(data) != count:
                raise BadCommand(errno.EIO, f"BAR{region} read returned {len(data)} bytes")
        return vu.REGION_RW.packer.pack(offset, region, count) + data

    def _cmd_region_write(self, msg: Message, p: dict[str, Any]) -> bytes:
        offset, region, count, data = p["offset"], p["region"], p["count"], p["data"]
        size = self._region_size(region)
        if count == 0 or offset >= size or count > size - offset:
            raise BadCommand(errno.EINVAL, f"REGION_WRITE region {region} {offset:#x}+{count}")
        if region == PciRegion.CONFIG:
            self.config.write(offset, data)
            self.config_written(offset, data)
        else:
            self.bar_write(region, offset, data)
        return vu.REGION_RW.packer.pack(offset, region, count)

    def _cmd_device_reset(self, msg: Message, p: dict[str, Any]) -> bytes:
        self.reset()
        return b""

    def reset(self) -> None:
        """Function-level reset: config space to its defaults, MSI off, the model's reset."""
        self.config.data[:] = self._config_reset[0]
        self.reset_device()

    def _cmd_dma_map(self, msg: Message, p: dict[str, Any]) -> bytes:
        iova, size, flags, off = p["address"], p["size"], p["flags"], p["offset"]
        if size == 0 or iova + size > 1 << 64 or iova & 0xFFF or size & 0xFFF:
            raise BadCommand(errno.EINVAL, f"DMA_MAP {iova:#x}+{size:#x}")
        if flags & ~(vu.DMA_MAP_FLAG_READ | vu.DMA_MAP_FLAG_WRITE) or len(msg.fds) > 1:
            raise BadCommand(errno.EINVAL, f"DMA_MAP flags {flags:#x} / {len(msg.fds)} fds")
        if len(self.windows) >= MAX_DMA_MAPS:
            raise BadCommand(errno.ENOSPC, "DMA_MAP: too many windows")
        for w in self.windows.values():
            if iova < w.iova + w.size and w.iova < iova + size:
                raise BadCommand(errno.EEXIST, f"DMA_MAP {iova:#x}+{size:#x} overlaps {w.iova:#x}")
        writable = bool(flags & vu.DMA_MAP_FLAG_WRITE)
        win = DmaWindow(iova, size, bool(flags & vu.DMA_MAP_FLAG_READ), writable, None)
        if msg.fds:
            win.fd_offset = off
            if not self._unmapped_once and not self.ram.contains(iova, size):
                try:
                    self.ram.add_fd(msg.fds[0], off, size, iova, writable=writable, name="ram")
                except (OSError, ValueError) as e:
                    raise BadCommand(errno.EINVAL, f"DMA_MAP: cannot map the fd: {e}") from e
                win.ram = True
        self.windows[iova] = win
        log.debug("%s: DMA_MAP %#x+%#x fd=%s ram=%s", self.name, iova, size, bool(msg.fds), win.ram)
        return b""

    def _cmd_dma_unmap(self, msg: Message, p: dict[str, Any]) -> bytes:
        iova, size, flags = p["address"], p["size"], p["flags"]
        if flags & vu.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise BadCommand(errno.ENOTSUP, "DMA_UNMAP: dirty bitmaps are not supported")
        if flags & ~vu.DMA_UNMAP_FLAG_ALL:
            raise BadCommand(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        self._unmapped_once = True
        if flags & vu.DMA_UNMAP_FLAG_ALL:
            self.windows.clear()
        else:
            end = iova + size
            if end > 1 << 64:
                raise BadCommand(errno.EINVAL, f"DMA_UNMAP {iova:#x}+{size:#x}")
            gone = []
            for k, w in self.windows.items():
                if w.iova < end and iova < w.iova + w.size:
                    if w.iova < iova or w.iova + w.size > end:  # VFIO type1: no bisecting
                        raise BadCommand(
                            errno.EINVAL, f"DMA_UNMAP {iova:#x}+{size:#x} splits {w.iova:#x}"
                        )
                    gone.append(k)
            for k in gone:  # a range with nothing mapped is fine (QEMU sweeps its IOVA space)
                del self.windows[k]
        return vu.DMA_UNMAP.packer.pack(vu.DMA_UNMAP.size, flags, iova, size)

    # -- migration -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Config space (MSI included) and the model's state, JSON-ready."""
        return {
            "config": base64.b64encode(bytes(self.config.data)).decode(),
            "device": self.device_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        raw = base64.b64decode(state["config"])
        if len(raw) != self.config.size:
            raise ValueError("config space of the wrong size")
        self.config.data[:] = raw
        self.load_device_state(state.get("device", {}))

    def connection_lost(self) -> None:
        """The client (QEMU) went away: release what the connection handed over. A model that
        holds more (bindings) overrides this and calls ``super().connection_lost()``."""
        self.close()

    def close(self) -> None:
        """Release eventfds and forget the DMA windows (the RAM mappings stay until GC)."""
        self._release_msi(0, self.msi_vectors)
        self.windows.clear()
        self.negotiated = False
