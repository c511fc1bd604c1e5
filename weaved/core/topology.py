"""The topology: every peer's latest entry, merged CRDT-style, with routes and garbage collection.

Theory of operation
-------------------
Each peer owns exactly one entry (its own) and is the only one to change it, bumping ``version``.
Merging keeps, per name, the entry with the highest ``(version, uid)``. That join is commutative,
associative and idempotent, so peers that have seen the same entries hold the same state whatever the
order, loss or duplication of gossip. :meth:`Topology.merge` returns the delta (entries that improved
our view) so that gossip only forwards news and dies out once everyone agrees.

Our own name is special: an incoming entry with our name and another UID is an older incarnation of
us (we restarted) or a clone. We never store it; :class:`MergeResult` reports it so the mesh bumps its
version past it.

Entries of peers that are no longer reachable over established, symmetric connections are removed
(garbage collection), unless one of our own connections still names them; they come back through
anti-entropy once they are reachable again. The mesh runs the collection a moment after a change
rather than inside :meth:`merge`: an entry and the entry that makes it reachable may arrive in two
different datagrams, and collecting in between would throw the first away. Unreachable entries are
bounded all the same (:data:`MAX_UNREACHABLE`): past it, a merge collects at once.

Hardening (UDP sources are forgeable, and any member may gossip anything):

* **Version jumps.** An entry may not jump far above the version we hold for its name
  (:data:`MAX_VERSION_JUMP`), and none may exceed the ceiling the mesh passes in (our wall clock in ms
  plus :data:`CLOCK_ALLOWANCE_MS`): versions start at wall-clock ms, so a real restart lands under it, while
  a forged 2**62 that would leave its owner no room to ever win again is dropped and counted.
* **Short ids** (:meth:`Topology.short_ids`) count only us and the peers we reach: forged entries of
  invented peers cannot make real ones collide.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from weaved.core.entries import PeerEntry
from weaved.core.routes import symmetric_neighbours, unicast_next_hops
from weaved.core.types import PeerName

MAX_VERSION = 1 << 62
"""Versions start at wall-clock milliseconds (about 2**41) and grow by one per change; anything near 2**64
is forged or broken and would leave its owner no room to overtake it."""

MAX_VERSION_JUMP = 1 << 24
"""How far above the version we hold for a name an entry may go without also being under the clock ceiling:
far more changes than a peer makes between two gossip rounds, and 2**38 forged pushes short of 2**62."""

CLOCK_ALLOWANCE_MS = 366 * 86_400_000
"""How far ahead of our clock (in ms) a version may be: a peer whose clock runs a year ahead of ours is
refused (counted as ``version-jump``); one running behind is not (its version is simply lower)."""

MAX_UNREACHABLE = 1024
"""Most entries held that are not reachable from us (they are waiting for the entry that links them in);
past it, a merge collects garbage at once. Honest meshes hold none of them for more than a moment."""


@dataclass
class MergeResult:
    improved: list[PeerEntry] = field(default_factory=list)
    """Entries that replaced or added to our view."""
    own_conflict: PeerEntry | None = None
    """An entry with our name that would supersede ours (another incarnation, or a forged copy)."""
    implausible: int = 0
    """Entries dropped for a version jump (see :meth:`Topology.version_limit`)."""


class Topology:
    """Entries by name, plus derived routes; ``generation`` changes whenever anything does."""

    def __init__(self, own: PeerEntry) -> None:
        self.own_name = own.name
        self.entries: dict[PeerName, PeerEntry] = {own.name: own}
        self.generation = 0
        self._routes_generation = -1
        self._hash_generation = -1
        self._next_hops: dict[PeerName, PeerName] = {}
        self._graph: dict[PeerName, list[PeerName]] = {}
        self._digest_hash = b""

    @property
    def own(self) -> PeerEntry:
        return self.entries[self.own_name]

    def set_own(self, entry: PeerEntry) -> None:
        """Replace our own entry (a local change); the caller has bumped the version."""
        assert entry.name == self.own_name and entry.order_key > self.own.order_key, "own version must grow"
        self.entries[self.own_name] = entry
        self.generation += 1

    def version_limit(self, name: PeerName, clock_ms: int | None) -> int:
        """The highest version we accept for ``name``: a bounded jump above what we hold, or anything under
        our clock plus :data:`CLOCK_ALLOWANCE_MS` (where a restarted peer's wall-clock version lands)."""
        held = self.entries.get(name)
        limit = held.version + MAX_VERSION_JUMP if held is not None else MAX_VERSION_JUMP
        if clock_ms is not None:
            limit = max(limit, clock_ms + CLOCK_ALLOWANCE_MS)
        return min(limit, MAX_VERSION)

    def merge(self, incoming: Iterable[PeerEntry], clock_ms: int | None = None) -> MergeResult:
        """Join remote entries into ours; return the delta. A CRDT join over plausible entries: one whose
        version is above :meth:`version_limit` is dropped and counted. ``clock_ms``: our wall clock in ms
        (the scale versions start at); None allows only bounded jumps above what we hold."""
        result = MergeResult()
        for entry in incoming:
            if entry.version > self.version_limit(entry.name, clock_ms):
                result.implausible += 1  # would leave its owner no room to ever out-version it
                continue
            if entry.name == self.own_name:
                # Anything claiming our name that would win the join (another incarnation, or a forged
                # copy of ours with a higher version) must be overtaken, never stored.
                if entry != self.own and entry.supersedes(self.own) and (
                        result.own_conflict is None or entry.supersedes(result.own_conflict)):
                    result.own_conflict = entry
                continue
            if entry.supersedes(self.entries.get(entry.name)):
                self.entries[entry.name] = entry
                result.improved.append(entry)
        if result.improved:
            self.generation += 1
            # Cheap test first (routes as last computed), so honest merges never pay for a route search.
            if len(self.entries) > len(self._next_hops) + 1 + MAX_UNREACHABLE \
                    and len(self.entries) > len(self.next_hops()) + 1 + MAX_UNREACHABLE:
                removed = self.collect_garbage()
                result.improved = [e for e in result.improved if e.name not in removed]
        return result

    def short_ids(self) -> dict[PeerName, int]:
        """Short id of us and of every peer we reach: what the data path maps. Unreachable entries do not
        count, so entries of invented peers (which nobody real links to) cannot squat the ids."""
        hops = self.next_hops()
        return {name: int(e.short_id) for name, e in self.entries.items() if name in hops or name == self.own_name}

    def collect_garbage(self) -> set[PeerName]:
        """Drop entries unreachable from us and not named by one of our own connections."""
        reachable = set(self.next_hops()) | {self.own_name}
        reachable.update(c.remote for c in self.own.connections)
        removed = {name for name in self.entries if name not in reachable}
        for name in removed:
            del self.entries[name]
        if removed:
            self.generation += 1
        return removed

    def _refresh_routes(self) -> None:
        if self._routes_generation != self.generation:
            self._graph = symmetric_neighbours(self.entries)
            self._next_hops = unicast_next_hops(self.own_name, self._graph)
            self._routes_generation = self.generation

    def next_hops(self) -> dict[PeerName, PeerName]:
        """Unicast routes: reachable peer → neighbour to send through (cached per generation)."""
        self._refresh_routes()
        return self._next_hops

    def graph(self) -> dict[PeerName, list[PeerName]]:
        """Symmetric established adjacency, for broadcast trees."""
        self._refresh_routes()
        return self._graph

    def digest_hash(self) -> bytes:
        """8-byte hash over every (name, version, uid): equal hashes mean equal views."""
        if self._hash_generation != self.generation:
            packed = b"".join(
                name.encode() + struct.pack(">QQ", e.version, e.uid) for name, e in sorted(self.entries.items())
            )
            self._digest_hash = hashlib.blake2b(packed, digest_size=8).digest()
            self._hash_generation = self.generation
        return self._digest_hash
