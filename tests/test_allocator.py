"""PasidAllocator: lowest free value >= 1 below 2**bits, deterministic, nothing leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vioasid.model.allocator import PasidAllocator
from vioasid.model.errors import InvalidRequest


def test_lowest_free_from_one() -> None:
    a = PasidAllocator(4)
    assert [a.alloc() for _ in range(15)] == list(range(1, 16))
    assert a.alloc() is None  # 2**4 - 1 values, PASID 0 never handed out
    assert a.peek() is None


def test_free_returns_lowest_first() -> None:
    a = PasidAllocator(8)
    for _ in range(10):
        a.alloc()
    a.free(7)
    a.free(3)
    assert a.peek() == 3
    assert a.alloc() == 3
    assert a.alloc() == 7
    assert a.alloc() == 11


def test_take_exact_and_skip() -> None:
    a = PasidAllocator(8)
    assert a.take(5)
    assert not a.take(5)
    assert not a.take(0)
    assert not a.take(256)
    assert [a.alloc() for _ in range(5)] == [1, 2, 3, 4, 6]
    a.free(2)
    assert a.take(2)
    assert a.alloc() == 7


def test_free_unallocated_is_refused() -> None:
    a = PasidAllocator(8)
    with pytest.raises(InvalidRequest):
        a.free(3)


def test_bits_range() -> None:
    with pytest.raises(InvalidRequest):
        PasidAllocator(0)
    with pytest.raises(InvalidRequest):
        PasidAllocator(21)
    assert PasidAllocator(20).limit == 1 << 20


def test_peek_has_no_effect() -> None:
    a = PasidAllocator(8)
    a.alloc()
    before = a.snapshot()
    assert a.peek() == 2
    assert a.peek() == 2
    assert a.snapshot() == before


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "take", "free"]), st.integers(0, 40))))
def test_matches_reference_model(ops: list[tuple[str, int]]) -> None:
    """Against a plain set: lowest free first, take/free exact, used set == live values."""
    a = PasidAllocator(5)
    used: set[int] = set()
    for op, v in ops:
        if op == "alloc":
            free = [x for x in range(1, 32) if x not in used]
            got = a.alloc()
            assert got == (free[0] if free else None)
            if got is not None:
                used.add(got)
        elif op == "take":
            ok = a.take(v)
            assert ok == (1 <= v < 32 and v not in used)
            if ok:
                used.add(v)
        elif v in used:
            a.free(v)
            used.discard(v)
        assert a.used() == frozenset(used)
        assert len(a) == len(used)
