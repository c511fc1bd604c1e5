"""The IPAM ring: examples of every rule, the CRDT laws on states built by legal histories, the codec.

The multi-peer model (partitions, loss, concurrent rmpeer, leases) is in ``test_ipam_cluster.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weaved.core.ipam.ring import (
    INHERIT_VERSION_JUMP,
    AddressRange,
    Ring,
    RingDecodeError,
    RingError,
    RingState,
    Token,
    decode_ring,
    encode_ring,
    ring_from_bytes,
    ring_to_bytes,
    seeded_state,
    split_range,
)
from weaved.core.types import PeerName, peer_name_from_bytes


def name(i: int) -> PeerName:
    return peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i]))


A, B, C, D, E = (name(i) for i in range(1, 6))
RANGE = AddressRange.from_cidr("10.32.0.0/26")
S = RANGE.start


def rel(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges relative to the start of RANGE, for readable assertions."""
    return [(s - S, e - S) for s, e in ranges]


def layout(ring: Ring | RingState) -> list[tuple[int, int, PeerName]]:
    state = ring.state if isinstance(ring, Ring) else ring
    return [(s - S, e - S, o) for s, e, o in state.segments()]


def seeded(*peers: PeerName, seed: tuple[PeerName, ...] = (A, B, C, D)) -> dict[PeerName, Ring]:
    rings = {p: Ring(p, RANGE) for p in peers}
    for ring in rings.values():
        ring.seed(seed)
    return rings


def believers(rings: list[Ring], address: int) -> list[PeerName]:
    """Peers that consider ``address`` theirs (may allocate from it)."""
    return [r.own for r in rings if r.state.owner_of(address) == r.own and not r.removed]


# -- addresses and the initial split ----------------------------------------------------------------


def test_range_parsing_and_reserved_addresses() -> None:
    r = AddressRange.from_cidr("10.32.0.0/12")
    assert (r.start, r.size, str(r)) == (0x0A200000, 1 << 20, "10.32.0.0/12")
    assert r.reserved() == {r.start, r.end - 1}
    assert AddressRange.from_cidr("10.0.0.4/31").reserved() == frozenset()
    for bad in ("10.32.0.1/12", "fd00::/64", "nonsense"):
        with pytest.raises(ValueError):
            AddressRange.from_cidr(bad)


def test_split_halves_recursively_and_is_order_independent() -> None:
    assert [(s - S, p) for s, p in split_range(RANGE, [D, B, A, C])] == [(0, A), (16, B), (32, C), (48, D)]
    assert [(s - S, p) for s, p in split_range(RANGE, [C, A, B])] == [(0, A), (32, B), (48, C)]
    assert split_range(RANGE, [B, A]) == split_range(RANGE, [A, B, A])
    tiny = AddressRange(S, 2)
    assert [p for _, p in split_range(tiny, [A, B, C])] == [A, B]  # more peers than addresses
    with pytest.raises(ValueError):
        split_range(RANGE, [])


def test_seeded_rings_are_identical_and_cover_every_address_once() -> None:
    rings = seeded(A, B, E)
    assert rings[A].state == rings[B].state == rings[E].state
    assert layout(rings[A]) == [(0, 16, A), (16, 32, B), (32, 48, C), (48, 64, D)]
    assert rings[E].owned_ranges() == []
    assert sum(t.free for t in rings[A].state.tokens) == RANGE.size
    with pytest.raises(RingError, match="already-seeded"):
        rings[A].seed([A])


def test_unseeded_ring_adopts_a_seeded_one_and_different_seeds_never_join() -> None:
    fresh = Ring(E, RANGE)
    assert fresh.merge(seeded(A)[A].state).changed
    assert layout(fresh) == layout(seeded(A)[A])
    other = Ring(A, RANGE)
    other.seed([A, B])
    with pytest.raises(RingError) as err:
        fresh.merge(other.state)
    assert err.value.reason == "seeded-differently"
    assert fresh.rejected["seeded-differently"] == 1


# -- grants -------------------------------------------------------------------------------------------


def test_grant_hands_over_a_sub_range_and_keeps_the_rest() -> None:
    rings = seeded(A, C)
    a = rings[A]
    a.grant(S + 8, S + 12, C)
    assert layout(a) == [(0, 8, A), (8, 12, C), (12, 16, A), (16, 32, B), (32, 48, C), (48, 64, D)]
    assert {t.start - S: t.free for t in a.state.tokens if t.owner == C} == {8: 4, 32: 16}
    result = rings[C].merge(a.state)
    assert result.changed and result.ours_changed
    assert rel(rings[C].owned_ranges()) == [(8, 12), (32, 48)]
    assert not rings[C].merge(a.state).changed  # idempotent


def test_grant_at_the_range_end_keeps_the_wrapped_piece() -> None:
    # D owns [48, 64); granting its top makes a token at the range start so the last token's wrap
    # does not swallow A's [0, 16).
    d = seeded(D)[D]
    d.grant(S + 56, S + 64, A)
    assert layout(d)[-1] == (56, 64, A)
    assert rel(d.state.owned_ranges(A)) == [(0, 16), (56, 64)]
    # Same on a ring whose first token is not at the range start.
    e = Ring(E, RANGE, RingState(RANGE, (E,), (Token(S + 10, E, 1, 64),)))
    e.grant(S + 60, S + 64, A)
    assert layout(e) == [(0, 10, E), (10, 60, E), (60, 64, A)]
    assert e.state.token_at(S) is not None


def test_grant_preconditions() -> None:
    a = seeded(A)[A]
    cases: list[tuple[Callable[[], None], str]] = [
        (lambda: a.grant(S + 15, S + 17, C), "not-owner"),  # crosses into B's range
        (lambda: a.grant(S + 4, S + 4, C), "bad-range"),
        (lambda: a.grant(S - 1, S + 4, C), "bad-range"),
        (lambda: a.grant(S, S + 4, A), "self"),
        (lambda: a.grant(S, S + 4, PeerName("not-a-name")), "bad-name"),
        (lambda: Ring(A, RANGE).grant(S, S + 4, B), "not-seeded"),
    ]
    before = a.state
    for call, reason in cases:
        with pytest.raises(RingError) as err:
            call()
        assert err.value.reason == reason
    assert a.state == before


def test_report_free_bumps_only_changed_tokens() -> None:
    a = seeded(A)[A]
    token = a.state.tokens[0]
    assert not a.report_free({token.start: token.free})
    assert a.report_free({token.start: 3})
    assert a.state.tokens[0] == Token(token.start, A, 2, 3)
    for free, reason in (({S + 16: 1}, "not-owner"), ({S: 17}, "bad-free"), ({S + 1: 1}, "not-owner")):
        with pytest.raises(RingError) as err:
            a.report_free(free)
        assert err.value.reason == reason


def test_pick_donor_is_weighted_by_free_and_skips_removed_and_self() -> None:
    rings = seeded(A)
    a = rings[A]
    a.report_free({S: 0})
    a.rmpeer(D)  # A is not D's heir (C is): D's token stays recorded as D's, but D is removed
    rng = random.Random(7)
    picks = {a.pick_donor(rng) for _ in range(200)}
    assert picks == {B, C}
    assert a.pick_donor(rng, exclude=[B, C]) is None


# -- rmpeer --------------------------------------------------------------------------------------------


def test_rmpeer_gives_the_dead_range_to_the_left_neighbour() -> None:
    rings = seeded(A, B, C)
    assert rings[A].rmpeer(D) == ()  # A is not the heir: it only records the tombstone
    assert layout(rings[A])[-1] == (48, 64, D)
    assert rings[C].merge(rings[A].state).inherited == (S + 48,)
    assert layout(rings[C])[-1] == (48, 64, C)
    assert rings[C].state.token_at(S + 48) == Token(S + 48, C, 1 + INHERIT_VERSION_JUMP, 16)
    assert rings[A].merge(rings[C].state).changed
    assert rings[A].state == rings[C].state
    assert rings[A].rmpeer(D) == ()  # idempotent


def test_concurrent_rmpeer_with_partial_knowledge_ends_with_one_owner() -> None:
    # A and B remove the dead D at the same time, and they disagree about D's left neighbour: C handed
    # [32, 48) to A, and A handed [40, 48) on to E; B has heard of neither.
    rings = seeded(A, B, C, E)
    a, b, c, e = rings[A], rings[B], rings[C], rings[E]
    everyone = [a, b, c, e]

    def check() -> None:
        for address in range(RANGE.start, RANGE.end):
            assert len(believers(everyone, address)) <= 1

    c.grant(S + 32, S + 48, A)
    a.merge(c.state)
    a.grant(S + 40, S + 48, E)
    # Neither caller takes anything: in A's view the heir is E, in B's stale view it is C.
    assert a.rmpeer(D) == ()
    assert b.rmpeer(D) == ()
    assert layout(b)[-1] == (48, 64, D)
    check()
    # Gossip in an unfortunate order. C knows it gave [32, 48) to A, so A's token precedes D's and C
    # inherits nothing; E, before it hears of A's grant, is not the heir either.
    assert c.merge(b.state).inherited == ()
    assert e.merge(b.state).inherited == ()
    check()
    assert e.merge(a.state).inherited == (S + 48,)  # now E knows it is D's left neighbour
    check()
    for _ in range(3):
        for src in everyone:
            for dst in everyone:
                assert not dst.merge(src.state).inherited
                check()
    assert len({r.state for r in everyone}) == 1
    assert layout(a)[-2:] == [(40, 48, E), (48, 64, E)]
    assert not any(r.rejected for r in everyone)


def test_weave_style_rmpeer_produces_conflicting_rings() -> None:
    # The failure this design avoids: two callers each take the dead peer's tokens (version+100).
    rings = seeded(A, B)
    states = []
    for caller in (A, B):
        s = rings[caller].state
        tokens = tuple(Token(t.start, caller, t.version + 100, t.free) if t.owner == D else t for t in s.tokens)
        states.append(RingState(RANGE, s.seeded_by, tokens, s.removed))
    with pytest.raises(RingError) as err:
        states[0].join(states[1])
    assert err.value.reason == "inconsistent-entry"


def test_rmpeer_preconditions_and_the_last_owner() -> None:
    solo = Ring(A, RANGE)
    solo.seed([B])
    with pytest.raises(RingError) as err:
        solo.rmpeer(B)
    assert err.value.reason == "last-owner"
    assert not solo.state.removed
    assert solo.rmpeer(B, adopt_orphans=True) == (S,)
    assert solo.owned_ranges() == [(RANGE.start, RANGE.end)]
    with pytest.raises(RingError, match="self"):
        solo.rmpeer(A)
    with pytest.raises(RingError, match="not-seeded"):
        Ring(A, RANGE).rmpeer(B)


def test_concurrent_removal_of_the_last_owners_orphans_the_ring_safely() -> None:
    rings = seeded(E, seed=(A, B))  # E owns nothing; A and B are the only owners
    e2 = Ring(C, RANGE, rings[E].state)
    rings[E].rmpeer(A)
    e2.rmpeer(B)
    rings[E].merge(e2.state)
    assert rings[E].state.orphaned
    assert rings[E].owned_ranges() == []  # nobody took anything: safe, and the status can say why
    assert rings[E].rmpeer(A, adopt_orphans=True) == tuple(t.start for t in rings[E].state.tokens)


def test_removed_peer_refuses_the_ring_that_removes_it() -> None:
    rings = seeded(A, D)
    rings[A].rmpeer(D)
    before = rings[D].state
    with pytest.raises(RingError) as err:
        rings[D].merge(rings[A].state)
    assert err.value.reason == "removed"
    assert rings[D].state == before and rings[D].rejected["removed"] == 1


def test_stale_knowledge_of_the_dead_peer_is_detected_not_silent() -> None:
    # The documented residual risk: D handed part of its range to E just before dying and only E
    # heard. C, D's heir, takes the whole range; the two claims meet and the merge refuses.
    rings = seeded(C, D, E)
    rings[D].grant(S + 56, S + 64, E)
    rings[E].merge(rings[D].state)
    rings[C].rmpeer(D)
    assert layout(rings[C])[-1] == (48, 64, C)
    with pytest.raises(RingError) as err:
        rings[C].merge(rings[E].state)
    assert err.value.reason == "entry-in-my-range"


# -- leave ---------------------------------------------------------------------------------------------


def test_leave_hands_everything_over() -> None:
    rings = seeded(A, B, C)
    assert rings[B].leave(C) == (S + 16,)
    assert rings[B].owned_ranges() == []
    assert rel(rings[B].state.owned_ranges(C)) == [(16, 48)]
    assert rings[A].leave() == (S,)  # to the left neighbour, wrapping: D
    assert rel(rings[A].state.owned_ranges(D)) == [(0, 16), (48, 64)]
    with pytest.raises(RingError, match="no-heir"):
        only = Ring(A, RANGE)
        only.seed([A])
        only.leave()


# -- rejecting remote state --------------------------------------------------------------------------


def forged(state: RingState, start: int, owner: PeerName, version: int, free: int = 0) -> RingState:
    tokens = {t.start: t for t in state.tokens}
    tokens[start] = Token(start, owner, version, free)
    return RingState(state.range, state.seeded_by, tuple(tokens[s] for s in sorted(tokens)), state.removed)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: forged(s, S, A, 1, 5), "inconsistent-entry"),  # same version, other content
        (lambda s: forged(s, S, B, 2, 16), "newer-version-of-own-token"),  # someone edits our token
        (lambda s: forged(forged(s, S, A, 1, 4), S + 4, B, 1), "entry-in-my-range"),  # inside our range
        (lambda s: RingState(AddressRange(S, 32), (A,), (Token(S, A, 1, 32),)), "range-mismatch"),
        (lambda s: forged(s, S + 64, B, 1), "out-of-range"),
        (lambda s: forged(s, S + 20, B, 1, 99), "bad-free"),
        (lambda s: RingState(s.range, s.seeded_by, s.tokens[::-1], s.removed), "unsorted"),
        (lambda s: RingState(s.range, (), s.tokens, s.removed), "bad-seed"),
    ],
)
def test_merge_rejects_bad_remote_state_and_leaves_ours_untouched(
    make: Callable[[RingState], RingState], reason: str
) -> None:
    a = seeded(A)[A]
    before = a.state
    with pytest.raises(RingError) as err:
        a.merge(make(before))
    assert err.value.reason == reason
    assert a.state == before
    assert a.rejected == {reason: 1}


# -- legal histories and the CRDT laws ----------------------------------------------------------------

PEERS = (A, B, C, D)
ops = st.lists(
    st.tuples(
        st.sampled_from(["grant", "merge", "rmpeer", "leave", "free"]),
        st.sampled_from(PEERS),
        st.sampled_from(PEERS),
        st.integers(0, 63),
    ),
    max_size=30,
)


def history(steps: list[tuple[str, PeerName, PeerName, int]]) -> list[RingState]:
    """Run a legal history among four peers (any op that a peer refuses is skipped) and return every
    state any peer held. Peers never remove a peer they know to be alive in this model, so every
    removed peer is one that stopped acting."""
    rings = seeded(*PEERS)
    stopped: set[PeerName] = set()
    states = [rings[A].state]
    for kind, p, q, n in steps:
        ring = rings[p]
        if p in stopped:
            continue
        try:
            if kind == "grant":
                ranges = ring.owned_ranges()
                if ranges:
                    lo, hi = ranges[n % len(ranges)]
                    ring.grant(lo + (hi - lo) // 2, hi, q)
            elif kind == "merge":
                ring.merge(rings[q].state)
            elif kind == "rmpeer" and q != p:
                # rmpeer's precondition (docs/ipam.md): the dead peer's last changes reached the living.
                stopped.add(q)
                for other in PEERS:
                    if other not in stopped:
                        rings[other].merge(rings[q].state)
                ring.rmpeer(q)
            elif kind == "leave":
                ring.leave(q)
                stopped.add(p)
            elif kind == "free":
                ring.report_free({t: min(n, sum(e - s for s, e in segs)) for t, segs in ring.own_tokens().items()})
        except RingError as err:
            assert err.reason in {"self", "removed-peer", "removed", "last-owner", "no-heir"}, err
        states.append(ring.state)
    return states


def safe_join(x: RingState, y: RingState) -> RingState | str:
    try:
        return x.join(y)
    except RingError as err:
        return err.reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.data())
def test_join_is_commutative_associative_and_idempotent(
    steps: list[tuple[str, PeerName, PeerName, int]], data: st.DataObject
) -> None:
    states = history(steps)
    pick = st.sampled_from(states)
    x, y, z = data.draw(pick), data.draw(pick), data.draw(pick)
    assert x.join(x) == x
    assert safe_join(x, y) == safe_join(y, x)
    xy, yz = safe_join(x, y), safe_join(y, z)
    left = safe_join(xy, z) if isinstance(xy, RingState) else xy
    right = safe_join(x, yz) if isinstance(yz, RingState) else yz
    if isinstance(left, RingState) or isinstance(right, RingState):
        assert left == right


@settings(max_examples=60, deadline=None)
@given(ops)
def test_states_of_legal_histories_always_join(steps: list[tuple[str, PeerName, PeerName, int]]) -> None:
    # Dead peers' tokens are only ever rewritten by their heir, so no two states conflict: folding
    # every state any peer ever held succeeds, and the result still has one owner per address.
    states = history(steps)
    total = states[0]
    for s in states[1:]:
        total = total.join(s)
    assert sum(e - s for s, e, _ in total.segments()) == RANGE.size


@settings(max_examples=100, deadline=None)
@given(ops)
def test_encode_decode_round_trip(steps: list[tuple[str, PeerName, PeerName, int]]) -> None:
    for state in history(steps)[-3:]:
        assert decode_ring(encode_ring(state)) == state
        assert ring_from_bytes(ring_to_bytes(state)) == state


def test_unseeded_state_round_trips() -> None:
    empty = RingState(RANGE)
    assert ring_from_bytes(ring_to_bytes(empty)) == empty


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=8) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300)
@given(plain)
def test_decode_of_random_structures_raises_only_decode_error(value: object) -> None:
    try:
        state = decode_ring(value)
    except RingDecodeError:
        return
    assert not state.problems()


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_of_random_bytes_raises_only_decode_error(raw: bytes) -> None:
    try:
        state = ring_from_bytes(raw)
    except RingDecodeError:
        return
    assert not state.problems()


@settings(max_examples=300)
@given(st.data())
def test_decode_of_mutated_valid_rings_raises_only_decode_error(data: st.DataObject) -> None:
    encoded = encode_ring(seeded(A)[A].state)
    path_value = data.draw(plain)
    field_index = data.draw(st.integers(0, 5))
    encoded[field_index] = path_value
    try:
        state = decode_ring(encoded)
    except RingDecodeError:
        return
    state.validate()  # whatever decoded is a valid ring


def test_decode_rejects_valid_msgpack_of_the_wrong_shape() -> None:
    cases = [
        [1, S, 64, [], [], []],  # fine: an unseeded ring
        [2, S, 64, [], [], []],
        [1, S, 64, [bytes(6)], [], []],
        [1, S, 64, [bytes(6)], [[S, bytes(6), 0, 0]], []],
        [1, S, 64, [bytes(6)], [[S, bytes(6), 1, 0]], [bytes(6), bytes(6)]],
        [True, S, 64, [], [], []],
    ]
    assert decode_ring(cases[0]) == RingState(RANGE)
    for case in cases[1:]:
        with pytest.raises(RingDecodeError):
            decode_ring(case)
        with pytest.raises(RingDecodeError):
            ring_from_bytes(msgpack.packb(case, use_bin_type=True))
    with pytest.raises(RingDecodeError, match="too-large"):
        ring_from_bytes(b"\x00" * (5 << 20))


def test_seeded_state_matches_ring_seed() -> None:
    assert seeded_state(RANGE, [A, B, C, D]) == seeded(A)[A].state
