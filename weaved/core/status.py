"""Immutable status snapshot of a mesh peer, behind ``weaved status``, ``/report`` and the metrics.

The snapshot is plain data (strings, ints, bools, lists, dicts) so that ``/report`` is just
:func:`dataclasses.asdict` of it and the CLI can rebuild it from JSON with :meth:`MeshStatus.from_json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConnectionStatus:
    """One of our connections or connection attempts, as ``weave status connections`` shows it."""

    address: str
    outbound: bool
    state: str
    """``connecting`` | ``pending`` | ``established`` | ``failed`` (a target waiting for its next attempt)"""
    peer_name: str | None
    peer_nickname: str | None
    info: str
    """Why it is in this state (error text, ``retry in 4.1s``, negotiated version …)."""


@dataclass(frozen=True)
class PeerConnectionStatus:
    """A connection as published in a peer's gossiped entry."""

    remote_name: str
    remote_nickname: str | None
    address: str
    outbound: bool
    established: bool


@dataclass(frozen=True)
class PeerStatus:
    """One peer of the topology as we know it."""

    name: str
    nickname: str
    uid: int
    version: int
    short_id: int
    connections: list[PeerConnectionStatus]
    next_hop: str | None
    """Name of the neighbour we send through to reach it (itself when direct, None for us)."""


@dataclass(frozen=True)
class MeshStatus:
    name: str
    nickname: str
    uid: int
    short_id: int
    protocol: str
    port: int
    conn_limit: int
    peers: list[PeerStatus]
    connections: list[ConnectionStatus]
    targets: list[str]
    counters: dict[str, int] = field(default_factory=dict)
    ready: bool = True
    encryption: str = "disabled"
    """``enabled`` with a password: every connection authenticated, sealed, data encrypted (see security.md)."""
    trusted_subnets: list[str] = field(default_factory=list)
    """Subnets whose peers get unsealed sleeve data when they trust us too (``--trusted-subnets``)."""
    """``enabled`` with a password: every connection authenticated, sealed, data encrypted (see security.md)."""

    @property
    def established(self) -> int:
        return sum(1 for c in self.connections if c.state == "established")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeshStatus:
        peers = [
            PeerStatus(**{**p, "connections": [PeerConnectionStatus(**c) for c in p["connections"]]})
            for p in data["peers"]
        ]
        conns = [ConnectionStatus(**c) for c in data["connections"]]
        return cls(**{**data, "peers": peers, "connections": conns})
