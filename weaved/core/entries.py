"""The gossiped facts about one peer: who it is and which connections it has.

An entry is immutable; a peer publishes a new one (with a higher version) whenever its connections
change. Entries are shared between the topology, the wire codec and the status snapshot, so they live
in their own module with no behaviour beyond ordering.
"""

from __future__ import annotations

from dataclasses import dataclass

from weaved.core.types import Endpoint, PeerName, PeerUID, ShortID


@dataclass(frozen=True, slots=True)
class ConnectionEntry:
    """One side's view of a connection: the remote peer, the address used, and its state."""

    remote: PeerName
    address: Endpoint
    outbound: bool
    established: bool


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """A peer's published state. Newer means higher ``(version, uid)``: see :meth:`supersedes`."""

    name: PeerName
    nickname: str
    uid: PeerUID
    version: int
    short_id: ShortID
    connections: tuple[ConnectionEntry, ...]

    @property
    def order_key(self) -> tuple[int, int]:
        """Total order among entries of one name; merge keeps the maximum, so it is a CRDT join.

        The UID breaks ties so that two incarnations that reached the same version still agree
        everywhere on one winner; the live incarnation then bumps its version past the other.
        """
        return (self.version, self.uid)

    def supersedes(self, other: PeerEntry | None) -> bool:
        """True when this entry should replace ``other`` (which describes the same name).

        Two different entries at one (version, uid) come only from a faulty peer; comparing their
        contents still picks the same one everywhere, so merge stays commutative even then."""
        if other is None:
            return True
        if self.order_key != other.order_key:
            return self.order_key > other.order_key
        return self != other and self._content_key() > other._content_key()

    def _content_key(self) -> tuple[object, ...]:
        return (self.nickname, self.short_id,
                tuple((c.remote, c.address.host, c.address.port, c.outbound, c.established)
                      for c in self.connections))

    def label(self) -> str:
        return f"{self.name}({self.nickname})"
