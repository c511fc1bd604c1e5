"""The mesh core on a simulated network: convergence, loss, partitions, restarts, relays, leaving."""

from __future__ import annotations

import random

import pytest

from tests.sim.simnet import LinkProfile, SimNet, SimPeer
from weaved.core.events import ConnectionStateChanged, NameCollision, PeerJoined, PeerLeft, RelayDelivered
from weaved.core.mesh import MeshConfig


def build(n: int, seed: int, *, fan_in: int = 3, profile: LinkProfile | None = None,
          config: MeshConfig | None = None) -> SimNet:
    """``n`` peers, each told about ``fan_in`` random others (like a partial KUBE_PEERS list)."""
    net = SimNet(seed, profile, config)
    rng = random.Random(seed)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        picks = rng.sample(others, min(fan_in, len(others)))
        net.add_peer(f"p{i}", [net.address_of(j) for j in picks], index=i)
    return net


def names_known(peer: SimPeer) -> set[str]:
    return {e.nickname for e in peer.mesh.topology.entries.values()}


def departures(net: SimNet) -> int:
    return sum(isinstance(e, PeerLeft) for p in net.alive() for e in p.events)


def converge(net: SimNet, timeout: float = 60.0) -> float:
    """Run until every view agrees; then check nobody flaps (no peer is lost while links are healthy)
    and that the views agree again after a few more seconds of heartbeats and late connections."""
    took = net.run_until(net.converged, timeout)
    before = departures(net)
    net.run_for(3.0)
    net.run_until(net.converged, 30.0)
    assert departures(net) == before, f"a peer flapped after convergence (seed={net.seed})"
    return took


def test_three_peers_converge_with_full_routes_and_status() -> None:
    net = build(3, seed=1, fan_in=2)
    converge(net)
    p0 = net.peers["p0"]
    status = p0.mesh.status(net.now)
    assert {p.nickname for p in status.peers} == {"p0", "p1", "p2"}
    assert all(p.next_hop is not None for p in status.peers if p.nickname != "p0")
    assert status.established == 2
    joined = {e.nickname for e in p0.events if isinstance(e, PeerJoined)}
    assert joined == {"p1", "p2"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifty_peers_converge_from_partial_peer_lists(seed: int) -> None:
    net = build(50, seed, fan_in=2, config=MeshConfig(conn_limit=10))
    converge(net, timeout=60)
    assert all(len(names_known(p)) == 50 for p in net.alive())


def test_fifty_peers_converge_with_ten_percent_loss_duplication_and_reorder() -> None:
    profile = LinkProfile(loss=0.10, duplicate=0.05, delay=0.001, jitter=0.02)
    net = build(50, seed=7, fan_in=2, profile=profile, config=MeshConfig(conn_limit=10))
    converge(net, timeout=120)
    assert net.dropped["loss"] > 0


@pytest.mark.slow
def test_three_hundred_peers_converge_with_loss() -> None:
    net = build(300, seed=11, fan_in=2, profile=LinkProfile(loss=0.10, jitter=0.01), config=MeshConfig(conn_limit=6))
    converge(net, timeout=180)


def test_partition_then_heal_reconverges() -> None:
    net = build(8, seed=5, fan_in=7)
    converge(net)
    left, right = [f"p{i}" for i in range(4)], [f"p{i}" for i in range(4, 8)]
    net.partition(left, right)
    net.run_until(lambda: net.converged([net.peers[n] for n in left])
                  and net.converged([net.peers[n] for n in right]), 60)
    assert names_known(net.peers["p0"]) == set(left)
    assert any(isinstance(e, PeerLeft) and e.nickname == "p7" for e in net.peers["p0"].events)
    net.heal()
    converge(net, timeout=60)


def test_crashed_peer_is_noticed_and_logged_within_fifteen_seconds() -> None:
    net = build(5, seed=3, fan_in=4)
    converge(net)
    crash_at = net.now
    net.crash("p4")
    net.run_until(lambda: all("p4" not in names_known(p) for p in net.alive()), 15)
    for peer in net.alive():
        left = [e for e in peer.events if isinstance(e, PeerLeft) and e.nickname == "p4"]
        assert left, f"{peer.nickname} did not report p4 leaving"
    assert net.now - crash_at <= 15


def test_restart_with_new_uid_supersedes_old_entry() -> None:
    net = build(5, seed=9, fan_in=4)
    converge(net)
    old_uid = net.peers["p2"].mesh.identity.uid
    net.crash("p2")
    net.run_for(1.0)  # back before the others notice the crash
    restarted = net.restart("p2", [net.address_of(0)])
    assert restarted.mesh.identity.uid != old_uid
    converge(net, timeout=60)
    for peer in net.alive():
        assert peer.mesh.topology.entries[restarted.mesh.identity.name].uid == restarted.mesh.identity.uid


def test_graceful_leave_is_seen_at_once() -> None:
    net = build(4, seed=4, fan_in=3)
    converge(net)
    net.leave("p3")
    took = net.run_until(lambda: all("p3" not in names_known(p) for p in net.alive()), 5)
    assert took < 1.5, "a goodbye should not wait for the heartbeat timeout"
    reasons = {e.reason for p in net.alive() for e in p.events if isinstance(e, PeerLeft) and e.nickname == "p3"}
    assert reasons == {"said goodbye"}


def test_relay_through_a_third_peer_when_the_direct_link_is_blocked() -> None:
    net = SimNet(seed=2)
    net.block("a", "c")
    a = net.add_peer("a", [net.address_of(1), net.address_of(2)], index=0)
    b = net.add_peer("b", [net.address_of(0), net.address_of(2)], index=1)
    c = net.add_peer("c", [net.address_of(0), net.address_of(1)], index=2)
    converge(net)
    c_name, b_name = c.mesh.identity.name, b.mesh.identity.name
    assert a.mesh.topology.next_hops()[c_name] == b_name
    assert a.mesh.send_relay(c_name, "test", b"hello via b")
    net.run_for(0.5)
    delivered = [e for e in c.events if isinstance(e, RelayDelivered)]
    assert [(e.src, e.payload) for e in delivered] == [(a.mesh.identity.name, b"hello via b")]
    to_c = [s.state for s in a.mesh.status(net.now).connections if s.address == str(net.address_of(2))]
    assert to_c and to_c[0] in ("connecting", "failed"), "the blocked direct link keeps being retried"


def test_broadcast_reaches_everyone_once() -> None:
    net = build(12, seed=6, fan_in=2, config=MeshConfig(conn_limit=3))
    converge(net)
    origin = net.peers["p0"]
    origin.mesh.send_relay(None, "bcast", b"to all")
    net._flush(origin)
    net.run_for(1.0)
    for peer in net.alive():
        got = [e for e in peer.events if isinstance(e, RelayDelivered) and e.channel == "bcast"]
        assert len(got) == (0 if peer is origin else 1), peer.nickname


def test_duplicate_name_is_refused() -> None:
    net = SimNet(seed=8)
    a = net.add_peer("a", [net.address_of(1)], index=0)
    clone = net.add_clone("clone", "a", [net.address_of(0)], index=1)
    net.run_for(5.0)
    assert any(isinstance(e, NameCollision) for e in a.events + clone.events)
    assert a.mesh.status(net.now).established == 0


def test_peer_list_including_ourselves_is_harmless() -> None:
    net = SimNet(seed=10)
    a = net.add_peer("a", [net.address_of(0), net.address_of(1)], index=0)
    net.add_peer("b", [net.address_of(0)], index=1)
    converge(net)
    status = a.mesh.status(net.now)
    assert str(net.address_of(0)) not in status.targets
    assert status.established == 1


def test_connection_events_tell_the_story() -> None:
    net = build(2, seed=12, fan_in=1)
    converge(net)
    changes = [(e.old, e.new) for e in net.peers["p0"].events if isinstance(e, ConnectionStateChanged)]
    assert ("connecting", "established") in changes or ("pending", "established") in changes


def test_malformed_datagrams_are_counted_not_fatal() -> None:
    net = build(2, seed=13, fan_in=1)
    converge(net)
    p0 = net.peers["p0"]
    for junk in (b"", b"\x00" * 10, b"\x96\xa2wv\x01\x63\xc4\x06AAAAAA\x01\x90"):
        p0.mesh.receive_datagram(junk, net.address_of(1), net.now)
    counters = p0.mesh.status(net.now).counters
    assert sum(v for k, v in counters.items() if k.startswith("dropped_")) >= 3
    net.run_for(2.0)
    assert net.converged()


def test_late_joiner_is_taken_even_when_its_contacts_are_full() -> None:
    net = build(20, seed=14, fan_in=19, config=MeshConfig(conn_limit=3))
    converge(net)
    contacts = [0, 1]
    assert all(net.peers[f"p{i}"].mesh.status(net.now).established >= 3 for i in contacts)
    late = net.add_peer("late", [net.address_of(i) for i in contacts], index=20)
    converge(net, timeout=60)
    assert late.mesh.status(net.now).established >= 1
    assert max(p.mesh.status(net.now).established for p in net.alive()) <= 3 + 1


def test_full_peers_refuse_connected_peers_beyond_the_limit() -> None:
    net = build(20, seed=15, fan_in=19, config=MeshConfig(conn_limit=3))
    converge(net)
    assert all(len(p.mesh._conns) <= 3 + 1 for p in net.alive())


# --- forged and hostile input (UDP sources are easy to forge) ------------------------------------------

def _forge(net: SimNet, body: object, sender_name: str | None = None, uid: int = 12345) -> bytes:
    from weaved.core.types import PeerName, PeerUID, derive_peer_name
    from weaved.core.wire import PROTOCOL_MAX, Message, encode

    name = PeerName(sender_name) if sender_name else derive_peer_name("forger")
    return encode(Message(PROTOCOL_MAX, name, PeerUID(uid), body))  # type: ignore[arg-type]


def test_forged_reject_or_hello_from_a_neighbours_address_does_not_cut_the_link() -> None:
    from weaved.core.wire import Hello, Reject

    net = build(3, seed=16, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    for body in (Reject("collision", "forged"), Reject("limit", "forged"),
                 Hello(1, 1, "impostor", 7, ("sleeve",), 0)):
        p0.mesh.receive_datagram(_forge(net, body), p1.address, net.now)
    net._flush(p0)
    assert any(c.state == "established" and c.peer_nickname == "p1" for c in p0.mesh.status(net.now).connections)
    net.run_for(3.0)
    assert departures(net) == 0


def test_an_implausible_version_is_dropped_and_a_forged_own_entry_is_overtaken() -> None:
    from weaved.core.entries import PeerEntry
    from weaved.core.wire import GossipUpdate

    net = build(3, seed=17, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    own = p0.mesh.topology.own
    huge = PeerEntry(own.name, own.nickname, own.uid, 2**63, own.short_id, ())
    forged = PeerEntry(own.name, own.nickname, own.uid, own.version + 5, own.short_id, ())
    sender = p1.mesh.identity
    for entry in (huge, forged):
        p0.mesh.receive_datagram(_forge(net, GossipUpdate((entry,)), sender.name, sender.uid), p1.address, net.now)
    net._flush(p0)
    assert p0.mesh.topology.own.version > forged.version, "our entry must overtake the forged copy"
    assert p0.mesh.topology.own.connections, "and keep our real connections"
    converge(net)


def test_duplicate_names_in_a_request_do_not_amplify() -> None:
    from weaved.core.wire import GossipRequest

    net = build(3, seed=18, fan_in=2)
    converge(net)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    sender = p1.mesh.identity
    request = GossipRequest(tuple([p0.mesh.identity.name] * 5000))
    p0.mesh.receive_datagram(_forge(net, request, sender.name, sender.uid), p1.address, net.now)
    assert len(p0.mesh.datagrams_to_send()) == 1


def test_a_live_clone_elsewhere_ends_in_a_reported_collision_not_a_version_war() -> None:
    net = SimNet(seed=19)
    a = net.add_peer("a", [net.address_of(1)], index=0)
    net.add_peer("hub", [net.address_of(0), net.address_of(2)], index=1)
    clone = net.add_clone("clone", "a", [net.address_of(1)], index=2)
    net.run_for(60.0)
    # Whichever of the two the hub heard second is refused, and that one reports the collision.
    assert any(isinstance(e, NameCollision) for e in a.events + clone.events)
    versions = (a.mesh.topology.own.version, clone.mesh.topology.own.version)
    net.run_for(30.0)
    assert a.mesh.topology.own.version - versions[0] < 10, "no version war over the name"
    assert clone.mesh.topology.own.version - versions[1] < 10, "no version war over the name"


def test_the_dialler_gives_up_on_a_name_collision() -> None:
    net = SimNet(seed=20)
    net.add_peer("a", [], index=0)
    clone = net.add_clone("clone", "a", [net.address_of(0)], index=1)
    net.run_for(60.0)
    attempts = [e for e in clone.events if isinstance(e, ConnectionStateChanged) and e.new == "connecting"]
    assert len(attempts) == 1
    assert "not retrying" in clone.mesh.status(net.now).connections[0].info
