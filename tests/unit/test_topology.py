"""Topology merge is a CRDT join; routes agree with a naive shortest-path model."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.strategies import entries, small_names
from weaved.core.entries import ConnectionEntry, PeerEntry
from weaved.core.routes import broadcast_children, symmetric_neighbours, unicast_next_hops
from weaved.core.topology import MAX_UNREACHABLE, MAX_VERSION_JUMP, Topology
from weaved.core.types import Endpoint, PeerName, PeerUID, ShortID, peer_name_from_bytes

SELF = peer_name_from_bytes(bytes([2, 0, 0, 0, 0, 0xFF]))


def fresh() -> Topology:
    return Topology(PeerEntry(SELF, "self", PeerUID(1), 1, ShortID(1), ()))


def view(topology: Topology) -> dict[str, PeerEntry]:
    return dict(topology.entries)


batches = st.lists(entries(small_names), max_size=12)


@given(batches, batches)
def test_merge_is_commutative(a: list[PeerEntry], b: list[PeerEntry]) -> None:
    t1, t2 = fresh(), fresh()
    t1.merge(a)
    t1.merge(b)
    t2.merge(b)
    t2.merge(a)
    assert view(t1) == view(t2)


@given(batches, batches, batches)
def test_merge_is_associative(a: list[PeerEntry], b: list[PeerEntry], c: list[PeerEntry]) -> None:
    t1, t2 = fresh(), fresh()
    t1.merge(a)
    t1.merge(b + c)
    t2.merge(a + b)
    t2.merge(c)
    assert view(t1) == view(t2)


@given(batches)
def test_merge_is_idempotent_and_delta_empties(a: list[PeerEntry]) -> None:
    t = fresh()
    t.merge(a)
    before = view(t)
    result = t.merge(a)
    assert view(t) == before
    assert result.improved == []


@given(batches)
def test_delta_is_exactly_what_changed(a: list[PeerEntry]) -> None:
    t = fresh()
    before = view(t)
    result = t.merge(a)
    changed = {n for n, e in view(t).items() if before.get(n) != e}
    assert {e.name for e in result.improved} == changed
    assert all(t.entries[name] in result.improved for name in changed)


def test_own_name_with_other_uid_is_reported_not_stored() -> None:
    t = fresh()
    ghost = PeerEntry(SELF, "old-self", PeerUID(9), 50, ShortID(1), ())
    result = t.merge([ghost])
    assert result.own_conflict == ghost
    assert t.own.uid == 1


def test_garbage_collection_drops_unreachable_but_keeps_own_neighbours() -> None:
    a, b = (peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in (1, 2))
    ep = Endpoint("198.51.100.1", 6783)
    t = fresh()
    t.set_own(PeerEntry(SELF, "self", PeerUID(1), 2, ShortID(1), (ConnectionEntry(a, ep, True, True),)))
    t.merge([PeerEntry(a, "a", PeerUID(1), 1, ShortID(2), (ConnectionEntry(SELF, ep, False, True),)),
             PeerEntry(b, "b", PeerUID(1), 1, ShortID(3), ())])
    assert t.collect_garbage() == {b}
    assert set(t.entries) == {SELF, a}


# --- routes against a naive model ------------------------------------------------------------------

graphs = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.booleans(), st.booleans()), max_size=40)


def build(edges: list[tuple[int, int, bool, bool]]) -> dict[PeerName, PeerEntry]:
    """Entries for 10 peers; each edge is listed by its ends with independent 'established' flags."""
    names = [peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in range(10)]
    conns: dict[PeerName, list[ConnectionEntry]] = {n: [] for n in names}
    ep = Endpoint("198.51.100.1", 6783)
    for x, y, ex, ey in edges:
        if x != y:
            conns[names[x]].append(ConnectionEntry(names[y], ep, True, ex))
            conns[names[y]].append(ConnectionEntry(names[x], ep, False, ey))
    return {n: PeerEntry(n, str(i), PeerUID(1), 1, ShortID(i), tuple(conns[n])) for i, n in enumerate(names)}


def naive_distances(entries: dict[PeerName, PeerEntry], src: PeerName) -> dict[PeerName, int]:
    def usable(a: PeerName, b: PeerName) -> bool:
        return any(c.remote == b and c.established for c in entries[a].connections) and any(
            c.remote == a and c.established for c in entries[b].connections)

    dist = {src: 0}
    queue = deque([src])
    while queue:
        node = queue.popleft()
        for other in entries:
            if other not in dist and usable(node, other):
                dist[other] = dist[node] + 1
                queue.append(other)
    return dist


@settings(max_examples=200)
@given(graphs, st.integers(0, 9))
def test_next_hops_follow_shortest_paths(edges: list[tuple[int, int, bool, bool]], me: int) -> None:
    entries = build(edges)
    own = sorted(entries)[me]
    graph = symmetric_neighbours(entries)
    hops = unicast_next_hops(own, graph)
    dist = naive_distances(entries, own)
    assert set(hops) == set(dist) - {own}
    for dst, hop in hops.items():
        assert dist.get(hop) == 1, "next hop must be a direct, symmetric neighbour"
        assert naive_distances(entries, hop)[dst] == dist[dst] - 1, "next hop must lie on a shortest path"


@settings(max_examples=200)
@given(graphs, st.integers(0, 9))
def test_broadcast_reaches_every_reachable_peer_exactly_once(edges: list[tuple[int, int, bool, bool]],
                                                               origin_index: int) -> None:
    entries = build(edges)
    origin = sorted(entries)[origin_index]
    graph = symmetric_neighbours(entries)
    received = {origin: 1}
    queue = deque([origin])
    while queue:
        node = queue.popleft()
        for child in broadcast_children(origin, node, graph):
            received[child] = received.get(child, 0) + 1
            queue.append(child)
    assert set(received) == set(naive_distances(entries, origin))
    assert all(count == 1 for count in received.values())


# --- hardening: version jumps, unreachable entries, short ids --------------------------------------------

def _peer(i: int, version: int, uid: int = 1, conns: tuple[ConnectionEntry, ...] = ()) -> PeerEntry:
    return PeerEntry(peer_name_from_bytes(bytes([2, 0, 0, 0, 1, i])), f"p{i}", PeerUID(uid), version, ShortID(i),
                     conns)


def test_a_version_far_above_the_held_one_is_refused_unless_under_the_clock() -> None:
    t = fresh()
    clock = 1_780_000_000_000
    t.merge([_peer(1, clock)], clock)
    forged = _peer(1, 2**62, uid=2)
    assert t.merge([forged], clock).implausible == 1
    assert t.entries[forged.name].version == clock
    bump = _peer(1, clock + 5)
    restart = _peer(1, clock + 200 * 86_400_000, uid=3)  # restarted after 200 days up
    assert t.merge([bump], clock).improved == [bump]
    assert t.merge([restart], clock + 200 * 86_400_000).improved == [restart]
    assert t.merge([_peer(2, clock + 2 * 366 * 86_400_000)], clock).implausible == 1, "a clock two years ahead"


def test_without_a_clock_only_bounded_jumps_pass() -> None:
    t = fresh()
    assert t.merge([_peer(1, 10)]).improved
    assert t.merge([_peer(1, 10 + MAX_VERSION_JUMP + 1)]).implausible == 1
    assert t.merge([_peer(1, 10 + MAX_VERSION_JUMP)]).improved


def test_own_name_with_a_huge_version_is_dropped_not_reported() -> None:
    t = fresh()
    result = t.merge([PeerEntry(SELF, "forged", PeerUID(9), 2**62, ShortID(1), ())], 1_780_000_000_000)
    assert result.own_conflict is None and result.implausible == 1


def test_unreachable_entries_are_bounded_at_once() -> None:
    t = fresh()
    t.merge([_peer(i % 256, 1, uid=i) for i in range(200)])
    assert len(t.entries) == 201
    many = [PeerEntry(peer_name_from_bytes(bytes([2, 0, 0, 2, i >> 8, i & 0xFF])), "x", PeerUID(1), 1, ShortID(0), ())
            for i in range(MAX_UNREACHABLE + 10)]
    result = t.merge(many)
    assert len(t.entries) <= 1 + MAX_UNREACHABLE
    assert all(e.name in t.entries for e in result.improved)


def test_short_ids_count_only_reachable_peers() -> None:
    a = peer_name_from_bytes(bytes([2, 0, 0, 0, 0, 1]))
    ep = Endpoint("198.51.100.1", 6783)
    t = fresh()
    t.set_own(PeerEntry(SELF, "self", PeerUID(1), 2, ShortID(1), (ConnectionEntry(a, ep, True, True),)))
    t.merge([PeerEntry(a, "a", PeerUID(1), 1, ShortID(2), (ConnectionEntry(SELF, ep, False, True),))])
    squatters = [PeerEntry(peer_name_from_bytes(bytes([0, 0, 0, 0, 0, i])), "s", PeerUID(1), 1, ShortID(i), ())
                 for i in range(4)]
    t.merge(squatters)
    assert t.short_ids() == {SELF: 1, a: 2}
