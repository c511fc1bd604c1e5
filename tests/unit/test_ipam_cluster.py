"""A model cluster: peers with rings and leases, a lossy reordering network, partitions, deaths,
concurrent rmpeer and graceful leaves, driven by hypothesis.

Everything is in-process and deterministic: messages are data in a list, delivered, duplicated or
dropped by rules that hypothesis picks (and shrinks). After every step:

* no merge anywhere was refused (legal histories never conflict),
* no address is considered "mine" by two live peers (the safety property behind everything),
* no address is leased twice and every lease lies in its holder's ranges,
* the rings of all peers, dead ones included, still join into one valid ring.

``converge`` heals the network and gossips until quiet, then checks that the live peers agree and that
every range of a removed peer has reached its heir.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from weaved.core.ipam.ring import AddressRange, Ring, RingError, RingState, ring_from_bytes, ring_to_bytes
from weaved.core.ipam.space import Space
from weaved.core.types import PeerName, peer_name_from_bytes

RANGE = AddressRange.from_cidr("10.40.0.0/26")
OWNERS = tuple(peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in range(1, 6))
OBSERVER = peer_name_from_bytes(bytes([2, 0, 0, 0, 0, 0x20]))
ALL = (*OWNERS, OBSERVER)
peer_index = st.integers(0, len(ALL) - 1)

EXPECTED_REFUSALS = {
    "not-seeded",  # acting before the ring arrived
    "removed-peer",  # handing space to a peer we know was removed
    "last-owner",  # rmpeer that would leave nobody owning anything
    "no-heir",  # leave when we own the whole ring
}


@dataclass
class Peer:
    name: PeerName
    ring: Ring
    space: Space
    alive: bool = True
    leases: dict[int, int] = field(default_factory=dict)
    """container id → address"""
    authored: dict[int, int] = field(default_factory=dict)
    """token start → highest version this peer wrote by a hand-over, split or inheritance (free-count
    reports excluded): rmpeer's precondition is that the living know all of these."""


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[PeerName, Peer] = {}
        self.queue: list[tuple[PeerName, PeerName, bytes]] = []
        self.group: dict[PeerName, int] = {}
        self.seed_names: tuple[PeerName, ...] = ()
        self.failures: list[str] = []
        self.next_container = 0
        self.rng = random.Random(0)

    # -- helpers ----------------------------------------------------------------------------------

    def pick(self, index: int) -> Peer:
        """Any peer, by index (so that every draw names a peer that exists)."""
        peers = list(self.peers.values())
        return peers[index % len(peers)]

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive]

    def record(self, peer: Peer, before: RingState, remote: RingState | None = None) -> None:
        """Remember the token versions ``peer`` itself wrote: whatever is newer than both what it had
        and what it was sent (local mutators, and inheritances during a merge)."""
        for token in peer.ring.state.tokens:
            old = before.token_at(token.start)
            sent = remote.token_at(token.start) if remote is not None else None
            if (old is None or token.version > old.version) and (sent is None or token.version > sent.version):
                peer.authored[token.start] = max(token.version, peer.authored.get(token.start, 0))

    def refresh(self, peer: Peer) -> None:
        """After the ring changed: update free space, report free counts, check no lease was lost."""
        outside = peer.space.set_ranges(peer.ring.owned_ranges())
        if outside:
            self.failures.append(f"{peer.name} lost leased addresses {outside}")
        if peer.ring.seeded and not peer.ring.removed and peer.ring.own_tokens():
            peer.ring.report_free(  # free-only edits: deliberately not recorded as authored
                {t: sum(peer.space.count_free(s, e) for s, e in segs) for t, segs in peer.ring.own_tokens().items()}
            )

    def local(self, peer: Peer, action: str, *args: object) -> bool:
        """Run a local mutator, recording authorship; False if it was (expectedly) refused."""
        before = peer.ring.state
        try:
            getattr(peer.ring, action)(*args)
        except RingError as err:
            if err.reason not in EXPECTED_REFUSALS:
                self.failures.append(f"{peer.name} {action}{args}: unexpected refusal {err}")
            return False
        self.record(peer, before)
        self.refresh(peer)
        return True

    def hand_over(self, donor: Peer, block: tuple[int, int], to: Peer) -> bool:
        """Grant ``block``; the donor must lose exactly that block and nothing else."""
        before = set(self.addresses(donor.ring.owned_ranges()))
        if not self.local(donor, "grant", block[0], block[1], to.name):
            return False
        assert set(self.addresses(donor.ring.owned_ranges())) == before - set(range(*block))
        return True

    @staticmethod
    def addresses(ranges: list[tuple[int, int]]) -> list[int]:
        return [a for start, end in ranges for a in range(start, end)]

    def merge(self, peer: Peer, state: RingState) -> None:
        before = peer.ring.state
        try:
            peer.ring.merge(state)
        except RingError as err:
            self.failures.append(f"{peer.name} refused a legal ring: {err}")
            return
        self.record(peer, before, state)
        self.refresh(peer)

    def connected(self, a: PeerName, b: PeerName) -> bool:
        return self.group.get(a, 0) == self.group.get(b, 0)

    def knows_all_edits_of(self, dead: Peer) -> bool:
        """rmpeer's documented precondition: the dead peer's last changes reached every live peer."""
        for peer in self.live():
            for start, version in dead.authored.items():
                token = peer.ring.state.token_at(start)
                if token is None or token.version < version:
                    return False
        return True

    # -- setup --------------------------------------------------------------------------------------

    @initialize(count=st.integers(2, len(OWNERS)), data=st.data(), rng_seed=st.integers(0, 2**32))
    def setup(self, count: int, data: st.DataObject, rng_seed: int) -> None:
        names = OWNERS[:count]
        self.rng = random.Random(rng_seed)
        self.seed_names = tuple(
            sorted(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=count, unique=True)))
        )
        for name in (*names, OBSERVER):
            self.peers[name] = Peer(name, Ring(name, RANGE), Space(RANGE.reserved()))
        for name in data.draw(st.lists(st.sampled_from(names), max_size=count, unique=True)):
            self.seed(names.index(name))

    # -- rules --------------------------------------------------------------------------------------

    @rule(i=peer_index)
    def seed(self, i: int) -> None:
        """A seed-mode peer claims the configured split (an observer never does)."""
        peer = self.pick(i)
        if peer.alive and not peer.ring.seeded and peer.name != OBSERVER:
            peer.ring.seed(self.seed_names)  # version-1 tokens: every seeding peer writes the same ones
            self.refresh(peer)

    @rule(i=peer_index, j=peer_index)
    def gossip(self, i: int, j: int) -> None:
        src, dst = self.pick(i), self.pick(j)
        if src is not dst and src.alive:
            self.queue.append((src.name, dst.name, ring_to_bytes(src.ring.state)))

    @rule(i=peer_index)
    def broadcast(self, i: int) -> None:
        src = self.pick(i)
        if src.alive:
            data = ring_to_bytes(src.ring.state)
            self.queue.extend((src.name, dst, data) for dst in self.peers if dst != src.name)

    @precondition(lambda self: self.queue)
    @rule(index=st.integers(0, 10_000), keep=st.booleans())
    def deliver(self, index: int, keep: bool) -> None:
        """Deliver any queued message (reordering); ``keep`` leaves a copy behind (duplication)."""
        src, dst, data = self.queue[index % len(self.queue)]
        if not keep:
            del self.queue[index % len(self.queue)]
        peer = self.peers[dst]
        if peer.alive and self.connected(src, dst):
            self.merge(peer, ring_from_bytes(data))

    @precondition(lambda self: self.queue)
    @rule(index=st.integers(0, 10_000))
    def drop(self, index: int) -> None:
        del self.queue[index % len(self.queue)]

    @rule(i=peer_index, count=st.integers(1, 12))
    def allocate(self, i: int, count: int) -> None:
        """Containers start; a peer that runs out asks a connected donor for space, as the allocator will."""
        peer = self.pick(i)
        if not peer.alive or not peer.ring.seeded:
            return
        for _ in range(count):
            address = peer.space.allocate()
            if address is None:
                self.ask_for_space(peer)
                address = peer.space.allocate()  # only if the donor's reply was ours already: it is not
                assert address is None
                break
            self.next_container += 1
            peer.leases[self.next_container] = address
        self.refresh(peer)

    def ask_for_space(self, peer: Peer) -> None:
        donor_name = peer.ring.pick_donor(self.rng)
        if donor_name is None or donor_name not in self.peers:
            return
        donor = self.peers[donor_name]
        if not donor.alive or not self.connected(peer.name, donor.name) or not donor.ring.seeded:
            return
        block = donor.space.donation(max_size=16)
        if block is not None and self.hand_over(donor, block, peer):
            self.queue.append((donor.name, peer.name, ring_to_bytes(donor.ring.state)))  # the reply

    @rule(i=peer_index, index=st.integers(0, 100), count=st.integers(1, 6))
    def release(self, i: int, index: int, count: int) -> None:
        peer = self.pick(i)
        for _ in range(count):
            if not peer.alive or not peer.leases:
                break
            container = sorted(peer.leases)[index % len(peer.leases)]
            assert peer.space.release(peer.leases.pop(container))
        self.refresh(peer)

    @rule(i=peer_index, j=peer_index, cap=st.none() | st.integers(1, 16))
    def donate(self, i: int, j: int, cap: int | None) -> None:
        """``j`` asked ``i`` for space, whatever ``j``'s own view (it may be dead or removed)."""
        donor, to = self.pick(i), self.pick(j)
        if donor is to or not donor.alive or not donor.ring.seeded:
            return
        block = donor.space.donation(cap)
        if block is not None:
            self.hand_over(donor, block, to)

    @rule(groups=st.lists(st.integers(0, 2), min_size=len(ALL), max_size=len(ALL)))
    def partition(self, groups: list[int]) -> None:
        self.group = dict(zip(ALL, groups, strict=True))

    @rule()
    def heal(self) -> None:
        self.group = {}

    @rule(i=peer_index)
    def kill(self, i: int) -> None:
        """A node disappears with its containers. Messages it already sent may still arrive."""
        peer = self.pick(i)
        if peer.alive and len([p for p in self.live() if p.name != OBSERVER and p is not peer]) >= 2:
            peer.alive = False
            peer.leases.clear()

    @rule(i=peer_index, callers=st.lists(peer_index, min_size=1, max_size=4, unique=True))
    def rmpeer(self, i: int, callers: list[int]) -> None:
        """One or several live peers remove the same dead peer at once, each from its own view."""
        gone = self.pick(i)
        if gone.alive or not self.knows_all_edits_of(gone):
            return
        for index in callers:
            peer = self.pick(index)
            if peer.alive:
                self.local(peer, "rmpeer", gone.name)

    @rule(i=peer_index, callers=st.lists(peer_index, min_size=1, max_size=4, unique=True))
    def die_then_rmpeer(self, i: int, callers: list[int]) -> None:
        """The common real case: a node's last gossip got out, then it died, and several peers (whose
        views of each other still differ) remove it at once."""
        gone = self.pick(i)
        if not gone.alive or len([p for p in self.live() if p.name != OBSERVER and p is not gone]) < 2:
            return
        for peer in self.live():
            if peer is not gone:
                self.merge(peer, gone.ring.state)
        self.kill(i)
        self.rmpeer(i, callers)

    @rule(i=peer_index, j=st.none() | peer_index)
    def leave(self, i: int, j: int | None) -> None:
        """Drain containers, hand everything over, tell everyone (messages may be lost), stop."""
        peer = self.pick(i)
        to = None if j is None else self.pick(j)
        if to is peer or not peer.alive or not peer.ring.seeded:
            return
        if len([p for p in self.live() if p.name != OBSERVER and p is not peer]) < 2:
            return
        for address in peer.leases.values():
            peer.space.release(address)
        peer.leases.clear()
        self.refresh(peer)
        if not self.local(peer, "leave", None if to is None else to.name):
            return  # refused (we own everything, or the recipient was removed): stay
        self.broadcast(i)
        peer.alive = False

    @rule()
    def converge(self) -> None:
        """Heal and gossip until nothing changes, then check that the live peers agree."""
        self.group = {}
        live = self.live()
        for _ in range(4 * len(self.peers)):
            changed = False
            for src in live:
                for dst in live:
                    if src is not dst:
                        before = dst.ring.state
                        self.merge(dst, src.ring.state)
                        changed |= dst.ring.state != before
            if not changed:
                break
        else:
            self.failures.append("gossip did not converge")
        states = {p.ring.state for p in live}
        assert len(states) <= 1, "live peers disagree after convergence"
        if states:
            state = states.pop()
            heirs = state.heirs()
            for token in state.tokens:
                if token.owner in state.removed and token.start in heirs:
                    heir = self.peers[heirs[token.start]]
                    assert not heir.alive, f"{heir.name} is heir of {token.start} but did not take it"

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def nothing_refused(self) -> None:
        assert not self.failures, self.failures

    @invariant()
    def one_believer_per_address(self) -> None:
        claims = [0] * RANGE.size
        for peer in self.live():
            for start, end in peer.ring.owned_ranges():
                for address in range(start, end):
                    claims[address - RANGE.start] += 1
        assert max(claims) <= 1, "two live peers consider the same address theirs"

    @invariant()
    def no_address_leased_twice(self) -> None:
        seen: dict[int, PeerName] = {}
        for peer in self.live():
            owned = peer.ring.owned_ranges()
            for address in peer.leases.values():
                assert address not in seen, f"{address} leased by {seen.get(address)} and {peer.name}"
                seen[address] = peer.name
                assert any(s <= address < e for s, e in owned), f"{peer.name} leases {address} outside its ranges"
                assert address not in RANGE.reserved()

    @invariant()
    def all_rings_join(self) -> None:
        states = [p.ring.state for p in self.peers.values()]
        total = states[0] if states else RingState(RANGE)
        for state in states[1:]:
            total = total.join(state)  # raises RingError on any conflict
        if total.seeded:
            assert sum(end - start for start, end, _ in total.segments()) == RANGE.size
        for group in {self.group.get(p.name, 0) for p in self.live()}:
            members = [p.ring.state for p in self.live() if self.group.get(p.name, 0) == group]
            view = members[0]
            for state in members[1:]:
                view = view.join(state)
            assert not view.problems()


Cluster.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCluster = Cluster.TestCase


# -- concurrent rmpeer from divergent views, in focus -------------------------------------------------

history_ops = st.lists(
    st.tuples(st.sampled_from(["grant", "merge"]), peer_index, peer_index, st.integers(1, 3)), max_size=25
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(3, len(OWNERS)),
    before=history_ops,
    between=history_ops,
    dead_index=peer_index,
    callers=st.lists(peer_index, min_size=2, max_size=len(OWNERS), unique=True),
    data=st.data(),
)
def test_concurrent_rmpeer_from_divergent_views(
    count: int,
    before: list[tuple[str, int, int, int]],
    between: list[tuple[str, int, int, int]],
    dead_index: int,
    callers: list[int],
    data: st.DataObject,
) -> None:
    """Peers diverge (grants, partial gossip); one dies after its last gossip got out; several others
    run rmpeer for it, from their different views, with more divergence in between; then everything
    is gossiped in an arbitrary order. No merge is ever refused, no address ever has two believers,
    and the end state gives every address of the dead peer to exactly one live peer."""
    names = OWNERS[:count]
    rings = {n: Ring(n, RANGE) for n in names}
    for ring in rings.values():
        ring.seed(names)

    def check() -> None:
        claims = [0] * RANGE.size
        for n, ring in rings.items():
            if n != dead:
                for start, end in ring.owned_ranges():
                    for address in range(start, end):
                        claims[address - RANGE.start] += 1
        assert max(claims) <= 1

    def run(steps: list[tuple[str, int, int, int]], alive: list[PeerName]) -> None:
        for kind, i, j, k in steps:
            p, q = alive[i % len(alive)], alive[j % len(alive)]
            if kind == "merge":
                rings[p].merge(rings[q].state)
            elif p != q and (owned := rings[p].owned_ranges()):
                lo, hi = owned[k % len(owned)]
                if hi - lo > 1:
                    rings[p].grant(lo + (hi - lo) // 2, hi, q)
            check()

    dead = PeerName("")
    run(before, list(names))
    dead = names[dead_index % count]
    living = [n for n in names if n != dead]
    for n in living:  # rmpeer's precondition: the dead peer's last state reached the living
        rings[n].merge(rings[dead].state)
    check()
    callers_now = sorted({living[c % len(living)] for c in callers})
    for n in callers_now:
        rings[n].rmpeer(dead)
        check()
    run(between, living)
    order = data.draw(st.permutations([(a, b) for a in living for b in living if a != b]))
    for _ in range(len(living)):
        for a, b in order:
            rings[b].merge(rings[a].state)
            check()
    final = {rings[n].state for n in living}
    assert len(final) == 1
    state = final.pop()
    assert dead in state.removed
    assert {owner for _, _, owner in state.segments()} <= set(living)
    assert not any(rings[n].rejected for n in living)
