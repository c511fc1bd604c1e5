"""The sealed sleeve frame (weaved.core.sleeveseal) as a pure definition: round trips, and that no tampered,
truncated or replayed datagram ever opens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.core import sleeve, superframe
from weaved.core.seal import REPLAY_WINDOW, PeerSleeveKeys, SleeveKeys
from weaved.core.sleeve import FrameError
from weaved.core.sleeveseal import CLEAR, OVERHEAD, SEALED_V1, SEALED_V2, Sealer

A, B = ("198.51.100.1", 6785), ("198.51.100.2", 6785)
K1, K2 = bytes(range(32)), bytes(range(32, 64))


def pair(k1: bytes = K1, k2: bytes = K2, ids: tuple[int, int] = (0x1111, 0x2222)) -> tuple[SleeveKeys, SleeveKeys]:
    """A's and B's view of one session's keys."""
    a = SleeveKeys(recv_id=ids[0], send_id=ids[1], send_key=k1, recv_key=k2)
    b = SleeveKeys(recv_id=ids[1], send_id=ids[0], send_key=k2, recv_key=k1)
    return a, b


def sealers() -> tuple[Sealer, Sealer]:
    """A's sealer (keys for B) and B's (keys for A)."""
    a_keys, b_keys = pair()
    a, b = Sealer(), Sealer()
    a.update({B: PeerSleeveKeys(a_keys)})
    b.update({A: PeerSleeveKeys(b_keys)})
    return a, b


V1 = sleeve.encode(bytes(range(60)), 3, 4)
V2 = superframe.CHUNK_HEADER.pack(sleeve.MAGIC, 2, 9, 3, 4, superframe.word(7, 0, 1)) + bytes(range(200))


def test_a_sealed_frame_opens_to_the_plain_frame() -> None:
    a, b = sealers()
    for frame, version in ((V1, SEALED_V1), (V2, SEALED_V2)):
        sealed = a.seal(B, frame)
        assert len(sealed) == len(frame) + OVERHEAD
        assert sealed[2] == version and sealed[3:8] == frame[3:8]  # ttl and short ids in the clear
        assert frame[8:] not in sealed
        assert b.open(sealed, A) == frame
    counters = [CLEAR.unpack_from(a.seal(B, V1))[6] for _ in range(3)]
    assert counters == [2, 3, 4]  # per key, never repeated


def test_a_batch_is_sealed_datagram_by_datagram() -> None:
    a, b = sealers()
    batch = V2 * 3 + V2[:100]
    sealed = a.seal_batch(B, batch, len(V2))
    step = len(V2) + OVERHEAD
    assert len(sealed) == len(batch) + 4 * OVERHEAD
    opened = [b.open(sealed[at:at + step], A) for at in range(0, len(sealed), step)]
    assert b"".join(opened) == batch


@given(st.data())
def test_any_flipped_bit_or_truncation_is_dropped_never_delivered(data: st.DataObject) -> None:
    a, b = sealers()
    sealed = bytearray(a.seal(B, data.draw(st.sampled_from([V1, V2]))))
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
        sealed[bit // 8] ^= 1 << (bit % 8)
    else:
        sealed = sealed[:data.draw(st.integers(0, len(sealed) - 1))]
    with pytest.raises(FrameError) as info:
        b.open(sealed, A)
    assert info.value.reason in ("auth", "short", "replay")


def test_a_replay_is_dropped_and_reordering_within_the_window_is_not() -> None:
    a, b = sealers()
    sealed = [a.seal(B, V1) for _ in range(5)]
    for index in (3, 0, 4, 1):
        assert b.open(sealed[index], A) == V1
    for index in (3, 0):
        with pytest.raises(FrameError, match="replay"):
            b.open(sealed[index], A)
    assert b.open(sealed[2], A) == V1


def test_a_forged_counter_does_not_move_the_window() -> None:
    a, b = sealers()
    first = a.seal(B, V1)
    forged = bytearray(a.seal(B, V1))
    forged[12:20] = (REPLAY_WINDOW * 10).to_bytes(8, "big")  # far ahead, tag now wrong
    with pytest.raises(FrameError, match="auth"):
        b.open(forged, A)
    assert b.open(first, A) == V1  # still inside the window: the forged counter was never marked


def test_a_key_of_another_neighbour_or_from_another_address_does_not_open() -> None:
    a, b = sealers()
    sealed = a.seal(B, V1)
    with pytest.raises(FrameError, match="auth"):
        b.open(sealed, ("198.51.100.9", 6785))
    with pytest.raises(FrameError, match="auth"):
        Sealer().open(sealed, A)
    with pytest.raises(FrameError, match="auth"):
        Sealer().seal(B, V1)


def test_a_rekey_keeps_counters_of_kept_keys_and_the_previous_session_still_opens() -> None:
    a, b = sealers()
    old = a.seal(B, V1)
    a_old, b_old = pair()
    a.update({B: PeerSleeveKeys(a_old)})  # a table rebuilt for another reason: same keys
    assert CLEAR.unpack_from(a.seal(B, V1))[6] == 1  # the counter went on
    a_new, b_new = pair(K2, K1, (0x3333, 0x4444))
    a.update({B: PeerSleeveKeys(a_new, a_old)})
    b.update({A: PeerSleeveKeys(b_new, b_old)})
    fresh = a.seal(B, V1)
    assert CLEAR.unpack_from(fresh)[5:] == (0x4444, 0)  # B's id of the new key, its own counter from 0
    assert b.open(fresh, A) == V1
    assert b.open(old, A) == V1  # in flight across the rekey
    b.update({A: PeerSleeveKeys(b_new)})
    with pytest.raises(FrameError, match="auth"):
        b.open(sealer_with(a_old).seal(B, V1), A)  # the session before: gone


def sealer_with(keys: SleeveKeys) -> Sealer:
    s = Sealer()
    s.update({B: PeerSleeveKeys(keys)})
    return s


def test_pod_mtu_leaves_room_for_the_seal() -> None:
    assert superframe.pod_mtu(1500, sealed=True) == superframe.pod_mtu(1500) - OVERHEAD
