"""The forwarding table against a brute-force model, the kernel routes it implies, and sleeve addresses."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.core.forwarding import (
    EMPTY,
    ForwardingTable,
    Route,
    build,
    remote_networks,
    sleeve_address,
    sleeve_overlay,
)
from weaved.core.ipam.ring import AddressRange, seeded_state
from weaved.core.sleeve import FrameError
from weaved.core.types import Endpoint, PeerName, peer_name_from_bytes

RANGE = AddressRange.from_cidr("10.32.0.0/12")
NAMES = [peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in range(6)]
OWN = NAMES[0]


def sleeve_of(name: PeerName) -> Endpoint:
    return Endpoint(f"198.51.100.{10 + NAMES.index(name)}", 6785)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[tuple[int, int, PeerName]], dict[PeerName, int], dict[PeerName, PeerName],
                                     dict[PeerName, Endpoint]]:
    cuts = sorted(draw(st.sets(st.integers(RANGE.start + 1, RANGE.end - 1), max_size=12)))
    bounds = [RANGE.start, *cuts, RANGE.end]
    segments = [(a, b, draw(st.sampled_from(NAMES))) for a, b in itertools.pairwise(bounds)]
    short_ids = {n: draw(st.integers(0, 7)) for n in NAMES if draw(st.booleans()) or n == OWN}
    neighbours = [n for n in NAMES[1:] if draw(st.booleans())]
    next_hops: dict[PeerName, PeerName] = {n: n for n in neighbours}
    for n in NAMES[1:]:
        if n not in next_hops and neighbours and draw(st.booleans()):
            next_hops[n] = draw(st.sampled_from(neighbours))
    addresses = {n: sleeve_of(n) for n in neighbours if draw(st.integers(0, 4))}  # mostly with a sleeve
    return segments, short_ids, next_hops, addresses


def model(address: int, segments: list[tuple[int, int, PeerName]], short_ids: dict[PeerName, int],
          next_hops: dict[PeerName, PeerName], addresses: dict[PeerName, Endpoint]) -> Route | str:
    owner = next((o for a, b, o in segments if a <= address < b), None)
    if owner is None:
        return "unowned"
    if owner == OWN:
        return "own-range"
    if owner not in short_ids or list(short_ids.values()).count(short_ids[owner]) > 1:
        return "unknown-destination"
    hop = next_hops.get(owner)
    if hop is None or hop not in addresses:
        return "no-route"
    return short_ids[owner], (addresses[hop].host, addresses[hop].port)


@given(worlds(), st.lists(st.integers(RANGE.start - 5, RANGE.end + 5), min_size=1, max_size=30))
def test_lookup_agrees_with_the_model(world: tuple, probes: list[int]) -> None:  # type: ignore[type-arg]
    segments, short_ids, next_hops, addresses = world
    table = build(OWN, short_ids, segments, next_hops, addresses)
    for address in [*probes, *(a for a, _, _ in segments), *(b - 1 for _, b, _ in segments)]:
        assert table.lookup(address) == model(address, segments, short_ids, next_hops, addresses)
    assert len(table.starts) <= len(segments)  # adjacent pieces with one answer are merged


@given(worlds())
def test_relay_known_and_senders(world: tuple) -> None:  # type: ignore[type-arg]
    segments, short_ids, next_hops, addresses = world
    table = build(OWN, short_ids, segments, next_hops, addresses)
    unique = {n: s for n, s in short_ids.items() if list(short_ids.values()).count(s) == 1}
    assert table.known == frozenset(unique.values())
    assert table.senders == frozenset((e.host, e.port) for e in addresses.values())
    for name, sid in unique.items():
        hop = next_hops.get(name)
        if name != OWN and hop in addresses:
            assert table.relay[sid] == (addresses[hop].host, addresses[hop].port)
        elif name != OWN:
            assert sid not in table.relay
    assert table.peers == len(table.relay)


@given(worlds(), st.lists(st.integers(RANGE.start - 5, RANGE.end + 5), min_size=1, max_size=30))
def test_owner_is_the_unambiguous_short_id_owning_the_address(world: tuple, probes: list[int]) -> None:  # type: ignore[type-arg]
    segments, short_ids, next_hops, addresses = world
    table = build(OWN, short_ids, segments, next_hops, addresses)
    ids = list(short_ids.values())
    for address in [*probes, *(a for a, _, _ in segments), *(b - 1 for _, b, _ in segments)]:
        owner = next((o for a, b, o in segments if a <= address < b), None)
        expected = short_ids[owner] if owner in short_ids and ids.count(short_ids[owner]) == 1 else -1
        assert table.owner(address) == expected


def test_inner_addresses_must_belong_to_the_frames_peers() -> None:
    """Regression: a frame's inner source and destination were never checked (a spoofed datagram put a
    packet from 6.6.6.6 into a pod)."""
    near, far = NAMES[1], NAMES[2]
    state = seeded_state(RANGE, [OWN, near, far])
    table = build(OWN, {OWN: 1, near: 2, far: 3}, state.segments(), {near: near, far: near}, {near: sleeve_of(near)})
    addr = {name: next(a for a, _, o in state.segments() if o == name) + 5 for name in (OWN, near, far)}

    def header(src: int, dst: int) -> bytes:
        return bytes(12) + src.to_bytes(4, "big") + dst.to_bytes(4, "big")

    table.check_inner(header(addr[near], addr[OWN]), 0, 2, 1)
    table.check_inner(header(addr[far], addr[near]), 0, 3, 2)  # relayed: dst is the frame's dst peer
    for src_addr, dst_addr, src, dst, reason in (
            (0x06060606, addr[OWN], 2, 1, "spoofed-source"),
            (addr[far], addr[OWN], 2, 1, "spoofed-source"),  # another peer's address
            (addr[near], addr[far], 2, 1, "spoofed-destination"),
            (addr[near], 0x0A000001, 2, 1, "spoofed-destination")):
        with pytest.raises(FrameError) as info:
            table.check_inner(header(src_addr, dst_addr), 0, src, dst)
        assert info.value.reason == reason


def test_a_short_id_collision_makes_both_peers_unroutable_not_misrouted() -> None:
    a, b = NAMES[1], NAMES[2]
    segments = [(RANGE.start, RANGE.start + 100, a), (RANGE.start + 100, RANGE.end, b)]
    table = build(OWN, {OWN: 1, a: 7, b: 7}, segments, {a: a, b: b}, {a: sleeve_of(a), b: sleeve_of(b)})
    assert table.lookup(RANGE.start) == "unknown-destination"
    assert table.lookup(RANGE.end - 1) == "unknown-destination"
    assert 7 not in table.known and 7 not in table.relay


def test_relayed_peer_goes_through_its_next_hop() -> None:
    far, near = NAMES[3], NAMES[2]
    state = seeded_state(RANGE, [OWN, near, far])
    table = build(OWN, {OWN: 1, near: 2, far: 3}, state.segments(), {near: near, far: near}, {near: sleeve_of(near)})
    far_address = next(a for a, _, o in state.segments() if o == far)
    assert table.lookup(far_address) == (3, ("198.51.100.12", 6785))
    assert table.relay == {2: ("198.51.100.12", 6785), 3: ("198.51.100.12", 6785)}


def test_empty_table_drops_everything() -> None:
    assert EMPTY.lookup(RANGE.start + 5) == "unowned"
    assert ForwardingTable(own_short_id=1).senders == frozenset()


@given(worlds())
def test_remote_networks_cover_exactly_what_others_own(world: tuple) -> None:  # type: ignore[type-arg]
    segments = world[0]
    networks = remote_networks(segments, OWN)
    covered = sorted((int(n.network_address), int(n.broadcast_address) + 1) for n in networks)
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert end <= start  # disjoint
    others = [(a, b) for a, b, o in segments if o != OWN]
    assert sum(b - a for a, b in covered) == sum(b - a for a, b in others)
    for a, b in others:
        assert any(s <= a and b <= e for s, e in _merge(covered))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def test_remote_networks_of_an_even_split_are_few_cidrs() -> None:
    state = seeded_state(RANGE, NAMES[:3])
    networks = remote_networks(state.segments(), NAMES[0])
    assert all(isinstance(n, ipaddress.IPv4Network) for n in networks)
    assert len(networks) <= 4
    assert remote_networks(state.segments(), PeerName("02:00:00:00:00:99")) == [ipaddress.ip_network("10.32.0.0/12")]


def test_sleeve_address_rules() -> None:
    control = Endpoint("198.51.100.11", 6783)
    assert sleeve_overlay(7000) == "sleeve:7000"
    assert sleeve_address(control, ("sleeve:7000",)) == Endpoint("198.51.100.11", 7000)
    assert sleeve_address(control, ("fastdp", "sleeve")) == Endpoint("198.51.100.11", 6785)  # an older peer
    assert sleeve_address(control, ()) is None  # a control-only peer (--no-datapath) carries no data
    assert sleeve_address(control, ("fastdp",)) is None
    for bad in ("sleeve:", "sleeve:x", "sleeve:0", "sleeve:70000"):
        assert sleeve_address(control, (bad,)) is None
    assert sleeve_address(Endpoint("198.51.100.11", 65534), ("sleeve",)) is None
