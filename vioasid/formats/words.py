"""Enums whose members read as lower-case dashed words (``NOT_BOUND`` <-> ``not-bound``).

The spelling of the daemon protocol's JSON views, the CLI and the guest driver's messages for
the wire's and the PASID DMA function's code tables.
"""

from __future__ import annotations

import enum
from typing import Self


class WordEnum(enum.IntEnum):
    """An ``IntEnum`` with :attr:`word` (its name, lower case, ``_`` as ``-``)."""

    @property
    def word(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_word(cls, word: str) -> Self:
        """The member spelled ``word`` (KeyError if none)."""
        return cls[word.upper().replace("-", "_")]
