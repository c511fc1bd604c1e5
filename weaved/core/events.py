"""Events the mesh core reports to its adapter: what an operator wants to read in the logs.

The core never logs; it returns these, and the daemon turns each into one structured log line (and
metrics). Keeping them as data lets the simulated-network tests assert on them too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    """A connection (or attempt) to ``address`` moved from ``old`` to ``new``."""

    address: str
    peer: str | None
    """``name(nickname)`` once the handshake told us who is there."""
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """A peer became reachable over the mesh (directly or through relays)."""

    name: str
    nickname: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """A peer is no longer reachable and was removed from the topology."""

    name: str
    nickname: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """A known peer came back with a new UID (a new incarnation supersedes the old entry)."""

    name: str
    nickname: str


@dataclass(frozen=True, slots=True)
class NameCollision:
    """Another live peer uses our name (a cloned machine id): it is refused, never retried."""

    address: str
    name: str
    nickname: str


@dataclass(frozen=True, slots=True)
class RelayDelivered:
    """An application payload routed over the mesh reached us (unicast to us, or broadcast)."""

    src: str
    channel: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """A host at ``address`` could not complete an authenticated handshake with us (reported at most once a
    minute per address and reason): a wrong password, or one side has a password and the other none."""

    address: str
    reason: str


MeshEvent = (
    ConnectionStateChanged | PeerJoined | PeerLeft | PeerRestarted | NameCollision | RelayDelivered | AuthFailed
)
