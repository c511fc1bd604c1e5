"""Free and used addresses inside the ranges one peer owns.

Theory of operation
-------------------
The ring says *which* addresses are ours; :class:`Space` says which of those are leased. It holds the
owned ranges (sorted, disjoint ``[start, end)`` intervals, refreshed from the ring after every change)
and a sorted list of used addresses, so every query is a bisect plus a walk over the used addresses of
one range; nothing is proportional to the size of the range (a /12 has a million addresses).

Allocation takes the lowest free address, which keeps leases packed at the bottom of our ranges and
leaves large free blocks at the top to donate. A donation (:meth:`Space.donation`) is the largest free
block, capped at half of our free addresses as Weave does: a donor never gives away its last address
and two peers that keep asking each other converge instead of ping-ponging the whole space.

Leases that fall outside the owned ranges after a refresh are not dropped; :meth:`Space.set_ranges`
reports them, because losing a range with live leases means the ring and the leases disagree, which
the caller must surface rather than hide. Reserved addresses (network and broadcast) are never free.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable


class SpaceError(Exception):
    """A refused claim; ``reason`` is a short stable label (``not-owned``, ``in-use``, ``reserved``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _normalise(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged, non-empty intervals; raises ValueError on overlaps or reversed bounds."""
    result: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if not start < end:
            raise ValueError(f"empty or reversed range [{start}, {end})")
        if result and start < result[-1][1]:
            raise ValueError(f"overlapping ranges at {start}")
        if result and start == result[-1][1]:
            result[-1] = (result[-1][0], end)
        else:
            result.append((start, end))
    return tuple(result)


class Space:
    """Owned ranges and the leased addresses within them."""

    def __init__(self, reserved: Iterable[int] = ()) -> None:
        self.reserved = frozenset(reserved)
        self.ranges: tuple[tuple[int, int], ...] = ()
        self._used: list[int] = []
        self._used_set: set[int] = set()

    # -- ranges -------------------------------------------------------------------------------------

    def set_ranges(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Replace the owned ranges; returns used addresses that are now outside them (normally none)."""
        self.ranges = _normalise(ranges)
        return [a for a in self._used if not self.owns(a)]

    def owns(self, address: int) -> bool:
        i = bisect_left(self.ranges, (address + 1,)) - 1
        return i >= 0 and self.ranges[i][0] <= address < self.ranges[i][1]

    # -- leases -------------------------------------------------------------------------------------

    def is_used(self, address: int) -> bool:
        return address in self._used_set

    @property
    def used(self) -> list[int]:
        return list(self._used)

    def allocate(self) -> int | None:
        """Lease the lowest free address, or ``None`` when we have none (time to ask for space)."""
        for start, end in self.ranges:
            address = start
            i = bisect_left(self._used, start)
            while address < end:
                if address in self.reserved:
                    address += 1
                elif i < len(self._used) and self._used[i] == address:
                    address += 1
                    i += 1
                else:
                    self._mark(address)
                    return address
        return None

    def claim(self, address: int) -> None:
        """Lease a specific address (a restarted container keeping its IP)."""
        if address in self.reserved:
            raise SpaceError("reserved", str(address))
        if not self.owns(address):
            raise SpaceError("not-owned", str(address))
        if address in self._used_set:
            raise SpaceError("in-use", str(address))
        self._mark(address)

    def release(self, address: int) -> bool:
        """Free a lease; ``False`` if it was not leased (a repeated CNI DEL is not an error)."""
        if address not in self._used_set:
            return False
        self._used_set.remove(address)
        del self._used[bisect_left(self._used, address)]
        return True

    def _mark(self, address: int) -> None:
        insort(self._used, address)
        self._used_set.add(address)

    # -- counting and donating ----------------------------------------------------------------------

    def count_free(self, start: int, end: int) -> int:
        """Free addresses in ``[start, end)`` that we own (used and reserved ones excluded)."""
        total = 0
        for r_start, r_end in self.ranges:
            lo, hi = max(start, r_start), min(end, r_end)
            if lo >= hi:
                continue
            used = bisect_left(self._used, hi) - bisect_left(self._used, lo)
            reserved = sum(1 for a in self.reserved if lo <= a < hi and a not in self._used_set)
            total += hi - lo - used - reserved
        return total

    def free_count(self) -> int:
        return sum(self.count_free(start, end) for start, end in self.ranges)

    def free_blocks(self) -> list[tuple[int, int]]:
        """Maximal runs of free addresses, in address order."""
        blocks: list[tuple[int, int]] = []
        for start, end in self.ranges:
            lo, hi = bisect_left(self._used, start), bisect_left(self._used, end)
            taken = sorted({*self._used[lo:hi], *(a for a in self.reserved if start <= a < end)})
            cursor = start
            for address in taken:
                if address > cursor:
                    blocks.append((cursor, address))
                cursor = address + 1
            if cursor < end:
                blocks.append((cursor, end))
        return blocks

    def donation(self, max_size: int | None = None) -> tuple[int, int] | None:
        """The block to give a peer that asked for space: the top of our largest free block, at most
        half of our free addresses (and at most ``max_size``). ``None`` if we cannot spare any.

        The top end is given so that what we keep stays packed with our leases at the bottom.
        """
        cap = self.free_count() // 2
        if max_size is not None:
            cap = min(cap, max_size)
        if cap <= 0:
            return None
        blocks = self.free_blocks()
        start, end = max(blocks, key=lambda b: (b[1] - b[0], -b[0]))
        size = min(end - start, cap)
        return (end - size, end)
