"""Real :class:`~weaved.core.ipam.allocator.Allocator` instances on a simulated network, driven by hypothesis.

Where ``tests/unit/test_ipam_cluster.py`` checks the ring alone, this machine runs the whole allocator as the
daemon runs it: requests, messages, timers, the durability rule and restarts from the persisted snapshot.

The network is data: every message an allocator emits is queued per (source, destination), and hypothesis
decides which queued message is delivered next (any position: reordering), which is dropped, and when.
Partitions hold queued messages until they heal; a message to a peer that is unreachable when it is sent
has no route and is dropped, as ``MeshPeer.send_relay`` does. Time is a virtual clock; timers fire when
hypothesis advances it.

The disk is modelled exactly like :meth:`weaved.adapters.ipam.IpamService.commit`: when the allocator is
``dirty`` its ``snapshot()`` becomes the durable state *before* its messages are queued and its completions
answered. A flush is a separate choice after every operation, so a crash can also strike between a change
and its write; it then loses the change, and nobody heard of it. A crashed peer restarts from its durable
snapshot with its containers still running (a node reboot). A killed peer is gone for good with its
containers; live peers may ``rmpeer`` it, one or several at once, once its last hand-overs reached them
(rmpeer's documented precondition, docs/ipam.md §2). A peer that leaves gracefully hands its ranges over.

Invariants after every step:

* no address is leased to two containers, across the live allocators and the disks of crashed peers;
* every address handed to a container is still leased by its peer (in memory, or on disk while it is down),
  and lies inside that peer's ranges;
* no two running (or restartable) peers consider the same address theirs;
* no allocator refused a message or a ring (legal histories never conflict);
* the rings of every peer that ever ran join into one valid ring.

``converge`` heals, restarts nobody, delivers everything and runs anti-entropy until quiet, then checks that
every running peer holds the same ring, that it covers the range exactly once, and that no range is stranded
with a removed peer whose heir is running.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from weaved.core.ipam.allocator import (
    RING_GOSSIP_INTERVAL,
    Allocated,
    AllocationFailed,
    Allocator,
    AllocError,
)
from weaved.core.ipam.ring import AddressRange, RingState, Token, decode_ring, encode_ring
from weaved.core.ipam.seeding import ConsensusInit, InitMode, ObserverInit, SeedInit
from weaved.core.types import PeerName, peer_name_from_bytes

RANGE = AddressRange.from_cidr("10.50.0.0/27")
"""Small on purpose: peers run out and ask each other for space within a few allocations."""
NAMES = tuple(peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in range(1, 8))
TIMEOUT = 10.0
peer_index = st.integers(0, len(NAMES) - 1)

STATS: Counter[str] = Counter()
"""What the runs reached (handed-out addresses, grants, inheritances, restarts...): read it when tuning the
strategies, so the machine does not quietly degenerate into idling."""

FORGER = peer_name_from_bytes(bytes([2, 0, 0, 0, 0, 99]))
"""A member that sends what it may not (``forge``): its rings and requests reach every peer, under its own
authenticated name. Only the forgeries IPAM refuses are sent (a version jump, a request from a name the mesh
does not reach): forged ring edits and tombstones of others' tokens are joined like relayed news, since
nothing is signed (docs/ipam.md §9), so a forger sending those could make two owners here by design."""

UP, DOWN, DEAD, LEFT = "up", "down", "dead", "left"
"""Running; crashed (restarts from its disk, containers survive); killed for good; left gracefully."""


@dataclass
class Node:
    name: PeerName
    mode: InitMode
    seed: int
    alloc: Allocator | None = None
    state: str = UP
    disk: bytes | None = None
    pending: dict[int, str] = field(default_factory=dict)
    """allocation request → container id, not yet answered."""
    unanswered: list[tuple[str, int]] = field(default_factory=list)
    """claims that succeeded in memory, answered once durable (as the daemon's ``_until_durable``)."""
    containers: dict[str, int] = field(default_factory=dict)
    """container id → the address it was told: the ground truth the allocator must never contradict."""
    restarts: int = 0


def disk_view(snapshot: bytes | None) -> tuple[RingState | None, list[int]]:
    """The ring and leased addresses a snapshot holds (``Allocator.snapshot``'s format)."""
    if snapshot is None:
        return None, []
    _, ring_raw, _, leases = msgpack.unpackb(snapshot, raw=False)
    return decode_ring(ring_raw), [address for _, _, address in leases]


class IpamNet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[PeerName, Node] = {}
        self.queues: dict[tuple[PeerName, PeerName], list[bytes]] = defaultdict(list)
        self.group: dict[PeerName, int] = {}
        self.now = 0.0
        self.next_container = 0
        self.consensus = False
        self.initial = 0
        self.failures: list[str] = []
        self.forged: dict[PeerName, Counter[str]] = defaultdict(Counter)
        """Per peer, what it refused of the forger's messages (the only refusals allowed)."""

    # -- the network ------------------------------------------------------------------------------

    def up(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state == UP]

    def living(self) -> list[Node]:
        """Peers that run or will run again: their rings and leases are real."""
        return [n for n in self.nodes.values() if n.state in (UP, DOWN)]

    def connected(self, a: PeerName, b: PeerName) -> bool:
        return self.group.get(a, 0) == self.group.get(b, 0)

    def reachable(self, node: Node) -> set[PeerName]:
        return {n.name for n in self.up() if n is not node and self.connected(n.name, node.name)}

    def topology_changed(self) -> None:
        """The mesh tells every running peer whom it reaches now (new ones get our ring at once)."""
        for node in self.up():
            assert node.alloc is not None
            node.alloc.set_reachable(self.reachable(node), self.now)
            self.flush(node)

    def flush(self, node: Node) -> None:
        """The daemon's commit: persist while dirty, then send and answer."""
        alloc = node.alloc
        assert alloc is not None and node.state == UP
        if alloc.dirty:
            node.disk = alloc.snapshot()
            assert not alloc.dirty
        for dst, payload in alloc.messages():
            targets = [dst] if dst is not None else sorted(self.reachable(node))
            for target in targets:
                peer = self.nodes.get(target)
                if peer is not None and peer.state == UP and self.connected(node.name, target):
                    self.queues[(node.name, target)].append(payload)
        for done in alloc.completions():
            cid = node.pending.pop(done.request, None)
            if isinstance(done, Allocated):
                assert cid == done.lease.container_id, (cid, done)
                node.containers[cid] = done.lease.address
                STATS["allocated"] += 1
            else:
                STATS["timed-out"] += 1
                assert isinstance(done, AllocationFailed) and done.code in ("timeout", "left"), done
        for cid, address in node.unanswered:
            node.containers[cid] = address
        node.unanswered.clear()

    def receive(self, src: PeerName, dst: PeerName, payload: bytes) -> None:
        node = self.nodes[dst]
        assert node.alloc is not None
        node.alloc.receive(src, payload, self.now)

    def deliverable(self) -> list[tuple[PeerName, PeerName]]:
        return sorted(
            key for key, queue in self.queues.items()
            if queue and self.nodes[key[1]].state == UP and self.connected(*key)
        )

    def drop_undeliverable(self) -> None:
        """Datagrams to a peer that is not running are lost."""
        for (_, dst), queue in self.queues.items():
            if self.nodes[dst].state != UP:
                queue.clear()

    def deliver_all(self, limit: int = 5_000) -> None:
        for _ in range(limit):
            self.drop_undeliverable()
            keys = self.deliverable()
            if not keys:
                return
            for src, dst in keys:
                queue = self.queues[(src, dst)]
                if queue and self.nodes[dst].state == UP:
                    self.receive(src, dst, queue.pop(0))
                    self.flush(self.nodes[dst])
        self.failures.append("IPAM messages did not quiesce")

    def fire_timers(self) -> None:
        for node in self.up():
            assert node.alloc is not None
            deadline = node.alloc.next_deadline()
            if deadline is not None and deadline <= self.now:
                node.alloc.handle_timer(self.now)
                self.flush(node)

    def new_allocator(self, node: Node) -> Allocator:
        return Allocator(node.name, RANGE, node.mode, random.Random(node.seed * 1000 + node.restarts),
                         timeout=TIMEOUT, snapshot=node.disk)

    def pick(self, index: int, *states: str) -> Node | None:
        nodes = [n for n in self.nodes.values() if n.state in states]
        return nodes[index % len(nodes)] if nodes else None

    def knows_last_handovers_of(self, gone: Node) -> bool:
        """rmpeer's precondition: every living peer has each token of the gone peer's last durable ring
        at that version or newer."""
        ring, _ = disk_view(gone.disk)
        if ring is None:
            return True
        for node in self.living():
            view = node.alloc.ring.state if node.alloc is not None else disk_view(node.disk)[0]
            if view is None:
                return False
            for token in ring.tokens:
                mine = view.token_at(token.start)
                if mine is None or mine.version < token.version:
                    return False
        return True

    # -- setup ------------------------------------------------------------------------------------

    @initialize(count=st.integers(3, 5), consensus=st.booleans(), seed=st.integers(0, 2**16))
    def setup(self, count: int, consensus: bool, seed: int) -> None:
        self.consensus = consensus
        self.initial = count
        for i, name in enumerate(NAMES[:count]):
            mode: InitMode = ConsensusInit(count) if consensus else SeedInit(NAMES[:count])
            node = Node(name, mode, seed + i)
            node.alloc = self.new_allocator(node)
            self.nodes[name] = node
        self.topology_changed()

    # -- rules: requests ----------------------------------------------------------------------------

    @rule(i=peer_index, count=st.integers(1, 8), flush=st.booleans())
    def allocate(self, i: int, count: int, flush: bool) -> None:
        node = self.pick(i, UP)
        if node is None:
            return
        assert node.alloc is not None
        for _ in range(count):
            self.next_container += 1
            cid = f"c{self.next_container}"
            try:
                request = node.alloc.allocate(cid, "eth0", self.now)
            except AllocError as err:
                assert err.code == "left" and node.alloc.departure is not None, err
                return
            node.pending[request] = cid
        if flush:
            self.flush(node)

    @rule(i=peer_index, offset=st.integers(0, RANGE.size - 1), flush=st.booleans())
    def claim(self, i: int, offset: int, flush: bool) -> None:
        node = self.pick(i, UP)
        if node is None:
            return
        assert node.alloc is not None
        self.next_container += 1
        cid = f"c{self.next_container}"
        try:
            lease = node.alloc.claim(cid, "eth0", _ip(RANGE.start + offset), self.now)
        except AllocError as err:
            assert err.code in ("not-ready", "owned-elsewhere", "in-use", "reserved", "left"), err
            return
        node.unanswered.append((cid, lease.address))
        if flush:
            self.flush(node)

    @rule(i=peer_index, count=st.integers(1, 12))
    def allocate_and_flush(self, i: int, count: int) -> None:
        """The common case, weighted up: requests answered as soon as they can be."""
        self.allocate(i, count, True)

    @rule(i=peer_index, index=st.integers(0, 1_000), count=st.integers(1, 4), flush=st.booleans())
    def release(self, i: int, index: int, count: int, flush: bool) -> None:
        """Containers stop: the model forgets them at once (a lease that comes back after a crash is a leak,
        not a duplicate: nobody uses it)."""
        node = self.pick(i, UP)
        if node is None:
            return
        assert node.alloc is not None
        for _ in range(count):
            if not node.containers:
                break
            cid = sorted(node.containers)[index % len(node.containers)]
            address = node.containers.pop(cid)
            released = node.alloc.release(cid, self.now)
            assert [lease.address for lease in released] == [address]
        if flush:
            self.flush(node)

    # -- rules: the network -------------------------------------------------------------------------

    @precondition(lambda self: self.deliverable())
    @rule(which=st.integers(0, 1_000), position=st.integers(0, 1_000), keep=st.booleans(), flush=st.booleans())
    def deliver(self, which: int, position: int, keep: bool, flush: bool) -> None:
        """Deliver one queued message from any position (reordering); ``keep`` duplicates it."""
        keys = self.deliverable()
        src, dst = keys[which % len(keys)]
        queue = self.queues[(src, dst)]
        payload = queue[position % len(queue)] if keep else queue.pop(position % len(queue))
        self.receive(src, dst, payload)
        if flush:
            self.flush(self.nodes[dst])

    @precondition(lambda self: any(self.queues.values()))
    @rule(which=st.integers(0, 1_000), position=st.integers(0, 1_000))
    def drop(self, which: int, position: int) -> None:
        keys = sorted(k for k, q in self.queues.items() if q)
        queue = self.queues[keys[which % len(keys)]]
        queue.pop(position % len(queue))

    @rule()
    def deliver_everything(self) -> None:
        self.deliver_all()

    @rule(groups=st.lists(st.integers(0, 2), min_size=len(NAMES), max_size=len(NAMES)))
    def partition(self, groups: list[int]) -> None:
        self.group = dict(zip(NAMES, groups, strict=True))
        self.topology_changed()

    @rule()
    def heal(self) -> None:
        self.group = {}
        self.topology_changed()

    @rule(seconds=st.sampled_from([0.5, 2.0, 5.0, 11.0, RING_GOSSIP_INTERVAL]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.fire_timers()

    @rule(victim=peer_index, receiver=peer_index, kind=st.sampled_from(["jump", "request"]),
          offset=st.integers(0, RANGE.size - 1))
    def forge(self, victim: int, receiver: int, kind: str, offset: int) -> None:
        """The forger sends what IPAM refuses: a real peer's ring (as of that peer's view) with one token's
        version jumped by 2**40, or a space request (the mesh does not reach it). Nothing may change."""
        source, dest = self.pick(victim, UP), self.pick(receiver, UP)
        if source is None or dest is None or source.alloc is None or dest.alloc is None:
            return
        body: bytes
        if kind == "request":
            body = msgpack.packb([3, None, 1], use_bin_type=True)
        else:
            state = source.alloc.ring.state
            if not state.seeded:
                return
            tokens = list(state.tokens)
            index = state.index_owning(RANGE.start + offset)
            token = tokens[index]
            tokens[index] = Token(token.start, token.owner, token.version + (1 << 40), token.free)
            forged = RingState(RANGE, state.seeded_by, tuple(tokens), state.removed)
            if forged.problems():
                return
            body = msgpack.packb([1, encode_ring(forged), 1], use_bin_type=True)
        alloc = dest.alloc
        before, ring_before, owned = self.refusals(alloc), alloc.ring.state, alloc.ring.owned_ranges()
        alloc.receive(FORGER, body, self.now)
        refused = self.refusals(alloc) - before
        self.forged[dest.name] += refused
        if kind == "jump":
            assert refused and alloc.ring.state == ring_before, (dest.name, dict(refused))
        assert alloc.ring.owned_ranges() == owned
        STATS[f"forged-{kind}"] += 1
        self.flush(dest)

    @staticmethod
    def refusals(alloc: Allocator) -> Counter[str]:
        return Counter(alloc.rejected) + Counter({f"ring-{k}": v for k, v in alloc.ring.rejected.items()})

    # -- rules: peers come and go -------------------------------------------------------------------

    @rule(i=peer_index)
    def crash(self, i: int) -> None:
        """The process dies: memory (unflushed changes, waiting requests) is lost; the disk and the
        containers survive."""
        node = self.pick(i, UP)
        if node is None:
            return
        node.alloc = None
        node.state = DOWN
        node.pending.clear()
        node.unanswered.clear()  # never answered: the CNI plugin saw an error
        self.topology_changed()

    @rule(i=peer_index)
    def restart(self, i: int) -> None:
        node = self.pick(i, DOWN)
        if node is None:
            return
        node.restarts += 1
        STATS["restart"] += 1
        node.alloc = self.new_allocator(node)
        node.state = UP
        _, leased = disk_view(node.disk)
        for cid, address in node.containers.items():
            assert address in leased, f"{node.name} restarted without the lease of {cid}"
        self.topology_changed()

    @rule()
    def join(self) -> None:
        """A new peer starts, configured like the others (seed list) or as an observer (consensus
        clusters: a late peer must not vote, since N counts the initial peers only)."""
        free = [name for name in NAMES if name not in self.nodes]
        if not free:
            return
        name = free[0]
        mode: InitMode = ObserverInit() if self.consensus else SeedInit(NAMES[: self.initial])
        node = Node(name, mode, NAMES.index(name) + 100)
        node.alloc = self.new_allocator(node)
        self.nodes[name] = node
        self.topology_changed()

    def enough_left_without(self, node: Node) -> bool:
        owners = [n for n in self.living() if n is not node]
        return len(owners) >= 2

    @rule(i=peer_index)
    def kill(self, i: int) -> None:
        """A node is gone for good, with its containers. What it already sent may still arrive."""
        node = self.pick(i, UP, DOWN)
        if node is not None and self.enough_left_without(node):
            self._kill(node)

    def _kill(self, node: Node) -> None:
        node.alloc = None
        node.state = DEAD
        node.containers.clear()
        node.pending.clear()
        node.unanswered.clear()
        self.topology_changed()

    @rule(i=peer_index, callers=st.lists(peer_index, min_size=1, max_size=4, unique=True))
    def rmpeer(self, i: int, callers: list[int]) -> None:
        """One or several running peers remove a dead peer at once, each from its own view."""
        gone = self.pick(i, DEAD, LEFT)
        if gone is not None and self.knows_last_handovers_of(gone):
            self._rmpeer(gone, callers)

    def _rmpeer(self, gone: Node, callers: list[int]) -> None:
        for index in callers:
            caller = self.pick(index, UP)
            if caller is None or caller.alloc is None:
                continue
            try:
                STATS["rmpeer-taken"] += bool(caller.alloc.rmpeer(gone.name, self.now))
                STATS["rmpeer"] += 1
            except AllocError as err:
                assert err.code == "left" or (err.code == "ring" and ("last-owner" in str(err)
                                                                      or "not-seeded" in str(err))), err
            self.flush(caller)

    @rule(i=peer_index, callers=st.lists(peer_index, min_size=1, max_size=4, unique=True))
    def die_then_rmpeer(self, i: int, callers: list[int]) -> None:
        """The common real case: a node's last ring reached everyone, then it died, and several peers
        remove it at once."""
        gone = self.pick(i, UP)
        if gone is None or gone.alloc is None or not self.enough_left_without(gone):
            return
        if any(n.state == DOWN for n in self.nodes.values()):
            return  # a crashed peer would miss the last ring: rmpeer's precondition would not hold
        self.flush(gone)
        ring_raw = msgpack.unpackb(gone.alloc.snapshot(), raw=False)[1]
        payload = msgpack.packb([1, ring_raw], use_bin_type=True)  # a RING message
        for node in self.up():
            if node is not gone:
                self.receive(gone.name, node.name, payload)
                self.flush(node)
        self._kill(gone)
        self._rmpeer(gone, callers)

    @rule(i=peer_index, drain=st.booleans())
    def leave(self, i: int, drain: bool) -> None:
        """Leave for good (``weaved reset``): with its containers drained first, or refused while they run.
        The peer keeps running (re-sending to its heir) until ``stop_left``."""
        node = self.pick(i, UP)
        if node is None or node.alloc is None or not self.enough_left_without(node):
            return
        self.flush(node)  # answers already given stand; what was pending is then refused
        already = node.alloc.departure is not None
        for _ in range(10 if drain else 0):
            for cid in list(node.containers):
                node.alloc.release(cid, self.now)
                del node.containers[cid]
            self.flush(node)  # a waiting request may get a freed address meanwhile: drain again
            if not node.containers:
                break
        # force only drops what the model knows no container uses: leases resurrected by a crash before
        # their release was written
        force = not node.containers and not node.unanswered
        owned = node.alloc.ring.state.owned_count(node.name) if node.alloc.ring.seeded else 0
        try:
            departure = node.alloc.leave(self.now, force=force)
        except AllocError as err:
            assert err.code in ("in-use", "no-heir", "removed"), err
            assert err.code != "in-use" or not force
            assert err.code != "no-heir" or self.reachable(node) <= node.alloc.leavers | node.alloc.ring.state.removed
            return
        assert already or departure.addresses == owned
        assert not node.alloc.leases()
        assert already or departure.heir is None or departure.heir in self.reachable(node)
        assert already or not node.alloc.ring.owned_ranges()
        STATS["left"] += 1
        self.flush(node)

    @rule(i=peer_index)
    def stop_left(self, i: int) -> None:
        """A peer that left is stopped for good (confirmed or not: then its last ring may still be in the
        network, or lost, and rmpeer is the way out)."""
        node = self.pick(i, UP)
        if node is None or node.alloc is None or node.alloc.departure is None:
            return
        STATS["stopped-confirmed" if node.alloc.departure.confirmed else "stopped-unconfirmed"] += 1
        node.alloc = None
        node.state = LEFT
        self.topology_changed()

    # -- converge -----------------------------------------------------------------------------------

    @rule()
    def converge(self) -> None:
        """Heal, deliver everything, run anti-entropy until quiet; the running peers then agree."""
        self.group = {}
        self.topology_changed()
        for _ in range(3):
            self.deliver_all()
            self.now += RING_GOSSIP_INTERVAL * 1.6
            self.fire_timers()
        self.deliver_all()
        running = [n for n in self.up() if n.alloc is not None]
        states = {n.alloc.ring.state for n in running if n.alloc is not None}
        assert len(states) <= 1, f"running peers disagree after convergence: {len(states)} rings"
        if not states:
            return
        state = states.pop()
        if not state.seeded:
            return
        STATS["converged-seeded"] += 1
        STATS["converged-tokens"] += len(state.tokens)
        covered = sorted((start, end) for start, end, _ in state.segments())
        assert covered[0][0] == RANGE.start and covered[-1][1] == RANGE.end
        assert all(a[1] == b[0] for a, b in pairwise(covered)), covered
        staying = [n for n in running if n.alloc is not None and n.alloc.departure is None]
        for node in running:
            departure = node.alloc.departure if node.alloc is not None else None
            if departure is not None and departure.heir is not None and self.nodes[departure.heir].state == UP:
                assert departure.confirmed, f"{node.name} left to {departure.heir} without confirmation"
            if departure is not None and staying:  # else every running peer left: nobody can take it
                assert not state.owned_count(node.name), f"{node.name} left but still owns addresses"
        heirs = state.heirs()
        for token in state.tokens:
            if token.owner in state.removed and token.start in heirs:
                heir = self.nodes[heirs[token.start]]
                assert heir.state != UP, f"{heir.name} is heir of {_ip(token.start)} but did not take it"

    # -- invariants ---------------------------------------------------------------------------------

    def lease_views(self) -> dict[PeerName, list[int]]:
        views: dict[PeerName, list[int]] = {}
        for node in self.living():
            if node.alloc is not None:
                views[node.name] = [lease.address for lease in node.alloc.leases()]
            else:
                views[node.name] = disk_view(node.disk)[1]
        return views

    @invariant()
    def no_failures(self) -> None:
        assert not self.failures, self.failures

    @invariant()
    def no_address_leased_twice(self) -> None:
        seen: dict[int, PeerName] = {}
        for name, addresses in self.lease_views().items():
            for address in addresses:
                assert address not in seen, f"{_ip(address)} leased by {seen[address]} and {name}"
                seen[address] = name
                assert address not in RANGE.reserved()
        told: dict[int, str] = {}
        for node in self.living():
            for cid, address in node.containers.items():
                assert address not in told, f"{_ip(address)} given to {told[address]} and {cid}"
                told[address] = cid

    @invariant()
    def containers_keep_their_addresses(self) -> None:
        views = self.lease_views()
        for node in self.living():
            for cid, address in node.containers.items():
                assert address in views[node.name], f"{node.name} lost the lease of {cid} ({_ip(address)})"
            if node.alloc is not None:
                owned = node.alloc.ring.owned_ranges()
                for lease in node.alloc.leases():
                    assert any(s <= lease.address < e for s, e in owned), \
                        f"{node.name} leases {lease.ip()} outside its ranges"

    @invariant()
    def one_believer_per_address(self) -> None:
        claims: dict[int, PeerName] = {}
        for node in self.living():
            ring = node.alloc.ring.state if node.alloc is not None else disk_view(node.disk)[0]
            if ring is None or not ring.seeded or node.name in ring.removed:
                continue
            for start, end, owner in ring.segments():
                if owner != node.name:
                    continue
                for address in range(start, end):
                    assert address not in claims, f"{_ip(address)} is both {claims[address]}'s and {node.name}'s"
                    claims[address] = node.name

    @invariant()
    def nothing_refused(self) -> None:
        for node in self.up():
            assert node.alloc is not None
            # The one refusal a legal history produces: a dead peer's request still in the network when
            # the rmpeer tombstone got here first. What the forger sent is refused too, nothing else.
            honest = self.refusals(node.alloc) - self.forged[node.name]
            refused = set(honest) - {"request-from-removed-peer"}
            assert not refused, (node.name, dict(honest))
            assert not node.alloc.seeder.rejected, (node.name, node.alloc.seeder.rejected)

    @invariant()
    def all_rings_join(self) -> None:
        rings = [disk_view(n.disk)[0] for n in self.nodes.values()]
        rings += [n.alloc.ring.state for n in self.up() if n.alloc is not None]
        total = RingState(RANGE)
        for ring in rings:
            if ring is not None:
                total = total.join(ring)  # raises RingError on any conflict
        assert not total.problems()


def _ip(address: int) -> str:
    return f"{address >> 24}.{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}"


def machine_settings(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


TestIpamNet = IpamNet.TestCase
TestIpamNet.settings = machine_settings(200, 80)


class IpamNetLong(IpamNet):
    """The same machine, longer runs and more of them (``-m slow``)."""


TestIpamNetLong = pytest.mark.timeout(1200)(pytest.mark.slow(IpamNetLong.TestCase))
IpamNetLong.TestCase.settings = machine_settings(2000, 150)
