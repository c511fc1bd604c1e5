"""The Noise NNpsk0 handshake: interoperates with an independent implementation, refuses wrong keys."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from noise.connection import NoiseConnection

from weaved.core.handshake import (
    PROLOGUE,
    PROTOCOL_NAME,
    Claim,
    HandshakeError,
    Initiator,
    decode_claim,
    derive_psk,
    encode_claim,
    respond,
)
from weaved.core.types import PeerName, PeerUID

PSK = bytes(range(32))
OTHER = bytes(range(1, 33))


def entropy(seed: int = 1) -> random.Random:
    return random.Random(seed)


def noise(initiator: bool, psk: bytes = PSK) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_psks(psk=psk)
    conn.set_prologue(PROLOGUE)
    conn.start_handshake()
    return conn


def test_our_initiator_talks_to_an_independent_noise_responder() -> None:
    ours = Initiator(PSK, b"hello", entropy().randbytes)
    theirs = noise(initiator=False)
    assert theirs.read_message(ours.message) == b"hello"
    payload, keys = ours.finish(theirs.write_message(b"welcome"))
    assert payload == b"welcome"
    assert theirs.handshake_finished
    # Split keys agree: what we seal with control_send, the other implementation opens, and back.
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from weaved.core.seal import nonce
    assert theirs.decrypt(ChaCha20Poly1305(keys.control_send).encrypt(nonce(0), b"ping", b"")) == b"ping"
    assert ChaCha20Poly1305(keys.control_recv).decrypt(nonce(0), theirs.encrypt(b"pong"), b"") == b"pong"
    assert keys.transcript == theirs.get_handshake_hash()


def test_our_responder_talks_to_an_independent_noise_initiator() -> None:
    theirs = noise(initiator=True)
    first = theirs.write_message(b"hi")
    payload, answer, keys = respond(PSK, first, lambda p: p + b" back", entropy(2).randbytes)
    assert payload == b"hi"
    assert theirs.read_message(answer) == b"hi back"
    assert keys.transcript == theirs.get_handshake_hash()


def test_both_sides_derive_mirrored_keys_including_the_sleeve_pair() -> None:
    init = Initiator(PSK, b"a", entropy(3).randbytes)
    _, answer, responder_keys = respond(PSK, init.message, lambda _: b"b", entropy(4).randbytes)
    _, initiator_keys = init.finish(answer)
    assert initiator_keys.control_send == responder_keys.control_recv
    assert initiator_keys.sleeve_send == responder_keys.sleeve_recv
    assert initiator_keys.sleeve_recv == responder_keys.sleeve_send
    assert len({initiator_keys.control_send, initiator_keys.control_recv, initiator_keys.sleeve_send,
                initiator_keys.sleeve_recv}) == 4


def test_a_wrong_password_fails_at_the_responder_before_any_key_work() -> None:
    init = Initiator(PSK, b"a", entropy().randbytes)
    called = []
    with pytest.raises(HandshakeError) as refused:
        respond(OTHER, init.message, lambda p: called.append(p) or b"", entropy().randbytes)
    assert refused.value.reason == "auth" and not called


def test_an_answer_made_with_another_password_does_not_open_at_the_initiator() -> None:
    init = Initiator(PSK, b"a", entropy().randbytes)
    theirs = noise(initiator=True, psk=OTHER)
    theirs.write_message(b"x")
    forged = noise(initiator=False, psk=OTHER)
    forged.read_message(Initiator(OTHER, b"a", entropy().randbytes).message)
    with pytest.raises(HandshakeError) as refused:
        init.finish(forged.write_message(b"y"))
    assert refused.value.reason == "auth"


@given(st.data())
def test_any_flipped_bit_or_truncation_of_a_first_message_is_refused(data: st.DataObject) -> None:
    message = bytearray(Initiator(PSK, b"claim", entropy().randbytes).message)
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(message) * 8 - 1))
        message[bit // 8] ^= 1 << (bit % 8)
    else:
        message = message[:data.draw(st.integers(0, len(message) - 1))]
    with pytest.raises(HandshakeError):
        respond(PSK, bytes(message), lambda _: b"", entropy().randbytes)


def test_ephemeral_keys_differ_per_handshake_so_sessions_differ() -> None:
    rng = entropy(9)
    transcripts = set()
    for _ in range(3):
        init = Initiator(PSK, b"a", rng.randbytes)
        _, answer, _ = respond(PSK, init.message, lambda _: b"b", rng.randbytes)
        transcripts.add(init.finish(answer)[1].transcript)
    assert len(transcripts) == 3


def test_the_password_key_is_memory_hard_and_deterministic() -> None:
    assert derive_psk(b"secret") == derive_psk(b"secret") != derive_psk(b"secret2")
    assert len(derive_psk(b"secret")) == 32
    with pytest.raises(ValueError):
        derive_psk(b"")


def test_claims_round_trip_and_malformed_ones_are_refused() -> None:
    claim = Claim(PeerName("02:00:00:00:00:01"), PeerUID(7), 0xDEADBEEF, 123, True)
    assert decode_claim(encode_claim(claim)) == claim
    for bad in (b"", b"\x90", b"\x95\xc4\x06abcdef\x01\x02\x03\x04", b"\xff" * 300):
        with pytest.raises(HandshakeError):
            decode_claim(bad)


def test_key_material_never_shows_in_repr() -> None:
    init = Initiator(PSK, b"a", entropy().randbytes)
    _, _, keys = respond(PSK, init.message, lambda _: b"b", entropy(5).randbytes)
    assert keys.control_send.hex() not in repr(keys) and keys.sleeve_send.hex() not in repr(keys)


def test_a_forged_answer_leaves_the_handshake_able_to_take_the_real_one() -> None:
    init = Initiator(PSK, b"a", entropy(6).randbytes)
    _, real, _ = respond(PSK, init.message, lambda _: b"b", entropy(7).randbytes)
    forged = bytes(32) + bytes(range(40))
    with pytest.raises(HandshakeError):
        init.finish(forged)
    with pytest.raises(HandshakeError):
        init.finish(real[:32] + bytes(len(real) - 32))  # the real ephemeral, a broken seal
    assert init.finish(real)[0] == b"b"
