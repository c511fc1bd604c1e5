"""The offload loop on loopback: a datagram socketpair stands in for the virtio-header TUN (one virtio header
+ packet per read and write, as ``IFF_TUN|IFF_NO_PI|IFF_VNET_HDR`` gives), real UDP sockets on 127.0.0.1 for
the peers. Chunks are sent one by one, shuffled, with gaps, as one GSO batch, and malformed; what comes out
of the "TUN" is judged by scapy's checksums after the segmentation the receiving kernel would do.

Every test runs twice: with the C pump carrying the common cases (``c-pump``, when it was built) and with
the Python loop alone (``python``); both must give the same bytes on the wire and in the TUN.

The real TUN, offloads and kernel routing are exercised by ``tests/netns/test_sleeve_fast.py``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, Raw

from tests.adapters.conftest import until
from weaved.adapters import sleeve_native
from weaved.adapters.sleeve_offload import SOL_UDP, UDP_SEGMENT, OffloadLoop
from weaved.adapters.udp import open_control_socket
from weaved.core import sleeve, superframe
from weaved.core.forwarding import build
from weaved.core.ipam.ring import AddressRange
from weaved.core.superframe import CHUNK_HEADER, F_NEEDS_CSUM, GSO_TCPV4, PREFIX, VNET, VNET_SIZE, ZERO_VNET
from weaved.core.types import Endpoint, PeerName, peer_name_from_bytes

OWN, NEAR, PLAIN = (peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in (1, 2, 3))
SHORT = {OWN: 11, NEAR: 22, PLAIN: 33}
RANGE = AddressRange.from_cidr("10.32.0.0/12")
OWN_POD, NEAR_POD, PLAIN_POD = "10.32.0.5", "10.40.0.5", "10.44.0.5"
MSS = 1000
CHUNK = PREFIX + 52 + MSS


def super_packet(src: str, dst: str, payload: bytes, seq: int = 7000) -> bytes:
    """virtio header + TSO super-packet as a TUN with offloads hands it over (partial TCP checksum)."""
    tcp = TCP(sport=5201, dport=40000, seq=seq, ack=1, flags="PA",
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    raw = bytearray(bytes(IP(src=src, dst=dst, id=300) / tcp / Raw(payload)))
    pseudo = raw[12:20] + struct.pack("!BBH", 0, 6, len(raw) - 20)
    raw[36:38] = superframe.ones_sum(pseudo).to_bytes(2, "big")
    return VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16) + bytes(raw)


def chunks_of(vnet_packet: bytes, frame: int = 1, src: int = 22, dst: int = 11) -> list[bytes]:
    """The version-2 chunks a sender makes of ``vnet_packet`` (what the loop's own outbound path sends)."""
    head, payload = vnet_packet[:VNET_SIZE + 52], vnet_packet[VNET_SIZE + 52:]
    count = -(-len(payload) // MSS)
    out = []
    for i in range(count):
        word = superframe.word(frame, i, count)
        out.append(CHUNK_HEADER.pack(sleeve.MAGIC, 2, 16, src, dst, word) + head + payload[i * MSS:(i + 1) * MSS])
    return out


def payload_of(packets: list[bytes]) -> bytes:
    """TCP payload of delivered packets (virtio header first), after the kernel's own segmentation, with
    every segment's checksums checked."""
    data = b""
    for item in sorted(packets, key=lambda p: IP(p[VNET_SIZE:])[TCP].seq):
        for seg in superframe.segments(item[:VNET_SIZE], item[VNET_SIZE:]):
            parsed = IP(bytes(seg))
            fresh = IP(bytes(seg))
            del fresh.chksum, fresh[TCP].chksum
            fresh = IP(bytes(fresh))
            assert (parsed.chksum, parsed[TCP].chksum) == (fresh.chksum, fresh[TCP].chksum)
            data += bytes(parsed[TCP].payload)
    return data


class Rig:
    def __init__(self, native: bool) -> None:
        self.tun_peer, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        self._tun = tun
        self.sock = open_control_socket("127.0.0.1", 0)
        self.near = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.near.bind(("127.0.0.1", 0))
        self.plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.plain.bind(("127.0.0.1", 0))
        for s in (self.near, self.plain, self.tun_peer):
            s.settimeout(2)
        self.loop = OffloadLoop(tun.fileno(), self.sock, own_chunk=1472, native=native)
        assert self.loop.native == native
        segments: list[tuple[int, int, PeerName]] = [
            (RANGE.start, RANGE.start + (1 << 19), OWN),
            (RANGE.start + (1 << 19), RANGE.start + (3 << 18), NEAR),
            (RANGE.start + (3 << 18), RANGE.end, PLAIN),
        ]
        near_at, plain_at = Endpoint(*self.near.getsockname()), Endpoint(*self.plain.getsockname())
        self.loop.table = build(OWN, SHORT, segments, {NEAR: NEAR, PLAIN: PLAIN},
                                {NEAR: near_at, PLAIN: plain_at}, {NEAR: 1472})
        self.loop.start()
        self.address = self.sock.getsockname()

    def delivered(self, count: int) -> list[bytes]:
        return [self.tun_peer.recv(70000) for _ in range(count)]

    def close(self) -> None:
        self.loop.stop()
        for s in (self.sock, self._tun, self.tun_peer, self.near, self.plain):
            s.close()


@pytest.fixture(params=[True, False], ids=["c-pump", "python"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    if request.param and not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built (setup.py: a C compiler and the Python headers are needed)")
    r = Rig(request.param)
    yield r
    r.close()


def native_count(rig: Rig, name: str) -> int:
    """How many packets the C pump handled itself (0 on the Python loop, where nothing is native)."""
    return rig.loop.counters().get(name, 0)


PAYLOAD = bytes((i * 13) % 256 for i in range(3500))


def test_a_super_packet_leaves_as_chunks_one_inner_segment_each(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, NEAR_POD, PAYLOAD))
    got = [rig.near.recv(70000) for _ in range(4)]
    assert [len(c) for c in got] == [CHUNK] * 3 + [PREFIX + 52 + 500]
    for index, chunk in enumerate(got):
        ttl, src, dst, _frame, i, count = superframe.decode_chunk(chunk, 0, len(chunk))
        assert (ttl, src, dst, i, count) == (sleeve.DEFAULT_TTL, 11, 22, index, 4)
        assert chunk[PREFIX + 52:] == PAYLOAD[index * MSS:(index + 1) * MSS]
    until(lambda: rig.loop.counters().get("tx_chunks") == 4, "counted")
    assert native_count(rig, "native_tx_packets") == (1 if rig.loop.native else 0)


def test_a_super_packet_of_one_segment_leaves_whole(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, NEAR_POD, PAYLOAD[:MSS]))
    chunk = rig.near.recv(70000)
    assert superframe.decode_chunk(chunk, 0, len(chunk))[4:] == (0, 1)
    assert chunk[PREFIX:] == super_packet(OWN_POD, NEAR_POD, PAYLOAD[:MSS])[VNET_SIZE:]


def test_a_peer_without_offloads_gets_finished_segments(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, PLAIN_POD, PAYLOAD))
    frames = [rig.plain.recv(70000) for _ in range(4)]
    for frame in frames:
        assert sleeve.decode_header(frame, len(frame)) == (sleeve.DEFAULT_TTL, 11, 33)
    assert payload_of([ZERO_VNET + f[sleeve.HEADER_SIZE:] for f in frames]) == PAYLOAD
    # A plain UDP packet whose checksum the kernel left to us is finished too.
    udp = bytearray(bytes(IP(src=OWN_POD, dst=PLAIN_POD) / UDP(sport=1, dport=2) / Raw(b"datagram")))
    udp[26:28] = superframe.ones_sum(udp[12:20] + struct.pack("!BBH", 0, 17, len(udp) - 20)).to_bytes(2, "big")
    rig.tun_peer.send(VNET.pack(F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(udp))
    frame = rig.plain.recv(70000)
    parsed = IP(frame[sleeve.HEADER_SIZE:])
    check = parsed[UDP].chksum
    del parsed[UDP].chksum
    assert IP(bytes(parsed))[UDP].chksum == check


def test_chunks_that_arrive_one_by_one_are_delivered_as_segments(rig: Rig) -> None:
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    for chunk in chunks_of(original):
        rig.near.sendto(chunk, rig.address)
    out = rig.delivered(4)  # no GRO for separate sends: each chunk is a run of one, a finished-header segment
    assert all(VNET.unpack_from(p, 0)[1] == 0 for p in out)
    assert payload_of(out) == PAYLOAD


def test_a_gso_batch_takes_the_fast_path(rig: Rig) -> None:
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    batch = b"".join(chunks_of(original, frame=9))
    rig.near.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, CHUNK.to_bytes(2, "little"))], 0, rig.address)
    (out,) = rig.delivered(1)
    assert out == original
    until(lambda: rig.loop.counters().get("rx_superpackets") == 1, "delivered as one super-packet")
    assert rig.loop.counters().get("rx_partial_runs", 0) == 0
    assert native_count(rig, "native_rx_packets") == (1 if rig.loop.native else 0)


def test_reordered_and_lost_chunks_cost_only_their_own_segments(rig: Rig) -> None:
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    segment = [(SOL_UDP, UDP_SEGMENT, CHUNK.to_bytes(2, "little"))]
    c = chunks_of(original, frame=3)
    rig.near.sendmsg([c[2] + c[0] + c[1]], segment, 0, rig.address)  # one batch, reordered, chunk 3 lost
    out = rig.delivered(2)  # runs [2] and [0, 1]
    assert sorted(VNET.unpack_from(p, 0)[1] for p in out) == [0, GSO_TCPV4]
    assert payload_of(out) == PAYLOAD[:3 * MSS]
    c = chunks_of(original, frame=4)
    rig.near.sendmsg([c[0] + c[2] + c[3]], segment, 0, rig.address)  # chunk 1 lost
    out = rig.delivered(2)  # runs [0] and [2, 3]
    assert payload_of(out) == PAYLOAD[:MSS] + PAYLOAD[2 * MSS:]
    until(lambda: rig.loop.counters().get("rx_partial_runs", 0) == 4, "four partial runs")


def test_plain_frames_are_taken_and_malformed_chunks_dropped_by_reason(rig: Rig) -> None:
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"v1"))
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    good = chunks_of(super_packet(NEAR_POD, OWN_POD, PAYLOAD), frame=5)[0]
    cases = {
        "bad-chunk": good[:14] + bytes([4, 4]) + good[16:],           # index 4 of 4
        "bad-vnet": good[:17] + bytes([4]) + good[18:],               # gso_type TCPv6: never offered
        "bad-version": good[:2] + b"\x09" + good[3:],
        "unknown-source": good[:4] + b"\x00\x2c" + good[6:],
        "short": good[:30],
    }
    for frame in cases.values():
        rig.near.sendto(frame, rig.address)
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]  # everything between was dropped
    until(lambda: all(rig.loop.counters().get(f"drop_udp_{r}", 0) == 1 for r in cases), "each drop counted")


def test_the_packed_table_is_what_the_pump_reads() -> None:
    """The layout both sides agree on: the pump takes the packed table and refuses anything else."""
    if not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built (setup.py: a C compiler and the Python headers are needed)")
    from weaved.adapters import _sleevepump

    assert _sleevepump.TABLE_MAGIC == sleeve_native.TABLE_MAGIC
    segments: list[tuple[int, int, PeerName]] = [
        (RANGE.start, RANGE.start + 100, OWN), (RANGE.start + 100, RANGE.start + 200, NEAR),
        (RANGE.start + 200, RANGE.end, PLAIN)]
    near_at, plain_at = Endpoint("127.0.0.1", 7001), Endpoint("127.0.0.1", 7002)
    table = build(OWN, SHORT, segments, {NEAR: NEAR, PLAIN: PLAIN}, {NEAR: near_at, PLAIN: plain_at}, {NEAR: 9000})
    blob = sleeve_native.pack_table(table, own_chunk=1472)
    head = sleeve_native.HEAD.unpack_from(blob)
    assert head[:6] == (sleeve_native.TABLE_MAGIC, 11, 3, 2, 3, 0)  # ... 3 owners, no keys
    assert all(head[6][sid >> 3] >> (sid & 7) & 1 for sid in (11, 22, 33))
    rows = [sleeve_native.SEGMENT.unpack_from(blob, sleeve_native.HEAD.size + i * sleeve_native.SEGMENT.size)
            for i in range(3)]
    assert rows[0][-1] == 0  # our own range: a drop reason, decided in Python
    assert rows[1] == (RANGE.start + 100, RANGE.start + 200, socket.inet_aton("127.0.0.1"), 7001, 22, 1472, 1)
    assert rows[2][5:] == (0, 1)  # a version-1 peer: routable, but no chunks (the Python path segments)
    owners_at = sleeve_native.HEAD.size + 3 * sleeve_native.SEGMENT.size + 2 * sleeve_native.SENDER.size
    assert [sleeve_native.OWNER.unpack_from(blob, owners_at + i * sleeve_native.OWNER.size) for i in range(3)] == [
        (RANGE.start, RANGE.start + 100, 11, 0), (RANGE.start + 100, RANGE.start + 200, 22, 0),
        (RANGE.start + 200, RANGE.end, 33, 0)]
    assert len(blob) == owners_at + 3 * sleeve_native.OWNER.size
    pump = _sleevepump.Pump(bytearray(superframe.VNET_SIZE + 65_535), bytearray(1 << 17))
    pump.set_table(blob)
    for bad in (blob[:-1], blob + b"\0", b"\0" * len(blob), b""):
        with pytest.raises(ValueError, match="not a packed forwarding table"):
            pump.set_table(bad)
    with pytest.raises(ValueError, match="buffers too small"):
        _sleevepump.Pump(bytearray(100), bytearray(1 << 17))


def test_an_empty_datagram_is_dropped_as_short_and_the_loop_goes_on(rig: Rig) -> None:
    """No GRO segment size comes with an empty datagram: nothing may divide by it."""
    rig.near.sendto(b"", rig.address)
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"after"))
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    until(lambda: rig.loop.counters().get("drop_udp_short", 0) == 1, "the empty datagram counted")
    assert rig.loop.counters().get("internal_errors", 0) == 0


def test_spoofed_inner_addresses_are_dropped_on_every_path(rig: Rig) -> None:
    """Regression: a frame from a neighbour's sleeve address put a packet from any source into any pod. Each
    path is tried: a whole GSO batch (the C pump's fast path), a lone chunk (a run), a version-1 frame."""
    segment = [(SOL_UDP, UDP_SEGMENT, CHUNK.to_bytes(2, "little"))]
    rig.near.sendmsg([b"".join(chunks_of(super_packet("6.6.6.6", OWN_POD, PAYLOAD), frame=20))], segment, 0,
                     rig.address)
    rig.near.sendto(chunks_of(super_packet("6.6.6.6", OWN_POD, PAYLOAD), frame=21)[1], rig.address)
    rig.near.sendto(sleeve.encode(bytes(IP(src="6.6.6.6", dst=OWN_POD) / UDP(sport=3, dport=4)), 22, 11),
                    rig.address)
    rig.near.sendmsg([b"".join(chunks_of(super_packet(NEAR_POD, PLAIN_POD, PAYLOAD), frame=22))], segment, 0,
                     rig.address)  # for a pod of PLAIN's, framed for us
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"after"))
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    # A whole frame is judged (and counted) once by its first chunk's headers: the others' are never used.
    until(lambda: rig.loop.counters().get("drop_udp_spoofed-source", 0) == 3, "every spoofed frame counted")
    until(lambda: rig.loop.counters().get("drop_udp_spoofed-destination", 0) == 1, "the wrong pod's frame counted")
    until(lambda: rig.loop.counters().get("rx_packets") == 1, "only the good packet delivered")


def test_a_verified_checksum_flag_or_a_tiny_segment_size_is_dropped(rig: Rig) -> None:
    """Regression: DATA_VALID (pods then skip checksum checks) and a gso_size of 1 passed the virtio check."""
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    flags, gso, hdr, _mss, start, offset = VNET.unpack_from(original, 0)
    segment = [(SOL_UDP, UDP_SEGMENT, CHUNK.to_bytes(2, "little"))]
    valid = VNET.pack(flags | 2, gso, hdr, MSS, start, offset) + original[VNET_SIZE:]
    rig.near.sendmsg([b"".join(chunks_of(valid, frame=30))], segment, 0, rig.address)
    tiny = VNET.pack(flags, gso, hdr, 1, start, offset) + original[VNET_SIZE:]
    rig.near.sendto(chunks_of(tiny, frame=31)[0], rig.address)
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"after"))
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    until(lambda: rig.loop.counters().get("drop_udp_bad-vnet", 0) == 2, "the frame and the tiny chunk counted")


def test_a_super_packet_with_a_small_mss_leaves_as_finished_segments(rig: Rig) -> None:
    """A TCP peer that really uses an MSS below the receivers' floor: the sender segments (version 1)."""
    vnet_packet = super_packet(OWN_POD, NEAR_POD, PAYLOAD[:1200])
    flags, gso, hdr, _mss, start, offset = VNET.unpack_from(vnet_packet, 0)
    rig.tun_peer.send(VNET.pack(flags, gso, hdr, 400, start, offset) + vnet_packet[VNET_SIZE:])
    frames = [rig.near.recv(70000) for _ in range(3)]
    assert all(f[2] == sleeve.VERSION for f in frames)
    assert payload_of([ZERO_VNET + f[sleeve.HEADER_SIZE:] for f in frames]) == PAYLOAD[:1200]


def _datagrams() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and bytes that start like a chunk or a version-1 frame so the checks go deep."""
    good = chunks_of(super_packet(NEAR_POD, OWN_POD, PAYLOAD), frame=40)[0]
    heads = st.sampled_from([b"", good[:8], good[:16], good[:PREFIX], good[:PREFIX + 40],
                             sleeve.HEADER.pack(sleeve.MAGIC, 1, 16, 22, 11)])
    return st.builds(lambda head, tail: (head + tail)[:3000], heads, st.binary(max_size=1600))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_datagrams(), min_size=1, max_size=4), st.integers(0, 3100))
def test_no_datagram_raises_out_of_the_python_receive_path(datagrams: list[bytes], segment: int) -> None:
    """Regression: ``is_whole_frame`` raised struct.error for a GRO segment below a chunk header, and
    ``_inbound`` did not catch it. Any bytes, any segment size: dropped and counted, never raised."""
    tun_peer, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        loop = OffloadLoop(tun.fileno(), sock, native=False)
        segments: list[tuple[int, int, PeerName]] = [(RANGE.start, RANGE.start + (1 << 19), OWN),
                                                     (RANGE.start + (1 << 19), RANGE.end, NEAR)]
        near_at = ("127.0.0.1", 9)
        loop.table = build(OWN, SHORT, segments, {NEAR: NEAR}, {NEAR: Endpoint(*near_at)}, {NEAR: 1472})
        data = b"".join(datagrams)
        loop._rx[:len(data)] = data
        loop._inbound(len(data), segment, near_at)  # raises on a bug: the test fails
    finally:
        for s in (tun_peer, tun, sock):
            s.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(datagrams=st.lists(_datagrams(), min_size=1, max_size=4), segment=st.integers(1, 1600))
def test_no_datagram_raises_out_of_either_loop(rig: Rig, datagrams: list[bytes], segment: int) -> None:
    """The same bytes over UDP to the running loop (the C pump first, then Python), as separate datagrams and
    as one GSO send of ``segment``-byte datagrams; a good frame after them still arrives, and the loop counts
    no internal error."""
    for datagram in datagrams:
        rig.near.sendto(datagram, rig.address)
    batch = b"".join(datagrams)
    if batch and segment < len(batch) and len(batch) <= segment * 64:
        with contextlib.suppress(OSError):  # the kernel refuses some GSO sizes: then nothing was sent
            rig.near.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, "little"))], 0, rig.address)
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"sentinel"))
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)
    while (got := rig.delivered(1)[0]) != ZERO_VNET + inner:
        assert got[VNET_SIZE:VNET_SIZE + 1] == b"\x45"  # anything else delivered was a well-formed packet
    assert rig.loop.counters().get("internal_errors", 0) == 0
