"""A seeded, single-threaded simulated network with a virtual clock for driving pure MeshPeers.

Each peer has an address ``10.x.y.z:6783``-style (any IP literal works). Datagrams go through a heap of
(delivery time, sequence) events; per-link loss, duplication, reordering (random extra delay) and
blocked links are data. Timers: every peer's ``next_deadline()`` sits in the same heap, with lazy
deletion (a popped timer that is no longer due is re-scheduled). Failures print the seed.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from weaved.core.events import MeshEvent
from weaved.core.handshake import derive_psk
from weaved.core.mesh import MeshConfig, MeshPeer
from weaved.core.secure import SecureConfig
from weaved.core.types import Endpoint, PeerIdentity, PeerName, PeerUID, default_short_id, derive_peer_name


@functools.lru_cache(maxsize=8)
def _psk(password: bytes) -> bytes:
    """scrypt is slow on purpose: derive each test password once."""
    return derive_psk(password)


@dataclass
class LinkProfile:
    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.001
    jitter: float = 0.0
    """Extra random delay in [0, jitter): with jitter > delay, datagrams overtake each other (reorder)."""


@dataclass
class SimPeer:
    nickname: str
    address: Endpoint
    mesh: MeshPeer
    alive: bool = True
    events: list[MeshEvent] = field(default_factory=list)
    tx_bytes: int = 0
    timer_at: float | None = None
    """The one live timer entry of this peer in the heap; any other entry for it is stale."""


class SimNet:
    def __init__(self, seed: int, profile: LinkProfile | None = None, config: MeshConfig | None = None,
                 version_clock_ms: int | None = None) -> None:
        self.seed = seed
        self.version_clock_ms = version_clock_ms
        """Start peers at this wall-clock millisecond count plus virtual time, as the daemon does; None: at 1."""
        self.rng = random.Random(seed)
        self.profile = profile or LinkProfile()
        self.config = config or MeshConfig()
        self.now = 0.0
        self.peers: dict[str, SimPeer] = {}
        self.by_address: dict[Endpoint, SimPeer] = {}
        self.blocked: set[frozenset[str]] = set()
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self.delivered = 0
        self.dropped: Counter[str] = Counter()
        self._restarts: Counter[str] = Counter()
        self.password: bytes | None = None
        """The mesh password every new peer (or restart) gets, unless ``passwords`` names another."""
        self.passwords: dict[str, bytes | None] = {}
        self.stamp_base = 1_000_000

    # --- building ---------------------------------------------------------------------------------

    def address_of(self, index: int) -> Endpoint:
        return Endpoint(str(ipaddress.ip_address("10.0.0.0") + index + 1), 6783)

    def add_peer(self, nickname: str, targets: Iterable[Endpoint] = (), index: int | None = None) -> SimPeer:
        index = len(self.peers) if index is None else index
        address = self.address_of(index)
        name = derive_peer_name(f"sim-{self.seed}-{nickname}")
        peer = SimPeer(nickname, address, self._new_mesh(name, nickname))
        for target in targets:
            peer.mesh.add_target(target, self.now)
        self.peers[nickname] = peer
        self.by_address[address] = peer
        self._schedule_timer(peer)
        return peer

    def _new_mesh(self, name: PeerName, nickname: str) -> MeshPeer:
        uid = PeerUID(self.rng.getrandbits(64))
        identity = PeerIdentity(name, nickname, uid, default_short_id(name))
        rng = random.Random(self.rng.getrandbits(64))
        password = self.passwords.get(nickname, self.password)
        secure = None
        if password is not None:
            entropy = random.Random(self.rng.getrandbits(64)).randbytes
            # Wall-clock ms at start, as the daemon passes it: later starts get larger stamps.
            secure = SecureConfig(_psk(password), entropy, self.stamp_base + int(self.now * 1000))
        initial = 1 if self.version_clock_ms is None else self.version_clock_ms + int(self.now * 1000)
        return MeshPeer(identity, self.config, rng, self.now, initial_version=initial, secure=secure)

    def add_clone(self, nickname: str, of: str, targets: Iterable[Endpoint], index: int) -> SimPeer:
        """A peer that uses another peer's name (a cloned machine), with its own UID and address."""
        peer = self.add_peer(nickname, (), index=index)
        peer.mesh = self._new_mesh(self.peers[of].mesh.identity.name, nickname)
        peer.timer_at = None
        for target in targets:
            peer.mesh.add_target(target, self.now)
        self._schedule_timer(peer)
        return peer

    def crash(self, nickname: str) -> None:
        """The process dies: no goodbye, state lost."""
        self.peers[nickname].alive = False

    def restart(self, nickname: str, targets: Iterable[Endpoint] = ()) -> SimPeer:
        """Start again with the same name, a new UID and version 1 (no persisted version)."""
        old = self.peers[nickname]
        old.mesh = self._new_mesh(old.mesh.identity.name, nickname)
        old.alive = True
        old.timer_at = None
        for target in targets:
            old.mesh.add_target(target, self.now)
        self._schedule_timer(old)
        return old

    def leave(self, nickname: str) -> None:
        peer = self.peers[nickname]
        peer.mesh.leave(self.now)
        self._flush(peer)
        peer.alive = False

    def block(self, a: str, b: str) -> None:
        self.blocked.add(frozenset((a, b)))

    def unblock(self, a: str, b: str) -> None:
        self.blocked.discard(frozenset((a, b)))

    def partition(self, *groups: Iterable[str]) -> None:
        """Peers in different groups cannot reach each other."""
        sets = [set(g) for g in groups]
        for i, g1 in enumerate(sets):
            for g2 in sets[i + 1:]:
                for a in g1:
                    for b in g2:
                        self.block(a, b)

    def heal(self) -> None:
        self.blocked.clear()

    # --- running ----------------------------------------------------------------------------------

    def _push(self, when: float, kind: str, item: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, item))

    def _schedule_timer(self, peer: SimPeer) -> None:
        deadline = peer.mesh.next_deadline()
        if deadline is None:
            return
        deadline = max(deadline, self.now)
        if peer.timer_at is None or deadline < peer.timer_at:
            peer.timer_at = deadline
            self._push(deadline, "timer", (peer, peer.mesh))

    def _flush(self, sender: SimPeer) -> None:
        for data, dest in sender.mesh.datagrams_to_send():
            sender.tx_bytes += len(data)
            receiver = self.by_address.get(dest)
            if receiver is None or frozenset((sender.nickname, receiver.nickname)) in self.blocked:
                self.dropped["blocked"] += 1
                continue
            copies = 2 if self.rng.random() < self.profile.duplicate else 1
            for _ in range(copies):
                if self.rng.random() < self.profile.loss:
                    self.dropped["loss"] += 1
                    continue
                delay = self.profile.delay + self.rng.random() * self.profile.jitter
                self._push(self.now + delay, "packet", (receiver, data, sender.address))
        sender.events.extend(sender.mesh.events())

    def step(self) -> bool:
        if not self._heap:
            return False
        when, _, kind, item = heapq.heappop(self._heap)
        self.now = max(self.now, when)
        if kind == "packet":
            receiver, data, source = item  # type: ignore[misc]
            if receiver.alive:
                receiver.mesh.receive_datagram(data, source, self.now)
                self.delivered += 1
                self._flush(receiver)
                self._schedule_timer(receiver)
        else:
            peer, mesh = item  # type: ignore[misc]
            if not peer.alive or peer.mesh is not mesh or peer.timer_at != when:
                return True  # stale: a crashed peer, an old incarnation, or a superseded timer
            peer.timer_at = None
            deadline = mesh.next_deadline()
            if deadline is None:
                return True
            if deadline > self.now + 1e-9:
                self._schedule_timer(peer)
                return True
            mesh.handle_timer(self.now)
            self._flush(peer)
            self._schedule_timer(peer)
        return True

    def run_for(self, seconds: float) -> None:
        """Advance virtual time by ``seconds``, delivering and firing everything due meanwhile."""
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            self.step()
        self.now = end

    def run_until(self, predicate: Callable[[], bool], timeout: float, check_every: float = 0.25) -> float:
        """Advance until ``predicate()`` holds (checked every ``check_every`` virtual seconds); return the
        virtual time it took, or raise AssertionError with the seed after ``timeout``."""
        start = self.now
        deadline = start + timeout
        next_check = start
        while True:
            if self.now >= next_check:
                if predicate():
                    return self.now - start
                next_check = self.now + check_every
            if self.now >= deadline:
                raise AssertionError(f"not reached after {timeout}s of virtual time (seed={self.seed})")
            if not self._heap or self._heap[0][0] > next_check:
                self.now = min(next_check, deadline)
                continue
            self.step()

    # --- observing --------------------------------------------------------------------------------

    def alive(self) -> list[SimPeer]:
        return [p for p in self.peers.values() if p.alive]

    def view(self, peer: SimPeer) -> frozenset[tuple[str, int, int]]:
        return frozenset((e.name, e.version, e.uid) for e in peer.mesh.topology.entries.values())

    def converged(self, peers: list[SimPeer] | None = None) -> bool:
        """Every live peer holds the same topology, and it names exactly the live peers, all routable."""
        peers = self.alive() if peers is None else peers
        if not peers:
            return True
        hashes = {p.mesh.topology.digest_hash() for p in peers}
        if len(hashes) != 1:
            return False
        names = {p.mesh.identity.name for p in peers}
        for p in peers:
            topo = p.mesh.topology
            if set(topo.entries) != names:
                return False
            if set(topo.next_hops()) != names - {p.mesh.identity.name}:
                return False
        own = {p.mesh.identity.name: p.mesh.identity.uid for p in peers}
        return all(e.uid == own[e.name] for e in peers[0].mesh.topology.entries.values())
