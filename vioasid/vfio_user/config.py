"""A PCI Express function's configuration space: bytes, write masks, capability builders.

:class:`ConfigSpace` keeps the 4 KiB configuration space with a per-byte write mask and a
per-byte RW1C mask. A write changes only the writable bits (``new = old & ~wmask | val &
wmask``); RW1C bits clear where a 1 is written; read-only fields keep their value whatever the
guest writes (PCIe 4.0 §7.4 register attributes RO/RW/RW1C). Layouts and bit names come from
:mod:`vioasid.formats.pci`.
"""

from __future__ import annotations

import struct

from vioasid.formats import pci

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ConfigSpace:
    """Configuration space with read-only masks. Out-of-range accesses read 0 / are dropped."""

    def __init__(self, size: int = pci.CONFIG_SPACE_EXP_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self._last_cap = 0  # offset of the last standard capability (0: none yet)
        self._last_ext = 0

    # -- guest accesses ------------------------------------------------------------------
    def read(self, off: int, count: int) -> bytes:
        if off < 0 or count < 0 or off >= self.size:
            return bytes(count)
        end = min(off + count, self.size)
        return bytes(self.data[off:end]) + bytes(count - (end - off))

    def write(self, off: int, value: bytes) -> None:
        if off < 0 or off >= self.size:
            return
        data, wm, cm = self.data, self.wmask, self.w1cmask
        for i, b in enumerate(value[: self.size - off]):
            o = off + i
            old = data[o]
            data[o] = ((old & ~wm[o]) | (b & wm[o])) & ~(b & cm[o]) & 0xFF

    # -- device-side helpers ---------------------------------------------------------------
    def u8(self, off: int) -> int:
        return self.data[off]

    def u16(self, off: int) -> int:
        return int(_U16.unpack_from(self.data, off)[0])

    def u32(self, off: int) -> int:
        return int(_U32.unpack_from(self.data, off)[0])

    def set_u16(self, off: int, v: int) -> None:
        _U16.pack_into(self.data, off, v & 0xFFFF)

    def set_u32(self, off: int, v: int) -> None:
        _U32.pack_into(self.data, off, v & 0xFFFFFFFF)

    def set_wmask(self, off: int, mask: int, width: int) -> None:
        self.wmask[off : off + width] = (mask & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def set_w1c(self, off: int, mask: int, width: int) -> None:
        self.w1cmask[off : off + width] = (mask & ((1 << 8 * width) - 1)).to_bytes(width, "little")

    def put(self, off: int, raw: bytes) -> None:
        self.data[off : off + len(raw)] = raw

    # -- capability lists -------------------------------------------------------------------
    def add_cap(self, off: int, raw: bytes) -> None:
        """Link a standard capability (its first byte is the id) at ``off`` (PCI 3.0 §6.7)."""
        if off < 0x40 or off + len(raw) > pci.CONFIG_SPACE_SIZE or off & 3:
            raise ValueError(f"capability at {off:#x} outside 0x40..0xff or unaligned")
        self.put(off, raw)
        self.data[off + 1] = 0
        if self._last_cap:
            self.data[self._last_cap + 1] = off
        else:
            self.data[pci.PCI_CAPABILITY_LIST] = off
            self.set_u16(pci.PCI_STATUS, self.u16(pci.PCI_STATUS) | pci.PCI_STATUS_CAP_LIST)
        self._last_cap = off

    def add_ext_cap(self, off: int, cap_id: int, version: int, body: bytes) -> None:
        """Link an extended capability at ``off`` (≥ 0x100; PCIe 4.0 §7.6.3)."""
        if off < pci.EXT_CAP_START or off + 4 + len(body) > self.size or off & 3:
            raise ValueError(f"extended capability at {off:#x} outside config space")
        self.set_u32(off, pci.ext_cap_header(cap_id, version, 0))
        self.put(off + 4, body)
        if self._last_ext:
            hdr = self.u32(self._last_ext)
            self.set_u32(self._last_ext, (hdr & 0xFFFFF) | (off << 20))
        self._last_ext = off

    def find_cap(self, cap_id: int) -> int | None:
        """Offset of a standard capability, walking the list (bounded)."""
        off = self.data[pci.PCI_CAPABILITY_LIST] & ~3
        for _ in range(48):
            if off < 0x40:
                return None
            if self.data[off] == cap_id:
                return off
            off = self.data[off + 1] & ~3
        return None

    def find_ext_cap(self, cap_id: int) -> int | None:
        off = pci.EXT_CAP_START
        for _ in range(960):
            hdr = self.u32(off)
            if hdr & 0xFFFF == cap_id:
                return off
            off = hdr >> 20 & 0xFFC
            if off < pci.EXT_CAP_START:
                return None
        return None
