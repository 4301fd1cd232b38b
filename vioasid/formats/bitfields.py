"""Little-endian 64-bit words split into named bit fields, as construct definitions.

VT-d structures are arrays of little-endian 64-bit words with bit fields (LSB = 0). Each word is
declared once as a table of :class:`Field` (name, low bit, high bit). From that one table come
both the construct parser/builder (an ``Adapter`` over ``Int64ul`` yielding a ``Container`` of
named fields) and the precomputed masks/shifts the translation hot path uses with
``struct.unpack_from``. There is no second description of any layout.

The hot path reads fields through code generated from the same tables: :meth:`Layout.decoder`
builds ``words -> value(s)`` with the masks and shifts written as literals, and :func:`render`
turns a Python template naming fields symbolically (``$PE.FLPM(w2)``, ``$PE.P``,
``$PE.rsvd0``) into source with those literals, for a walk that must not pay for a lookup per
field.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import construct as cs

U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Field:
    """One bit field ``[hi:lo]`` of a 64-bit word.

    ``addr`` fields (table pointers, page addresses) are kept in place: their value is the word
    masked, not shifted, so a parsed ``SSPTPTR`` is the address itself.
    """

    name: str
    lo: int
    hi: int
    addr: bool = False
    doc: str = ""

    # computed once per field (the instance dict answers later reads)
    @functools.cached_property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @functools.cached_property
    def vmask(self) -> int:
        """Mask of the value once shifted down to bit 0."""
        return (1 << self.width) - 1

    @functools.cached_property
    def mask(self) -> int:
        """Mask of the field in place in its word."""
        return self.vmask << self.lo

    def expr(self, word: str) -> str:
        """Python source reading this field from the variable ``word``, masks as literals;
        a one-bit field reads as a bool, an ``addr`` field in place."""
        if self.addr:
            return f"({word} & {self.mask:#x})"
        if self.width == 1:
            return f"({word} & {self.mask:#x} != 0)"
        if self.lo == 0:
            return f"({word} & {self.vmask:#x})"
        return f"(({word} >> {self.lo}) & {self.vmask:#x})"

    def get(self, word: int) -> int:
        if self.addr:
            return word & self.mask
        return (word >> self.lo) & self.vmask

    def put(self, value: int) -> int:
        if self.addr:
            if value & ~self.mask:
                raise ValueError(f"{self.name}: 0x{value:x} does not fit bits {self.hi}:{self.lo}")
            return value
        if value < 0 or value > self.vmask:
            raise ValueError(f"{self.name}: {value} does not fit {self.width} bits")
        return value << self.lo


class Word:
    """A 64-bit little-endian word made of fields; bits no field names are reserved.

    ``reserved`` overrides the computed reserved mask (for words whose spare bits are ignored
    rather than reserved, or reserved only in some modes).
    """

    def __init__(self, name: str, fields: Iterable[Field], reserved: int | None = None) -> None:
        self.name = name
        self.fields: tuple[Field, ...] = tuple(fields)
        used = 0
        for f in self.fields:
            if f.lo < 0 or f.hi > 63 or f.lo > f.hi:
                raise ValueError(f"{name}.{f.name}: bad bit range {f.hi}:{f.lo}")
            if used & f.mask:
                raise ValueError(f"{name}.{f.name}: overlaps another field")
            used |= f.mask
        self.used = used
        self.reserved = (~used & U64) if reserved is None else reserved
        self.by_name = {f.name: f for f in self.fields}
        self.construct: cs.Construct = _WordAdapter(self)

    def decode(self, value: int) -> dict[str, int]:
        return {f.name: f.get(value) for f in self.fields}

    def encode(self, values: Mapping[str, int]) -> int:
        word = 0
        for key, val in values.items():
            if key.startswith("_"):
                continue
            f = self.by_name.get(key)
            if f is None:
                raise KeyError(f"{self.name} has no field {key!r}")
            word |= f.put(int(val))
        return word


class _WordAdapter(cs.Adapter):  # type: ignore[misc]
    """construct adapter: Int64ul <-> Container of the word's named fields."""

    def __init__(self, word: Word) -> None:
        super().__init__(cs.Int64ul)
        self.word = word

    def _decode(self, obj: int, context: Any, path: Any) -> cs.Container:
        c = cs.Container(self.word.decode(obj))
        return c

    def _encode(self, obj: Mapping[str, int], context: Any, path: Any) -> int:
        return self.word.encode(obj)


class Layout:
    """A VT-d structure: ``n`` little-endian 64-bit words, qw0 first.

    ``layout.struct`` is the construct definition (``Struct(qw0=..., qw1=...)``), ``parse`` and
    ``build`` round-trip, and ``layout[name]`` gives ``(word index, Field)`` for the hot path.
    """

    def __init__(self, name: str, words: Iterable[Word], doc: str = "") -> None:
        self.name = name
        self.words: tuple[Word, ...] = tuple(words)
        self.doc = doc
        self.size = 8 * len(self.words)
        self.struct: cs.Construct = cs.Struct(*(w.name / w.construct for w in self.words))
        self._unpack = struct.Struct(f"<{len(self.words)}Q")
        self.reserved: tuple[int, ...] = tuple(w.reserved for w in self.words)  # per word
        self.fields: dict[str, tuple[int, Field]] = {}
        for i, w in enumerate(self.words):
            for f in w.fields:
                if f.name in self.fields:
                    raise ValueError(f"{name}: field {f.name} appears twice")
                self.fields[f.name] = (i, f)

    def __getitem__(self, name: str) -> tuple[int, Field]:
        return self.fields[name]

    def field(self, name: str) -> Field:
        return self.fields[name][1]

    def parse(self, data: bytes | bytearray | memoryview) -> cs.Container:
        return self.struct.parse(bytes(data[: self.size]))

    def build(self, values: Mapping[str, Any]) -> bytes:
        """Build from ``{"qw0": {...}, "qw1": {...}}`` or a flat ``{field: value}`` mapping."""
        if any(w.name in values for w in self.words):
            per_word = {w.name: dict(values.get(w.name, {})) for w in self.words}
        else:
            per_word = {w.name: {} for w in self.words}
            for key, val in values.items():
                idx, _ = self.fields[key]
                per_word[self.words[idx].name][key] = val
        data: bytes = self.struct.build(per_word)
        return data

    def words_of(self, data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, ...]:
        """The raw words (fast path, no construct): ``struct.unpack_from``."""
        return self._unpack.unpack_from(data, offset)

    def flat(self, data: bytes | bytearray | memoryview) -> dict[str, int]:
        """Every named field of ``data`` in one flat dict (for dumps and JSON)."""
        out: dict[str, int] = {}
        for w, val in zip(self.words, self.words_of(data), strict=True):
            out.update(w.decode(val))
        return out

    def reserved_violations(self, words: tuple[int, ...]) -> list[str]:
        """Names of the words whose reserved bits are set."""
        return [w.name for w, v in zip(self.words, words, strict=True) if v & w.reserved]

    def mask(self, name: str) -> int:
        """Field ``name`` in place in its word."""
        return self.fields[name][1].mask

    def decoder(
        self, items: Sequence[object] | None = None, into: Callable[..., Any] | None = None
    ) -> Callable[[Sequence[int]], Any]:
        """A generated ``words -> into(v0, v1, ...)``: each ``str`` item is a field read with
        literal masks (one-bit fields as bools, ``addr`` fields in place), any other item is
        passed as it is. Without ``into``, ``words -> {field: value}`` of ``items`` (default:
        every field)."""
        names = list(items) if items is not None else list(self.fields)
        used = sorted({self.fields[n][0] for n in names if isinstance(n, str)})
        exprs = [self.fields[n][1].expr(f"w{self.fields[n][0]}") if isinstance(n, str)
                 else repr(n) for n in names]  # fmt: skip
        if into is None:
            body = "{" + ", ".join(f"{n!r}: {e}" for n, e in zip(names, exprs, strict=True)) + "}"
        else:
            body = f"into({', '.join(exprs)})"
        src = "def decode(w):\n"
        src += "".join(f"    w{i} = w[{i}]\n" for i in used)
        src += f"    return {body}\n"
        ns: dict[str, Any] = {"into": into}
        exec(compile(src, f"<{self.name} decoder>", "exec"), ns)  # generated from our own tables
        fn: Callable[[Sequence[int]], Any] = ns["decode"]
        fn.__doc__ = src
        return fn


_TOKEN = re.compile(r"\$([A-Z][A-Z0-9_]*)(?:\.([A-Za-z][A-Za-z0-9_]*))?(?:\((\w+)\))?")


def render(template: str, layouts: Mapping[str, Layout], consts: Mapping[str, int]) -> str:
    """Python source from ``template`` with every field named symbolically made literal:
    ``$L.F(var)`` reads field F of layout ``layouts["L"]`` from ``var`` (as :meth:`Field.expr`),
    ``$L.F`` is F's mask in place, ``$L.rsvdN`` word N's reserved mask, ``$L.rsvdN(var)`` the
    reserved bits set in ``var`` (``False`` for a word with none), ``$NAME`` ``consts["NAME"]``."""

    def sub(m: re.Match[str]) -> str:
        name, attr, var = m.group(1), m.group(2), m.group(3)
        if attr is None:
            return f"{consts[name]:#x}"
        layout = layouts[name]
        if attr.startswith("rsvd"):
            rsvd = layout.words[int(attr[4:])].reserved
            if var is None:
                return f"{rsvd:#x}"
            # the reserved bits set in ``var``, as cheap as the mask allows
            return "False" if not rsvd else var if rsvd == U64 else f"({var} & {rsvd:#x})"
        f = layout.fields[attr][1]
        return f.expr(var) if var is not None else f"{f.mask:#x}"

    return _TOKEN.sub(sub, template)


def F(name: str, hi: int, lo: int | None = None, *, addr: bool = False, doc: str = "") -> Field:
    """Field from ``hi:lo`` in the spec's order (``F("PGTT", 8, 6)``; one bit: ``F("P", 0)``)."""
    return Field(name, hi if lo is None else lo, hi, addr, doc)
