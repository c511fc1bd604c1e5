"""Sleeve frame version 2: chunk checks, the receiver's run fix-up and the userspace segmentation, judged
against scapy's own IPv4/TCP checksums and what the kernel's segmentation would have produced."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, Raw

from weaved.core import sleeve, superframe
from weaved.core.sleeve import FrameError
from weaved.core.superframe import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    VNET,
    VNET_SIZE,
    complete_checksum,
    decode_chunk,
    is_whole_frame,
    ones_sum,
    run_header,
    segments,
    word,
)

SRC, DST = "10.32.0.5", "10.40.0.7"


def pseudo_partial(packet: bytes, l4_length: int, proto: int) -> int:
    """What the kernel leaves in the checksum field of a NEEDS_CSUM packet: the folded pseudo-header sum."""
    raw = packet[12:20] + struct.pack("!BBH", 0, proto, l4_length)
    return ones_sum(raw)


def super_packet(payload: bytes, mss: int, flags: str = "PA", seq: int = 1000, ip_id: int = 77) -> tuple[bytes, bytes]:
    """(vnet, packet) as the TUN hands over a TSO super-packet: full lengths, partial TCP checksum."""
    pkt = IP(src=SRC, dst=DST, id=ip_id) / TCP(sport=5201, dport=40000, seq=seq, ack=9, flags=flags,
                                                 options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    pkt = pkt / Raw(payload)
    raw = bytearray(bytes(pkt))
    ihl = 20
    raw[ihl + 16:ihl + 18] = pseudo_partial(bytes(raw), len(raw) - ihl, 6).to_bytes(2, "big")
    headers = superframe.header_length(raw)
    vnet = VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, headers, mss, 20, 16)
    return vnet, bytes(raw)


def assert_valid(packet: bytes) -> IP:
    """The packet's IP and TCP/UDP checksums are what scapy computes afresh."""
    parsed = IP(packet)
    fresh = IP(packet)
    del fresh.chksum, fresh.payload.chksum
    rebuilt = IP(bytes(fresh))
    assert parsed.chksum == rebuilt.chksum, "IP header checksum"
    assert parsed.payload.chksum == rebuilt.payload.chksum, "L4 checksum"
    assert parsed.len == len(packet)
    return parsed


@given(st.integers(1, 6000), st.sampled_from([536, 1000, 1394]), st.sampled_from(["PA", "FPA", "A", "CA"]))
def test_segments_are_what_the_kernel_would_send(size: int, mss: int, flags: str) -> None:
    payload = bytes(i % 251 for i in range(size))
    vnet, packet = super_packet(payload, mss, flags)
    out = [bytes(p) for p in segments(vnet, packet)]
    assert len(out) == -(-size // mss)
    data = b""
    for i, seg in enumerate(out):
        parsed = assert_valid(seg)
        assert parsed.id == (77 + i) & 0xFFFF
        assert parsed[TCP].seq == 1000 + i * mss
        tcp_flags = str(parsed[TCP].flags)
        assert ("F" in tcp_flags) == ("F" in flags and i == len(out) - 1)
        assert ("P" in tcp_flags) == ("P" in flags and i == len(out) - 1)
        assert ("C" in tcp_flags) == ("C" in flags and i == 0)
        data += bytes(parsed[TCP].payload)
    assert data == payload


@given(st.integers(1, 20), st.data())
def test_a_run_is_a_valid_super_packet_of_its_chunks(total: int, data: st.DataObject) -> None:
    mss = 1000
    payload = bytes((i * 7) % 256 for i in range((total - 1) * mss + data.draw(st.integers(1, mss))))
    vnet, packet = super_packet(payload, mss)
    headers = superframe.header_length(packet)
    first = data.draw(st.integers(0, total - 1))
    chunks = data.draw(st.integers(1, total - first))
    piece = payload[first * mss:(first + chunks) * mss]
    head = run_header(vnet + packet[:headers], first, chunks, total, len(piece))
    _flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack_from(head, 0)
    assert (gso_type, gso_size) == ((GSO_TCPV4, mss) if chunks > 1 else (GSO_NONE, 0))
    assert hdr_len == headers
    # The receiving kernel segments a run the way the sender's would have: each piece is a valid packet.
    for seg in segments(head[:VNET_SIZE], head[VNET_SIZE:] + piece):
        assert_valid(bytes(seg))
    whole = bytearray(head[VNET_SIZE:] + piece)
    complete_checksum(whole, csum_start, csum_offset)  # what a NIC would do with the run as it is
    parsed = assert_valid(bytes(whole))
    assert parsed[TCP].seq == 1000 + first * mss
    assert bytes(parsed[TCP].payload) == piece


def test_plain_packet_checksum_finished_in_userspace() -> None:
    raw = bytearray(bytes(IP(src=SRC, dst=DST) / UDP(sport=1, dport=2) / Raw(b"hello world")))
    raw[26:28] = pseudo_partial(bytes(raw), len(raw) - 20, 17).to_bytes(2, "big")
    (out,) = segments(VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6), raw)
    assert_valid(bytes(out))
    untouched = bytes(IP(src=SRC, dst=DST) / UDP(sport=1, dport=2) / Raw(b"x"))
    assert bytes(next(segments(bytes(VNET_SIZE), untouched))) == untouched


@given(st.binary(max_size=3000))
def test_ones_sum_is_the_end_around_carry_sum_of_the_words(data: bytes) -> None:
    padded = data + b"\x00" * (len(data) & 1)
    total = 0
    for (word16,) in struct.iter_unpack("!H", padded):
        total += word16
        total = (total & 0xFFFF) + (total >> 16)
    assert ones_sum(data) == total


def chunk(frame: int, index: int, count: int, inner: bytes, *, vnet: bytes = bytes(10)) -> bytes:
    return superframe.CHUNK_HEADER.pack(sleeve.MAGIC, 2, 16, 3, 4, word(frame, index, count)) + vnet + inner


INNER = bytes(IP(src=SRC, dst=DST) / UDP() / Raw(b"z" * 40))


def test_decode_chunk_and_its_drop_reasons() -> None:
    good = chunk(9, 0, 1, INNER)
    assert decode_chunk(good, 0, len(good)) == (16, 3, 4, 9, 0, 1)
    vnet, packet = super_packet(b"d" * 3000, 1000)
    piece = chunk(9, 1, 3, packet[:1052], vnet=vnet)
    assert decode_chunk(piece, 0, len(piece)) == (16, 3, 4, 9, 1, 3)

    def reason(frame: bytes) -> str:
        with pytest.raises(FrameError) as info:
            decode_chunk(frame, 0, len(frame))
        return info.value.reason

    assert reason(good[:40]) == "short"
    assert reason(b"XX" + good[2:]) == "bad-magic"
    assert reason(good[:2] + b"\x07" + good[3:]) == "bad-version"
    assert reason(chunk(9, 3, 3, INNER)) == "bad-chunk"
    assert reason(chunk(9, 0, 0, INNER)) == "bad-chunk"
    assert reason(chunk(9, 1, 3, INNER)) == "bad-chunk"  # a UDP packet is never cut into chunks
    assert reason(chunk(9, 0, 1, b"\x60" + INNER[1:])) == "not-ipv4"
    assert reason(chunk(9, 0, 1, b"\x4f" + INNER[1:30])) == "bad-ip-header"
    assert reason(chunk(9, 0, 1, INNER, vnet=VNET.pack(0, 4, 0, 0, 0, 0))) == "bad-vnet"  # TCPv6: not offered
    assert reason(chunk(9, 0, 1, INNER, vnet=VNET.pack(1, 0, 0, 0, 20, 900))) == "bad-vnet"  # checksum past end
    assert reason(chunk(9, 0, 1, INNER, vnet=VNET.pack(0, 1, 0, 1000, 0, 0))) == "bad-vnet"  # TSO without CSUM


def test_whole_frame_check() -> None:
    size = 100
    inner = INNER + b"\x00" * (size - superframe.PREFIX - len(INNER))
    frame = b"".join(chunk(5, i, 4, inner) for i in range(4))
    assert is_whole_frame(frame, 4, size)
    assert not is_whole_frame(frame[size:], 3, size)  # starts at index 1
    missing = frame[:size] + frame[2 * size:]
    assert not is_whole_frame(missing, 3, size)
    other = frame[:3 * size] + chunk(6, 3, 4, inner)
    assert not is_whole_frame(other, 4, size)
    assert is_whole_frame(chunk(7, 0, 1, INNER), 1, size)


def test_negotiation_strings() -> None:
    assert superframe.chunk_limit(("sleeve:6785", superframe.overlay(1472))) == 1472
    assert superframe.chunk_limit(("sleeve:6785",)) == 0
    assert superframe.chunk_limit(("sleeve-gso:abc", "sleeve-gso:10")) == 0
    assert superframe.tun_gso_max_size(1446) == 44 * 1394 + 52
    assert superframe.OVERHEAD == 54


def test_the_virtio_header_takes_only_needs_csum_and_a_sane_segment_size() -> None:
    """Regression: DATA_VALID (2, "checksum already verified") passed, so a pod skipped its checksum check;
    a gso_size of 1 passed, so one relayed chunk became ~1,400 packets."""
    def reason(frame: bytes) -> str:
        with pytest.raises(FrameError) as info:
            decode_chunk(frame, 0, len(frame))
        return info.value.reason

    vnet, packet = super_packet(b"d" * 3000, 1000)
    flags, gso, hdr, _mss, start, offset = VNET.unpack_from(vnet, 0)
    assert reason(chunk(9, 0, 1, INNER, vnet=VNET.pack(2, 0, 0, 0, 0, 0))) == "bad-vnet"  # DATA_VALID alone
    assert reason(chunk(9, 0, 3, packet[:1052], vnet=VNET.pack(flags | 2, gso, hdr, 1000, start, offset))) == \
        "bad-vnet"
    for mss in (1, superframe.MIN_GSO_SIZE - 1):
        assert reason(chunk(9, 0, 3, packet[:1052], vnet=VNET.pack(flags, gso, hdr, mss, start, offset))) == \
            "bad-vnet"
    good = chunk(9, 0, 3, packet[:1052], vnet=VNET.pack(flags, gso, hdr, superframe.MIN_GSO_SIZE, start, offset))
    assert decode_chunk(good, 0, len(good))[4:] == (0, 3)


@given(st.binary(max_size=200), st.integers(-2, 300), st.integers(-2, 300))
def test_is_whole_frame_answers_and_never_raises(buf: bytes, count: int, size: int) -> None:
    """Regression: ``is_whole_frame(buf, 3, 10)`` raised struct.error (a GRO segment below a chunk header)."""
    assert is_whole_frame(buf, count, size) in (True, False)
    assert not is_whole_frame(bytes(100), 3, 10)
