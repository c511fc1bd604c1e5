"""Gossip policy: how many neighbours hear a change, and how state is cut into datagrams.

Theory of operation
-------------------
* **Deltas, promptly, to O(log N) neighbours.** A change (ours, or news merged from someone) is sent
  after a short coalescing delay to ``fanout(N)`` randomly chosen neighbours. Receivers forward only
  what improved their view, so an update spreads epidemically and dies out once everyone has it.
* **Anti-entropy.** Every few seconds each peer sends one random neighbour a :class:`GossipSummary`
  (a hash of every name/version/uid it knows). A mismatch triggers a digest; the receiver of a digest
  pushes entries it has newer and requests those it lacks. Both ends send a summary when a connection
  is established, so a joining peer pulls the whole topology and two healed partitions exchange only
  what differs.
* **Chunks.** Entries, digests and requests are packed into datagrams of about
  :data:`~weaved.core.wire.GOSSIP_CHUNK_TARGET` bytes, so a topology of any size gossips without
  relying on IP fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from weaved.core.entries import PeerEntry
from weaved.core.types import PeerName
from weaved.core.wire import GOSSIP_CHUNK_TARGET, DigestItem, encoded_entry_size

T = TypeVar("T")

DIGEST_ITEM_SIZE = 28
"""Upper bound on one encoded digest item: 6-byte name and two uint64 with msgpack headers."""
REQUEST_ITEM_SIZE = 8


def fanout(peer_count: int, neighbour_count: int) -> int:
    """Neighbours to push a delta to: ``ceil(log2(N + 1))``, at least 2, at most all neighbours."""
    return min(neighbour_count, max(2, math.ceil(math.log2(peer_count + 1))))


def chunk(items: Sequence[T], size_of: Callable[[T], int], target: int = GOSSIP_CHUNK_TARGET) -> list[list[T]]:
    """Split ``items`` into lists whose summed sizes stay near ``target``; an oversized item goes alone."""
    chunks: list[list[T]] = []
    current: list[T] = []
    current_size = 0
    for item in items:
        size = size_of(item)
        if current and current_size + size > target:
            chunks.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += size
    if current:
        chunks.append(current)
    return chunks


class EntrySizeCache:
    """Encoded sizes of entries, keyed by (name, version, uid): entries are immutable per key."""

    def __init__(self, limit: int = 20_000) -> None:
        self._sizes: dict[tuple[str, int, int], int] = {}
        self._limit = limit

    def size(self, entry: PeerEntry) -> int:
        key = (entry.name, entry.version, entry.uid)
        size = self._sizes.get(key)
        if size is None:
            if len(self._sizes) >= self._limit:
                self._sizes.clear()
            size = self._sizes[key] = encoded_entry_size(entry)
        return size


def compare_digest(
    items: Iterable[DigestItem], mine: Mapping[PeerName, PeerEntry]
) -> tuple[list[PeerEntry], list[DigestItem]]:
    """Given a neighbour's digest: (our entries that are newer, their items we lack or hold older)."""
    push: list[PeerEntry] = []
    want: list[DigestItem] = []
    for item in items:
        entry = mine.get(item.name)
        theirs = (item.version, item.uid)
        if entry is None or entry.order_key < theirs:
            want.append(item)
        elif entry.order_key > theirs:
            push.append(entry)
    return push, want
