"""The offload loop with sleeve keys, on loopback (the rig of test_sleeve_offload): every datagram to and from
a keyed neighbour sealed, hop by hop; the C pump and the Python loop byte for byte the same.

The test plays the neighbours: NEAR (takes version-2 chunks) and PLAIN (version 1 only) each share keys with
the loop; STRANGER is an established neighbour without keys (a trusted subnet): plain frames as before.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, UDP, Raw

from tests.adapters.conftest import until
from tests.adapters.test_sleeve_offload import CHUNK, MSS, PAYLOAD, RANGE, chunks_of, payload_of, super_packet
from weaved.adapters import sleeve_native
from weaved.adapters.sleeve_offload import SOL_UDP, UDP_SEGMENT, OffloadLoop
from weaved.adapters.udp import open_control_socket
from weaved.core import sleeve, superframe
from weaved.core.forwarding import build
from weaved.core.seal import COUNTER_LIMIT, REPLAY_WINDOW, PeerSleeveKeys, ReplayWindow, SleeveKeys, nonce
from weaved.core.sleeveseal import CLEAR, OVERHEAD, SEALED_V2, Sealer
from weaved.core.superframe import VNET_SIZE, ZERO_VNET
from weaved.core.types import Endpoint, PeerName, peer_name_from_bytes

OWN, NEAR, PLAIN, STRANGER = (peer_name_from_bytes(bytes([2, 0, 0, 0, 0, i])) for i in (1, 2, 3, 4))
SHORT = {OWN: 11, NEAR: 22, PLAIN: 33, STRANGER: 44}
OWN_POD, NEAR_POD, PLAIN_POD, STRANGER_POD = "10.32.0.5", "10.40.0.5", "10.44.0.5", "10.46.0.5"
SEGMENTS: list[tuple[int, int, PeerName]] = [
    (RANGE.start, RANGE.start + (1 << 19), OWN),                    # 10.32.0.0/13
    (RANGE.start + (1 << 19), RANGE.start + (3 << 18), NEAR),       # 10.40.0.0/14
    (RANGE.start + (3 << 18), RANGE.start + (7 << 17), PLAIN),      # 10.44.0.0/15
    (RANGE.start + (7 << 17), RANGE.end, STRANGER),                 # 10.46.0.0/15
]
SEALED_CHUNK = CHUNK + OVERHEAD
PREFIX_52 = superframe.PREFIX + 52


def session(seed: int) -> tuple[SleeveKeys, SleeveKeys]:
    """One handshake's keys: the loop's view and the neighbour's."""
    k1, k2 = bytes([seed]) * 32, bytes([seed + 100]) * 32
    ours = SleeveKeys(recv_id=0x100 + seed, send_id=0x200 + seed, send_key=k1, recv_key=k2)
    theirs = SleeveKeys(recv_id=0x200 + seed, send_id=0x100 + seed, send_key=k2, recv_key=k1)
    return ours, theirs


class Rig:
    def __init__(self, native: bool) -> None:
        self.tun_peer, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        self._tun = tun
        self.sock = open_control_socket("127.0.0.1", 0)
        self.address = self.sock.getsockname()
        self.peers = {}
        for name in (NEAR, PLAIN, STRANGER):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            self.peers[name] = s
        self.tun_peer.settimeout(2)
        self.near, self.plain, self.stranger = (self.peers[n] for n in (NEAR, PLAIN, STRANGER))
        self.loop = OffloadLoop(tun.fileno(), self.sock, own_chunk=1472 + OVERHEAD, native=native)
        assert self.loop.native == native
        self.sealers = {NEAR: Sealer(), PLAIN: Sealer()}
        self.keys: dict[PeerName, PeerSleeveKeys] = {}
        for seed, name in enumerate((NEAR, PLAIN), start=1):
            ours, theirs = session(seed)
            self.keys[name] = PeerSleeveKeys(ours)
            self.sealers[name].update({self.address: PeerSleeveKeys(theirs)})
        self.set_table()
        self.loop.start()

    def set_table(self) -> None:
        at = {name: Endpoint(*s.getsockname()) for name, s in self.peers.items()}
        self.loop.table = build(OWN, SHORT, SEGMENTS, {n: n for n in at}, at,
                                {NEAR: 1472 + OVERHEAD, STRANGER: 1472 + OVERHEAD}, self.keys)

    def seal(self, name: PeerName, frame: bytes) -> bytes:
        return self.sealers[name].seal(self.address, frame)

    def opened(self, name: PeerName, count: int) -> list[bytes]:
        """The next ``count`` datagrams the loop sent ``name``, opened with its keys."""
        return [self.sealers[name].open(self.peers[name].recv(70000), self.address) for _ in range(count)]

    def delivered(self, count: int) -> list[bytes]:
        return [self.tun_peer.recv(70000) for _ in range(count)]

    def close(self) -> None:
        self.loop.stop()
        for s in (self.sock, self._tun, self.tun_peer, *self.peers.values()):
            s.close()


@pytest.fixture(params=["default", "openssl", None], ids=["c-pump", "c-pump-openssl", "python"])
def rig(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    """The C pump with its fastest AEAD, the C pump with its EVP fallback, and the Python loop."""
    if request.param is not None and not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built (setup.py: a C compiler, the Python and OpenSSL headers are needed)")
    if request.param == "openssl":
        fallback = functools.partial(sleeve_native.new_pump, aead="openssl")
        monkeypatch.setattr(sleeve_native, "new_pump", fallback)
    r = Rig(request.param is not None)
    yield r
    r.close()


def counter(rig: Rig, name: str) -> int:
    return rig.loop.counters().get(name, 0)


def test_a_super_packet_leaves_as_sealed_chunks(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, NEAR_POD, PAYLOAD))
    raw = [rig.near.recv(70000) for _ in range(4)]
    assert [len(d) for d in raw] == [SEALED_CHUNK] * 3 + [PREFIX_52 + 500 + OVERHEAD]
    assert {d[2] for d in raw} == {SEALED_V2}
    assert all(PAYLOAD[:MSS] not in d for d in raw)
    chunks = [rig.sealers[NEAR].open(d, rig.address) for d in raw]
    for index, chunk in enumerate(chunks):
        assert superframe.decode_chunk(chunk, 0, len(chunk))[4:] == (index, 4)
        assert chunk[PREFIX_52:] == PAYLOAD[index * MSS:(index + 1) * MSS]
    until(lambda: counter(rig, "tx_sealed") == 4, "four sealed")
    assert counter(rig, "native_tx_packets") == (1 if rig.loop.native else 0)


def test_a_peer_without_offloads_gets_sealed_version_1_segments(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, PLAIN_POD, PAYLOAD))
    frames = rig.opened(PLAIN, 4)
    assert all(sleeve.decode_header(f, len(f)) == (sleeve.DEFAULT_TTL, 11, 33) for f in frames)
    assert payload_of([ZERO_VNET + f[sleeve.HEADER_SIZE:] for f in frames]) == PAYLOAD


def test_a_neighbour_without_keys_still_gets_plain_frames(rig: Rig) -> None:
    rig.tun_peer.send(super_packet(OWN_POD, STRANGER_POD, PAYLOAD[:MSS]))
    chunk = rig.stranger.recv(70000)
    assert chunk[2] == superframe.VERSION and chunk[superframe.PREFIX:] == super_packet(
        OWN_POD, STRANGER_POD, PAYLOAD[:MSS])[VNET_SIZE:]


def test_a_sealed_gso_batch_is_opened_and_delivered_whole(rig: Rig) -> None:
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    batch = b"".join(rig.seal(NEAR, c) for c in chunks_of(original, frame=9))
    rig.near.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, SEALED_CHUNK.to_bytes(2, "little"))], 0, rig.address)
    assert rig.delivered(1) == [original]
    until(lambda: counter(rig, "rx_sealed") == 4 and counter(rig, "rx_superpackets") == 1, "opened, delivered")
    assert counter(rig, "native_rx_packets") == (1 if rig.loop.native else 0)


def test_lost_and_lone_sealed_chunks_become_runs(rig: Rig) -> None:
    original = super_packet(NEAR_POD, OWN_POD, PAYLOAD)
    c = [rig.seal(NEAR, x) for x in chunks_of(original, frame=3)]
    rig.near.sendmsg([c[0] + c[2] + c[3]], [(SOL_UDP, UDP_SEGMENT, SEALED_CHUNK.to_bytes(2, "little"))], 0,
                     rig.address)
    assert payload_of(rig.delivered(2)) == PAYLOAD[:MSS] + PAYLOAD[2 * MSS:]
    rig.near.sendto(c[1], rig.address)
    assert payload_of(rig.delivered(1)) == PAYLOAD[MSS:2 * MSS]


def test_replayed_tampered_unsealed_and_unkeyed_frames_are_dropped_by_reason(rig: Rig) -> None:
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"v1"))
    good = rig.seal(NEAR, sleeve.encode(inner, 22, 11))
    rig.near.sendto(good, rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    rig.near.sendto(good, rig.address)  # replay
    flipped = bytearray(rig.seal(NEAR, sleeve.encode(inner, 22, 11)))
    flipped[-20] ^= 4
    rig.near.sendto(bytes(flipped), rig.address)  # auth
    rig.near.sendto(sleeve.encode(inner, 22, 11), rig.address)  # unsealed, from a keyed neighbour
    stranger_inner = bytes(IP(src=STRANGER_POD, dst=OWN_POD) / UDP(sport=3, dport=4))
    forged = rig.seal(NEAR, sleeve.encode(stranger_inner, 44, 11))
    rig.stranger.sendto(forged, rig.address)  # sealed, from a neighbour we share no keys with: auth
    rig.plain.sendto(rig.seal(NEAR, sleeve.encode(inner, 22, 11)), rig.address)  # NEAR's key from PLAIN: auth
    last = rig.seal(NEAR, sleeve.encode(inner, 22, 11))
    rig.near.sendto(last, rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]  # everything between was dropped
    until(lambda: (counter(rig, "drop_udp_replay"), counter(rig, "drop_udp_auth"),
                   counter(rig, "drop_udp_unsealed")) == (1, 3, 1), "each drop counted by reason")
    assert counter(rig, "internal_errors") == 0


def test_a_relay_opens_with_one_key_and_seals_with_the_next(rig: Rig) -> None:
    """NEAR → us → PLAIN: the chunks are opened with NEAR's key, cut into version-1 packets (PLAIN takes no
    chunks) and sealed with PLAIN's; PLAIN → us → NEAR: a version-1 frame re-sealed for NEAR."""
    original = super_packet(NEAR_POD, PLAIN_POD, PAYLOAD[:2 * MSS])
    batch = b"".join(rig.seal(NEAR, c) for c in chunks_of(original, frame=5, dst=33))
    rig.near.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, SEALED_CHUNK.to_bytes(2, "little"))], 0, rig.address)
    frames = rig.opened(PLAIN, 2)
    assert all(sleeve.decode_header(f, len(f))[1:] == (22, 33) for f in frames)
    assert payload_of([ZERO_VNET + f[sleeve.HEADER_SIZE:] for f in frames]) == PAYLOAD[:2 * MSS]
    inner = bytes(IP(src=PLAIN_POD, dst=NEAR_POD) / UDP(sport=3, dport=4) / Raw(b"back"))
    rig.plain.sendto(rig.seal(PLAIN, sleeve.encode(inner, 33, 22)), rig.address)
    (back,) = rig.opened(NEAR, 1)
    assert back == sleeve.encode(inner, 33, 22, ttl=sleeve.DEFAULT_TTL - 1)


def test_after_a_rekey_the_new_keys_seal_and_the_previous_still_open(rig: Rig) -> None:
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"old"))
    in_flight = rig.seal(NEAR, sleeve.encode(inner, 22, 11))
    old_ours, old_theirs = session(1)
    new_ours, new_theirs = session(7)
    rig.keys[NEAR] = PeerSleeveKeys(new_ours, old_ours)
    rig.set_table()
    rig.sealers[NEAR].update({rig.address: PeerSleeveKeys(new_theirs, old_theirs)})
    rig.near.sendto(in_flight, rig.address)
    assert rig.delivered(1) == [ZERO_VNET + inner]
    rig.tun_peer.send(ZERO_VNET + bytes(IP(src=OWN_POD, dst=NEAR_POD) / UDP(sport=3, dport=4)))
    raw = rig.near.recv(70000)
    assert int.from_bytes(raw[8:12], "big") == new_theirs.recv_id
    rig.sealers[NEAR].open(raw, rig.address)


def test_every_aead_of_the_pump_seals_and_opens_as_python_does() -> None:
    """Each library the pump can seal with (libgcrypt, OpenSSL's EVP) against ``cryptography``: the same
    sealed bytes, the same opened frames, forged and replayed datagrams refused and counted."""
    if not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built")
    from weaved.adapters import _sleevepump

    assert "openssl" in _sleevepump.AEADS and _sleevepump.AEADS == sleeve_native.AEADS
    ours, theirs = session(4)
    address = ("127.0.0.1", 7001)
    table = build(OWN, SHORT, SEGMENTS, {NEAR: NEAR}, {NEAR: Endpoint(*address)}, {NEAR: 1500},
                  {NEAR: PeerSleeveKeys(ours)})
    batch = b"".join(chunks_of(super_packet(NEAR_POD, OWN_POD, PAYLOAD), frame=12))
    v1 = sleeve.encode(bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP()), 22, 11)
    for aead in _sleevepump.AEADS:
        pump = _sleevepump.Pump(bytearray(VNET_SIZE + 65_535), bytearray(1 << 17), aead)
        assert pump.aead() == aead
        pump.set_table(sleeve_native.pack_table(table, own_chunk=1500))
        python, neighbour = Sealer(), Sealer()
        python.update(table.keys)
        neighbour.update({address: PeerSleeveKeys(theirs)})  # plays NEAR, sealing to us
        for data, segment in ((batch, CHUNK), (v1, 0), (v1[:sleeve.HEADER_SIZE], 0), (batch, 0)):
            assert pump.seal(address, data, segment) == python.seal_batch(address, data, segment), aead
            sealed = neighbour.seal_batch(address, data, segment)
            assert pump.open(address, sealed, segment and segment + OVERHEAD) == data, aead
        assert pump.open(address, sealed, 0) == b""  # replayed
        forged = bytearray(neighbour.seal(address, v1))
        forged[-1] ^= 1
        assert pump.open(address, bytes(forged), 0) == b""
        assert pump.open(("127.0.0.1", 7002), neighbour.seal(address, v1), 0) == b""  # NEAR's key, not NEAR
        counts = pump.counters()
        assert (counts["drop_udp_replay"], counts["drop_udp_auth"]) == (1, 2), aead


def test_the_pump_seals_with_libgcrypt_where_it_was_built_with_it_and_the_cpu_can() -> None:
    """The faster library is the default wherever setup.py found libgcrypt and the CPU has AES-NI and
    PCLMULQDQ (bench/aead_per_chunk.py: ~two thirds of EVP's cost per chunk); an unknown name is refused."""
    if not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built")
    from weaved.adapters import _sleevepump

    with open("/proc/cpuinfo") as f:
        flags = set(next((line for line in f if line.startswith("flags")), "").split())
    if not os.path.exists("/usr/include/gcrypt.h") or not {"aes", "pclmulqdq"} <= flags \
            or os.environ.get("WEAVED_NO_GCRYPT"):
        pytest.skip("no libgcrypt headers, no AES-NI and PCLMULQDQ, or a build without (setup.py): EVP seals")
    assert _sleevepump.AEADS == ("libgcrypt", "openssl")
    assert _sleevepump.Pump(bytearray(VNET_SIZE + 65_535), bytearray(1 << 17)).aead() == "libgcrypt"
    with pytest.raises(ValueError):
        _sleevepump.Pump(bytearray(VNET_SIZE + 65_535), bytearray(1 << 17), "rot13")


def _sealed_with_counter(keys: SleeveKeys, frame: bytes, counter: int) -> bytes:
    """``frame`` sealed by the neighbour holding ``keys`` with any ``counter`` (a Sealer only counts up)."""
    magic, version, ttl, src, dst = sleeve.HEADER.unpack_from(frame, 0)
    clear = CLEAR.pack(magic, version + 2, ttl, src, dst, keys.send_id, counter)
    return clear + AESGCM(keys.send_key).encrypt(nonce(counter), frame[sleeve.HEADER_SIZE:], clear)


_STEP = st.one_of(st.integers(-70, 70), st.integers(-4200, 4200), st.integers(0, 1 << 14),
                 st.sampled_from([REPLAY_WINDOW - 1, REPLAY_WINDOW, REPLAY_WINDOW + 64, -REPLAY_WINDOW, 1 << 40,
                                  COUNTER_LIMIT]))
_COUNTER_WALK = st.lists(st.one_of(_STEP, st.tuples(st.integers(0, 59))), min_size=1, max_size=60)
"""A walk of counters: an int moves the counter by that much; a 1-tuple (k,) sends counter k of the walk again."""


@settings(max_examples=300, deadline=None)
@given(walk=_COUNTER_WALK)
def test_the_pump_replay_window_accepts_exactly_what_python_accepts(walk: list[int | tuple[int]]) -> None:
    """The C window (a ring of bits indexed by counter) against seal.ReplayWindow (a shifted bitmap): any
    walk of counters, forwards, backwards, replays, across word and window edges and up to the limit."""
    if not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built")
    from weaved.adapters import _sleevepump

    ours, theirs = session(5)
    address = ("127.0.0.1", 7001)
    table = build(OWN, SHORT, SEGMENTS, {NEAR: NEAR}, {NEAR: Endpoint(*address)}, {NEAR: 1500},
                  {NEAR: PeerSleeveKeys(ours)})
    pump = _sleevepump.Pump(bytearray(VNET_SIZE + 65_535), bytearray(1 << 17))
    pump.set_table(sleeve_native.pack_table(table, own_chunk=1500))
    frame = sleeve.encode(bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP()), 22, 11)
    window, counter, sent = ReplayWindow(), 0, []
    for step in walk:
        if isinstance(step, tuple):
            counter = sent[step[0] % len(sent)] if sent else counter
        else:
            counter = min(max(counter + step, 0), (1 << 64) - 1)
        sent.append(counter)
        accepted = pump.open(address, _sealed_with_counter(theirs, frame, counter), 0) == frame
        assert accepted == window.mark(counter), (counter, window.highest)


def test_the_c_pump_and_python_seal_byte_for_byte_the_same() -> None:
    """Same keys, same counters, same buffers: the pump's libcrypto and ``cryptography`` agree."""
    if not sleeve_native.AVAILABLE:
        pytest.fail("the C pump was not built")
    from weaved.adapters import _sleevepump

    ours, _theirs = session(3)
    address = ("127.0.0.1", 7001)
    table = build(OWN, SHORT, SEGMENTS, {NEAR: NEAR}, {NEAR: Endpoint(*address)}, {NEAR: 1500},
                  {NEAR: PeerSleeveKeys(ours)})
    pump = _sleevepump.Pump(bytearray(VNET_SIZE + 65_535), bytearray(1 << 17))
    pump.set_table(sleeve_native.pack_table(table, own_chunk=1500))
    python = Sealer()
    python.update(table.keys)
    batch = b"".join(chunks_of(super_packet(NEAR_POD, OWN_POD, PAYLOAD), frame=11))
    v1 = sleeve.encode(bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP()), 22, 11)
    for data, segment in ((batch, CHUNK), (v1, 0), (batch[:CHUNK], CHUNK), (batch, 0)):
        assert pump.seal(address, data, segment) == python.seal_batch(address, data, segment)
    assert pump.seal(("127.0.0.1", 7002), v1, 0) is None  # no keys for that address


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_tampered_or_truncated_sealed_datagram_is_ever_delivered(rig: Rig, data: st.DataObject) -> None:
    inner = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"x" * 30))
    frame = data.draw(st.sampled_from([sleeve.encode(inner, 22, 11), chunks_of(super_packet(
        NEAR_POD, OWN_POD, PAYLOAD[:MSS]), frame=data.draw(st.integers(1, 1000)))[0]]))
    sealed = bytearray(rig.seal(NEAR, frame))
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
        sealed[bit // 8] ^= 1 << (bit % 8)
    else:
        sealed = sealed[:data.draw(st.integers(0, len(sealed) - 1))]
    before = sum(v for k, v in rig.loop.counters().items() if k.startswith("drop_udp_"))
    rig.near.sendto(bytes(sealed), rig.address)
    sentinel = bytes(IP(src=NEAR_POD, dst=OWN_POD) / UDP(sport=3, dport=4) / Raw(b"sentinel"))
    rig.near.sendto(rig.seal(NEAR, sleeve.encode(sentinel, 22, 11)), rig.address)
    assert rig.delivered(1) == [ZERO_VNET + sentinel]  # the tampered one never reached the TUN
    until(lambda: sum(v for k, v in rig.loop.counters().items() if k.startswith("drop_udp_")) == before + 1,
          "the tampered datagram counted")
