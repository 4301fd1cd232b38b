"""Content digests of the source files an image part is built from (edit one, rebuild the part)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from .errors import ImageError


def files_digest(d: Path, names: Iterable[str], what: str, extra: bytes = b"") -> str:
    """16 hex digits over each named file of ``d`` (name and bytes) and ``extra``.

    A missing file is an ImageError naming it as ``what`` (e.g. "guest script").
    """
    h = hashlib.sha256()
    for name in names:
        p = d / name
        if not p.is_file():
            raise ImageError(f"{what} {p} is missing")
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(extra)
    return h.hexdigest()[:16]
