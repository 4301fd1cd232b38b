"""Fixed-size little-endian records: one field table, two speeds.

Each structure is declared once as a field table of (name, struct code). From that one table
come the construct ``Struct`` (``.struct``: parse/build, docs, tests), a precompiled
``struct.Struct`` (``.packer``: the hot path, ``unpack_from``/``pack_into``) and the field
offsets (``.offsets``). Used by the virtio/vhost-user, vfio-user, PCI and PASID DMA layouts.
"""

from __future__ import annotations

import struct
from typing import Any

import construct as cs

_CODES: dict[str, Any] = {
    "B": cs.Int8ul,
    "H": cs.Int16ul,
    "I": cs.Int32ul,
    "Q": cs.Int64ul,
}


class Record:
    """A fixed-size little-endian record: one field table, a construct Struct and a packer."""

    def __init__(self, name: str, fields: tuple[tuple[str, str], ...], doc: str = "") -> None:
        self.name = name
        self.fields = fields
        self.doc = doc
        parts: list[Any] = []
        fmt = "<"
        self.offsets: dict[str, int] = {}  # field -> byte offset (packed, no alignment)
        for fname, code in fields:
            self.offsets[fname] = struct.calcsize(fmt)
            if code.endswith("x"):
                parts.append(fname / cs.Padding(int(code[:-1] or "1")))
            else:
                parts.append(fname / _CODES[code])
            fmt += code
        self.struct: Any = cs.Struct(*parts)
        self.packer = struct.Struct(fmt)
        self.size = self.packer.size
        self.names = tuple(n for n, c in fields if not c.endswith("x"))

    def parse(self, data: bytes | bytearray | memoryview) -> dict[str, int]:
        """Named fields of the first ``size`` bytes of ``data`` (checked by construct)."""
        c = self.struct.parse(bytes(data[: self.size]))
        return {n: int(c[n]) for n in self.names}

    def build(self, **values: int) -> bytes:
        """Bytes of the record; missing fields are 0."""
        data: bytes = self.struct.build({n: values.get(n, 0) for n in self.names})
        return data
