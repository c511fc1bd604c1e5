"""Sealing primitives shared by the control plane and the sleeve: nonces, replay windows, data keys.

Theory of operation
-------------------
With a password every datagram a peer sends after the handshake (:mod:`weaved.core.handshake`) is sealed
with an AEAD under a key of its own direction, and the nonce is a 64-bit counter that the sender never
repeats under one key. The receiver keeps a sliding :class:`ReplayWindow` per key: a counter it has seen,
or one that fell more than :data:`REPLAY_WINDOW` behind the highest seen, is dropped (``replay``), so a
captured datagram replayed later does nothing, while the reordering that UDP and GSO batches cause does
not cost a packet. A counter is marked seen only *after* the AEAD tag verified: a forged datagram with a
huge counter must not advance the window.

The nonce layout is WireGuard's: 4 zero bytes then the counter, little-endian (:func:`nonce`). Counters
are per key and keys are per handshake, so a restart (a new handshake, new keys) never reuses a nonce.

:class:`SleeveKeys` is what the data path gets per neighbour: the keys the handshake derived for sleeve
frames (separate from the control keys, so the control and data counters never share a nonce space), and
the 32-bit key ids that name them on the wire. Pure: no I/O; the AEAD itself comes from ``cryptography``
(OpenSSL), never written here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

REPLAY_WINDOW: Final = 4096
"""Counters this far behind the highest one seen are still accepted once (WireGuard keeps 2,048+)."""
COUNTER_LIMIT: Final = (1 << 64) - (1 << 13) - 1
"""A sender stops using a key before its counter gets here (WireGuard's REJECT_AFTER_MESSAGES)."""
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
_NONCE = struct.Struct("<4xQ")


def nonce(counter: int) -> bytes:
    """The 12-byte AEAD nonce for ``counter``: 4 zero bytes, then the counter little-endian."""
    return _NONCE.pack(counter)


class ReplayWindow:
    """Which counters of one key were already accepted, over the last :data:`REPLAY_WINDOW` of them.

    Two steps, so that only authenticated datagrams move the window: :meth:`fresh` before opening (cheap
    reject of replays and of counters far behind), :meth:`mark` after the tag verified."""

    __slots__ = ("_bits", "highest")

    def __init__(self) -> None:
        self.highest = -1
        """The highest counter accepted so far (-1: none)."""
        self._bits = 0
        """Bit ``i`` set: counter ``highest - i`` was accepted."""

    def fresh(self, counter: int) -> bool:
        """Whether ``counter`` may still be accepted: not seen, not too far behind, below the limit."""
        if counter >= COUNTER_LIMIT or counter < 0:
            return False
        if counter > self.highest:
            return True
        behind = self.highest - counter
        return behind < REPLAY_WINDOW and not (self._bits >> behind) & 1

    def mark(self, counter: int) -> bool:
        """Record ``counter`` as accepted; False (and nothing recorded) if it was not :meth:`fresh`."""
        if not self.fresh(counter):
            return False
        if counter > self.highest:
            shift = counter - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.highest = counter
        else:
            self._bits |= 1 << (self.highest - counter)
        return True


@dataclass(frozen=True, slots=True)
class SleeveKeys:
    """One neighbour's sleeve keys from one handshake, as the data path uses them.

    A sealed frame names the key that opens it by the *receiver's* id: we put ``send_id`` (the id the
    neighbour chose) in frames we send, and find ``recv_key`` by ``recv_id`` (the id we chose) in frames we
    receive. Ids are random per handshake and unique among our live sessions."""

    recv_id: int
    send_id: int
    send_key: bytes
    recv_key: bytes

    def __repr__(self) -> str:  # never print key material in logs or tracebacks
        return f"SleeveKeys(recv_id={self.recv_id:#010x}, send_id={self.send_id:#010x})"


@dataclass(frozen=True, slots=True)
class PeerSleeveKeys:
    """A neighbour's sleeve keys: the newest session (what we send with) and the one before it, which
    still opens frames for a short while after a rekey (frames in flight, the peer not switched yet)."""

    current: SleeveKeys
    previous: SleeveKeys | None = None
