"""The shared strict readers: exact types, bounds, stable reasons, and only the caller's error type."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.core.codec import BAD_FIELD, StrictReader
from weaved.core.ipam.ring import RingDecodeError, decode_ring
from weaved.core.ipam.seeding import SeedingDecodeError, decode_paxos


class Oops(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


R = StrictReader(Oops)


def fails(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(Oops) as info:
        call(*args, **kwargs)
    return info.value.reason, info.value.detail


def test_values_pass_through_unchanged() -> None:
    items = [1, 2]
    assert R.integer(7, 0, 7, "n") == 7
    assert R.text("ab", 2, "s") == "ab"
    assert R.blob(b"xyz", None, "b") == b"xyz"
    assert R.blob(b"xyz", 3, "b") == b"xyz"
    assert R.array(items, "l", 2, 2) is items
    assert R.array([], "l", 0) == []
    assert R.name(b"\x02\x00\x00\x00\x00\x01", "who") == "02:00:00:00:00:01"
    R.need(True, "never")


@pytest.mark.parametrize(
    ("call", "args", "expected"),
    [
        (R.integer, (True, 0, 9, "flag"), (BAD_FIELD, "flag")),  # bool is not an int here
        (R.integer, (1.0, 0, 9, "n"), (BAD_FIELD, "n")),
        (R.integer, (10, 0, 9, "n"), (BAD_FIELD, "n")),
        (R.integer, (-1, 0, 9, "n"), (BAD_FIELD, "n")),
        (R.text, (b"ab", 9, "s"), (BAD_FIELD, "s")),
        (R.text, ("abc", 2, "s"), (BAD_FIELD, "s")),
        (R.blob, ("ab", None, "b"), (BAD_FIELD, "b")),
        (R.blob, (bytearray(b"ab"), None, "b"), (BAD_FIELD, "b")),
        (R.blob, (b"ab", 3, "b"), (BAD_FIELD, "b")),
        (R.array, ((1, 2), "l", 9), (BAD_FIELD, "l")),
        (R.array, ([1, 2, 3], "l", 2), ("too-large", "l")),
        (R.array, ([1, 2], "l", 9, 3), (BAD_FIELD, "l arity")),
        (R.name, (b"\x01" * 5, "who"), (BAD_FIELD, "who")),
        (R.name, ("02:00:00:00:00:01", "who"), (BAD_FIELD, "who")),
        (R.need, (False, "some-reason", "why"), ("some-reason", "why")),
    ],
)
def test_rejects_with_reason_and_field(call: Any, args: tuple[Any, ...], expected: tuple[str, str]) -> None:
    assert fails(call, *args) == expected


def test_long_list_reason_is_the_callers() -> None:
    assert fails(StrictReader(Oops, long_list=BAD_FIELD).array, [1, 2], "l", 1) == (BAD_FIELD, "l")
    # The ring reports an over-long list as too-large, the seeding votes as bad-field (their history).
    with pytest.raises(RingDecodeError, match="too-large"):
        decode_ring([1, 0, 1, [b"\x01" * 6] * 5_000, [], []])
    with pytest.raises(SeedingDecodeError) as info:
        decode_paxos([1, 0, 1, [[]] * 5_000])
    assert info.value.reason == BAD_FIELD


def test_unpack_round_trip_and_bounds() -> None:
    data = msgpack.packb([1, "a", b"b", [None]], use_bin_type=True)
    assert R.unpack(data, max_size=100, max_str=8, max_array=8) == [1, "a", b"b", [None]]
    assert R.unpack(bytearray(data), max_size=100, max_str=8, max_array=8) == [1, "a", b"b", [None]]
    assert fails(R.unpack, data, max_size=len(data) - 1, max_str=8, max_array=8) == (
        "too-large", f"{len(data)} bytes")
    for refused in (
        b"\xc1",  # never used
        b"\x92\x01",  # truncated
        msgpack.packb({"k": 1}),  # maps are not part of any format here
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb("x" * 9),  # longer string than allowed
        msgpack.packb(b"x" * 9, use_bin_type=True),
        msgpack.packb(list(range(9))),  # longer array than allowed
    ):
        reason, _ = fails(R.unpack, refused, max_size=100, max_str=8, max_array=8)
        assert reason == "not-msgpack", refused


@given(st.binary(max_size=64))
def test_unpack_raises_only_the_callers_error(data: bytes) -> None:
    try:
        R.unpack(data, max_size=32, max_str=8, max_array=8)
    except Oops as exc:
        assert exc.reason in {"too-large", "not-msgpack"}
