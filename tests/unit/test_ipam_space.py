"""Space: examples, and a comparison against a naive set-of-addresses model under random operations."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from weaved.core.ipam.space import Space, SpaceError


def test_allocates_lowest_free_skipping_reserved_and_used() -> None:
    space = Space(reserved={100})
    space.set_ranges([(104, 106), (100, 103)])
    assert space.ranges == ((100, 103), (104, 106))
    assert [space.allocate() for _ in range(5)] == [101, 102, 104, 105, None]
    assert space.release(102) and not space.release(102)
    assert space.allocate() == 102


def test_claim_rules() -> None:
    space = Space(reserved={10})
    space.set_ranges([(10, 20)])
    space.claim(15)
    assert space.is_used(15)
    for address, reason in ((15, "in-use"), (10, "reserved"), (20, "not-owned"), (9, "not-owned")):
        with pytest.raises(SpaceError) as err:
            space.claim(address)
        assert err.value.reason == reason
    assert space.allocate() == 11


def test_set_ranges_reports_leases_left_outside_and_merges_adjacent() -> None:
    space = Space()
    space.set_ranges([(0, 8)])
    space.claim(2)
    space.claim(6)
    assert space.set_ranges([(0, 4), (4, 5)]) == [6]
    assert space.ranges == ((0, 5),)
    assert space.free_count() == 4
    for bad in ([(5, 5)], [(0, 4), (3, 6)]):
        with pytest.raises(ValueError):
            space.set_ranges(bad)


def test_counting_and_blocks() -> None:
    space = Space(reserved={0, 63})
    space.set_ranges([(0, 16), (32, 64)])
    for address in (1, 2, 40):
        space.claim(address)
    assert space.free_count() == 16 + 32 - 2 - 3
    assert space.count_free(0, 8) == 5
    assert space.count_free(8, 40) == 16  # [8, 16) and [32, 40); the lease at 40 is past the end
    assert space.count_free(8, 41) == 16
    assert space.free_blocks() == [(3, 16), (32, 40), (41, 63)]


def test_donation_is_the_top_of_the_largest_block_capped_at_half() -> None:
    space = Space()
    space.set_ranges([(0, 64)])
    for address in range(8):
        space.claim(address)
    assert space.donation() == (36, 64)  # 56 free: half is 28, the top of [8, 64)
    assert space.donation(max_size=4) == (60, 64)
    space.claim(40)
    assert space.donation() == (13, 40)  # blocks [8, 40) and [41, 64): 27 (half of 55) off the top of the first
    space.claim(20)
    assert space.donation() == (41, 64)  # now [41, 64) is the largest, and smaller than half of 54
    one = Space()
    one.set_ranges([(0, 1)])
    assert one.donation() is None  # never the last address
    two = Space()
    two.set_ranges([(0, 2)])
    assert two.donation() == (1, 2)
    assert Space().donation() is None


class SpaceModel(RuleBasedStateMachine):
    """The same operations on :class:`Space` and on plain sets must agree."""

    SIZE = 96

    def __init__(self) -> None:
        super().__init__()
        self.owned: set[int] = set()
        self.used: set[int] = set()
        self.reserved: set[int] = set()
        self.space = Space()

    @initialize(reserved=st.sets(st.integers(0, SIZE - 1), max_size=4))
    def setup(self, reserved: set[int]) -> None:
        self.reserved = reserved
        self.space = Space(reserved)

    @rule(cuts=st.lists(st.integers(0, SIZE), min_size=2, max_size=10, unique=True), keep=st.integers(0, 1023))
    def set_ranges(self, cuts: list[int], keep: int) -> None:
        points = sorted(cuts)
        pieces = [(a, b) for i, (a, b) in enumerate(itertools.pairwise(points)) if keep >> i & 1]
        outside = self.space.set_ranges(pieces)
        self.owned = {a for start, end in pieces for a in range(start, end)}
        assert sorted(outside) == sorted(self.used - self.owned)

    def free(self) -> set[int]:
        return self.owned - self.used - self.reserved

    @rule()
    def allocate(self) -> None:
        expected = min(self.free(), default=None)
        assert self.space.allocate() == expected
        if expected is not None:
            self.used.add(expected)

    @rule(address=st.integers(0, SIZE - 1))
    def claim(self, address: int) -> None:
        if address in self.free():
            self.space.claim(address)
            self.used.add(address)
        else:
            with pytest.raises(SpaceError):
                self.space.claim(address)

    @precondition(lambda self: self.used)
    @rule(index=st.integers(0, 1000))
    def release(self, index: int) -> None:
        address = sorted(self.used)[index % len(self.used)]
        assert self.space.release(address)
        self.used.discard(address)

    @rule(start=st.integers(0, SIZE), length=st.integers(0, SIZE))
    def count(self, start: int, length: int) -> None:
        assert self.space.count_free(start, start + length) == len(
            {a for a in self.free() if start <= a < start + length}
        )

    @rule(cap=st.none() | st.integers(1, SIZE))
    def donation(self, cap: int | None) -> None:
        block = self.space.donation(cap)
        free = self.free()
        limit = len(free) // 2 if cap is None else min(len(free) // 2, cap)
        if limit == 0:
            assert block is None
            return
        assert block is not None
        start, end = block
        assert set(range(start, end)) <= free
        assert end not in free  # the top of a maximal free run
        longest = max(len(run) for run in runs(free))
        assert end - start == min(longest, limit)

    @invariant()
    def agrees(self) -> None:
        assert self.space.free_count() == len(self.free())
        assert sorted(self.space.used) == sorted(self.used)
        assert [a for start, end in self.space.free_blocks() for a in range(start, end)] == sorted(self.free())


def runs(addresses: set[int]) -> list[list[int]]:
    result: list[list[int]] = []
    for address in sorted(addresses):
        if result and result[-1][-1] == address - 1:
            result[-1].append(address)
        else:
            result.append([address])
    return result


SpaceModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSpaceModel = SpaceModel.TestCase
