"""A mesh with a password in the simulated network: who gets in, what a forger achieves, rekeying."""

from __future__ import annotations

import pytest

from tests.sim.simnet import LinkProfile, SimNet, SimPeer
from weaved.core.events import AuthFailed
from weaved.core.secure import REJECT_AFTER, REKEY_AFTER, Kind
from weaved.core.types import Endpoint
from weaved.core.wire import Goodbye, Heartbeat, Message, encode

PASSWORD = b"correct horse battery staple"


def mesh(seed: int, n: int, profile: LinkProfile | None = None) -> SimNet:
    net = SimNet(seed, profile)
    net.password = PASSWORD
    for i in range(n):
        net.add_peer(f"p{i}", [net.address_of(0)] if i else [])
    return net


def auth_failures(peer: SimPeer) -> list[AuthFailed]:
    return [e for e in peer.events if isinstance(e, AuthFailed)]


def test_a_mesh_with_a_password_converges_and_says_so() -> None:
    net = mesh(1, 5)
    net.run_until(net.converged, timeout=30)
    status = net.peers["p0"].mesh.status(net.now)
    assert status.encryption == "enabled"
    assert all("encrypted sleeve" in c.info for c in status.connections if c.state == "established")
    assert net.peers["p0"].mesh.sleeve_keys()  # the data path gets keys for every neighbour


@pytest.mark.parametrize("seed", [2, 3])
def test_handshakes_survive_loss_duplication_and_reordering(seed: int) -> None:
    net = mesh(seed, 12, LinkProfile(loss=0.1, duplicate=0.1, delay=0.005, jitter=0.02))
    net.run_until(net.converged, timeout=90)
    assert sum(p.mesh.counters["handshake_ok"] for p in net.alive()) >= 11


@pytest.mark.parametrize("intruder_password", [b"wrong", None])
def test_a_peer_with_a_wrong_or_no_password_never_joins_and_both_sides_say_why(
        intruder_password: bytes | None) -> None:
    net = mesh(4, 3)
    net.passwords["intruder"] = intruder_password
    intruder = net.add_peer("intruder", [net.address_of(0)])
    net.run_until(lambda: net.converged([p for p in net.alive() if p is not intruder]), timeout=30)
    net.run_for(20)
    names = set(net.peers["p0"].mesh.topology.entries)
    assert intruder.mesh.identity.name not in names
    assert set(intruder.mesh.topology.entries) == {intruder.mesh.identity.name}
    assert not any(c.state == "established" for c in intruder.mesh.status(net.now).connections)
    # One clear line on each side, rate-limited (not one per attempt).
    assert 1 <= len(auth_failures(net.peers["p0"])) <= 2
    assert 1 <= len(auth_failures(intruder)) <= 2
    said = auth_failures(net.peers["p0"]) + auth_failures(intruder)
    assert all("wrong or missing password" in e.reason for e in said)


def test_a_peer_restarted_with_the_right_password_joins_again() -> None:
    net = mesh(5, 0)
    net.passwords["p2"] = b"wrong"
    for i in range(3):
        net.add_peer(f"p{i}", [net.address_of(0)] if i else [])
    net.run_until(lambda: net.converged([net.peers["p0"], net.peers["p1"]]), timeout=30)
    assert net.peers["p2"].mesh.identity.name not in net.peers["p0"].mesh.topology.entries
    net.passwords["p2"] = PASSWORD
    net.restart("p2", [net.address_of(0)])
    net.run_until(net.converged, timeout=30)


def test_sessions_rekey_under_load_without_losing_a_connection() -> None:
    net = mesh(6, 3, LinkProfile(loss=0.02, delay=0.002, jitter=0.004))
    net.run_until(net.converged, timeout=30)
    p0 = net.peers["p0"]
    first = {name: keys.current for name, keys in p0.mesh.sleeve_keys().items()}
    failed_before = sum(1 for e in p0.events if getattr(e, "new", None) == "failed")
    net.run_for(REJECT_AFTER * 2 + REKEY_AFTER)
    assert net.converged()
    assert sum(p.mesh.counters["rekeys"] for p in net.alive()) >= 3
    later = p0.mesh.sleeve_keys()
    assert set(later) == set(first) and all(later[n].current != first[n] for n in first)
    assert sum(1 for e in p0.events if getattr(e, "new", None) == "failed") == failed_before


def test_a_restarted_peer_rejoins_at_once_with_new_sessions() -> None:
    net = mesh(7, 3)
    net.run_until(net.converged, timeout=30)
    net.crash("p1")
    net.restart("p1", [net.address_of(0)])
    took = net.run_until(net.converged, timeout=30)
    assert took < 15


def test_replayed_handshakes_and_sealed_datagrams_do_nothing() -> None:
    net = mesh(8, 2)
    captured: list[bytes] = []
    p0, p1 = net.peers["p0"], net.peers["p1"]  # p1 dials p0: its first messages are INITs
    original = p1.mesh.datagrams_to_send

    def tap() -> list[tuple[bytes, Endpoint]]:
        out = original()
        captured.extend(d for d, _ in out)
        return out

    p1.mesh.datagrams_to_send = tap  # type: ignore[method-assign]
    net.run_until(net.converged, timeout=30)
    net.run_for(5)
    before = dict(p0.mesh.counters)
    uid_before = p0.mesh.topology.entries[p1.mesh.identity.name].uid
    for data in captured:
        p0.mesh.receive_datagram(data, p1.address, net.now)
    net._flush(p0)
    after = p0.mesh.counters
    inits = sum(1 for d in captured if d[0] == Kind.INIT)
    sealed = sum(1 for d in captured if d[0] == Kind.SEALED)
    assert inits >= 1 and sealed >= 5
    assert after["dropped_replay"] - before.get("dropped_replay", 0) == inits + sealed
    assert after["handshake_answered"] == before.get("handshake_answered", 0)
    net.run_for(10)
    assert net.converged() and p0.mesh.topology.entries[p1.mesh.identity.name].uid == uid_before


def test_a_forged_clear_goodbye_or_heartbeat_from_a_neighbours_address_is_refused() -> None:
    net = mesh(9, 3)
    net.run_until(net.converged, timeout=30)
    p0, p1 = net.peers["p0"], net.peers["p1"]
    for body in (Goodbye(), Heartbeat()):
        forged = encode(Message(1, p0.mesh.identity.name, p0.mesh.identity.uid, body))
        p1.mesh.receive_datagram(forged, p0.address, net.now)
        # Even the victim's own name and UID, from a neighbour's address (made p1 mark the address as self).
        own = encode(Message(1, p1.mesh.identity.name, p1.mesh.identity.uid, body))
        p1.mesh.receive_datagram(own, p0.address, net.now)
    net.run_for(10)
    assert p1.mesh.counters["dropped_unsealed"] >= 4
    assert net.converged()
    assert p0.mesh.identity.name in p1.mesh.neighbours()


def test_a_member_cannot_speak_for_another_peer_on_its_own_session() -> None:
    net = mesh(10, 3)
    net.run_until(net.converged, timeout=30)
    p0, p1, p2 = (net.peers[f"p{i}"] for i in range(3))
    transport = p2.mesh._transport
    assert transport is not None
    # p2 (a member) seals a Goodbye that claims to come from p0, on its own session with p1.
    forged = encode(Message(1, p0.mesh.identity.name, p0.mesh.identity.uid, Goodbye()))
    transport.seal(forged, p1.address, net.now)
    net._flush(p2)
    net.run_for(1)
    assert p1.mesh.counters["dropped_identity-mismatch"] == 1
    assert p0.mesh.identity.name in p1.mesh.neighbours()


def test_trusted_subnets_skip_data_sealing_only_when_both_ends_trust() -> None:
    import ipaddress

    from weaved.core.secure import SecureConfig
    net = mesh(11, 0)
    trusted = (ipaddress.ip_network("10.0.0.0/24"),)
    for i, trust in enumerate([True, True, False]):
        peer = net.add_peer(f"t{i}", [net.address_of(0)] if i else [])
        transport = peer.mesh._transport
        assert transport is not None
        if trust:
            cfg = transport._config
            transport._config = SecureConfig(cfg.psk, cfg.entropy, cfg.stamp_base, trusted)
    net.run_until(net.converged, timeout=30)
    t0, t1, t2 = (net.peers[f"t{i}"] for i in range(3))
    assert t1.mesh.identity.name not in t0.mesh.sleeve_keys()  # both trust: data in clear
    assert t2.mesh.identity.name in t0.mesh.sleeve_keys()      # t2 does not trust t0: sealed
    modes = {c.peer_name: c.info for c in t0.mesh.status(net.now).connections}
    assert modes[t1.mesh.identity.name].startswith("sleeve")
    assert modes[t2.mesh.identity.name].startswith("encrypted sleeve")


def test_garbage_in_every_kind_is_counted_never_raised() -> None:
    import random
    net = mesh(12, 2)
    net.run_until(net.converged, timeout=30)
    p1 = net.peers["p1"]
    rng = random.Random(12)
    for _ in range(2000):
        kind = rng.choice([1, 2, 4, 5, 0x96, 0])
        data = bytes([kind]) + rng.randbytes(rng.randrange(0, 200))
        p1.mesh.receive_datagram(data, net.peers["p0"].address, net.now)
    net.run_for(5)
    assert net.converged()
    dropped = sum(v for k, v in p1.mesh.counters.items() if k.startswith("dropped_"))
    assert dropped >= 1900



@pytest.mark.parametrize("who", ["dialler", "acceptor"])
def test_a_restart_in_the_middle_of_a_handshake_still_ends_in_one_session(who: str) -> None:
    """The INIT is in flight (100 ms links) when one side restarts: the answer finds a new incarnation that
    never asked (dropped, counted), or the INIT finds one that never knew it; either way they handshake
    again and converge."""
    net = mesh(13, 0, LinkProfile(delay=0.1))
    net.add_peer("p0")
    net.add_peer("p1", [net.address_of(0)])
    net.run_for(0.05)  # p1's INIT is on the wire
    assert net.peers["p1"].mesh.counters["handshake_initiated"] == 1
    victim = "p1" if who == "dialler" else "p0"
    net.crash(victim)
    net.restart(victim, [net.address_of(0)] if victim == "p1" else [])
    net.run_until(net.converged, timeout=30)
    p0 = net.peers["p0"].mesh
    assert set(p0.sleeve_keys()) == {net.peers["p1"].mesh.identity.name}


def test_a_forged_answer_to_an_init_neither_stalls_the_handshake_nor_blames_the_password() -> None:
    """The INIT's index travels in clear: a forger who sees it answers first, from the responder's address."""
    from weaved.core.secure import RESPONSE_HEADER, Kind
    net = mesh(14, 0, LinkProfile(delay=0.05))
    p0 = net.add_peer("p0")
    p1 = net.add_peer("p1", [net.address_of(0)])
    net.run_for(0.01)
    pending = next(iter(p1.mesh._transport._pending))  # type: ignore[union-attr]
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    ephemeral = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes_raw()
    forged = RESPONSE_HEADER.pack(Kind.RESPONSE, 7, pending) + ephemeral + bytes(48)
    p1.mesh.receive_datagram(forged, p0.address, net.now)
    net.run_until(net.converged, timeout=10)
    assert p1.mesh.counters["handshake_ok"] == 1 and p1.mesh.counters["handshake_retried"] == 0
    assert p1.mesh.counters["dropped_auth"] == 1
    assert not auth_failures(p1) and not auth_failures(p0)
