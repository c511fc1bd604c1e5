"""The sleeve frame codec: round trips, and every malformation dropped with its own reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.core import sleeve, superframe
from weaved.core.sleeve import FrameError, decode_header, encode


def ipv4(payload: bytes = b"x" * 12, *, ihl: int = 5, total: int | None = None, version: int = 4,
         dst: bytes = b"\x0a\x28\x00\x01") -> bytes:
    """A minimal IPv4 header (checksum left 0: the codec does not verify it, the kernel does)."""
    options = b"\x00" * (4 * (ihl - 5)) if ihl > 5 else b""
    length = 20 + len(options) + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, length, 0, 0, 64, 17, 0, b"\x0a\x20\x00\x02", dst)
    return header + options + payload


short_ids = st.integers(0, sleeve.MAX_SHORT_ID)


@given(short_ids, short_ids, st.integers(1, 255), st.binary(max_size=1400), st.integers(5, 15))
def test_round_trip(src: int, dst: int, ttl: int, payload: bytes, ihl: int) -> None:
    packet = ipv4(payload, ihl=ihl)
    frame = encode(packet, src, dst, ttl)
    assert len(frame) == len(packet) + sleeve.HEADER_SIZE
    assert decode_header(frame, len(frame)) == (ttl, src, dst)
    assert frame[sleeve.HEADER_SIZE:] == packet


def test_header_layout_is_the_documented_one() -> None:
    frame = encode(ipv4(), 0x123, 0xABC, 7)
    assert frame[:8] == bytes([0x57, 0x53, 1, 7, 0x01, 0x23, 0x0A, 0xBC])
    assert sleeve.OVERHEAD == 36


def test_decode_reads_only_the_given_length_of_a_bigger_buffer() -> None:
    frame = encode(ipv4(), 1, 2)
    buf = bytearray(65536)
    buf[:len(frame)] = frame
    assert decode_header(buf, len(frame)) == (sleeve.DEFAULT_TTL, 1, 2)


def reason(frame: bytes, length: int | None = None) -> str:
    with pytest.raises(FrameError) as info:
        decode_header(frame, len(frame) if length is None else length)
    return info.value.reason


def test_each_malformation_has_its_reason() -> None:
    good = encode(ipv4(), 1, 2)
    assert reason(good[:sleeve.HEADER_SIZE + 19]) == "short"
    assert reason(b"") == "short"
    assert reason(b"XX" + good[2:]) == "bad-magic"
    assert reason(good[:2] + b"\x02" + good[3:]) == "bad-version"
    assert reason(struct.pack("!HBBHH", sleeve.MAGIC, 1, 5, 0x1000, 1) + ipv4()) == "bad-short-id"
    assert reason(struct.pack("!HBBHH", sleeve.MAGIC, 1, 5, 1, 0xFFFF) + ipv4()) == "bad-short-id"
    assert reason(encode(ipv4(version=6), 1, 2)) == "not-ipv4"
    assert reason(encode(ipv4(ihl=4), 1, 2)) == "bad-ip-header"
    assert reason(encode(b"\x4f" + ipv4(b"")[1:], 1, 2)) == "bad-ip-header"  # says 60-byte header, has 20
    assert reason(encode(ipv4(total=100), 1, 2)) == "bad-length"
    assert reason(good + b"trailing") == "bad-length"
    assert set(["short", "bad-magic", "bad-version", "bad-short-id", "not-ipv4", "bad-ip-header",
                "bad-length"]) <= set(sleeve.DROP_REASONS)


@given(st.binary(max_size=200))
def test_garbage_raises_only_frame_errors(data: bytes) -> None:
    try:
        decode_header(data, len(data))
    except FrameError as exc:
        assert exc.reason in sleeve.DROP_REASONS


def test_encode_refuses_fields_out_of_range() -> None:
    for src, dst, ttl in ((4096, 1, 5), (1, -1, 5), (1, 1, 0), (1, 1, 256)):
        with pytest.raises(ValueError):
            encode(ipv4(), src, dst, ttl)


def test_destination_and_pod_mtu() -> None:
    assert sleeve.ipv4_destination(ipv4(dst=b"\x0a\x2c\x00\x07"), 0) == 0x0A2C0007
    assert superframe.pod_mtu(1500) == 1446
    assert superframe.pod_mtu(9000) == 8946
    assert superframe.pod_mtu(600) == sleeve.MIN_MTU
