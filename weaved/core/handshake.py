"""The authenticated handshake: Noise ``NNpsk0`` over X25519, ChaCha20-Poly1305 and SHA-256.

Theory of operation
-------------------
Every member of a mesh knows one password; :func:`derive_psk` turns it, once at start, into a 32-byte
pre-shared key with scrypt (memory-hard, so a captured handshake cannot be brute-forced cheaply). Two
peers then run the Noise pattern ``NNpsk0``::

    -> psk, e          initiator: the PSK is mixed in first, so its payload is already sealed
    <- e, ee           responder: a fresh ephemeral of its own; ee gives forward secrecy

Mutual authentication comes from the PSK (only a member can produce a first message that opens, and only
a member can answer one so that it opens); forward secrecy from the two ephemeral X25519 keys, new for
every handshake: a password that leaks later does not open traffic recorded before. The payloads carry
who the peer claims to be (name, UID) and, in the first message, a *stamp* that grows with every
handshake the initiator makes (wall-clock milliseconds at start, then +1): a responder remembers the
highest stamp per peer name and drops a first message that is not newer, so a recorded handshake cannot
be replayed to displace a live session.

:func:`split` gives each direction its own control key, plus a second pair for the sleeve (derived from
the final chaining key under a label, Noise's "additional keys" idea), so the control and data counters
never share a nonce space. Everything here is computation: the ephemeral private key comes from the
caller's entropy, the primitives from ``cryptography`` (OpenSSL). The pattern is cross-checked against an
independent Noise implementation in ``tests/unit/test_handshake.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from weaved.core.codec import StrictReader
from weaved.core.seal import KEY_SIZE, TAG_SIZE, nonce
from weaved.core.types import UID_MAX, PeerName, PeerUID, peer_name_to_bytes

PROTOCOL_NAME: Final = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
PROLOGUE: Final = b"weaved handshake v1"
DH_SIZE: Final = 32
HASH_SIZE: Final = 32
SCRYPT_SALT: Final = b"weaved mesh password v1"
"""Fixed: every member must derive the same key from the same password, with no prior exchange."""
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
"""32 MiB and ~0.1 s per derivation here: paid once per start, by every guess of an attacker."""
SLEEVE_LABEL: Final = b"weaved sleeve keys v1"
MAX_PAYLOAD: Final = 256

Entropy = Callable[[int], bytes]
"""``n -> n random bytes``: ``os.urandom`` in the daemon, a seeded generator in the simulated network."""


class HandshakeError(Exception):
    """A handshake message that does not open or does not parse; ``reason`` labels the drop."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def derive_psk(password: bytes) -> bytes:
    """The mesh key from the password (scrypt). Raises ValueError for an empty password."""
    if not password:
        raise ValueError("the password is empty")
    return hashlib.scrypt(password, salt=SCRYPT_SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=64 * 1024 * 1024, dklen=KEY_SIZE)


def _hkdf(chaining_key: bytes, material: bytes, outputs: int) -> list[bytes]:
    """Noise's HKDF: RFC 5869 with the chaining key as salt and no info, ``outputs`` blocks of 32 bytes."""
    okm = HKDF(algorithm=hashes.SHA256(), length=HASH_SIZE * outputs, salt=chaining_key, info=b"").derive(material)
    return [okm[i * HASH_SIZE:(i + 1) * HASH_SIZE] for i in range(outputs)]


class _Symmetric:
    """Noise's SymmetricState (with its CipherState folded in): the transcript hash and the chaining key."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self) -> None:
        self.h = hashlib.sha256(PROTOCOL_NAME).digest() if len(PROTOCOL_NAME) > HASH_SIZE \
            else PROTOCOL_NAME.ljust(HASH_SIZE, b"\0")
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(PROLOGUE)

    def copy(self) -> _Symmetric:
        twin = _Symmetric.__new__(_Symmetric)
        twin.ck, twin.h, twin.k, twin.n = self.ck, self.h, self.k, self.n
        return twin

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, material: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, material, 2)
        self.n = 0

    def mix_key_and_hash(self, material: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, material, 3)
        self.mix_hash(temp_h)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None  # NNpsk0 mixes the PSK first: there is always a key
        ciphertext = ChaCha20Poly1305(self.k).encrypt(nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            plaintext = ChaCha20Poly1305(self.k).decrypt(nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("auth", "does not open: wrong or missing password") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """What a finished handshake gives one side: a key per direction for control and for the sleeve."""

    control_send: bytes
    control_recv: bytes
    sleeve_send: bytes
    sleeve_recv: bytes
    transcript: bytes
    """The handshake hash: the same on both sides, unique per handshake (channel binding, tests)."""

    def __repr__(self) -> str:
        return f"SessionKeys(transcript={self.transcript[:4].hex()}…)"


def _split(sym: _Symmetric, initiator: bool) -> SessionKeys:
    first, second = _hkdf(sym.ck, b"", 2)
    sleeve_first, sleeve_second = _hkdf(sym.ck, SLEEVE_LABEL, 2)
    if initiator:
        return SessionKeys(first, second, sleeve_first, sleeve_second, sym.h)
    return SessionKeys(second, first, sleeve_second, sleeve_first, sym.h)


def _private(entropy: Entropy) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(entropy(DH_SIZE))


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise HandshakeError("bad-handshake", "degenerate ephemeral key") from None


class Initiator:
    """Our side of a handshake we start: :attr:`message` goes out, :meth:`finish` takes the answer."""

    __slots__ = ("_e", "_sym", "message")

    def __init__(self, psk: bytes, payload: bytes, entropy: Entropy) -> None:
        self._sym = _Symmetric()
        self._sym.mix_key_and_hash(psk)
        self._e = _private(entropy)
        e_pub = _public(self._e)
        self._sym.mix_hash(e_pub)
        self._sym.mix_key(e_pub)
        self.message = e_pub + self._sym.encrypt_and_hash(payload)

    def finish(self, message: bytes) -> tuple[bytes, SessionKeys]:
        """The responder's payload and the session keys. Raises :class:`HandshakeError` and then stays as
        it was: a forged answer (the INIT's index travels in clear) must not spoil the real one after it."""
        message = bytes(message)
        if len(message) < DH_SIZE + TAG_SIZE:
            raise HandshakeError("short")
        sym = self._sym.copy()
        re = message[:DH_SIZE]
        sym.mix_hash(re)
        sym.mix_key(re)
        sym.mix_key(_dh(self._e, re))
        payload = sym.decrypt_and_hash(message[DH_SIZE:])
        return payload, _split(sym, initiator=True)


def respond(psk: bytes, message: bytes, payload_for: Callable[[bytes], bytes],
            entropy: Entropy) -> tuple[bytes, bytes, SessionKeys]:
    """Answer a first message: ``(initiator's payload, our answer, session keys)``.

    ``payload_for`` sees the initiator's payload (already authenticated) and returns ours, so the answer
    can depend on who asked. Raises :class:`HandshakeError` (``auth`` for a wrong or missing password)."""
    message = bytes(message)
    if len(message) < DH_SIZE + TAG_SIZE:
        raise HandshakeError("short")
    sym = _Symmetric()
    sym.mix_key_and_hash(psk)
    ie = message[:DH_SIZE]
    sym.mix_hash(ie)
    sym.mix_key(ie)
    their_payload = sym.decrypt_and_hash(message[DH_SIZE:])
    e = _private(entropy)
    e_pub = _public(e)
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    sym.mix_key(_dh(e, ie))
    answer = e_pub + sym.encrypt_and_hash(payload_for(their_payload))
    return their_payload, answer, _split(sym, initiator=False)


# --- payloads -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a handshake's sender says it is, what it wants, and (first message) how fresh the handshake is.

    ``index`` is the sender's session index for this handshake (repeated inside the seal so that the clear
    copy cannot be swapped); ``trusts_you`` says the sender counts the other side's address among its
    trusted subnets (data then goes unsealed when both say so)."""

    name: PeerName
    uid: PeerUID
    index: int
    stamp: int
    trusts_you: bool


_READ = StrictReader(HandshakeError)


def encode_claim(claim: Claim) -> bytes:
    data: bytes = msgpack.packb([peer_name_to_bytes(claim.name), claim.uid, claim.index, claim.stamp,
                                 claim.trusts_you], use_bin_type=True)
    return data


def decode_claim(data: bytes) -> Claim:
    """Parse a payload that already opened (so it came from a member); still strictly checked."""
    raw = _READ.unpack(data, max_size=MAX_PAYLOAD, max_str=MAX_PAYLOAD, max_array=8)
    fields = _READ.array(raw, "claim", 8)
    _READ.need(len(fields) >= 5, "bad-field", "claim arity")
    _READ.need(type(fields[4]) is bool, "bad-field", "trusts_you")
    return Claim(_READ.name(fields[0], "name"), PeerUID(_READ.integer(fields[1], 0, UID_MAX, "uid")),
                 _READ.integer(fields[2], 0, 0xFFFFFFFF, "index"), _READ.integer(fields[3], 0, UID_MAX, "stamp"),
                 fields[4])
