"""Forged control datagrams against a converged mesh: a forger that knows a neighbour's name and UID (both are
gossiped) sends crafted datagrams from that neighbour's address. None of them may cut a link, poison the
topology for good, squat the short ids, or turn a peer into an amplifier."""

from __future__ import annotations

from tests.sim.simnet import SimNet, SimPeer
from tests.sim.test_mesh_sim import build, converge, departures
from weaved.core.entries import ConnectionEntry, PeerEntry
from weaved.core.events import RelayDelivered
from weaved.core.mesh import MeshConfig
from weaved.core.types import Endpoint, PeerName, PeerUID, ShortID, peer_name_from_bytes
from weaved.core.wire import (
    PROTOCOL_MAX,
    Body,
    DigestItem,
    Goodbye,
    GossipDigest,
    GossipRequest,
    GossipSummary,
    GossipUpdate,
    Heartbeat,
    Hello,
    Message,
    Reject,
    Relay,
    encode,
)

MAX_UNREACHABLE = 1024
"""The bound on entries not reachable from us (weaved.core.topology.MAX_UNREACHABLE)."""


def forge(body: Body, as_peer: SimPeer) -> bytes:
    """A datagram in ``as_peer``'s name and incarnation (the forger read both from gossip)."""
    identity = as_peer.mesh.identity
    return encode(Message(PROTOCOL_MAX, identity.name, identity.uid, body))


def inject(net: SimNet, victim: SimPeer, data: bytes, source: Endpoint) -> None:
    victim.mesh.receive_datagram(data, source, net.now)
    net._flush(victim)


def established_with(peer: SimPeer, other: SimPeer, net: SimNet) -> bool:
    return any(c.state == "established" and c.peer_name == other.mesh.identity.name
               for c in peer.mesh.status(net.now).connections)


def fake_name(i: int) -> PeerName:
    """Names below every real one (real names have the locally administered bit set): the squatter's pick."""
    return peer_name_from_bytes(bytes([0, 0, 0, 0, i >> 8, i & 0xFF]))


# --- 1. versions -------------------------------------------------------------------------------------------

def test_a_forged_huge_version_is_refused_so_a_restarted_peer_still_wins() -> None:
    net = build(3, seed=31, fan_in=2)
    converge(net)
    p0, p1, p2 = (net.peers[f"p{i}"] for i in range(3))
    entry = p0.mesh.topology.entries[p2.mesh.identity.name]
    forged = PeerEntry(entry.name, entry.nickname, PeerUID(777), 2**62, entry.short_id, entry.connections)
    inject(net, p0, forge(GossipUpdate((forged,)), p1), p1.address)
    assert p0.mesh.topology.entries[entry.name].version < 2**62
    assert p0.mesh.counters["dropped_version-jump"] == 1
    net.crash("p2")
    net.run_for(1.0)
    net.restart("p2", [p0.address, p1.address])
    converge(net, timeout=60)


def test_a_peer_restarted_after_a_long_uptime_wins_at_once_with_wall_clock_versions() -> None:
    day_ms = 86_400_000
    net = SimNet(seed=32, version_clock_ms=1_780_000_000_000)
    for i in range(3):
        net.add_peer(f"p{i}", [net.address_of(j) for j in range(3) if j != i], index=i)
    converge(net)
    net.crash("p2")
    net.run_for(1.0)
    net.version_clock_ms += 200 * day_ms  # it ran for 200 days: its new version jumps by that many ms
    restarted = net.restart("p2", [net.address_of(0)])
    initial = restarted.mesh.topology.own.version
    converge(net, timeout=30)
    name = restarted.mesh.identity.name
    assert restarted.mesh.topology.own.version < initial + 100, "no bump war was needed"
    assert all(p.mesh.topology.entries[name].uid == restarted.mesh.identity.uid for p in net.alive())
    assert all(p.mesh.counters["dropped_version-jump"] == 0 for p in net.alive())


# --- 2. short ids ------------------------------------------------------------------------------------------

def _squatters() -> list[PeerEntry]:
    return [PeerEntry(fake_name(i), f"squat{i}", PeerUID(i), 1, ShortID(i), ()) for i in range(4096)]


def test_short_id_squatting_with_unreachable_entries_leaves_every_peer_routable() -> None:
    net = build(4, seed=33, fan_in=3)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    ids_before = {p.nickname: p.mesh.topology.own.short_id for p in net.alive()}
    squat = _squatters()
    for part in (squat[:2048], squat[2048:]):
        inject(net, p0, forge(GossipUpdate(tuple(part)), p1), p1.address)
    topology = p0.mesh.topology
    assert len(topology.entries) <= 4 + MAX_UNREACHABLE, "unreachable entries are bounded"
    short_ids = topology.short_ids()
    assert set(short_ids) == {p.mesh.identity.name for p in net.alive()}
    assert len(set(short_ids.values())) == 4, "no real peer collides with a squatter"
    net.run_for(3.0)
    assert {p.nickname: p.mesh.topology.own.short_id for p in net.alive()} == ids_before
    assert net.converged()
    assert all(len(p.mesh._targets) <= 4 for p in net.alive()), "no dial target learnt from a squatter"


# --- 3. our own name from a neighbour's address --------------------------------------------------------------

def test_a_heartbeat_in_our_own_name_from_a_neighbour_neither_cuts_it_nor_marks_it_self() -> None:
    net = build(3, seed=34, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    for body in (Heartbeat(), Hello(1, 1, p0.nickname, p0.mesh.topology.own.short_id, ("sleeve",), 2)):
        inject(net, p0, forge(body, p0), p1.address)
    assert established_with(p0, p1, net)
    assert str(p1.address) in p0.mesh.status(net.now).targets, "the neighbour's address is not 'self'"
    net.crash("p1")
    net.run_for(10.0)
    net.restart("p1", [])
    converge(net, timeout=60)  # p0 redials p1's address: it was never marked as our own


# --- 4. goodbye, heartbeat, reject and hello in a neighbour's name ---------------------------------------------

def test_a_forged_goodbye_reject_or_hello_in_a_neighbours_name_does_not_cut_the_link() -> None:
    net = build(3, seed=35, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    overlays_before = p0.mesh.neighbours()[p1.mesh.identity.name][1]
    forged: list[Body] = [Goodbye(), Reject("unknown-connection", "forged"),
                          Hello(1, 1, p1.nickname, p1.mesh.topology.own.short_id, ("sleeve:9",), 2)]
    for body in forged:
        inject(net, p0, forge(body, p1), p1.address)
        assert established_with(p0, p1, net), body
    assert p0.mesh.neighbours()[p1.mesh.identity.name][1] == overlays_before, "overlays stay as handshaken"
    net.run_for(3.0)
    assert departures(net) == 0


def test_forged_heartbeats_do_not_keep_a_crashed_neighbour_alive() -> None:
    net = build(3, seed=36, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    net.crash("p1")
    for _ in range(12):
        inject(net, p0, forge(Heartbeat(), p1), p1.address)
        net.run_for(0.5)
    assert not established_with(p0, p1, net)


# --- 5. amplification ----------------------------------------------------------------------------------------

def test_gossip_answers_to_one_source_stay_within_four_times_what_it_sent() -> None:
    net = build(30, seed=37, fan_in=3, config=MeshConfig(conn_limit=8))
    converge(net)
    p0 = net.peers["p0"]
    neighbour = next(net.by_address[c.address] for c in p0.mesh._established())
    names = tuple(sorted(p0.mesh.topology.entries))
    forged = [forge(GossipRequest(names), neighbour),
              forge(GossipDigest(tuple(DigestItem(n, 0, PeerUID(0)) for n in names)), neighbour),
              forge(GossipSummary(b"\0" * 8, 1), neighbour)]
    sent = answered = 0
    p0.mesh.datagrams_to_send()
    for _ in range(300):
        for data in forged:
            sent += len(data)
            p0.mesh.receive_datagram(data, neighbour.address, net.now)
            answered += sum(len(d) for d, dest in p0.mesh.datagrams_to_send() if dest == neighbour.address)
        net.now += 0.01
    # Four times what was sent, plus at most one budget cap (64 KiB at this size) of credit that the real
    # neighbour's own traffic and handshake had earned before.
    assert answered <= 4 * sent + 65_536, (answered, sent)
    assert p0.mesh.counters["dropped_answer-budget"] > 0


def test_a_replayed_broadcast_is_delivered_and_forwarded_once() -> None:
    net = build(6, seed=38, fan_in=5)
    converge(net)
    p0, p1, p2 = net.peers["p0"], net.peers["p1"], net.peers["p2"]
    data = forge(Relay(p2.mesh.identity.name, None, "ipam", 8, b"payload"), p1)
    tx_before = p0.tx_bytes
    for _ in range(50):
        inject(net, p0, data, p1.address)
    delivered = [e for e in p0.events if isinstance(e, RelayDelivered) and e.payload == b"payload"]
    assert len(delivered) == 1
    assert p0.tx_bytes - tx_before < 5 * len(data) + 1
    assert p0.mesh.counters["dropped_duplicate-broadcast"] == 49


# --- 6. bounded tables --------------------------------------------------------------------------------------

def test_learnt_targets_and_entries_stay_bounded_under_a_flood_of_forged_entries() -> None:
    net = build(3, seed=39, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    p1_name = p1.mesh.identity.name
    for batch in range(20):
        entries = []
        for i in range(200):
            n = batch * 200 + i
            conns = tuple(ConnectionEntry(p1_name, Endpoint(f"203.0.113.{k}", 1000 + n), True, True) for k in range(8))
            entries.append(PeerEntry(fake_name(n), "f", PeerUID(n), 1, ShortID(n % 4096), conns))
        inject(net, p0, forge(GossipUpdate(tuple(entries)), p1), p1.address)
        assert len(p0.mesh.topology.entries) <= 3 + MAX_UNREACHABLE
        assert len(p0.mesh._targets) <= 2 + 4096
    net.run_for(3.0)
    assert net.converged()
    assert len(p0.mesh._targets) <= 2
