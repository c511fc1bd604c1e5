"""The control-plane codec: round trips, bounds, and 'only DecodeError' on any input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.strategies import endpoints, entries, names
from weaved.core import gossip
from weaved.core.types import PeerUID, ShortID, peer_name_from_bytes
from weaved.core.wire import (
    MAX_DATAGRAM,
    PROTOCOL_MAX,
    DecodeError,
    DigestItem,
    Goodbye,
    GossipDigest,
    GossipRequest,
    GossipSummary,
    GossipUpdate,
    Heartbeat,
    Hello,
    HelloAck,
    Message,
    Reject,
    Relay,
    decode,
    encode,
)

uids = st.integers(0, 2**64 - 1).map(PeerUID)
short_ids = st.integers(0, 4095).map(ShortID)
overlays = st.lists(st.sampled_from(["sleeve", "fastdp"]), max_size=2).map(tuple)
tokens = st.integers(0, 2**64 - 1)
bodies = st.one_of(
    st.builds(Hello, st.integers(0, 255), st.integers(0, 255), st.text(max_size=64), short_ids, overlays,
              st.none()),
    st.builds(Hello, st.integers(0, 255), st.integers(0, 255), st.text(max_size=64), short_ids, overlays,
              st.integers(0, 1 << 32), st.one_of(st.none(), tokens)),
    st.builds(HelloAck, st.just(PROTOCOL_MAX), st.text(max_size=64), short_ids, overlays),
    st.builds(HelloAck, st.just(PROTOCOL_MAX), st.text(max_size=64), short_ids, overlays, tokens, tokens),
    st.builds(Reject, st.text(max_size=32), st.text(max_size=256)),
    st.builds(Heartbeat, st.one_of(st.none(), tokens)),
    st.builds(Goodbye, st.one_of(st.none(), tokens)),
    st.builds(GossipUpdate, st.lists(entries(), max_size=5).map(tuple)),
    st.builds(GossipSummary, st.binary(min_size=8, max_size=8), st.integers(0, 10_000)),
    st.builds(GossipDigest, st.lists(st.builds(DigestItem, names, st.integers(0, 2**64 - 1), uids),
                                     max_size=10).map(tuple)),
    st.builds(GossipRequest, st.lists(names, max_size=10).map(tuple)),
    st.builds(Relay, names, st.one_of(st.none(), names), st.text(max_size=32), st.integers(0, 64),
              st.binary(max_size=100)),
)


@given(st.builds(Message, st.just(PROTOCOL_MAX), names, uids, bodies))
def test_round_trip(message: Message) -> None:
    assert decode(encode(message)) == message


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError as exc:
        assert exc.reason


raw_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=10),
              st.binary(max_size=20)),
    lambda children: st.lists(children, max_size=7),
    max_leaves=40,
)


@given(st.lists(raw_values, min_size=6, max_size=6), st.integers(1, 10))
def test_structured_garbage_raises_only_decode_error(envelope: list[object], msg_type: int) -> None:
    """Well-formed msgpack with the right magic but arbitrary fields still only raises DecodeError."""
    envelope[0], envelope[1], envelope[2] = "wv", 1, msg_type
    try:
        decode(msgpack.packb(envelope, use_bin_type=True))
    except DecodeError as exc:
        assert exc.reason


def test_rejects_with_reasons() -> None:
    sender = b"\x02\x00\x00\x00\x00\x01"
    cases = {
        b"\xc1": "not-msgpack",
        msgpack.packb(["xx", 1, 4, sender, 1, []]): "bad-magic",
        msgpack.packb(["wv", 1, 99, sender, 1, []]): "unknown-type",
        msgpack.packb(["wv", 9, 4, sender, 1, []]): "unsupported-version",
        msgpack.packb(["wv", 1, 4, b"\x01", 1, []]): "bad-field",
        b"\x00" * (MAX_DATAGRAM + 1): "too-large",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError) as info:
            decode(data)
        assert info.value.reason == reason, data[:20]


def test_hello_of_a_future_version_still_decodes() -> None:
    """A peer speaking only version 9 must still be understood well enough to be told why not."""
    sender = b"\x02\x00\x00\x00\x00\x01"
    data = msgpack.packb(["wv", 9, 1, sender, 7, [9, 9, "future", 3, ["sleeve"], 0, "more", [1]]],
                         use_bin_type=True)
    message = decode(data)
    assert isinstance(message.body, Hello) and message.body.version_min == 9
    assert message.body.reachable == 0


def test_hello_of_the_first_shape_still_decodes() -> None:
    """HELLO's first five fields are fixed for ever; later ones are optional."""
    sender = b"\x02\x00\x00\x00\x00\x01"
    data = msgpack.packb(["wv", 1, 1, sender, 7, [1, 1, "old", 3, ["sleeve"]]], use_bin_type=True)
    message = decode(data)
    assert isinstance(message.body, Hello) and message.body.reachable is None
    with pytest.raises(DecodeError):
        decode(msgpack.packb(["wv", 1, 1, sender, 7, [1, 1, "short", 3]], use_bin_type=True))


@given(st.lists(entries(), min_size=1, max_size=200), endpoints)
def test_chunked_updates_fit_and_carry_everything(many: list, _addr: object) -> None:
    sizes = gossip.EntrySizeCache()
    chunks = gossip.chunk(many, sizes.size)
    assert [e for c in chunks for e in c] == many
    for part in chunks:
        data = encode(Message(PROTOCOL_MAX, many[0].name, PeerUID(1), GossipUpdate(tuple(part))))
        assert len(data) <= MAX_DATAGRAM
        if len(part) > 1:
            assert len(data) <= 2 * 1200
        assert decode(data).body == GossipUpdate(tuple(part))


def test_tokens_leave_the_older_shapes_alone() -> None:
    """Without a token, HELLO_ACK, HEARTBEAT and GOODBYE keep the exact shape older peers insist on (their
    decoders refuse extra fields there); with one, an older peer still reads a HELLO's first six fields."""
    sender = peer_name_from_bytes(b"\x02\x00\x00\x00\x00\x01")

    def body_of(body: object) -> list[object]:
        raw = msgpack.unpackb(encode(Message(PROTOCOL_MAX, sender, PeerUID(7), body)))  # type: ignore[arg-type]
        return list(raw[5])

    assert body_of(Heartbeat()) == [] and body_of(Goodbye()) == []
    assert body_of(Heartbeat(5)) == [5] and body_of(Goodbye(6)) == [6]
    assert len(body_of(HelloAck(1, "n", ShortID(3), ("sleeve",)))) == 4
    assert body_of(HelloAck(1, "n", ShortID(3), ("sleeve",), 8, 9))[4:] == [8, 9]
    assert body_of(Hello(1, 1, "n", ShortID(3), ("sleeve",), 2, 11))[5:] == [2, 11]
    assert body_of(Hello(1, 1, "n", ShortID(3), ("sleeve",), None, 11)) == [1, 1, "n", 3, ["sleeve"]]
