"""PASID allocators: the lowest free value >= 1, below ``2**bits``, deterministic.

PASID 0 is RID_PASID (requests without PASID) and is never handed out. An allocator answers
``alloc()`` (lowest free), ``take(value)`` (that exact value, for "pPASID must equal vPASID"),
``free(value)`` and ``peek()`` (what ``alloc`` would return, without allocating: the bind path
plans with ``peek``/``is_free`` and commits only when nothing can be refused).

Cost: ``alloc``/``free``/``take`` are O(log n) amortised (a watermark above which every value is
free, plus a min-heap of freed values below it; stale heap entries are skipped lazily).
"""

from __future__ import annotations

import heapq

from .errors import InvalidRequest


class PasidAllocator:
    """Lowest-free-first allocator over ``[1, 2**bits)``."""

    __slots__ = ("_freed", "_top", "_used", "bits", "limit", "name")

    def __init__(self, bits: int = 20, name: str = "") -> None:
        if not 1 <= bits <= 20:
            raise InvalidRequest(f"pasid_bits must be 1..20, not {bits}")
        self.bits = bits
        self.limit = 1 << bits
        self.name = name
        self._used: set[int] = set()
        self._top = 1  # every value >= _top not in _used is free
        self._freed: list[int] = []  # freed values below _top (may hold stale entries)

    # -- queries ------------------------------------------------------------------------
    def __contains__(self, value: int) -> bool:
        return value in self._used

    def __len__(self) -> int:
        return len(self._used)

    def is_free(self, value: int) -> bool:
        return 1 <= value < self.limit and value not in self._used

    def in_range(self, value: int) -> bool:
        return 1 <= value < self.limit

    def used(self) -> frozenset[int]:
        return frozenset(self._used)

    def peek(self) -> int | None:
        """The value :meth:`alloc` would return now, or None when exhausted (no side effect
        beyond dropping stale heap entries)."""
        heap, used = self._freed, self._used
        while heap and heap[0] in used:
            heapq.heappop(heap)
        if heap:
            return heap[0]
        top = self._top
        while top in used:
            top += 1
        self._top = top
        return top if top < self.limit else None

    # -- changes ------------------------------------------------------------------------
    def alloc(self) -> int | None:
        """Allocate the lowest free value; None when the space is exhausted."""
        value = self.peek()
        if value is None:
            return None
        if self._freed and self._freed[0] == value:
            heapq.heappop(self._freed)
        else:
            self._top = value + 1
        self._used.add(value)
        return value

    def take(self, value: int) -> bool:
        """Allocate exactly ``value``; False if it is taken or out of range."""
        used = self._used
        if value in used or not 1 <= value < self.limit:
            return False
        used.add(value)
        return True

    def free(self, value: int) -> None:
        if value not in self._used:
            raise InvalidRequest(f"{self.name or 'allocator'}: pPASID {value} is not allocated")
        self._used.discard(value)
        if value < self._top:
            heapq.heappush(self._freed, value)

    def snapshot(self) -> tuple[int, ...]:
        """The allocated values, sorted (tests compare snapshots before/after)."""
        return tuple(sorted(self._used))
