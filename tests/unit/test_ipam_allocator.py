"""The allocator on an in-process cluster: seeding by consensus, leases, space on demand, deadlines,
rmpeer, and restarts from the persisted snapshot."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import msgpack
import pytest

from weaved.core.ipam.allocator import (
    RING_GOSSIP_INTERVAL,
    Allocated,
    AllocationFailed,
    Allocator,
    AllocError,
    Completion,
    MsgKind,
)
from weaved.core.ipam.ring import AddressRange, encode_ring
from weaved.core.ipam.seeding import parse_init
from weaved.core.types import PeerName, peer_name_from_bytes

NAMES = [peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in range(1, 6)]


@dataclass
class Cluster:
    """Allocators joined by a lossless, ordered message queue; ``down`` peers hear nothing."""

    cidr: str
    count: int
    init: str = "consensus"
    now: float = 0.0
    peers: dict[PeerName, Allocator] = field(default_factory=dict)
    down: set[PeerName] = field(default_factory=set)
    done: dict[PeerName, list[Completion]] = field(default_factory=dict)
    disk: dict[PeerName, bytes] = field(default_factory=dict)
    restarts: int = 0

    def __post_init__(self) -> None:
        for name in NAMES[: self.count]:
            self.peers[name] = self._new(name, None)
            self.done[name] = []
        self.connect()

    def _new(self, name: PeerName, snapshot: bytes | None) -> Allocator:
        mode = parse_init(self.init, self.count)
        seed = NAMES.index(name) + 100 * self.restarts  # a new run: a new incarnation
        return Allocator(name, AddressRange.from_cidr(self.cidr), mode, random.Random(seed),
                         timeout=10.0, snapshot=snapshot)

    def live(self) -> list[PeerName]:
        return [n for n in self.peers if n not in self.down]

    def connect(self) -> None:
        for name in self.live():
            self.peers[name].set_reachable(set(self.live()) - {name}, self.now)

    def pump(self, rounds: int = 200) -> None:
        """Deliver messages (persisting first, as the daemon does) until quiet."""
        for _ in range(rounds):
            moved = False
            for name in self.live():
                alloc = self.peers[name]
                if alloc.dirty:
                    self.disk[name] = alloc.snapshot()
                self.done[name] += alloc.completions()
                for dst, payload in alloc.messages():
                    moved = True
                    for target in ([dst] if dst is not None else [n for n in self.live() if n != name]):
                        if target in self.live():
                            self.peers[target].receive(name, payload, self.now)
            if not moved:
                return
        raise AssertionError("IPAM messages did not quiesce")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for name in self.live():
                alloc = self.peers[name]
                deadline = alloc.next_deadline()
                if deadline is not None and deadline <= self.now:
                    alloc.handle_timer(self.now)
            self.pump()

    def allocate(self, name: PeerName, cid: str, ifname: str = "eth0") -> Completion:
        request = self.peers[name].allocate(cid, ifname, self.now)
        for _ in range(100):
            self.pump()
            found = [c for c in self.done[name] if c.request == request]
            if found:
                return found[0]
            self.advance(0.5)
        raise AssertionError(f"allocation {cid} never finished")

    def crash_and_restart(self, name: PeerName) -> None:
        self.restarts += 1
        self.peers[name] = self._new(name, self.disk.get(name))
        self.connect()

    def all_leases(self) -> list[str]:
        return [lease.ip() for n in self.live() for lease in self.peers[n].leases()]


def test_first_allocation_waits_for_consensus_then_every_peer_owns_a_share() -> None:
    cluster = Cluster("10.32.0.0/24", 3)
    assert cluster.peers[NAMES[0]].status().state == "idle"
    result = cluster.allocate(NAMES[0], "c1")
    assert isinstance(result, Allocated)
    assert ipaddress.ip_address(result.lease.ip()) in ipaddress.ip_network("10.32.0.0/24")
    owners = {o.name for o in cluster.peers[NAMES[1]].status().owners}
    assert owners == set(NAMES[:3])
    assert all(cluster.peers[n].status().state == "ready" for n in NAMES[:3])


def test_consensus_without_quorum_never_guesses_and_fails_with_the_reason() -> None:
    cluster = Cluster("10.32.0.0/24", 3)
    cluster.down = {NAMES[1], NAMES[2]}
    cluster.connect()
    result = cluster.allocate(NAMES[0], "c1")
    assert isinstance(result, AllocationFailed)
    assert "awaiting consensus (quorum 2, known 1)" in result.message
    assert not cluster.peers[NAMES[0]].ring.seeded


def test_allocation_is_idempotent_per_container_and_interface() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    first = cluster.allocate(NAMES[0], "c1")
    again = cluster.allocate(NAMES[0], "c1")
    other_if = cluster.allocate(NAMES[0], "c1", "eth1")
    assert isinstance(first, Allocated) and isinstance(again, Allocated) and isinstance(other_if, Allocated)
    assert first.lease == again.lease
    assert other_if.lease.address != first.lease.address


def test_a_peer_that_runs_out_gets_space_from_another() -> None:
    cluster = Cluster("10.32.0.0/28", 2, init="seed=" + ",".join(NAMES[:2]))
    a = NAMES[0]
    got = [cluster.allocate(a, f"c{i}") for i in range(10)]
    assert all(isinstance(r, Allocated) for r in got), got
    addresses = cluster.all_leases()
    assert len(addresses) == len(set(addresses)) == 10
    assert cluster.peers[a].status().owned > 8  # more than its half of a /28


def test_exhausted_range_fails_with_a_clear_error_after_the_deadline() -> None:
    cluster = Cluster("10.32.0.0/29", 2, init="seed=" + ",".join(NAMES[:2]))
    results = [cluster.allocate(NAMES[i % 2], f"c{i}") for i in range(8)]
    ok = [r for r in results if isinstance(r, Allocated)]
    failed = [r for r in results if isinstance(r, AllocationFailed)]
    assert len(ok) == 6  # a /29 has 8 addresses, minus network and broadcast
    assert failed and all(f.code == "timeout" and "waiting for IP" in f.message for f in failed)


def test_release_returns_the_address_and_unknown_ids_are_harmless() -> None:
    cluster = Cluster("10.32.0.0/29", 1, init="seed=" + NAMES[0])
    first = cluster.allocate(NAMES[0], "c1")
    assert isinstance(first, Allocated)
    assert cluster.peers[NAMES[0]].release("c1", cluster.now) == [first.lease]
    assert cluster.peers[NAMES[0]].release("c1", cluster.now) == []
    again = cluster.allocate(NAMES[0], "c2")
    assert isinstance(again, Allocated) and again.lease.address == first.lease.address


def test_claim_checks_ownership() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    cluster.allocate(NAMES[0], "warmup")
    a = cluster.peers[NAMES[0]]
    mine = ipaddress.IPv4Address(a.ring.owned_ranges()[0][0] + 5)
    lease = a.claim("c9", "eth0", str(mine), cluster.now)
    assert lease.ip() == str(mine)
    theirs = ipaddress.IPv4Address(cluster.peers[NAMES[1]].ring.owned_ranges()[0][0] + 5)
    with pytest.raises(AllocError) as info:
        a.claim("c10", "eth0", str(theirs), cluster.now)
    assert info.value.code == "owned-elsewhere"
    with pytest.raises(AllocError):
        a.claim("c11", "eth0", "not-an-ip", cluster.now)


def test_leases_survive_a_crash_and_restart_from_the_snapshot() -> None:
    cluster = Cluster("10.32.0.0/24", 3)
    leases = [cluster.allocate(NAMES[i % 3], f"c{i}") for i in range(30)]
    assert all(isinstance(r, Allocated) for r in leases)
    before = sorted(cluster.peers[NAMES[1]].leases(), key=lambda lease: lease.address)
    cluster.crash_and_restart(NAMES[1])
    assert sorted(cluster.peers[NAMES[1]].leases(), key=lambda lease: lease.address) == before
    more = [cluster.allocate(NAMES[1], f"d{i}") for i in range(20)]
    assert all(isinstance(r, Allocated) for r in more)
    addresses = cluster.all_leases()
    assert len(addresses) == len(set(addresses)) == 50


def test_rmpeer_returns_a_dead_peers_space_exactly_once() -> None:
    cluster = Cluster("10.32.0.0/24", 3)
    cluster.allocate(NAMES[0], "c1")
    dead = NAMES[2]
    cluster.down = {dead}
    cluster.connect()
    cluster.peers[NAMES[0]].rmpeer(dead, cluster.now)
    cluster.peers[NAMES[1]].rmpeer(dead, cluster.now)  # both at once: still one owner per address
    cluster.pump()
    for name in NAMES[:2]:
        status = cluster.peers[name].status()
        assert dead not in {o.name for o in status.owners}
        assert sum(o.addresses for o in status.owners) == 256


def test_malformed_messages_are_counted_not_fatal() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a = cluster.peers[NAMES[0]]
    bad_incarnations = [msgpack.packb([int(MsgKind.LEFT_RING), b"", incarnation]) for incarnation in (-1, "x", 1 << 62)]
    bad_left_ring = msgpack.packb([int(MsgKind.LEFT_RING), b"not a ring", 7])  # a fine run, a broken body
    for junk in (b"", b"\x92\x63\xc0", b"\x92\x01\x93\x01\x02\x03", b"\xff" * 20, *bad_incarnations, bad_left_ring):
        a.receive(NAMES[1], junk, cluster.now)
    assert sum(a.status().rejected.values()) >= 8
    assert a.status().rejected["bad-field"] >= 3 and a.leavers == set()  # refused before anything is learnt
    assert isinstance(cluster.allocate(NAMES[0], "c1"), Allocated)


def test_bad_snapshot_is_a_clear_error() -> None:
    with pytest.raises(AllocError) as info:
        Allocator(NAMES[0], AddressRange.from_cidr("10.32.0.0/24"), parse_init("seed=" + NAMES[0], 1),
                  random.Random(1), snapshot=b"\x93\x01\x02")
    assert info.value.code == "bad-snapshot"


def test_a_peer_that_runs_out_does_not_flood_donors_that_cannot_give() -> None:
    """Regression (found by tests/sim/test_ipam_stateful.py): two donors that each keep their last address
    said no in turn, and the requester asked the other one at once, forever, without time passing. A donor
    that said no is now left alone for SPACE_REQUEST_TIMEOUT, so requests are bounded by time, not by how
    fast the network carries the answers."""
    cluster = Cluster("10.32.0.0/28", 3, init="seed=" + ",".join(NAMES[:3]))
    a, b, c = NAMES[:3]
    for name in (a, b, c):
        assert isinstance(cluster.allocate(name, f"{name}-first"), Allocated)
    for name in (b, c):  # fill b and c up to their last free address, which a donor never gives away
        while cluster.peers[name].space.free_count() > 1:
            assert isinstance(cluster.allocate(name, f"{name}-{cluster.peers[name].space.free_count()}"), Allocated)
    while cluster.peers[a].space.free_count() > 0:
        assert isinstance(cluster.allocate(a, f"a-{cluster.peers[a].space.free_count()}"), Allocated)
    requests = 0
    original = cluster.peers[a].messages

    def counted() -> list[tuple[PeerName | None, bytes]]:
        nonlocal requests
        out = original()
        requests += sum(1 for _, payload in out if payload[1:2] == b"\x03")  # [SPACE_REQUEST, nil]
        return out

    cluster.peers[a].messages = counted  # type: ignore[method-assign]
    result = cluster.allocate(a, "one-too-many")  # pump() raises if the messages never quiesce
    assert isinstance(result, AllocationFailed) and "waiting for IP" in result.message
    # b and c are each asked at most once per SPACE_REQUEST_TIMEOUT (2 s) during the 10 s deadline.
    assert 2 <= requests <= 2 * (10 // 2 + 1), requests


def test_a_peer_restarted_from_its_snapshot_keeps_gossiping_its_ring() -> None:
    """Regression (found by tests/sim/test_ipam_stateful.py): anti-entropy was scheduled only when the ring
    changed, so a peer restarted from its snapshot whose ring never changed again never gossiped it, and a
    free-count report (or a hand-over whose messages were lost) stayed unknown to the others for good."""
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a, b = NAMES[:2]
    assert isinstance(cluster.allocate(b, "c1"), Allocated)
    cluster.crash_and_restart(b)
    deadline = cluster.peers[b].next_deadline()
    assert deadline is not None and deadline <= cluster.now + RING_GOSSIP_INTERVAL * 1.5
    cluster.advance(RING_GOSSIP_INTERVAL * 1.5)
    assert cluster.peers[a].ring.state == cluster.peers[b].ring.state  # b's free-count report reached a
    b_token = next(t for t in cluster.peers[a].ring.state.tokens if t.owner == b)
    assert b_token.free == cluster.peers[b].space.free_count()


# -- leaving for good ----------------------------------------------------------------------------------


def test_leave_hands_every_range_to_a_live_peer_which_confirms() -> None:
    cluster = Cluster("10.32.0.0/24", 3, init="seed=" + ",".join(NAMES[:3]))
    a, b, c = NAMES[:3]
    for name in (a, b, c):
        assert isinstance(cluster.allocate(name, f"{name}-c"), Allocated)
    cluster.peers[a].release(f"{a}-c", cluster.now)
    owned = cluster.peers[a].status().owned
    departure = cluster.peers[a].leave(cluster.now)
    assert departure.heir in (b, c) and departure.addresses == owned and not departure.confirmed
    cluster.pump()
    assert departure.confirmed  # the heir answered with its ring
    for name in (b, c):
        status = cluster.peers[name].status()
        assert a not in {o.name for o in status.owners}
        assert sum(o.addresses for o in status.owners) == 256
    assert cluster.peers[a].status().state == f"left: handed {owned} addresses to {departure.heir} (confirmed)"
    for call in (lambda: cluster.peers[a].allocate("x", "eth0", cluster.now),
                 lambda: cluster.peers[a].claim("x", "eth0", "10.32.0.9", cluster.now),
                 lambda: cluster.peers[a].rmpeer(c, cluster.now)):
        with pytest.raises(AllocError) as info:
            call()
        assert info.value.code == "left"
    assert cluster.peers[a].leave(cluster.now) is departure  # asking again changes nothing
    more = [cluster.allocate(name, f"more-{i}") for i, name in enumerate([b, c] * 20)]
    assert all(isinstance(r, Allocated) for r in more)  # the whole range is in live hands
    addresses = cluster.all_leases()
    assert len(addresses) == len(set(addresses)) == 42


def test_leave_refuses_while_containers_hold_addresses_unless_forced() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a = NAMES[0]
    held = cluster.allocate(a, "busy")
    assert isinstance(held, Allocated)
    with pytest.raises(AllocError) as info:
        cluster.peers[a].leave(cluster.now)
    assert info.value.code == "in-use" and held.lease.ip() in str(info.value) and "busy" in str(info.value)
    assert cluster.peers[a].departure is None and cluster.peers[a].leases() == [held.lease]
    departure = cluster.peers[a].leave(cluster.now, force=True)
    assert departure.dropped == (held.lease,) and cluster.peers[a].leases() == []
    cluster.pump()
    assert departure.confirmed and cluster.peers[NAMES[1]].status().owned == 256


def test_leave_with_nobody_to_take_over_is_refused_and_changes_nothing() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a, b = NAMES[:2]
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.peers[a].release("c1", cluster.now)
    cluster.down = {b}
    cluster.connect()
    before = cluster.peers[a].ring.state
    with pytest.raises(AllocError) as info:
        cluster.peers[a].leave(cluster.now)
    assert info.value.code == "no-heir" and "128 addresses" in str(info.value)
    assert cluster.peers[a].ring.state == before and cluster.peers[a].departure is None


def test_a_lost_hand_over_is_sent_again_until_the_heir_confirms() -> None:
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a, b = NAMES[:2]
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.peers[a].release("c1", cluster.now)
    departure = cluster.peers[a].leave(cluster.now)
    assert departure.heir == b
    cluster.down = {b}  # b is cut off: the hand-over and the first retries are lost
    cluster.pump()
    cluster.advance(5.0)
    assert not departure.confirmed and cluster.peers[a].next_deadline() is not None
    cluster.down = set()
    cluster.peers[b].set_reachable(set(), cluster.now)  # b's mesh lost a meanwhile; no news reached b
    cluster.advance(3.0)  # the next retry gets through
    assert departure.confirmed
    assert cluster.peers[b].status().owned == 256


def left_after_one_allocation() -> tuple[Cluster, PeerName, PeerName]:
    """Two seeded peers; ``a`` allocated once, released, and left: ``b`` owns everything."""
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join(NAMES[:2]))
    a, b = NAMES[:2]
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.peers[a].release("c1", cluster.now)
    cluster.peers[a].leave(cluster.now)
    cluster.pump()
    return cluster, a, b


def test_a_peer_that_left_and_restarts_owns_nothing_and_asks_for_space_like_a_new_one() -> None:
    cluster, a, b = left_after_one_allocation()
    cluster.crash_and_restart(a)  # the hand-over was on disk before it was sent
    assert cluster.peers[a].departure is None and cluster.peers[a].status().owned == 0
    cluster.done[a].clear()  # the new incarnation numbers its requests from 1 again
    again = cluster.allocate(a, "c2")
    assert isinstance(again, Allocated) and again.lease.container_id == "c2"
    assert cluster.peers[b].ring.owner_of(again.lease.address) == a  # granted by b


def test_a_request_waiting_for_a_reachable_donor_asks_as_soon_as_one_is_reachable() -> None:
    """A restarted peer that owns nothing can take an allocation before the mesh told its IPAM that the
    donor is reachable; it must ask the moment it is, not at the next anti-entropy round 15-45 s later
    (the daemon test of ``weaved reset`` caught a 20 s wait, and once a 30 s deadline)."""
    cluster, a, b = left_after_one_allocation()
    cluster.peers[a] = cluster._new(a, cluster.disk[a])  # restarted, and the mesh has not reported b yet
    cluster.done[a].clear()
    request = cluster.peers[a].allocate("c2", "eth0", cluster.now)
    cluster.pump()
    assert not cluster.done[a], "allocated with no space and no donor"
    cluster.peers[a].set_reachable({b}, cluster.now)  # b is reachable now: no time passes
    cluster.pump()
    (done,) = [c for c in cluster.done[a] if c.request == request]
    assert isinstance(done, Allocated) and cluster.peers[b].ring.owner_of(done.lease.address) == a


def test_a_share_of_the_first_split_that_reaches_a_peer_that_left_goes_to_a_late_joiner() -> None:
    """``c`` left before the ring was seeded; the seed list still gives it a share, which it must hand on.
    The only live peer is ``d``, which joined late and owns nothing in the first split: that is not a peer
    seen to leave (the slow stateful test found ``c`` keeping its share for good)."""
    cluster = Cluster("10.32.0.0/27", 4, init="seed=" + ",".join(NAMES[:3]))
    a, b, c, d = NAMES[:4]
    cluster.peers[c].leave(cluster.now)
    cluster.down = {a, b}
    cluster.connect()
    assert isinstance(cluster.allocate(d, "c1"), Allocated)  # seeds the ring: a, b and c get a share each
    cluster.advance(10)
    ring = cluster.peers[d].ring.state
    assert ring.owned_count(c) == 0 and cluster.peers[c].ring.state == ring
    assert d not in cluster.peers[c].leavers


def test_two_peers_that_leave_do_not_pass_a_range_back_and_forth() -> None:
    """Regression (found by tests/sim/test_ipam_stateful.py): a and b leave, c owns nothing. b's best heir
    was a (which had left and owns nothing, like c, and has the lower name), and a's was b again, for ever.
    A peer that left says so in every ring it sends (``LEFT_RING``), and is never picked as heir."""
    a, b, c = NAMES[:3]
    cluster = Cluster("10.32.0.0/24", 3, init="seed=" + ",".join([a, b]))  # c is in no seed: it owns nothing
    for name in (a, b, c):
        cluster.peers[name].handle_timer(cluster.now)  # adopt the seeded ring, as the daemon does at start
    cluster.pump()
    assert cluster.peers[c].ring.seeded and cluster.peers[c].status().owned == 0
    first = cluster.peers[a].leave(cluster.now)
    assert first.heir == b  # an owner of space comes first
    cluster.pump()
    second = cluster.peers[b].leave(cluster.now)
    cluster.pump()  # raises if the range keeps moving
    assert first.confirmed and second.confirmed
    for name in (a, b, c):
        assert {o.name for o in cluster.peers[name].status().owners} == {c}
    assert cluster.peers[c].status().owned == 256
    assert cluster.peers[c].leavers == {a, b} and not cluster.peers[a].leavers & {c}


def test_a_stale_ring_from_a_peer_that_owned_nothing_does_not_mark_it_as_left() -> None:
    """Regression (found by the slow stateful test): a ring ``c`` sent while it owned nothing arrives at
    ``b`` late, after ``c`` got space. ``b`` took it for a ring that showed ``c`` leaving, so when ``b``
    left with ``c`` as the only peer it could reach, it found no heir and kept its share for good.
    Leavers are now learnt only from the ``LEFT_RING`` marker, never inferred from a ring's content."""
    a, b, c = NAMES[:3]
    cluster = Cluster("10.32.0.0/24", 3, init="seed=" + ",".join([a, b]))  # c is in no seed: it owns nothing
    for name in (a, b, c):
        cluster.peers[name].handle_timer(cluster.now)
    cluster.pump()
    stale = msgpack.packb([int(MsgKind.RING), encode_ring(cluster.peers[c].ring.state),
                           cluster.peers[c].incarnation], use_bin_type=True)
    assert isinstance(cluster.allocate(c, "c1"), Allocated)  # c gets space from a or b
    assert cluster.peers[b].ring.state.owned_count(c) > 0
    cluster.peers[b].receive(c, stale, cluster.now)  # the old ring, delayed and reordered
    assert c not in cluster.peers[b].leavers
    cluster.down = {a}
    cluster.connect()
    b_share = cluster.peers[b].status().owned
    departure = cluster.peers[b].leave(cluster.now)
    assert departure.heir == c
    cluster.pump()
    assert departure.confirmed and cluster.peers[b].status().owned == 0
    assert cluster.peers[c].ring.state.owned_count(c) >= b_share


def test_every_ring_a_peer_sends_after_it_left_marks_it_as_left() -> None:
    """The receiver learns the departure from the message kind, before it merges the hand-over, so it
    never hands the space back; a peer that never left is never marked."""
    a, b = NAMES[:2]
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join([a, b]))
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.pump()
    assert not cluster.peers[a].leavers and not cluster.peers[b].leavers
    cluster.peers[a].release("c1", cluster.now)
    cluster.peers[a].leave(cluster.now)
    sent = cluster.peers[a].messages()
    assert sent and all(msgpack.unpackb(payload)[0] == MsgKind.LEFT_RING for _, payload in sent)
    for _, payload in sent:
        cluster.peers[b].receive(a, payload, cluster.now)
    assert cluster.peers[b].leavers == {a} and not cluster.peers[a].leavers


def test_a_peer_that_left_and_was_restarted_can_be_heir_again() -> None:
    """Regression (found by the slow stateful test): b left to a, then b was restarted and is a normal
    peer again. a still took b for a leaver, so when a left with b as the only other peer, a found no
    heir and kept its space for good. Leavers are known per incarnation, and a restart is a new one."""
    a, b = NAMES[:2]
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join([a, b]))
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.pump()
    assert cluster.peers[b].leave(cluster.now).heir == a
    cluster.pump()
    assert cluster.peers[a].leavers == {b}
    cluster.crash_and_restart(b)
    cluster.advance(RING_GOSSIP_INTERVAL * 2)  # b's new run gossips its ring
    assert cluster.peers[a].leavers == set()
    cluster.peers[a].release("c1", cluster.now)
    departure = cluster.peers[a].leave(cluster.now)
    assert departure.heir == b
    cluster.pump()
    assert departure.confirmed and cluster.peers[b].status().owned == 256


def test_a_late_message_from_a_run_that_left_marks_the_peer_only_until_its_new_run_speaks() -> None:
    a, b = NAMES[:2]
    cluster = Cluster("10.32.0.0/24", 2, init="seed=" + ",".join([a, b]))
    assert isinstance(cluster.allocate(a, "c1"), Allocated)
    cluster.pump()
    cluster.peers[b].leave(cluster.now)
    cluster.disk[b] = cluster.peers[b].snapshot()  # the durability rule: on disk before anything is sent
    late = [payload for _, payload in cluster.peers[b].messages()]
    assert late and all(msgpack.unpackb(p)[0] == MsgKind.LEFT_RING for p in late)
    cluster.crash_and_restart(b)
    cluster.advance(RING_GOSSIP_INTERVAL * 2)
    assert cluster.peers[a].leavers == set()
    cluster.peers[a].receive(b, late[0], cluster.now)  # the old run's hand-over, delayed
    assert cluster.peers[a].leavers == {b}
    cluster.advance(RING_GOSSIP_INTERVAL * 2)
    assert cluster.peers[a].leavers == set()
