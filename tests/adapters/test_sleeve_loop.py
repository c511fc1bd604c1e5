"""The packet loop on loopback: a datagram socketpair stands in for the TUN (one packet per read, like
``IFF_TUN|IFF_NO_PI``), real UDP sockets on 127.0.0.1 for the peers. No root, no device, no route.

The real TUN, bridge and kernel routing are exercised by ``tests/netns/test_datapath.py``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from scapy.all import ICMP, IP, Raw

from tests.adapters.conftest import until
from weaved.adapters.sleeve import ThreadedLoop, open_sleeve_socket
from weaved.core import sleeve
from weaved.core.forwarding import build
from weaved.core.ipam.ring import AddressRange
from weaved.core.types import Endpoint, PeerName, peer_name_from_bytes

OWN, NEAR, FAR = (peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in (1, 2, 3))
SHORT = {OWN: 11, NEAR: 22, FAR: 33}
RANGE = AddressRange.from_cidr("10.32.0.0/12")
OWN_POD, NEAR_POD, FAR_POD = "10.32.0.5", "10.40.0.5", "10.44.0.5"


def packet(src: str, dst: str, size: int = 100) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP() / Raw(b"p" * (size - 28)))


class Rig:
    """The loop under test, its fake TUN's other end, and a UDP socket for the near neighbour."""

    def __init__(self) -> None:
        self.tun_peer, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        self._tun = tun
        self.sock = open_sleeve_socket("127.0.0.1", 0)
        self.near = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.near.bind(("127.0.0.1", 0))
        self.near.settimeout(2)
        self.tun_peer.settimeout(2)
        self.loop = ThreadedLoop(tun.fileno(), self.sock)
        near_at = Endpoint(*self.near.getsockname())
        segments: list[tuple[int, int, PeerName]] = [
            (RANGE.start, RANGE.start + (1 << 19), OWN),           # 10.32.0.0/13
            (RANGE.start + (1 << 19), RANGE.start + (3 << 18), NEAR),  # 10.40.0.0/14
            (RANGE.start + (3 << 18), RANGE.end, FAR),             # 10.44.0.0/14, reached through NEAR
        ]
        self.loop.table = build(OWN, SHORT, segments, {NEAR: NEAR, FAR: NEAR}, {NEAR: near_at})
        self.loop.start()
        self.address = self.sock.getsockname()

    def close(self) -> None:
        self.loop.stop()
        self.sock.close()
        self._tun.close()  # the loop's close() would close this descriptor too; the socket object owns it
        self.tun_peer.close()
        self.near.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_outbound_packets_are_framed_to_the_next_hop(rig: Rig) -> None:
    for dst, short in ((NEAR_POD, 22), (FAR_POD, 33)):
        inner = packet(OWN_POD, dst)
        rig.tun_peer.send(inner)
        frame, source = rig.near.recvfrom(65536)
        assert source == rig.address
        assert sleeve.decode_header(frame, len(frame)) == (sleeve.DEFAULT_TTL, 11, short)
        assert frame[sleeve.HEADER_SIZE:] == inner
    until(lambda: rig.loop.counters().get("tx_packets") == 2, "two packets counted")


def test_outbound_drops_are_counted_by_reason(rig: Rig) -> None:
    rig.tun_peer.send(packet(OWN_POD, "10.32.0.9"))     # ours: the kernel should have used the bridge
    rig.tun_peer.send(packet(OWN_POD, "192.168.1.1"))   # nobody's
    rig.tun_peer.send(b"\x60" + bytes(39))              # IPv6
    until(lambda: rig.loop.counters().get("drop_tun_own-range") == 1
          and rig.loop.counters().get("drop_tun_unowned") == 1
          and rig.loop.counters().get("drop_tun_not-ipv4") == 1, "three drops by reason")


def test_inbound_frames_for_us_reach_the_tun_and_others_are_relayed(rig: Rig) -> None:
    inner = packet(NEAR_POD, OWN_POD)
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.tun_peer.recv(65536) == inner
    # FAR's packet for NEAR, arriving here (a view that disagrees for a moment): relayed to NEAR, ttl - 1.
    relayed = packet(FAR_POD, NEAR_POD)
    rig.near.sendto(sleeve.encode(relayed, 33, 22, ttl=5), rig.address)
    frame = rig.near.recv(65536)
    assert sleeve.decode_header(frame, len(frame)) == (4, 33, 22)
    assert frame[sleeve.HEADER_SIZE:] == relayed
    until(lambda: rig.loop.counters().get("rx_packets") == 1 and rig.loop.counters().get("relayed_packets") == 1,
          "one delivered, one relayed")


def test_inbound_garbage_is_dropped_and_counted_and_the_loop_goes_on(rig: Rig) -> None:
    good = packet(NEAR_POD, OWN_POD)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        stranger.sendto(sleeve.encode(good, 22, 11), rig.address)
    finally:
        stranger.close()
    cases = {
        "bad-magic": b"XX" + sleeve.encode(good, 22, 11)[2:],
        "short": b"WS",
        "bad-length": sleeve.encode(good, 22, 11) + b"!",
        "unknown-source": sleeve.encode(good, 44, 11),
        "unknown-destination": sleeve.encode(good, 22, 44),
        "ttl-expired": sleeve.encode(packet(NEAR_POD, FAR_POD), 22, 33, ttl=1),
    }
    for frame in cases.values():
        rig.near.sendto(frame, rig.address)
    rig.near.sendto(sleeve.encode(good, 22, 11), rig.address)
    assert rig.tun_peer.recv(65536) == good  # everything before it was dropped, in order
    deadline = time.monotonic() + 2
    while rig.loop.counters().get("rx_packets", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the loop counts a packet just after writing it to the TUN
    counters = rig.loop.counters()
    assert counters["drop_udp_unknown-sender"] == 1
    for reason in cases:
        assert counters[f"drop_udp_{reason}"] == 1, reason
    assert counters["rx_packets"] == 1


def test_a_new_table_takes_effect_at_the_next_packet(rig: Rig) -> None:
    rig.loop.table = build(OWN, SHORT, [(RANGE.start, RANGE.end, OWN)], {}, {})
    rig.tun_peer.send(packet(OWN_POD, NEAR_POD))
    until(lambda: rig.loop.counters().get("drop_tun_own-range") == 1, "dropped under the new table")
    rig.near.sendto(sleeve.encode(packet(NEAR_POD, OWN_POD), 22, 11), rig.address)
    until(lambda: rig.loop.counters().get("drop_udp_unknown-sender") == 1, "the old neighbour no longer accepted")


def test_stop_returns_promptly(rig: Rig) -> None:
    started = time.monotonic()
    rig.loop.stop()
    assert time.monotonic() - started < 1.5
    assert not any(t.is_alive() for t in rig.loop._threads)


def test_a_frame_with_a_spoofed_inner_address_is_dropped(rig: Rig) -> None:
    """Regression: only the UDP source was checked; a frame from the neighbour's address could carry a packet
    from any source (6.6.6.6) to any pod."""
    cases = {
        "spoofed-source": sleeve.encode(packet("6.6.6.6", OWN_POD), 22, 11),
        "spoofed-destination": sleeve.encode(packet(NEAR_POD, "10.44.0.9"), 22, 11),  # FAR's pod, not ours
    }
    for frame in cases.values():
        rig.near.sendto(frame, rig.address)
    good = packet(NEAR_POD, OWN_POD)
    rig.near.sendto(sleeve.encode(good, 22, 11), rig.address)
    assert rig.tun_peer.recv(65536) == good
    until(lambda: all(rig.loop.counters().get(f"drop_udp_{r}") == 1 for r in cases), "both counted")


def test_with_keys_frames_are_sealed_both_ways_and_relayed_sealed(rig: Rig) -> None:
    """The plain loop (no offloads) seals too: to a keyed neighbour only sealed frames go, from it only sealed
    frames are taken (``unsealed``), replays are dropped, and a relayed frame is sealed again."""
    from weaved.core.seal import PeerSleeveKeys, SleeveKeys
    from weaved.core.sleeveseal import SEALED_V1, Sealer

    ours = SleeveKeys(recv_id=1, send_id=2, send_key=b"k" * 32, recv_key=b"q" * 32)
    theirs = SleeveKeys(recv_id=2, send_id=1, send_key=b"q" * 32, recv_key=b"k" * 32)
    near_at = Endpoint(*rig.near.getsockname())
    segments: list[tuple[int, int, PeerName]] = [
        (RANGE.start, RANGE.start + (1 << 19), OWN), (RANGE.start + (1 << 19), RANGE.start + (3 << 18), NEAR),
        (RANGE.start + (3 << 18), RANGE.end, FAR)]
    rig.loop.table = build(OWN, SHORT, segments, {NEAR: NEAR, FAR: NEAR}, {NEAR: near_at}, None,
                           {NEAR: PeerSleeveKeys(ours)})
    near = Sealer()
    near.update({rig.address: PeerSleeveKeys(theirs)})
    out = packet(OWN_POD, NEAR_POD)
    rig.tun_peer.send(out)
    sealed = rig.near.recv(65536)
    assert sealed[2] == SEALED_V1 and near.open(sealed, rig.address) == sleeve.encode(out, 11, 22)
    good = packet(NEAR_POD, OWN_POD)
    frame = near.seal(rig.address, sleeve.encode(good, 22, 11))
    rig.near.sendto(frame, rig.address)
    assert rig.tun_peer.recv(65536) == good
    rig.near.sendto(frame, rig.address)  # replayed
    rig.near.sendto(sleeve.encode(good, 22, 11), rig.address)  # unsealed
    relayed = packet(NEAR_POD, FAR_POD)
    rig.near.sendto(near.seal(rig.address, sleeve.encode(relayed, 22, 33)), rig.address)
    assert near.open(rig.near.recv(65536), rig.address) == sleeve.encode(relayed, 22, 33, ttl=sleeve.DEFAULT_TTL - 1)
    until(lambda: (rig.loop.counters().get("drop_udp_replay"), rig.loop.counters().get("drop_udp_unsealed")) ==
          (1, 1), "replay and unsealed counted")
