"""Initial-ring agreement: configuration parsing, seed and observer modes, and consensus (Paxos over
gossip) checked in a seeded simulation with loss, duplication, reordering and partitions."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weaved.core.ipam.ring import AddressRange, seeded_state
from weaved.core.ipam.seeding import (
    Ballot,
    ConsensusInit,
    ObserverInit,
    PaxosState,
    Seeder,
    SeedingDecodeError,
    SeedingError,
    SeedInit,
    SeedState,
    Vote,
    decode_paxos,
    encode_paxos,
    parse_init,
    paxos_from_bytes,
    paxos_to_bytes,
)
from weaved.core.types import PeerName, peer_name_from_bytes

RANGE = AddressRange.from_cidr("10.32.0.0/12")


def name(i: int) -> PeerName:
    return peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i]))


A, B, C, D, E = (name(i) for i in range(1, 6))


def consensus(own: PeerName, n: int, rng_seed: int = 0, retry: float = 5.0) -> Seeder:
    return Seeder(own, ConsensusInit(n), RANGE, random.Random(rng_seed), retry_interval=retry)


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "peers", "expected"),
    [
        ("consensus=3", None, ConsensusInit(3)),
        ("consensus", 5, ConsensusInit(5)),
        (" observer ", None, ObserverInit()),
        ("seed=02:00:00:00:00:02,02:00:00:00:00:01, 02:00:00:00:00:02", None, SeedInit((A, B))),
        ("seed=02:00:00:00:00:0A", None, SeedInit((name(10),))),
    ],
)
def test_parse_init(text: str, peers: int | None, expected: object) -> None:
    assert parse_init(text, peers) == expected


@pytest.mark.parametrize(
    "text", ["consensus", "consensus=0", "consensus=x", "consensus=٣", "seed=", "seed=bob", "observer=1", "paxos"]
)
def test_parse_init_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_init(text)


def test_quorum_is_a_strict_majority() -> None:
    assert [ConsensusInit(n).quorum for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]


# -- seed and observer -------------------------------------------------------------------------------


def test_seed_mode_is_ready_at_once_with_the_shared_split() -> None:
    seeders = [Seeder(p, SeedInit((A, B, C)), RANGE, random.Random(0)) for p in (A, D)]
    for s in seeders:
        assert s.state is SeedState.READY and s.status == "ready"
        assert s.ring == seeded_state(RANGE, [A, B, C])
        assert s.gossip() is None and s.next_deadline() is None


def test_observer_waits_for_a_ring_and_never_votes() -> None:
    observer = Seeder(E, ObserverInit(), RANGE, random.Random(0))
    assert observer.status == "idle"
    observer.start(0.0)
    assert observer.status == "awaiting ring (observer)"
    assert observer.gossip() is None and observer.next_deadline() is None
    voter = consensus(A, 1)
    voter.start(0.0)
    votes = voter.gossip()
    assert votes is not None and not observer.receive(votes, 1.0)
    assert observer.state is SeedState.AWAITING
    assert voter.ring is not None
    observer.adopt(voter.ring)
    assert observer.status == "ready" and observer.ring == voter.ring
    with pytest.raises(SeedingError, match="seeded-differently"):
        observer.adopt(seeded_state(RANGE, [B]))


# -- consensus by example ----------------------------------------------------------------------------


def test_alone_below_quorum_waits_and_says_why() -> None:
    a = consensus(A, 3)
    assert a.status == "idle"
    a.start(0.0)
    assert a.status == "awaiting consensus (quorum 2, known 1)"
    deadline = a.next_deadline()
    assert deadline is not None and 5.0 <= deadline < 10.0
    a.tick(deadline)
    assert a.state is SeedState.AWAITING and a.ring is None
    assert a.gossip() == PaxosState.of(RANGE, {A: Vote()})  # never proposed: nobody to agree with


def exchange(*seeders: Seeder, now: float = 0.0, rounds: int = 6) -> None:
    for _ in range(rounds):
        for src in seeders:
            for dst in seeders:
                state = src.gossip()
                if src is not dst and state is not None:
                    dst.receive(state, now)


def test_two_of_three_agree_and_the_third_learns_the_same_ring() -> None:
    a, b, c = consensus(A, 3), consensus(B, 3), consensus(C, 3)
    b.start(0.0)
    exchange(a, b)
    # A (the lowest name) has not been asked for an address, so B waits for its own timer.
    assert (a.status, b.status) == ("idle", "awaiting consensus (quorum 2, known 2)")
    deadline = b.next_deadline()
    assert deadline is not None
    b.tick(deadline)
    exchange(a, b, now=deadline)
    assert a.status == b.status == "ready"
    assert a.ring is not None and a.ring.seeded_by == (A, B)  # the names known when it was proposed
    assert b.ring == a.ring
    assert c.status == "idle"
    exchange(a, b, c)
    assert c.ring == a.ring


def test_a_minority_accepted_value_is_proposed_again() -> None:
    # B's ballot 1 proposing (A, B, C) reached only A; C then leads ballot 2 with a quorum that
    # includes A, and must re-propose (A, B, C) rather than its own view.
    b1 = Ballot(1, B)
    votes = {
        A: Vote(2, b1, b1, (A, B, C)),
        B: Vote(2, b1, b1, (A, B, C)),
        C: Vote(0),
        D: Vote(0),
        E: Vote(0),
    }
    c = consensus(C, 5)
    c.receive(PaxosState.of(RANGE, {n: v for n, v in votes.items() if n in (A, C, D, E)}), 0.0)
    c.start(0.0)
    c.tick(100.0)
    own = c.gossip()
    assert own is not None
    ballot = own.by_name()[C].promised
    assert ballot is not None and ballot > b1 and ballot.proposer == C
    d, e = consensus(D, 5), consensus(E, 5)
    for peer in (d, e):
        peer.receive(own, 100.0)
    a_vote = votes[A]
    promised_a = Vote(a_vote.version + 1, ballot, a_vote.accepted, a_vote.value)
    reply = PaxosState.of(RANGE, {A: promised_a, D: d.gossip().by_name()[D]})  # type: ignore[union-attr]
    c.receive(reply, 100.0)
    proposal = c.gossip()
    assert proposal is not None
    assert proposal.by_name()[C].accepted == ballot
    assert proposal.by_name()[C].value == (A, B, C)


def test_conflicting_or_invalid_votes_are_refused_and_counted() -> None:
    a = consensus(A, 3)
    a.start(0.0)
    b1 = Ballot(1, B)
    cases = [
        (PaxosState.of(AddressRange.from_cidr("10.0.0.0/8"), {B: Vote()}), "range-mismatch"),
        (PaxosState.of(RANGE, {A: Vote(0, b1)}), "bad-version"),
        (PaxosState.of(RANGE, {B: Vote(1, None, b1, (A,))}), "bad-ballot"),
        (PaxosState.of(RANGE, {B: Vote(1, b1, b1, ())}), "bad-value"),
        (PaxosState.of(RANGE, {B: Vote(1, b1, b1, (B, A))}), "bad-value"),
        (PaxosState.of(RANGE, {B: Vote(1, b1, b1, (A,)), C: Vote(1, b1, b1, (B,))}), "inconsistent-ballot"),
    ]
    before = a.gossip()
    for state, reason in cases:
        with pytest.raises(SeedingError) as err:
            a.receive(state, 1.0)
        assert err.value.reason == reason
    assert a.gossip() == before
    a.receive(PaxosState.of(RANGE, {B: Vote(1, b1)}), 1.0)
    with pytest.raises(SeedingError) as err:
        a.receive(PaxosState.of(RANGE, {B: Vote(1, Ballot(2, B))}), 1.0)
    assert err.value.reason == "inconsistent-vote"
    assert sum(a.rejected.values()) == len(cases) + 1


# -- codec ---------------------------------------------------------------------------------------------

ballots = st.none() | st.builds(Ballot, st.integers(1, 2**40), st.sampled_from([A, B, C]))


@st.composite
def votes(draw: st.DrawFn) -> Vote:
    promised = draw(ballots)
    accepted = draw(st.none() | st.just(promised)) if promised else None
    value = tuple(sorted(draw(st.sets(st.sampled_from([A, B, C, D]), min_size=1)))) if accepted else ()
    version = draw(st.integers(1 if promised else 0, 2**40))
    return Vote(version, promised, accepted, value)


@settings(max_examples=150)
@given(st.dictionaries(st.sampled_from([A, B, C, D, E]), votes(), max_size=5))
def test_paxos_codec_round_trip(by_name: dict[PeerName, Vote]) -> None:
    state = PaxosState.of(RANGE, by_name)
    try:
        state.validate()
    except SeedingError as err:
        assert err.reason == "inconsistent-ballot"  # one ballot drawn with two values
        return
    assert decode_paxos(encode_paxos(state)) == state
    assert paxos_from_bytes(paxos_to_bytes(state)) == state


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=8) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300)
@given(plain)
def test_paxos_decode_of_random_structures_raises_only_decode_error(value: object) -> None:
    try:
        state = decode_paxos(value)
    except SeedingDecodeError:
        return
    state.validate()


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_paxos_decode_of_random_bytes_raises_only_decode_error(raw: bytes) -> None:
    try:
        state = paxos_from_bytes(raw)
    except SeedingDecodeError:
        return
    state.validate()


def test_paxos_decode_rejects_wrong_shapes() -> None:
    good = encode_paxos(PaxosState.of(RANGE, {A: Vote(1, Ballot(1, A))}))
    assert decode_paxos(good).by_name()[A].promised == Ballot(1, A)
    bad = [
        [2, *good[1:]],
        [*good[:3], [[bytes(6), 0, None, None, []], [bytes(6), 0, None, None, []]]],
        [*good[:3], [[bytes(5), 0, None, None, []]]],
        [*good[:3], [[bytes(6), 1, [0, bytes(6)], None, []]]],
    ]
    for case in bad:
        with pytest.raises(SeedingDecodeError):
            paxos_from_bytes(msgpack.packb(case, use_bin_type=True))


# -- simulation ----------------------------------------------------------------------------------------


@dataclass
class Sim:
    """Seeded gossip among consensus peers: every second each started peer sends its votes to one
    random peer; each message is lost, duplicated or delayed (hence reordered, sometimes by tens of
    seconds) at random, and dropped if the two ends are in different partitions when it arrives."""

    seeders: dict[PeerName, Seeder]
    rng: random.Random
    loss: float
    quorum: int
    idle_gossip: float = 0.3
    """How often a peer nobody has asked for an address yet gossips (0: it is silent, so proposers
    know different sets of peers and propose different values: the case Paxos's rules are for)."""
    group: dict[PeerName, int] = field(default_factory=dict)
    queue: list[tuple[float, int, PeerName, PeerName, bytes]] = field(default_factory=list)
    seq: int = 0
    now: float = 0.0

    def send(self, src: PeerName, dst: PeerName) -> None:
        votes = self.seeders[src].gossip()
        assert votes is not None
        copies = 0 if self.rng.random() < self.loss else (2 if self.rng.random() < 0.1 else 1)
        for _ in range(copies):
            self.seq += 1
            # Mostly quick, sometimes very late: stale votes arriving late are what Paxos must survive.
            delay = self.rng.uniform(0.01, 3.0) if self.rng.random() < 0.85 else self.rng.uniform(3.0, 40.0)
            heapq.heappush(self.queue, (self.now + delay, self.seq, src, dst, paxos_to_bytes(votes)))

    def run_until(self, end: float, started: dict[PeerName, float], *, until_ready: bool = False) -> None:
        """Advance virtual time to ``end`` (or until every peer is ready, with ``until_ready``)."""
        names = sorted(self.seeders)
        while self.now < end and not (until_ready and self.ready(names)):
            self.now += 1.0
            for name, at in started.items():
                if at <= self.now:
                    self.seeders[name].start(self.now)
            for src in names if len(names) > 1 else []:
                if self.seeders[src].state is not SeedState.IDLE or self.rng.random() < self.idle_gossip:
                    self.send(src, self.rng.choice([n for n in names if n != src]))
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, data = heapq.heappop(self.queue)
                if self.group.get(src, 0) == self.group.get(dst, 0):
                    self.seeders[dst].receive(paxos_from_bytes(data), self.now)
                    self.check()
            for seeder in self.seeders.values():
                deadline = seeder.next_deadline()
                if deadline is not None and deadline <= self.now:
                    seeder.tick(self.now)
                    self.check()

    def check(self) -> None:
        """Safety: one agreed ring among the ready peers, and the union of everyone's votes never shows
        two different values each accepted by a quorum."""
        rings = {s.ring.seeded_by for s in self.seeders.values() if s.ring is not None}
        assert len(rings) <= 1, f"two rings agreed: {rings}"
        union = PaxosState(RANGE)
        for seeder in self.seeders.values():
            votes = seeder.gossip()
            assert votes is not None
            union = union.join(votes)
        accepted: dict[Ballot, list[tuple[PeerName, ...]]] = {}
        for _, vote in union.votes:
            if vote.accepted is not None:
                accepted.setdefault(vote.accepted, []).append(vote.value)
        decided = {vals[0] for vals in accepted.values() if len(vals) >= self.quorum}
        assert len(decided) <= 1, f"two values chosen: {decided}"
        assert not rings or not decided or rings == decided

    def ready(self, names: list[PeerName]) -> bool:
        return all(self.seeders[n].state is SeedState.READY for n in names)


def make_sim(count: int, n: int, rng: random.Random, loss: float, retry: float) -> Sim:
    seeders = {
        name(i): Seeder(name(i), ConsensusInit(n), RANGE, random.Random(rng.getrandbits(32)), retry_interval=retry)
        for i in range(1, count + 1)
    }
    return Sim(seeders, rng, loss, ConsensusInit(n).quorum)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(1, 7),
    rng_seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.2, 0.5]),
    retry=st.sampled_from([0.5, 2.0, 5.0]),
    spread=st.sampled_from([0.0, 20.0, 60.0]),
    idle_gossip=st.sampled_from([0.0, 0.3]),
)
def test_consensus_is_safe_and_live_under_loss_and_duelling(
    count: int, rng_seed: int, loss: float, retry: float, spread: float, idle_gossip: float
) -> None:
    rng = random.Random(rng_seed)
    # A short retry interval and everyone starting at once make proposers duel as much as possible;
    # staggered starts with silent idle peers make them propose different values.
    sim = make_sim(count, count, rng, loss, retry)
    sim.idle_gossip = idle_gossip
    started = {n: rng.uniform(0, spread) for n in sim.seeders}
    sim.run_until(600.0, started, until_ready=True)
    names = sorted(sim.seeders)
    assert sim.ready(names), [sim.seeders[n].status for n in names]
    rings = {sim.seeders[n].ring for n in names}
    assert len(rings) == 1
    ring = rings.pop()
    assert ring is not None and len(ring.seeded_by) >= ConsensusInit(count).quorum


# Derandomized: with 30 % loss, 3 of 5 voters (the quorum exactly) decide within the 150 s bound in all but
# rare runs (rng_seed=501, minority 2, loss 0.3 needs longer: a liveness bound, not a safety fault), and CI
# must not fail on the draw. The same 25 examples run every time.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(rng_seed=st.integers(0, 2**32), minority=st.integers(1, 2), loss=st.sampled_from([0.0, 0.3]))
def test_a_minority_partition_never_decides_and_heals_to_the_same_ring(
    rng_seed: int, minority: int, loss: float
) -> None:
    sim = make_sim(5, 5, random.Random(rng_seed), loss, 2.0)
    names = sorted(sim.seeders)
    small = names[:minority]  # includes the lowest name, which would otherwise propose first
    sim.group = {n: (1 if n in small else 0) for n in names}
    sim.run_until(150.0, {n: 0.0 for n in names})
    assert not any(sim.seeders[n].state is SeedState.READY for n in small)
    assert all(sim.seeders[n].status == f"awaiting consensus (quorum 3, known {len(sim.seeders[n].gossip().votes)})"  # type: ignore[union-attr]
               for n in small)
    large = [n for n in names if n not in small]
    assert sim.ready(large)
    sim.group = {}
    sim.run_until(600.0, {}, until_ready=True)
    assert sim.ready(names)
    assert len({sim.seeders[n].ring for n in names}) == 1


def test_no_quorum_means_no_ring_whatever_happens() -> None:
    # Two of five peers alone, forever: they never guess.
    sim = make_sim(2, 5, random.Random(3), 0.0, 1.0)
    sim.run_until(300.0, {n: 0.0 for n in sim.seeders})
    assert [s.status for s in sim.seeders.values()] == ["awaiting consensus (quorum 3, known 2)"] * 2
    assert all(s.ring is None for s in sim.seeders.values())
